"""A checkpoint of an MoE model seen as the converter sees a dense one (`ExpertView`).

The flash format holds a layer's routed experts as one FFN of experts * F neurons, expert-major
(models/_moe.py). This view shows each record part of each layer as that one 2-D matrix, under
the part's module name (`...switch_mlp.gate_proj.weight`): rows (experts * F, d) for gate and
up, (d, experts * F) for down. It assembles them from HF checkpoints' per-expert tensors
(`...experts.{e}.gate_proj.weight`, (F, d) each) or from mlx-lm dirs' stacked 3-D ones (quantized
ones as stored: their rows are quantized along d as the records want). Every other tensor passes
through unchanged. One layer's part is in memory at a time, as for a dense FFN matrix.
"""

from __future__ import annotations

import mlx.core as mx

from .errors import CheckpointError
from .models.base import FlashSpec


class ExpertView:
    """`ckpt` (a `Checkpoint`) with each MoE layer's experts stacked per record part."""

    def __init__(self, ckpt, spec: FlashSpec):
        self._ckpt = ckpt
        config = spec.text(ckpt.config)
        self.experts = spec.num_experts(config)
        layers = config.get(spec.dims[2])
        if not isinstance(self.experts, int) or self.experts < 1 or not isinstance(layers, int):
            raise CheckpointError(f"{ckpt.path}/config.json: {spec.experts[0]} is "
                                  f"{self.experts!r}, expected a positive int")
        names = set(ckpt.keys())
        self._parts: dict[str, tuple[str, list[str] | str]] = {}  # name -> (axis, sources)
        hidden = set()
        for layer in range(layers):
            for p in spec.parts:
                name = f"{p.module.format(layer=layer)}.weight"
                per = [f"{p.expert.format(layer=layer, expert=e)}.weight"
                       for e in range(self.experts)]
                if name in names:  # mlx-lm's stacked (experts, ...) tensor
                    self._parts[name] = (p.axis, name)
                    hidden.add(name)
                elif all(n in names for n in per):
                    self._parts[name] = (p.axis, per)
                    hidden.update(per)
        self._keys = [k for k in ckpt.keys() if k not in hidden] + list(self._parts)

    def __getattr__(self, attr):  # path, config, raw, ...: the checkpoint's own
        return getattr(self._ckpt, attr)

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, name: str) -> bool:
        return name in self._parts or name in self._ckpt

    def _first(self, name: str) -> tuple[str, str, bool]:
        """(axis, a source tensor, whether that one is the stacked 3-D tensor)."""
        axis, sources = self._parts[name]
        return (axis, sources, True) if isinstance(sources, str) else (axis, sources[0], False)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._parts:
            return self._ckpt.shape(name)
        axis, source, stacked = self._first(name)
        shape = self._ckpt.shape(source)
        if stacked:
            if len(shape) != 3 or shape[0] != self.experts:
                raise CheckpointError(f"{self._ckpt.path}: tensor {source} has shape "
                                      f"{list(shape)}; expected ({self.experts}, ...)")
            shape = shape[1:]
        if len(shape) != 2:
            raise CheckpointError(f"{self._ckpt.path}: tensor {source} has shape {list(shape)}; "
                                  "expected a matrix per expert")
        rows, cols = shape
        return (self.experts * rows, cols) if axis == "row" else (rows, self.experts * cols)

    def dtype(self, name: str) -> str:
        return self._ckpt.dtype(self._first(name)[1] if name in self._parts else name)

    def quantization_of(self, name: str):
        if name not in self._parts:
            return self._ckpt.quantization_of(name)
        return self._ckpt.quantization_of(self._first(name)[1])

    def quantized(self, name: str):
        """A stacked quantized row part as (experts * F, ...) triples; None otherwise (per-expert
        HF tensors are float; a quantized down part is dequantized by `load`)."""
        if name not in self._parts:
            return self._ckpt.quantized(name)
        axis, source, stacked = self._first(name)
        got = self._ckpt.quantized(source) if stacked else None
        if got is None or axis != "row":
            return None
        arrays, q = got
        return tuple(a.reshape(-1, a.shape[-1]) for a in arrays), q

    def load(self, name: str) -> mx.array:
        if name not in self._parts:
            return self._ckpt.load(name)
        axis, sources = self._parts[name]
        if isinstance(sources, str):
            stacked = self._ckpt.load(sources)  # (E, F, d) or (E, d, F)
        else:
            stacked = mx.stack([self._ckpt.load(s) for s in sources])
        if axis == "row":  # (E, F, d) -> (E*F, d)
            return stacked.reshape(-1, stacked.shape[-1])
        return stacked.transpose(1, 0, 2).reshape(stacked.shape[1], -1)  # (d, E*F)
