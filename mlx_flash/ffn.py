"""The flash FFN of a dense model: `FlashMLP`, an MLP whose neurons live in `ffn.bundles`
(what the FlashMLPs of one model share is `ffn_shared.FlashRuntime`).

`runtime.load` builds them; per decode token and layer, the active neurons are found (oracle or
predictor), the missing ones are read from `ffn.bundles` straight into the layer's `NeuronCache`,
and the FFN runs as one dense matmul over the cache's contiguous rows. See DESIGN.md "Decode step".
"""

from __future__ import annotations

import dataclasses
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import quant
from .cache import NeuronCache
from .ffn_shared import BRIDGE_DENSITY, FlashRuntime
from .lookahead import Prefetched
from .memory import DEQUANT_ROWS
from .storage import ReadStats


class _Biases:
    """FFN biases of one layer, kept out of the module tree (they are not loadable weights)."""

    def __init__(self, by_module: dict[str, mx.array]):
        self.by_module = by_module


class FlashMLP(nn.Module):
    """An MLP whose weights live in `ffn.bundles`; see the module docstring.

    Public, read-only for callers: `layer` (its index), `cache` (its NeuronCache), `predictor`
    (predicted mode), `offset` (byte offset of its records in ffn.bundles).
    """

    def __init__(self, rt: FlashRuntime, layer: int, capacity: int, biases: dict, oracle=None,
                 predictor=None):
        super().__init__()
        m = rt.manifest
        self._rt, self.layer = rt, layer
        self.offset = m.layer_offset(layer)
        self.cache = self._new_cache(rt, capacity)
        self._biases = _Biases(biases)
        self._oracle = oracle  # (W_in (ffn, d), bias or None): dense activation input, oracle mode
        self.predictor = predictor  # predictor.Predictor (or a stand-in) for predicted mode
        self._step = 0
        self._row_parts = [p for p in m.parts if p.name in {r.name for r in rt.spec.row_parts}]
        self._column_part = m.part(rt.spec.column_part.name)
        # quantized compute: each part's quantized_matmul arguments, made once
        self._qkw = {p.name: m.part_quantization(p).kwargs for p in m.parts
                     if m.quantization is not None}
        self._out_bias = biases.get(rt.spec.column_part.name)
        self.pending = None  # lookahead.Pending: this layer's records read a layer early
        self._follower = _Follower(None)  # the next layer, whose reads this one starts

    def follow_with(self, nxt: FlashMLP) -> None:
        """Guess `nxt`'s active set from this layer's input and read it early (lookahead.py)."""
        self._follower = _Follower(nxt)

    def _new_cache(self, rt: FlashRuntime, capacity: int) -> NeuronCache:
        return _new_cache(rt, capacity)

    # -- the FFN over a block of records -------------------------------------------------------

    def _ffn(self, x: mx.array, n: int, ids: mx.array | None, buffer: int = 0,
             keep: mx.array | None = None) -> mx.array:
        """FFN of x (n_tok, d) over the first `n` records of stream buffer `buffer`, which hold
        neurons `ids` (prefill, naive, overflow); `keep` (1, n) zeroes the neurons not wanted."""
        rt = self._rt
        m = rt.manifest
        if m.quantization is not None:
            # quantized_matmul straight on the records: as fast as dequantize + matmul on MLX's
            # CPU backend (the fast path on GPUs), without dequantize's ~5x transient there. In
            # float32: MLX's CPU kernel in float16 is ~10x less exact than a float16 matmul.
            def times(a: mx.array, p, transpose: bool) -> mx.array:
                w, s, b = m.part_arrays(rt.chunks[buffer][0][:n], p)
                return mx.quantized_matmul(a.astype(mx.float32), w, s.astype(mx.float32),
                                           b.astype(mx.float32), transpose=transpose,
                                           **self._qkw[p.name])

            rows = {p.name: times(x, p, True) for p in self._row_parts}
            return self._combine(rows, lambda h: times(h, self._column_part, False), ids, keep)
        mats = {p.name: raw for p, raw in zip(m.parts, rt.staged_parts(n, buffer), strict=True)}
        rows = {p.name: x @ mats[p.name].view(m.mx_dtype).T for p in self._row_parts}
        column = mats[self._column_part.name].view(m.mx_dtype)
        return self._combine(rows, lambda h: _times(h, column), ids, keep)

    def _ffn_cached(self, x: mx.array) -> mx.array:
        """FFN of x over the cached neurons: each part's payload is a matrix of its own."""
        rt = self._rt
        # the neuron ids only pick bias entries: no per-token array for a model without biases
        ids = mx.array(self.cache.ids()) if self._biases.by_module else None
        if rt.compute == "quantized":  # (packed, scales, biases) per part
            m = rt.manifest
            mats = self.cache.part_weights()
            triples = [(w.view(mx.uint32), s.view(m.mx_dtype), b.view(m.mx_dtype))
                       for w, s, b in zip(mats[0::3], mats[1::3], mats[2::3], strict=True)]
            *row_parts, column = triples
            rows = {p.name: mx.quantized_matmul(x, *t, transpose=True, **self._qkw[p.name])
                    for p, t in zip(self._row_parts, row_parts, strict=True)}
            down = self._qkw[self._column_part.name]
            return self._combine(rows, lambda h: mx.quantized_matmul(
                h, *column, transpose=False, **down), ids)
        *row_parts, column = self.cache.part_weights(rt.manifest.mx_dtype)  # (n, d) each
        rows = {p.name: x @ w.T for p, w in zip(self._row_parts, row_parts, strict=True)}
        return self._combine(rows, lambda h: _times(h, column), ids)

    def _combine(self, rows: dict, down, ids: mx.array | None,
                 keep: mx.array | None = None) -> mx.array:
        """The row products (n_tok, n) plus their biases, combined by the architecture's
        `hidden` into h (times `keep`, where given), then `down(h)`: the column part's product
        (n_tok, d)."""
        rt, b = self._rt, self._biases.by_module
        for name in rows:
            if (bias := b.get(name)) is not None:
                rows[name] = rows[name] + (bias if ids is None else bias[ids])
        h = rt.spec.hidden(rows, rt.act)
        return down(h if keep is None else h * keep.astype(h.dtype))

    # -- modes ---------------------------------------------------------------------------------

    def __call__(self, x: mx.array) -> mx.array:
        # Host sync first: every graph that read this layer's buffers is evaluated, so the cache
        # and the stream buffer may be written in place below (DESIGN.md, "Decode step").
        mx.eval(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        rt = self._rt
        if shape[1] > 1 or rt.mode in ("naive", "hybrid"):
            y = self._streamed(x2, count_as_prefill=shape[1] > 1)
            if shape[1] > 1 and rt.mode not in ("naive", "hybrid"):
                self._seed_window(x2[-rt.window :])
        elif rt.down_reader is not None:
            y = self._decode_values(x2)
        else:
            y = self._decode(x2)
        if self._out_bias is not None:
            y = y + self._out_bias
        return y.reshape(shape)

    def _streamed(self, x: mx.array, count_as_prefill: bool) -> mx.array:
        """Whole-layer FFN with large sequential reads through the shared chunk buffer.

        In hybrid mode the cache holds the layer's first neurons for good; only the rest is read.
        """
        rt, m = self._rt, self._rt.manifest
        rows = rt.chunk.shape[0]
        before = rt.reader.snapshot()
        first = self.cache.num_used if rt.mode == "hybrid" else 0

        def read(ids: np.ndarray, out: np.ndarray) -> None:
            if m.packed:  # records inside blocks: the reader widens and copies
                rt.reader.read(self.offset, ids, out)
            else:
                rt.reader.read_range(m.neuron_offset(self.layer, int(ids[0])),
                                     len(ids) * m.record_bytes, out)

        pieces = [np.arange(a, min(a + rows, m.ffn_dim)) for a in range(first, m.ffn_dim, rows)]
        y, waited = self._stream(x, pieces, read) if pieces else (None, 0.0)
        if first:  # hybrid: the resident share
            cached = self._ffn_cached(x).astype(mx.float32)
            y = cached if y is None else y + cached
        y = y.astype(x.dtype)
        io = rt.reader.delta(before)
        if count_as_prefill:
            rt.stats.prefill_io = rt.stats.prefill_io + io
            if self.layer == 0:
                rt.stats.prefill_tokens += x.shape[0]
                rt.stats.last_token_start = None  # a new prompt: the gap is not a token
        else:
            self._count_decode(io, 0.0, 0.0, 0, 0, 0, wait_s=waited)
        return y

    def _stream(self, x: mx.array, pieces: list[np.ndarray], read,
                keeps: list | None = None) -> tuple[mx.array, float]:
        """The FFN of x over the neurons of `pieces` (sorted ids, a stream buffer's worth each;
        `keeps[k]`, where not None, masks piece k's neurons), summed in float32; `read(ids, out)`
        fills a buffer. While one piece computes, the next is read on the stream thread into the
        other buffer. Returns (y, seconds waited for reads)."""
        rt = self._rt
        y, waited = None, 0.0

        def start(k: int):
            return rt.read_in_background(read, pieces[k], rt.chunks[k % 2][1][: len(pieces[k])])

        pending = start(0)
        for k, ids in enumerate(pieces):
            t = time.perf_counter()
            pending.result()
            waited += time.perf_counter() - t
            if k + 1 < len(pieces):
                pending = start(k + 1)
            keep = None if keeps is None else keeps[k]
            part = self._ffn(x, len(ids), mx.array(ids), k % 2, keep)
            part = part.astype(mx.float32)  # partial sums add up in float32: one rounding
            y = part if y is None else y + part
            mx.eval(y)  # this buffer is read into again two pieces on
        return y, waited

    def _active(self, x: mx.array) -> np.ndarray:
        """Sorted ids of the neurons to hold for the rows of x: predicted, or the exact set."""
        if self.predictor is not None:
            mask = self.predictor(x)  # (n, ffn) bool
        elif not self._rt.exact_sparse:
            return np.arange(self._rt.manifest.ffn_dim)  # no exact zeros: every neuron is active
        else:
            w_in, b_in = self._oracle
            z = x @ w_in.T
            # the first row part's activation is zero below the cut (ReLU: z <= 0, FATReLU:
            # z <= t, a margin below); a gate past it whose product is zero anyway (dReLU's
            # up <= 0) is read all the same
            z = z + b_in if b_in is not None else z
            mask = z > self._rt.cut
        # The one device->host sync of the layer: the read plan needs the ids on the CPU.
        return np.flatnonzero(np.array(mx.any(mask, axis=0)))

    def _guess(self, x: mx.array) -> np.ndarray:
        """This layer's active set guessed from the previous layer's input x (the lookahead)."""
        guess = getattr(self.predictor, "guess", None)
        if guess is None:
            return self._active(x)
        # a benchmark's planted predictor: a guess must not advance its sequence of sets
        return np.flatnonzero(np.array(mx.any(guess(x), axis=0)))

    def _seed_window(self, x_last: mx.array) -> None:
        """After prefill, hold the neurons of the last `window` prompt tokens."""
        rt = self._rt
        reader = rt.cache_reader
        before = reader.snapshot()
        for row in range(x_last.shape[0]):
            ids, _ = self._split_overflow(self._active(x_last[row : row + 1]))
            self.cache.ensure(ids, self._step, reader, rt.down_offset(self.layer, self.offset))
            self._step += 1
        self.cache.slide(self._step - 1, rt.window)
        rt.stats.prefill_io = rt.stats.prefill_io + reader.delta(before)  # the prompt's reads

    def _split_overflow(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids the cache takes, ids beyond its capacity). Cached ones are kept first."""
        cap = self.cache.capacity
        if len(ids) <= cap:
            return ids, ids[:0]
        present = self.cache.row_of[ids] >= 0
        missing = ids[~present]
        room = cap - int(present.sum())
        return np.sort(np.concatenate([ids[present], missing[:room]])), missing[room:]

    def _decode(self, x: mx.array) -> mx.array:
        rt = self._rt
        t0 = time.perf_counter()
        ids = self._active(x)
        nxt, ahead = self._follower.layer, rt.lookahead
        if nxt is not None and ahead is not None:  # the next layer's guess, read meanwhile
            # (its predictor on this layer's input: on SmolLM2 98% of what the next layer then
            # loaded, against 89% for the previous token's set of that layer)
            ahead.start(nxt, nxt._guess(x))
        t1 = time.perf_counter()
        reader, early, wait_s = rt.reader, ReadStats(), 0.0
        if self.pending is not None:  # what the previous layer read for this one
            early = self.pending.future.result()
            wait_s = time.perf_counter() - t1
            reader = Prefetched(self.pending, rt.reader)
        before = rt.reader.snapshot()
        ids, overflow = self._split_overflow(ids)
        stats = self.cache.ensure(ids, self._step, reader, self.offset)
        self.cache.slide(self._step, rt.window)
        self._step += 1
        cache_io_s = rt.reader.delta(before).seconds  # the cache's reads (synchronous)
        y = self._ffn_cached(x)
        streamed_s = overflow_wait = 0.0  # the overflow: its reads, overlapping its compute
        if len(overflow):
            t2 = time.perf_counter()
            pieces, keeps = _bridge(overflow, rt.chunk.shape[0], rt.bridge_density)
            extra, overflow_wait = self._stream(
                x, pieces, lambda i, out: reader.read(self.offset, i, out), keeps)
            y = (y.astype(mx.float32) + extra).astype(x.dtype)
            streamed_s = time.perf_counter() - t2
        io = rt.reader.delta(before)
        if self.pending is not None:
            s = rt.stats
            s.guessed += len(self.pending.held)
            s.guessed_right += reader.used
            s.needed += reader.needed
            self.pending = None
        # the overflow's time (its reads waited for, and its compute) is not cache work
        cache_s = time.perf_counter() - t1 - wait_s - cache_io_s - streamed_s
        rt.stats.overflow += len(overflow)
        rt.stats.computed += self.cache.num_used + len(overflow)  # every cached row computes
        self._count_decode(io + early, t1 - t0, cache_s, stats.hits, stats.misses, stats.evicted,
                           wait_s=wait_s + cache_io_s + overflow_wait)
        return y

    def _decode_values(self, x: mx.array) -> mx.array:
        """Values mode: the sketch's act(gate)*up of its top share (and of every neuron the
        window holds) times their down rows, cached or read (the down span only)."""
        rt, m = self._rt, self._rt.manifest
        t0 = time.perf_counter()
        hidden, ids = self.predictor.top(x)  # the layer's one device->host sync
        h = hidden if m.quantization is not None else hidden.astype(x.dtype)  # float32 stays
        t1 = time.perf_counter()
        reader = rt.down_reader
        before = reader.snapshot()
        ids, overflow = self._split_overflow(ids)
        offset = rt.down_offset(self.layer, self.offset)
        stats = self.cache.ensure(ids, self._step, reader, offset)
        self.cache.slide(self._step, rt.window)
        self._step += 1
        cache_io_s = reader.delta(before).seconds
        h_cached = h[:, mx.array(self.cache.ids())]
        if m.quantization is None:
            down = self.cache.part_weights(m.mx_dtype)[0]  # (num_used, d)
            y = _times(h_cached, down).astype(mx.float32)
        else:  # (packed, scales, biases) of the down rows
            w, s_, b = self.cache.part_weights()
            y = self._down_q(h_cached, w.view(mx.uint32), s_.view(m.mx_dtype), b.view(m.mx_dtype))
        streamed_s = 0.0
        if len(overflow):  # beyond the cache: read a buffer's worth at a time, computed at once
            t2 = time.perf_counter()
            lo, hi = rt.down_span
            part = dataclasses.replace(self._column_part, offset=lo)  # in what the reader reads
            rows = len(rt.down_stage)
            for a in range(0, len(overflow), rows):
                piece = overflow[a : a + rows]
                out = rt.down_stage[: len(piece)]
                reader.read(offset, piece, out)
                if m.quantization is None:
                    column = mx.array(np.ascontiguousarray(out[:, lo:hi])).view(m.mx_dtype)
                    y = y + _times(h[:, mx.array(piece)], column).astype(mx.float32)
                else:
                    y = y + self._down_q(h[:, mx.array(piece)], *m.part_arrays(out, part))
                mx.eval(y)  # the buffer is read into again by the next piece
            streamed_s = time.perf_counter() - t2
        io = reader.delta(before)
        cache_s = time.perf_counter() - t1 - cache_io_s - streamed_s
        rt.stats.overflow += len(overflow)
        rt.stats.computed += self.cache.num_used + len(overflow)
        self._count_decode(io, t1 - t0, cache_s, stats.hits, stats.misses, stats.evicted,
                           wait_s=cache_io_s + streamed_s)
        return y.astype(x.dtype)

    def _down_q(self, h: mx.array, w: mx.array, scales: mx.array, biases: mx.array) -> mx.array:
        """h (n_tok, n) times n quantized down rows, in float32 (as `_ffn`)."""
        return mx.quantized_matmul(h.astype(mx.float32), w, scales.astype(mx.float32),
                                   biases.astype(mx.float32), transpose=False,
                                   **self._qkw[self._column_part.name])

    def _count_decode(self, io: ReadStats, predict_s, cache_s, hits, misses, evicted,
                      wait_s: float | None = None) -> None:
        """Add one layer's decode figures; `wait_s`: the reading the decode waited for (all of
        `io` unless some of it overlapped compute)."""
        s = self._rt.stats
        s.io = s.io + io
        s.io_wait_s += io.seconds if wait_s is None else wait_s
        s.predict_s += predict_s
        s.cache_s += cache_s
        s.hits += hits
        s.misses += misses
        s.evictions += evicted
        if self.layer == 0:
            # Layer 0 of token t+1 starts after token t is fully evaluated (the sync above).
            s.token_boundary()


class _Follower:
    """The next layer, kept out of the module tree."""

    def __init__(self, layer: FlashMLP | None):
        self.layer = layer


def _bridge(ids: np.ndarray, rows: int, density: float = BRIDGE_DENSITY
            ) -> tuple[list[np.ndarray], list]:
    """Sorted `ids` cut into pieces of at most `rows` neurons, and each piece's mask: a run of
    `rows` ids from the first one left is read whole where `density` of it is wanted (mask: the
    wanted ones), else the next `rows` ids are read as they are (mask None)."""
    pieces, keeps, i = [], [], 0
    while i < len(ids):
        lo = int(ids[i])
        j = int(np.searchsorted(ids, lo + rows))  # ids[i:j] lie in [lo, lo + rows)
        span = int(ids[j - 1]) - lo + 1
        if j - i > 1 and span > j - i and (j - i) >= density * span:
            run = np.arange(lo, lo + span)
            keep = np.zeros((1, span), dtype=np.float32)
            keep[0, ids[i:j] - lo] = 1
            pieces.append(run)
            keeps.append(mx.array(keep))
        else:
            j = max(j, min(i + rows, len(ids)))
            pieces.append(ids[i:j])
            keeps.append(None)
        i = j
    return pieces, keeps


def _times(h: mx.array, column: mx.array) -> mx.array:
    """h (n_tok, n) times the column part (n, d)."""
    if h.shape[0] == 1 and h.dtype == mx.bfloat16:
        # decode in bfloat16: multiply-sum beats MLX's CPU matvec (6.2 vs 11.7 ms for 2048x4096)
        return (h.T * column).sum(axis=0, keepdims=True)
    if h.shape[0] == 1 and h.dtype == mx.float16:
        # decode in float16: widened to float32 both faster (0.31 vs 0.33 ms matvec, 0.92
        # multiply-sum, for SmolLM2's 384x576 pieces; 3.1 vs 7.2 ms for 1024x2048) and exact to
        # 1e-6 instead of 3e-4 (a float16 matvec's rounding lost SmolLM2 4-bit its answer)
        return (h.astype(mx.float32) @ column.astype(mx.float32)).astype(h.dtype)
    return h @ column


def _new_cache(rt: FlashRuntime, capacity: int) -> NeuronCache:
    """A layer's NeuronCache: each part's payload in a matrix of its own (no padding to multiply);
    quantized records keep packed values, scales and biases apart, or are dequantized on insert."""
    m = rt.manifest
    spans = [p.span for p in m.parts]
    if rt.down_reader is not None:  # values mode: the down rows only (quantized: kept so)
        lo, hi = rt.down_span
        spans = [(lo, hi)]
        if m.quantization is not None:
            w, s, _ = m.part_quantization(rt.spec.column_part).spans(m.d_model, m.itemsize)
            spans = [(lo, lo + w), (lo + w, lo + w + s), (lo + w + s, hi)]
        return NeuronCache(capacity, rt.down_stage.shape[1], m.ffn_dim, parts=spans,
                           staging=rt.down_stage)
    if m.quantization is None:
        return NeuronCache(capacity, m.record_bytes, m.ffn_dim, parts=spans, staging=rt.chunk_np)
    d = m.d_model
    if rt.compute == "quantized":
        fine = []
        for p in m.parts:
            w, s, _ = m.part_quantization(p).spans(d, m.itemsize)
            lo, hi = p.span
            fine += [(lo, lo + w), (lo + w, lo + w + s), (lo + w + s, hi)]
        return NeuronCache(capacity, m.record_bytes, m.ffn_dim, parts=fine, staging=rt.chunk_np)

    def decode(rows: np.ndarray) -> list[np.ndarray]:
        values = [m.part_values(rows, p) for p in m.parts]
        return [quant.as_bytes(v) for v in values]

    # DEQUANT_ROWS records at a time: MLX's CPU dequantize holds ~5x its output (memory.py)
    return NeuronCache(capacity, m.record_bytes, m.ffn_dim, parts=spans, staging=rt.chunk_np,
                       decode=decode, widths=[d * m.itemsize] * len(m.parts),
                       decode_rows=DEQUANT_ROWS)
