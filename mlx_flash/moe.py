"""Routed experts from flash: `FlashExperts`, what the runtime puts in an MoE block's place of
mlx-lm's `SwitchGLU` (models/_moe.py).

The block's own router picks each token's top-k experts (an exact predictor: nothing to
calibrate) and calls `switch_mlp(x, indices)`; this module returns every (token, expert) pair's
output as `SwitchGLU` does, and the block weighs and sums them as before. Expert e of a layer is
records e*F .. (e+1)*F-1 of `ffn.bundles`, one run of adjacent records: reading it is a few large
requests.

- Decode (one token): the chosen experts are made resident in the layer's `NeuronCache`, whole
  experts at a time, so each cached expert is F consecutive rows of the cache's matrices (inserts
  append whole experts, evictions move whole experts: see `NeuronCache`); the cache keeps the
  least recently used experts out when the budget is full. The products run with
  `gather_mm`/`gather_qmm` over the cache viewed as (slots, F, d): no copy of the layer.
- Lookahead (decode): layer l applies layer l+1's router to its own input, and the experts that
  guess names and the cache lacks are read in a background thread while layer l computes, into a
  buffer of one token's experts; layer l+1 takes the ones its router really chose from there and
  reads the rest itself. A wrong guess costs bandwidth, never correctness.
- Prefill (many tokens) and `naive` mode: expert-major. The experts any token chose are read once
  per call, as many at a time as the stream buffer holds, and each group's tokens are multiplied
  by them together.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np

from .cache import NeuronCache
from .dtypes import FLOATS, to_float32
from .ffn import FlashMLP
from .storage import ReadStats, aligned_empty


class FlashExperts(FlashMLP):
    """The routed experts of one MoE layer; `__call__(x, indices)` as mlx-lm's `SwitchGLU`."""

    def __init__(self, rt, layer: int, capacity: int, lookahead: Lookahead | None = None):
        super().__init__(rt, layer, capacity, {})
        m = rt.manifest
        self.experts, self.expert_ffn = m.experts, m.expert_ffn
        self._neurons = np.arange(self.expert_ffn)
        self._lookahead = lookahead
        self._next = _Next(None, None)  # the next layer and its router (not child modules)
        self._pending = None  # (guess, missing, future): this layer's reads started early

    def link(self, nxt: FlashExperts, router) -> None:
        """Guess `nxt`'s experts with `router` (its block's) while this layer computes."""
        self._next = _Next(nxt, router)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        # Host sync: the router's choice decides the reads (and the cache may be written below).
        mx.eval(x, indices)
        k = indices.shape[-1]
        x2 = x.reshape(-1, x.shape[-1])
        chosen = np.array(indices).reshape(-1, k).astype(np.int64)  # (tokens, k)
        if len(x2) > 1 or self._rt.mode == "naive":
            y = self._expert_major(x2, chosen, count_as_prefill=len(x2) > 1)
            if len(x2) > 1 and self._rt.mode != "naive":
                self._seed(chosen[-self._rt.window :])
        else:
            y = self._decode_experts(x2, chosen[0])
        return y.reshape(*indices.shape, x.shape[-1])

    def _new_cache(self, rt, capacity: int) -> NeuronCache:
        """Float records: each part's values in a matrix of its own (runtime.py). Quantized ones
        stay quantized, their scales and biases widened to float32 on insert: MLX's CPU
        `gather_qmm` is ~35x faster in float32 than in float16 (and exact), and float32 scales
        cost ~11% more than float16 ones at 4 bits, group 64."""
        m = rt.manifest
        if m.quantization is None:
            return super()._new_cache(rt, capacity)
        spans, widths = [], []
        for p in m.parts:
            w, sc, _ = m.part_quantization(p).spans(m.d_model, m.itemsize)
            lo, hi = p.span
            spans += [(lo, lo + w), (lo + w, lo + w + sc), (lo + w + sc, hi)]
            widths += [w, sc * 4 // m.itemsize, sc * 4 // m.itemsize]

        def decode(rows: np.ndarray) -> list[np.ndarray]:
            out = []
            for i, (lo, hi) in enumerate(spans):
                raw = rows[:, lo:hi]
                out.append(raw if i % 3 == 0 else _float32_bytes(raw, m.dtype))
            return out

        return NeuronCache(capacity, m.record_bytes, m.ffn_dim, parts=spans, staging=rt.chunk_np,
                           decode=decode, widths=widths)

    # -- the products ---------------------------------------------------------------------------

    def _glu(self, x: mx.array, picks: np.ndarray, mats: list, quantized: bool) -> mx.array:
        """SwitchGLU of x (n, d) with the experts at slots `picks` (n, k) of `mats`, one
        (slots, F, w) matrix (or quantized triple) per record part: (n, k, d)."""
        rt = self._rt
        slots = mx.array(picks.astype(np.int32))
        xe = mx.expand_dims(x, (-2, -3))  # (n, 1, 1, d)

        def times(a, p, mat, transpose):
            if not quantized:
                return _gather_mm(a, mat.swapaxes(-1, -2) if transpose else mat, picks)
            w, s, b = mat
            return mx.gather_qmm(a, w, s, b, rhs_indices=slots, transpose=transpose,
                                 **self._qkw[p.name])

        *row_mats, column = mats
        rows = {p.name: times(xe, p, mat, True)
                for p, mat in zip(self._row_parts, row_mats, strict=True)}  # (n, k, 1, F)
        h = rt.spec.hidden(rows, rt.act)
        return times(h, self._column_part, column, False).squeeze(-2)  # (n, k, d)

    def _record_mats(self, records: mx.array, n: int) -> tuple[list, bool]:
        """The parts of `n` whole experts' records ((n*F, record_bytes) uint8) as (n, F, w)
        matrices; quantized records as float32 triples (MLX's CPU kernel in float16 is ~10x
        less exact, runtime.py)."""
        m, F = self._rt.manifest, self.expert_ffn
        mats = []
        for p in m.parts:
            arrays = m.part_arrays(records, p)
            if m.quantization is not None:
                w, s, b = arrays
                arrays = (w, s.astype(mx.float32), b.astype(mx.float32))
            else:  # MLX's CPU gather_mm is float32 only; the stream buffer is copied anyway
                arrays = (arrays[0].astype(mx.float32),)
            shaped = tuple(a.reshape(n, F, a.shape[-1]) for a in arrays)
            mats.append(shaped if m.quantization is not None else shaped[0])
        return mats, m.quantization is not None

    def _cache_mats(self) -> tuple[list, bool]:
        """The cached experts as (slots, F, w) matrices per part (triples when kept quantized)."""
        m, F = self._rt.manifest, self.expert_ffn
        slots = self.cache.num_used // F
        if m.quantization is not None:  # scales and biases widened to float32 (_new_cache)
            mats = self.cache.part_weights()
            triples = [(w.view(mx.uint32), s.view(mx.float32), b.view(mx.float32))
                       for w, s, b in zip(mats[0::3], mats[1::3], mats[2::3], strict=True)]
            return [tuple(a.reshape(slots, F, a.shape[-1]) for a in t) for t in triples], True
        return [w.reshape(slots, F, w.shape[-1])
                for w in self.cache.part_weights(m.mx_dtype)], False

    # -- paths ----------------------------------------------------------------------------------

    def _ids(self, experts: np.ndarray) -> np.ndarray:
        """The record ids of `experts` (sorted), ascending."""
        return (experts[:, None] * self.expert_ffn + self._neurons).reshape(-1)

    def _decode_experts(self, x: mx.array, chosen: np.ndarray) -> mx.array:
        rt = self._rt
        t0 = time.perf_counter()
        early, wait_s, reader = ReadStats(), 0.0, rt.reader
        if self._pending is not None:  # the previous layer's guess: take what it read
            guess, missing, future = self._pending
            self._pending = None
            early = future.result()
            wait_s = time.perf_counter() - t0
            reader = self._lookahead.reader(guess, missing, chosen)
        before = rt.reader.snapshot()
        stats = self.cache.ensure(self._ids(np.unique(chosen)), self._step, reader, self.offset)
        self._step += 1
        slots = self.cache.row_of[chosen * self.expert_ffn] // self.expert_ffn
        mats, quantized = self._cache_mats()
        y = self._glu(x.astype(mx.float32) if quantized else x, slots[None], mats, quantized)
        io = rt.reader.delta(before)
        t1 = time.perf_counter()
        if self._next.layer is not None and self._lookahead is not None:
            self._lookahead.start(self._next, x, chosen.shape[-1])
        predict_s = time.perf_counter() - t1  # the next router's guess and its readback
        cache_s = t1 - t0 - io.seconds - wait_s
        self._count_decode(io + early, predict_s, cache_s, stats.hits, stats.misses,
                           stats.evicted, wait_s=io.seconds + wait_s)
        return y[0].astype(x.dtype)

    def _expert_major(self, x: mx.array, chosen: np.ndarray, count_as_prefill: bool
                      ) -> mx.array:
        """Each expert any row chose read once through the stream buffer, a group at a time."""
        rt, F = self._rt, self.expert_ffn
        n_tok, k = chosen.shape
        flat = chosen.reshape(-1)  # pair p = (token p // k, slot p % k)
        needed = np.unique(flat)
        per_read = max(1, rt.chunk.shape[0] // F)  # whole experts the stream buffer holds
        y = mx.zeros((n_tok * k, x.shape[-1]), dtype=mx.float32)
        local = np.full(self.experts, -1, dtype=np.int64)
        before = rt.reader.snapshot()
        for start in range(0, len(needed), per_read):
            group = needed[start : start + per_read]
            ids = self._ids(group)
            rt.reader.read(self.offset, ids, rt.chunk_np[: len(ids)])
            local[group] = np.arange(len(group))
            pairs = np.flatnonzero(local[flat] >= 0)
            mats, quantized = self._record_mats(rt.chunk[: len(ids)], len(group))
            xs = x[mx.array(pairs // k)].astype(mx.float32)
            out = self._glu(xs, local[flat[pairs]][:, None], mats, quantized)
            y[mx.array(pairs)] = out[:, 0].astype(mx.float32)
            mx.eval(y)  # the stream buffer is overwritten next
            local[group] = -1
        io = rt.reader.delta(before)
        if count_as_prefill:
            rt.stats.prefill_io = rt.stats.prefill_io + io
            if self.layer == 0:
                rt.stats.prefill_tokens += n_tok
                rt.stats.last_token_start = None  # a new prompt: the gap is not a token
        else:
            self._count_decode(io, 0.0, 0.0, 0, 0, 0)
        return y.reshape(n_tok, k, -1).astype(x.dtype)

    def _seed(self, chosen: np.ndarray) -> None:
        """After prefill, hold the experts of the last prompt tokens (the most recent last)."""
        rt = self._rt
        before = rt.reader.snapshot()
        for row in chosen:
            self.cache.ensure(self._ids(np.unique(row)), self._step, rt.reader, self.offset)
            self._step += 1
        rt.stats.prefill_io = rt.stats.prefill_io + rt.reader.delta(before)  # the prompt's reads


def _gather_mm(a: mx.array, w: mx.array, picks: np.ndarray) -> mx.array:
    """`gather_mm(a, w, rhs_indices=picks)`; MLX's CPU kernel takes float32 only, so other
    dtypes multiply expert by expert (views of the cache: nothing copied)."""
    if w.dtype == mx.float32:
        return mx.gather_mm(a.astype(mx.float32), w, rhs_indices=mx.array(picks.astype(np.int32)))
    n, k = picks.shape
    shared = a.shape[1] == 1  # a (n, 1, 1, in): one row for all k, or (n, k, 1, in)
    rows = [a[i // k, 0 if shared else i % k] @ w[int(s)]
            for i, s in enumerate(picks.reshape(-1))]
    return mx.stack(rows).reshape(n, k, 1, w.shape[-1])


def _float32_bytes(raw: np.ndarray, dtype: str) -> np.ndarray:
    """(n, bytes) uint8 of `dtype` values -> the same values as float32 bytes."""
    values = np.ascontiguousarray(raw).view(FLOATS[dtype].storage)
    return to_float32(values, dtype).view(np.uint8)


class Lookahead:
    """The reads of the experts a layer is guessed to pick, in flight while the layer before it
    computes (see the module docstring). One per model: a background thread, and a buffer that
    holds one token's experts."""

    def __init__(self, rt, top_k: int):
        m = rt.manifest
        self._rt, self.top_k, self.expert_ffn = rt, top_k, m.expert_ffn
        # one aligned buffer per expert (direct reads need aligned destinations)
        self.buffers = [aligned_empty(m.expert_ffn, m.record_bytes)[1] for _ in range(top_k)]
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="flash-lookahead")

    def start(self, nxt: _Next, x: mx.array, k: int) -> None:
        """Guess the next layer's experts from x (this layer's input) with its router, and read
        the ones its cache lacks in the background."""
        layer = nxt.layer
        logits = nxt.router(x).reshape(-1)
        guess = np.sort(np.argpartition(-np.array(logits.astype(mx.float32)), k - 1)[:k])
        F = self.expert_ffn
        missing = guess[layer.cache.row_of[guess * F] < 0]
        layer._pending = (guess, missing, self._pool.submit(self._read, layer, missing))

    def _read(self, layer: FlashExperts, missing: np.ndarray) -> ReadStats:
        reader = self._rt.reader  # the decode thread waits for this before reading itself
        before = reader.snapshot()
        for j in range(len(missing)):  # expert by expert: the reader's scratch stays small
            reader.read(layer.offset, layer._ids(missing[j : j + 1]), self.buffers[j])
        return reader.delta(before)

    def reader(self, guess: np.ndarray, missing: np.ndarray, chosen: np.ndarray) -> _Buffered:
        """What the guessed layer reads its missing experts with: the read-ahead ones from the
        buffer, the rest from the file; counts the guess's hits."""
        stats = self._rt.stats
        stats.guessed += len(guess)
        stats.guessed_right += len(np.intersect1d(guess, chosen))
        return _Buffered(self, missing, self._rt.reader)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class _Next:
    """A layer's successor and that one's router, kept out of the module tree."""

    def __init__(self, layer: FlashExperts | None, router):
        self.layer, self.router = layer, router


class _Buffered:
    """A reader that takes the records of the experts `held` (sorted) from the lookahead buffer,
    where they lie in that order, and reads the others from the file."""

    def __init__(self, lookahead: Lookahead, held: np.ndarray, reader):
        self._la, self._held, self._reader = lookahead, held, reader

    def read(self, layer_offset: int, ids: np.ndarray, out: np.ndarray) -> None:
        F, held = self._la.expert_ffn, self._held
        pos = np.searchsorted(held, ids // F)
        inside = pos < len(held)
        inside[inside] = held[pos[inside]] == ids[inside] // F
        rest = np.flatnonzero(~inside)
        if len(rest):  # read into the first rows (aligned), then moved to theirs
            self._reader.read(layer_offset, ids[rest], out[: len(rest)])
            if len(rest) < len(ids):
                out[rest] = out[: len(rest)].copy()
        for j in np.unique(pos[inside]):  # expert by expert, from its own buffer
            rows = np.flatnonzero(inside & (pos == j))
            out[rows] = self._la.buffers[j][ids[rows] % F]
