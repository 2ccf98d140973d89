"""Perplexity of any mlx-lm style model (dense or flash) over a text file, in fixed windows."""

from __future__ import annotations

import math
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from .errors import FlashError
from .generation import new_cache

DEFAULT_SEQ_LEN = 256
BATCH_WINDOWS = 4  # windows per forward pass when not token by token


def read_tokens(tokenizer, data: str | Path, max_tokens: int | None = None) -> list[int]:
    """Token ids of the UTF-8 text file `data` (the first `max_tokens`: only as much of the file
    as they need is tokenized)."""
    data = Path(data)
    if not data.is_file():
        raise FlashError(f"{data}: no such file (--data expects a UTF-8 text file)")
    try:
        text = data.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FlashError(f"{data}: not UTF-8 text ({e})") from None
    if max_tokens is None:
        return _encode(tokenizer, text)
    chars = max(1, max_tokens) * 6
    while True:
        ids = _encode(tokenizer, text[:chars])
        if len(ids) > max_tokens or chars >= len(text):
            return ids[:max_tokens]
        chars *= 2


def _encode(tokenizer, text: str) -> list[int]:
    """tokenizer.encode without transformers' warning about sequences longer than the model's
    context (we cut the ids into windows ourselves)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return tokenizer.encode(text)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return tokenizer.encode(text)
    finally:
        hf_logging.set_verbosity(level)


def _nll(logits: mx.array, targets: mx.array) -> mx.array:
    """Summed negative log-likelihood of `targets` (...,) under `logits` (..., vocab)."""
    logits = logits.astype(mx.float32)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return (mx.logsumexp(logits, axis=-1) - picked).sum()


def perplexity(
    model,
    tokenizer,
    data: str | Path,
    seq_len: int = DEFAULT_SEQ_LEN,
    max_tokens: int | None = None,
    progress: bool = True,
    token_by_token: bool = False,
) -> dict:
    """Perplexity over the text file `data`, cut into non-overlapping windows of `seq_len` tokens.

    Each window starts from a fresh KV cache and scores its last `seq_len - 1` tokens; a tail
    shorter than a window is dropped (unless the file holds less than one window). With
    `token_by_token`, each window runs one token at a time through the KV cache, exercising the
    decode path (what a flash model does per token); otherwise whole windows run at once.
    Returns `perplexity`, `tokens` (scored), `tokens_per_s`, `windows`, `window`.
    """
    if seq_len < 2:
        raise FlashError(f"--seq-len must be >= 2 tokens (got {seq_len})")
    ids = read_tokens(tokenizer, data, max_tokens)
    if len(ids) < 2:
        raise FlashError(f"{data}: {len(ids)} tokens, need at least 2 for a perplexity")
    count = max(1, len(ids) // seq_len)
    size = min(seq_len, len(ids))
    windows = np.asarray(ids[: count * size], dtype=np.int32).reshape(count, size)
    total, scored = 0.0, 0
    tic = time.perf_counter()
    bar = tqdm(total=windows.size, desc="perplexity", unit="tok", disable=not progress,
               leave=False)
    if token_by_token:
        for row in windows:
            cache = new_cache(model)
            for t in range(size - 1):
                logits = model(mx.array(row[None, t : t + 1]), cache=cache)  # (1, 1, vocab)
                nll = _nll(logits[0, -1], mx.array(row[t + 1]))
                mx.eval(nll)
                total += nll.item()
                bar.update()
            scored += size - 1
            bar.update()
    else:
        for start in range(0, count, BATCH_WINDOWS):
            batch = mx.array(windows[start : start + BATCH_WINDOWS])
            nll = _nll(model(batch)[:, :-1], batch[:, 1:])
            total += nll.item()
            scored += batch.shape[0] * (size - 1)
            bar.update(batch.size)
    bar.close()
    return {
        "perplexity": round(math.exp(total / scored), 4),
        "tokens": scored,
        "tokens_per_s": round(scored / (time.perf_counter() - tic), 2),
        "windows": count,
        "window": size,  # tokens per window (`seq_len`)
    }
