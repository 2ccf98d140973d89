"""The routed experts of an mlx-lm MoE dir, streamed from its own safetensors (direct.py loads
the model and puts a `StreamedExperts` in place of each `SwitchGLU`/`SwitchMLP`).

- Decode (one token): each chosen expert is made resident in one of the layer's `slots` (its
  projections' (experts, out, in) weights, scales and biases become (slots, out, in) arrays; the
  least recently used expert leaves first), and mlx-lm's own module multiplies over the slots
  with each chosen expert mapped to its slot.
- Lookahead (decode): layer l applies layer l+1's router to its own input, and the experts that
  guess names and layer l+1 lacks are read in a background thread while layer l computes, into a
  buffer of one token's experts; layer l+1 copies the ones its router really chose from there and
  reads the rest itself. A wrong guess costs bandwidth, never correctness.
- Prefill (many tokens): expert-major; the experts any token chose pass through the slots a
  cache-full at a time, each group's tokens multiplied together.

In mlx-lm's stacked tensors expert e's weight, scales and biases are each one contiguous slice
(bytes e*S .. (e+1)*S of the tensor): a miss reads those slices (`spans.SpanReader`: widened
to the direct-I/O blocks around them, copied out).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .dtypes import to_float32
from .spans import SpanReader
from .state import FlashStats
from .storage import ReadStats


class DirectRuntime:
    """What the `StreamedExperts` of one model share: the reader, the lookahead, the counters."""

    def __init__(self, reader: SpanReader, top_k: int, naive: bool = False):
        self.mode = "naive" if naive else "routed"
        self.naive = naive  # benchmarks: every routed expert read at every step
        self.window = 1
        self.reader = reader
        self.top_k = top_k
        self.stats = FlashStats()
        self.layers: list[StreamedExperts] = []
        self.lookahead: ExpertLookahead | None = None
        self.reader_profile = "defaults (no probe profile for this volume)"

    def close(self) -> None:
        if self.lookahead is not None:
            self.lookahead.close()
        self.reader.close()


class _Slice:
    """One stacked tensor of a layer's experts: where expert e's bytes lie, and the cache's
    (slots, ...) copy of it (numpy bytes view, and the MLX array the module multiplies).

    `widen`: 16-bit values held as float32 (quantized experts' scales and biases on MLX's CPU
    backend, whose `gather_qmm` is ~35x faster in float32, moe.py); read into `stage` first."""

    def __init__(self, where: tuple[int, int, int, tuple[int, ...]], like: mx.array, slots: int,
                 widen: bool, stage_rows: int):
        self.file, self.offset, nbytes, shape = where
        self.bytes = nbytes // shape[0]
        self.widen = widen and like.dtype in (mx.float16, mx.bfloat16)
        self.dtype = "float16" if like.dtype == mx.float16 else "bfloat16"
        held = self.bytes * (2 if self.widen else 1)
        raw = mx.zeros((slots, held), dtype=mx.uint8)
        mx.eval(raw)
        self.view = np.array(raw, copy=False)  # (slots, bytes): reads land here
        self.stage = np.empty((stage_rows, self.bytes), np.uint8) if self.widen else None
        target = mx.float32 if self.widen else like.dtype
        self.array = raw.view(target).reshape(slots, *shape[1:])
        mx.eval(self.array)

    def span(self, expert: int) -> int:
        """Where expert `expert`'s bytes start in the file."""
        return self.offset + expert * self.bytes

    def target(self, slot: int, j: int) -> np.ndarray:
        """Where the read of the j-th expert of a batch going to `slot` lands."""
        return self.stage[j] if self.widen else self.view[slot]

    def settle(self, slots: np.ndarray) -> None:
        """Widen the staged experts of a batch into their slots."""
        if self.widen:
            for j, slot in enumerate(slots.tolist()):
                self.view[slot] = to_float32(self.stage[j].view("<u2"), self.dtype).view(np.uint8)


class _Cache:
    """Which expert each slot holds and when each was last used (the LRU's bookkeeping)."""

    def __init__(self, experts: int, slots: int):
        self.slot_of = np.full(experts, -1, dtype=np.int64)
        self.expert_at = np.full(slots, -1, dtype=np.int64)
        self.last = np.full(slots, -1, dtype=np.int64)


class StreamedExperts(nn.Module):
    """mlx-lm's `SwitchGLU`/`SwitchMLP` of one MoE layer over a cache of its experts;
    `__call__(x, indices)` as the module's own."""

    def __init__(self, inner: nn.Module, position: int, slots: int, where: dict,
                 rt: DirectRuntime):
        super().__init__()
        self.inner = inner
        self._rt, self._position, self.slots = rt, position, slots
        self._step = 0
        params = tree_flatten(inner.parameters())
        self.experts = params[0][1].shape[0]
        quantized = any(name.endswith(".scales") for name, _ in params)
        self.widened = quantized and mx.default_device() == mx.cpu
        self._slices = []
        for name, array in params:  # "gate_proj.weight" -> the cache's (slots, ...) array
            widen = self.widened and name.endswith((".scales", ".biases"))
            s = _Slice(where[name], array, slots, widen, rt.top_k)
            owner, attr = _owner(inner, name)
            setattr(owner, attr, s.array)
            self._slices.append(s)
        self.expert_bytes = sum(s.bytes for s in self._slices)
        self._lru = _Cache(self.experts, slots)
        self._next: _Next | None = None  # the next MoE layer and its guess (lookahead)
        self._pending = None  # (guess, missing, future): this layer's experts read ahead

    def link(self, nxt: StreamedExperts, guess) -> None:
        """Guess `nxt`'s experts with `guess` (x -> expert ids) while this layer computes."""
        self._next = _Next(nxt, guess)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        mx.eval(x, indices)  # the router's choice decides the reads
        k = indices.shape[-1]
        x2 = x.reshape(-1, x.shape[-1])
        chosen = np.array(indices).reshape(-1, k).astype(np.int64)
        if len(x2) > 1:
            if self._pending is not None:  # a decode step's guess, not for this: let it end
                self._pending[2].result()
                self._pending = None
            return self._expert_major(x2, chosen).reshape(*indices.shape, x.shape[-1])
        t0 = time.perf_counter()
        early, ahead = ReadStats(), {}
        if self._pending is not None:  # the previous layer's guess: take what it read
            guess, missing, future = self._pending
            self._pending = None
            early = future.result()
            ahead = {int(e): j for j, e in enumerate(missing.tolist())}
            self._rt.stats.guessed += len(guess)
            self._rt.stats.guessed_right += len(np.intersect1d(guess, chosen[0]))
        wait_s = time.perf_counter() - t0
        hits, misses, evicted, io = self._ensure(np.unique(chosen[0]), ahead)
        slots = mx.array(self._lru.slot_of[chosen].astype(np.uint32)).reshape(indices.shape)
        y = self._inner(x, slots)
        t1 = time.perf_counter()
        if self._next is not None and self._rt.lookahead is not None:
            self._rt.lookahead.start(self._next, x2)
        predict_s = time.perf_counter() - t1  # the next router's guess and its readback
        self._count_decode(io + early, t1 - t0 - io.seconds - wait_s, hits, misses, evicted,
                           wait_s=io.seconds + wait_s, predict_s=predict_s)
        return y

    def _inner(self, x: mx.array, slots: mx.array) -> mx.array:
        if not self.widened:
            return self.inner(x, slots)
        return self.inner(x.astype(mx.float32), slots).astype(x.dtype)

    def _ensure(self, experts: np.ndarray, ahead: dict | None = None
                ) -> tuple[int, int, int, ReadStats]:
        """Make the `experts` (unique, at most `slots`) cached, used at this step: read the
        missing ones into free slots or the least recently used ones' (those in `ahead`, expert
        -> its lookahead buffer, are copied from there)."""
        c, step = self._lru, self._step
        self._step += 1
        if self._rt.naive:  # nothing kept from the last step
            c.slot_of[:], c.expert_at[:], c.last[:] = -1, -1, -1
        have = c.slot_of[experts] >= 0
        c.last[c.slot_of[experts[have]]] = step
        miss = experts[~have]
        free = np.flatnonzero(c.expert_at < 0)
        evicted = 0
        if len(miss) > len(free):
            old = np.flatnonzero((c.expert_at >= 0) & (c.last < step))
            out = old[np.argsort(c.last[old], kind="stable")[: len(miss) - len(free)]]
            c.slot_of[c.expert_at[out]] = -1
            c.expert_at[out] = -1
            free, evicted = np.concatenate([free, out]), len(out)
        rt, ahead = self._rt, ahead or {}
        before = rt.reader.snapshot()
        targets = free[: len(miss)]
        for a in range(0, len(miss), rt.top_k):  # a token's worth at a time: small scratch
            batch, into = miss[a : a + rt.top_k], targets[a : a + rt.top_k]
            spans = []
            for j, (e, t) in enumerate(zip(batch.tolist(), into.tolist(), strict=True)):
                if e in ahead:
                    rt.lookahead.copy(self, ahead[e], t, j)
                else:
                    spans += [(s.file, s.span(e), s.target(t, j)) for s in self._slices]
            rt.reader.read(spans)
            for s in self._slices:
                s.settle(into)
        c.slot_of[miss], c.expert_at[targets], c.last[targets] = targets, miss, step
        return int(have.sum()), len(miss), evicted, rt.reader.delta(before)

    def _expert_major(self, x: mx.array, chosen: np.ndarray) -> mx.array:
        """Every expert any row chose, a cache-full at a time (the cached ones first), each
        group's (token, expert) pairs multiplied together: (tokens * k, d)."""
        rt = self._rt
        n_tok, k = chosen.shape
        flat = chosen.reshape(-1)  # pair p = (token p // k, slot p % k)
        needed = np.unique(flat)
        needed = needed[np.argsort(self._lru.slot_of[needed] < 0, kind="stable")]
        y = mx.zeros((n_tok * k, x.shape[-1]), dtype=x.dtype)
        before = rt.reader.snapshot()
        for start in range(0, len(needed), self.slots):
            group = needed[start : start + self.slots]
            self._ensure(np.sort(group))
            pairs = np.flatnonzero(np.isin(flat, group))
            slots = mx.array(self._lru.slot_of[flat[pairs]].astype(np.uint32))[:, None]
            out = self._inner(x[mx.array(pairs // k)], slots)  # (pairs, 1, d)
            y[mx.array(pairs)] = out[:, 0]
            mx.eval(y)  # the next group may take these slots
        s = rt.stats
        s.prefill_io = s.prefill_io + rt.reader.delta(before)
        if self._position == 0:
            s.prefill_tokens += n_tok
            s.last_token_start = None  # a new prompt: the gap is not a token
        return y

    def _count_decode(self, io: ReadStats, cache_s: float, hits: int, misses: int,
                      evicted: int, wait_s: float, predict_s: float = 0.0) -> None:
        s = self._rt.stats
        s.io = s.io + io
        s.io_wait_s += wait_s
        s.cache_s += max(cache_s, 0.0)
        s.predict_s += predict_s
        s.hits += hits
        s.misses += misses
        s.evictions += evicted
        if self._position == 0:  # the first MoE layer of token t+1 starts after token t
            s.token_boundary()


class ExpertLookahead:
    """The reads of the experts a layer is guessed to pick, in flight while the layer before it
    computes (see the module docstring). One per model: a background thread, and a buffer that
    holds one token's experts (`expert_bytes`: the largest layer's expert on disk)."""

    def __init__(self, rt: DirectRuntime, expert_bytes: int):
        self._rt = rt
        self.buffers = np.empty((rt.top_k, expert_bytes), np.uint8)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="flash-lookahead")

    def start(self, nxt: _Next, x: mx.array) -> None:
        """Guess the next layer's experts from x (this layer's input), and read the ones its
        cache lacks in the background."""
        layer = nxt.layer
        guess = np.unique(nxt.guess(x))[: self._rt.top_k]
        missing = guess[layer._lru.slot_of[guess] < 0]
        layer._pending = (guess, missing, self._pool.submit(self._read, layer, missing))

    def _read(self, layer: StreamedExperts, missing: np.ndarray) -> ReadStats:
        reader = self._rt.reader  # the decode thread waits for this before reading itself
        before = reader.snapshot()
        spans = []
        for j, e in enumerate(missing.tolist()):
            at = 0
            for s in layer._slices:
                spans.append((s.file, s.span(e), self.buffers[j, at : at + s.bytes]))
                at += s.bytes
        reader.read(spans)
        return reader.delta(before)

    def copy(self, layer: StreamedExperts, j: int, slot: int, batch_j: int) -> None:
        """Buffer j's expert into `slot` of `layer` (as a read of the batch's `batch_j`-th)."""
        at = 0
        for s in layer._slices:
            s.target(slot, batch_j)[:] = self.buffers[j, at : at + s.bytes]
            at += s.bytes

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class _Next:
    """A layer's successor and the guess of its experts, kept out of the module tree."""

    def __init__(self, layer: StreamedExperts, guess):
        self.layer, self.guess = layer, guess


def guesser(block: nn.Module, top_k: int):
    """x (1, d) -> the experts `block`'s router would pick for x (its top-k), or None where the
    block's router is not one this knows: a linear `gate`/`router` (softmax or sigmoid over its
    logits, with the block's `e_score_correction_bias` where it has one: MiniMax), a gate module
    that returns (indices, scores) (DeepSeek-V3, GLM-4.x), or a benchmark's planted router."""
    router = next((r for r in (getattr(block, a, None) for a in ("gate", "router"))
                   if r is not None), None)
    if router is None:
        return None

    def top(scores: mx.array) -> np.ndarray:
        s = np.array(scores.astype(mx.float32)).reshape(-1)
        return np.argpartition(-s, top_k - 1)[:top_k]

    if hasattr(router, "guess"):  # bench/routing.py's PlantedRouter
        return lambda x: top(router.guess(x))
    if isinstance(router, (nn.Linear, nn.QuantizedLinear)):
        bias = getattr(block, "e_score_correction_bias", None)
        if bias is None:
            return lambda x: top(router(x))
        return lambda x: top(mx.sigmoid(router(x.astype(mx.float32))) + bias)

    def indices(x):
        out = router(x)
        if not isinstance(out, tuple):  # a router this does not know: no guess
            return np.empty(0, np.int64)
        return np.array(out[0]).reshape(-1).astype(np.int64)

    return indices


def _owner(module: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    *path, attr = dotted.split(".")
    for p in path:
        module = module[int(p)] if p.isdigit() else getattr(module, p)
    return module, attr
