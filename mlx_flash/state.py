"""What a loaded model carries about flash: `model.flash`, a `FlashState`, and its figures.

Every loader of this package sets `model.flash`: the mode, the memory budget (a flash dir's), the
runtime (None when every weight is in memory) and the counters. Generation, chat, batch, bench and
the CLI read it through `state_of(model)`, which also covers a plain mlx-lm model.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import platform
from .storage import ReadStats
from .units import mib

if TYPE_CHECKING:
    from .ffn_shared import FlashRuntime
    from .memory import Budget


@dataclass
class FlashStats:
    """Counters of one model: decode tokens give the per-token figures; prefill is kept apart."""

    tokens: int = 0  # decode tokens (layer-0 decode calls)
    timed_tokens: int = 0  # of those, the ones whose wall time is known (next token started)
    token_s: float = 0.0
    io: ReadStats = field(default_factory=ReadStats)
    io_wait_s: float = 0.0  # of io.seconds, what the decode waited for (the rest overlapped)
    cache_s: float = 0.0
    predict_s: float = 0.0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    overflow: int = 0  # active neurons read past the cache because it was full
    computed: int = 0  # neurons the decode computed: the cached ones and the overflow
    guessed: int = 0  # MoE lookahead: experts guessed for the next layer
    guessed_right: int = 0  # of those, the ones its router then chose (dense: records used)
    needed: int = 0  # dense lookahead: records the guessed layers loaded (read early or not)
    prefill_tokens: int = 0
    prefill_io: ReadStats = field(default_factory=ReadStats)
    last_token_start: float | None = None
    ranks: tuple = ()  # rank 0 of a pipeline: the counters of ranks 1.. (distributed.py)

    def token_boundary(self) -> None:
        """A decode token's first layer starts: the time since the last one's start is a
        token's (the first token's is not known)."""
        now = time.perf_counter()
        if self.last_token_start is not None:
            self.timed_tokens += 1
            self.token_s += now - self.last_token_start
        self.last_token_start = now
        self.tokens += 1

    def since(self, before: FlashStats) -> FlashStats:
        """The counts accumulated after the snapshot `before`."""
        delta = {f.name: None if f.name == "last_token_start"
                 else getattr(self, f.name) - getattr(before, f.name)
                 for f in dataclasses.fields(self) if f.name != "ranks"}
        ranks = tuple(a.since(b) for a, b in zip(self.ranks, before.ranks, strict=False))
        return FlashStats(**delta, ranks=ranks)

    def per_token(self) -> dict:
        """Figures per decode token (what `--json` and `bench` print)."""
        n = max(self.tokens, 1)
        io_ms, cache_ms = 1000 * self.io.seconds / n, 1000 * self.cache_s / n
        wait_ms = 1000 * self.io_wait_s / n
        predict_ms = 1000 * self.predict_s / n
        token_ms = 1000 * self.token_s / self.timed_tokens if self.timed_tokens else None
        looked_up = self.hits + self.misses
        return {
            "decode_tokens": self.tokens,
            "flash_bytes_per_token": round(self.io.bytes / n),
            "read_requests_per_token": round(self.io.requests / n, 2),
            "read_gb_per_s": round(self.io.gb_per_s, 3),
            "io_ms_per_token": round(io_ms, 3),
            "io_wait_ms_per_token": round(wait_ms, 3),
            "cache_ms_per_token": round(cache_ms, 3),
            "predict_ms_per_token": round(predict_ms, 3),
            "compute_ms_per_token": None if token_ms is None
            else round(max(token_ms - wait_ms - cache_ms - predict_ms, 0.0), 3),
            "lookahead_hit_rate": round(self.guessed_right / self.guessed, 4)
            if self.guessed else None,
            # of the records the layers loaded, the share the lookahead had read (dense)
            "lookahead_recall": round(self.guessed_right / self.needed, 4) if self.needed else None,
            "token_ms": None if token_ms is None else round(token_ms, 3),
            "tokens_per_s": None if token_ms is None else round(1000 / token_ms, 2),
            "cache_hit_rate": round(self.hits / looked_up, 4) if looked_up else None,
            "evictions_per_token": round(self.evictions / n, 2),
            "overflow_neurons_per_token": round(self.overflow / n, 2),
            "computed_neurons_per_token": round(self.computed / n, 2),
            "prefill_tokens": self.prefill_tokens,
            "prefill_flash_bytes": self.prefill_io.bytes,
        }


@dataclass
class FlashState:
    """How a model was loaded: `mode`, the memory `budget` (flash dirs only), the `runtime`
    streaming its FFNs (None when every weight is in memory) and `capacity`, the neuron-cache
    rows per layer it holds, `max_context` the tokens of context it was loaded for."""

    mode: str = "dense"
    budget: Budget | None = None
    runtime: FlashRuntime | None = None
    capacity: int | None = None
    max_context: int | None = None  # tokens the KV cache may hold (None: the model's limit)
    base_rss_bytes: int | None = None  # the process's RSS before the model loaded
    pipeline: Any = None  # rank 0 under `mlx.launch`: distributed.Pipeline (the other ranks)
    note: str | None = None  # why `auto` chose this mode, where the user should know

    @property
    def streaming(self) -> bool:
        return self.runtime is not None

    def counters(self) -> FlashStats | None:
        """A snapshot of the counters (None when nothing streams), for `stats(since=...)`."""
        if self.pipeline is not None:  # with the other ranks' counters
            return self.pipeline.counters(self.runtime)
        return None if self.runtime is None else dataclasses.replace(self.runtime.stats)

    def stats(self, since: FlashStats | None = None) -> dict:
        """The per-token flash figures (none when nothing streams), the budget and peak RSS.

        `since`: a `counters()` snapshot; the figures then cover only what came after it.
        """
        out = {}
        if self.runtime is not None:
            counters = self.runtime.stats
            out = (counters.since(since) if since is not None else counters).per_token()
            out.pop("tokens_per_s")  # mlx-lm's end-to-end figure is the one reported
        if self.budget is not None:
            out["memory_budget_bytes"] = self.budget.total
            out["neuron_cache_rows_per_layer"] = (self.capacity if self.capacity is not None
                                                  else self.budget.capacity)
        out["peak_rss_bytes"] = platform.peak_rss_bytes()
        if self.base_rss_bytes is not None:  # Python, MLX and the tokenizer's libraries
            out["base_rss_bytes"] = self.base_rss_bytes
        if self.runtime is not None:
            out["reader_threads"] = self.runtime.reader.threads
            out["reader_profile"] = self.runtime.reader_profile
        if self.pipeline is not None:  # distributed_world_size, each rank's layers and figures
            out.update(self.pipeline.stats(self, since))
        return out


def state_of(model) -> FlashState:
    """`model.flash`, or a dense state for a model this package did not load."""
    state = getattr(model, "flash", None)
    return state if isinstance(state, FlashState) else FlashState()


def stats_line(s: dict, detail: bool = False) -> str:
    """The one-line summary after a generation: tokens, tok/s and, on a flash model, bytes per
    token and the cache hit rate; `detail` adds mode, reads, the time split, budget, peak RSS."""
    tokens, tps = s.get("generation_tokens", 0), s.get("tokens_per_s")
    parts = [f"{tokens} tokens"]
    if tokens and tps:  # no figure for nothing generated (a rate of 0 tokens is noise)
        parts.append(f"{tps:.1f} tok/s")
    if "prefilled_tokens" in s:
        parts.append(f"prefill {s['prefilled_tokens']}")
    if s.get("distributed_world_size"):  # the figures after it are rank 0's own
        total = s.get("distributed_flash_bytes_per_token")
        flash = f"flash {mib(total)}/token in all; " if total is not None else ""
        parts.append(f"{s['distributed_world_size']} ranks ({flash}the rest is rank 0's)")
    if detail:
        parts.append(f"mode {s.get('mode', 'dense')}")
    hit = s.get("cache_hit_rate")
    if s.get("flash_bytes_per_token") is not None:
        flash = f"flash {mib(s['flash_bytes_per_token'])}/token"
        if detail:
            flash += f" in {s['read_requests_per_token']:.0f} reads"
        parts.append(flash)
        if detail:
            parts.append(f"I/O {s['io_ms_per_token']:.1f} ms + cache {s['cache_ms_per_token']:.1f}"
                         f" ms + compute {s['compute_ms_per_token'] or 0:.1f} ms per token")
        if hit is not None:  # of the active neurons looked up in the cache, not of the bytes
            parts.append(f"cache hits {hit:.0%} of active neurons")
        elif detail:
            parts.append("no cache")
        if detail and s.get("memory_budget_bytes"):
            parts.append(f"budget {mib(s['memory_budget_bytes'], 1)}")
    if detail:
        rss = f"peak RSS {mib(s['peak_rss_bytes'], 0)}"
        if s.get("base_rss_bytes"):
            rss += f" ({mib(s['base_rss_bytes'], 0)} of it before the model: Python, libraries and the tokenizer)"
        parts.append(rss)
    return "[" + ", ".join(parts) + "]"
