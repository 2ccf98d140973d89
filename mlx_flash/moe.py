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
- Prefill (many tokens) and `naive` mode: expert-major. The experts any token chose are read once
  per call, as many at a time as the stream buffer holds, and each group's tokens are multiplied
  by them together.
"""

from __future__ import annotations

import time

import mlx.core as mx
import numpy as np

from .runtime import FlashMLP


class FlashExperts(FlashMLP):
    """The routed experts of one MoE layer; `__call__(x, indices)` as mlx-lm's `SwitchGLU`."""

    def __init__(self, rt, layer: int, capacity: int):
        super().__init__(rt, layer, capacity, {})
        m = rt.manifest
        self.experts, self.expert_ffn = m.experts, m.expert_ffn
        self._neurons = np.arange(self.expert_ffn)

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

    # -- the products ---------------------------------------------------------------------------

    def _glu(self, x: mx.array, slots: mx.array, mats: list, quantized: bool) -> mx.array:
        """SwitchGLU of x (n, d) with the experts at `slots` (n, k) of `mats`, one (slots, F, w)
        matrix (or quantized triple) per record part: (n, k, d)."""
        rt = self._rt
        xe = mx.expand_dims(x, (-2, -3))  # (n, 1, 1, d)

        def times(a, p, mat, transpose):
            if not quantized:
                return mx.gather_mm(a, mat.swapaxes(-1, -2) if transpose else mat,
                                    rhs_indices=slots)
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
            shaped = tuple(a.reshape(n, F, a.shape[-1]) for a in arrays)
            mats.append(shaped if m.quantization is not None else shaped[0])
        return mats, m.quantization is not None

    def _cache_mats(self) -> tuple[list, bool]:
        """The cached experts as (slots, F, w) matrices per part (triples when kept quantized)."""
        rt, m, F = self._rt, self._rt.manifest, self.expert_ffn
        slots = self.cache.num_used // F
        if rt.compute == "quantized":
            mats = self.cache.part_weights()
            triples = [(w.view(mx.uint32), s.view(m.mx_dtype), b.view(m.mx_dtype))
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
        before = rt.reader.snapshot()
        stats = self.cache.ensure(self._ids(np.unique(chosen)), self._step, rt.reader,
                                  self.offset)
        self._step += 1
        slots = self.cache.row_of[chosen * self.expert_ffn] // self.expert_ffn
        mats, quantized = self._cache_mats()
        y = self._glu(x, mx.array(slots[None].astype(np.int32)), mats, quantized)
        io = rt.reader.delta(before)
        cache_s = time.perf_counter() - t0 - io.seconds
        self._count_decode(io, 0.0, cache_s, stats.hits, stats.misses, stats.evicted)
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
            xs = x[mx.array(pairs // k)]
            if quantized:
                xs = xs.astype(mx.float32)
            out = self._glu(xs, mx.array(local[flat[pairs]][:, None].astype(np.int32)), mats,
                            quantized)
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
        for row in chosen:
            self.cache.ensure(self._ids(np.unique(row)), self._step, self._rt.reader, self.offset)
            self._step += 1
