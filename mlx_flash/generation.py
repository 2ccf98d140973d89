"""Generation: a thin layer over mlx-lm's `stream_generate` that carries our stats."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import GenerationResponse
from mlx_lm.generate import stream_generate as _mlx_stream_generate
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from . import platform

# The embedded demo model, shipped in the repository (never read from ../shared).
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "opt-tiny"


def stream_generate(
    model,
    tokenizer,
    prompt: str | list[int],
    max_tokens: int = 256,
    temp: float = 0.0,
    top_p: float = 0.0,
    repetition_penalty: float | None = None,
    seed: int | None = None,
) -> Iterator[GenerationResponse]:
    """Yield mlx-lm `GenerationResponse`s for `prompt` (text or token ids)."""
    if seed is not None:
        mx.random.seed(seed)
    yield from _mlx_stream_generate(
        model,
        tokenizer,
        prompt,
        max_tokens=max_tokens,
        sampler=make_sampler(temp=temp, top_p=top_p),
        logits_processors=make_logits_processors(repetition_penalty=repetition_penalty),
    )


def flash_stats(model) -> dict:
    """The model's flash figures (empty for a dense model), peak RSS and the budget in use."""
    stats = dict(model.flash_stats()) if hasattr(model, "flash_stats") else {}
    stats.pop("tokens_per_s", None)  # mlx-lm's end-to-end figure is the one reported
    budget = getattr(model, "flash_budget", None)
    if budget:
        stats["memory_budget_bytes"] = budget["total"]
        stats["neuron_cache_rows_per_layer"] = budget["capacity"]
    stats["peak_rss_bytes"] = platform.peak_rss_bytes()
    return stats


def generate(
    model,
    tokenizer,
    prompt: str | list[int],
    max_tokens: int = 256,
    on_text: Callable[[str], None] | None = None,
    **kwargs,
) -> dict:
    """Run to the end; return `{"text", "tokens", "stats"}`. `on_text` receives each new piece."""
    pieces, tokens, last = [], [], None
    tic = time.perf_counter()
    for last in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, **kwargs):
        if last.finish_reason != "stop":
            tokens.append(int(last.token))
        pieces.append(last.text)
        if on_text and last.text:
            on_text(last.text)
    stats = {"mode": getattr(model, "flash_mode", "dense"), "wall_s": round(time.perf_counter() - tic, 4)}
    if last is not None:
        stats.update(
            prompt_tokens=last.prompt_tokens,
            generation_tokens=len(tokens),
            prompt_tps=round(last.prompt_tps, 2),
            tokens_per_s=round(last.generation_tps, 2),
            finish_reason=last.finish_reason,
        )
    stats.update(flash_stats(model))
    return {"text": "".join(pieces), "tokens": tokens, "stats": stats}
