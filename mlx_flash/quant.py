"""MLX affine quantization of FFN records (docs/FORMAT.md, "Quantized records").

A quantized record part holds one neuron's row of d values as MLX's `mx.quantize` lays out a
(1, d) matrix: the packed values (d·bits/8 bytes, uint32 words), then d/group_size scales and
d/group_size biases in the directory's float dtype; value = scale · q + bias per group of
`group_size` consecutive values along d. Gate/up rows are rows of their matrix, the down part is
a row of the transposed down matrix, so every part is quantized along d and a cache of n neurons
is an (n, d) quantized matrix for `mx.quantized_matmul` (transpose=True for rows, False for the
down part) or for `mx.dequantize`.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize packs; `convert --quantize` offers 4 and 8
GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class Quantization:
    """How a directory's FFN records are quantized: MLX affine, `bits` per value."""

    bits: int
    group_size: int
    column_bits: int | None = None  # the down (column) part's own bits, if they differ

    def __post_init__(self):
        for bits in (self.bits, self.column_bits or self.bits):
            if bits not in BITS:
                raise ValueError(f"bits must be one of {', '.join(map(str, BITS))}, got {bits}")
        if self.group_size not in GROUP_SIZES:
            raise ValueError(f"group size must be one of {', '.join(map(str, GROUP_SIZES))}, "
                             f"got {self.group_size}")

    def check_dim(self, d: int) -> None:
        """Raise ValueError unless rows of `d` values split into whole groups."""
        if d % self.group_size:
            raise ValueError(f"d_model {d} is not a multiple of the group size {self.group_size}")

    def spans(self, d: int, itemsize: int) -> tuple[int, int, int]:
        """Bytes of a part's packed values, scales and biases."""
        groups = d // self.group_size
        return d * self.bits // 8, groups * itemsize, groups * itemsize

    def part_bytes(self, d: int, itemsize: int) -> int:
        return sum(self.spans(d, itemsize))

    def for_axis(self, axis: str) -> Quantization:
        """The quantization of a record part of `axis` ("row" or "column")."""
        if axis == "column" and self.column_bits not in (None, self.bits):
            return Quantization(self.column_bits, self.group_size)
        return Quantization(self.bits, self.group_size)

    def to_dict(self) -> dict:
        out = {"mode": "affine", "bits": self.bits, "group_size": self.group_size}
        if self.column_bits not in (None, self.bits):
            out["column_bits"] = self.column_bits
        return out

    @property
    def kwargs(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits}


COMPUTES = ("quantized", "dequantized")


def default_compute() -> str:
    """How to compute over cached quantized neurons on this device: `quantized_matmul` where
    MLX has fast quantized kernels (a GPU), else dequantize on insert into a float cache (on
    MLX's CPU backend quantized_matmul is ~11x slower than a float16 matvec: BENCHMARKS.md)."""
    return "quantized" if mx.default_device().type == mx.DeviceType.gpu else "dequantized"


def quantize(values: mx.array, q: Quantization, dtype: mx.Dtype) -> tuple[mx.array, ...]:
    """(n, d) float values -> (packed uint32, scales, biases) as `mx.quantize` makes them, with
    scales and biases in `dtype`."""
    w, s, b = mx.quantize(values.astype(dtype), **q.kwargs)
    return w, s.astype(dtype), b.astype(dtype)


def encode(w: mx.array, s: mx.array, b: mx.array) -> np.ndarray:
    """One part's (packed, scales, biases) of n rows as (n, part_bytes) uint8 record bytes."""
    return np.concatenate([as_bytes(a) for a in (w, s, b)], axis=1)


def as_bytes(a: mx.array) -> np.ndarray:
    """A 2-D MLX array's bits as (rows, bytes) numpy uint8."""
    if a.dtype in (mx.float16, mx.bfloat16):
        a = a.view(mx.uint16)  # numpy has no bfloat16: carry the bits
    return np.array(a).view(np.uint8).reshape(a.shape[0], -1)


def decode(raw: mx.array, q: Quantization, d: int, dtype: mx.Dtype) -> tuple[mx.array, ...]:
    """(n, part_bytes) uint8 -> (packed uint32 (n, d·bits/32), scales (n, d/g), biases (n, d/g))."""
    wb, sb, _ = q.spans(d, dtype.size)
    w = raw[:, :wb].view(mx.uint32)
    s = raw[:, wb : wb + sb].view(dtype)
    b = raw[:, wb + sb :].view(dtype)
    return w, s, b


def dequantize(raw: mx.array, q: Quantization, d: int, dtype: mx.Dtype) -> mx.array:
    """(n, part_bytes) uint8 record bytes -> (n, d) values in `dtype`."""
    return mx.dequantize(*decode(raw, q, d, dtype), **q.kwargs).astype(dtype)
