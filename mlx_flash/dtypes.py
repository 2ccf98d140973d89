"""Every dtype name the project knows, with its MLX, numpy and safetensors forms (one table).

Floating weights are stored as raw bits in numpy (`uint16` for float16 and bfloat16, since numpy
has no bfloat16), so one map serves files, records and MLX arrays alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np


@dataclass(frozen=True)
class DType:
    name: str  # "float16"
    itemsize: int
    safetensors: str  # "F16"
    storage: str  # numpy dtype of the raw bits: "<u2" for 16-bit floats
    mx: mx.Dtype | None = None  # None: not a floating weight dtype we compute in
    code: int = 0  # the ffn.bundles header code (floating weight dtypes only)


_ALL = (
    DType("float16", 2, "F16", "<u2", mx.float16, 1),
    DType("bfloat16", 2, "BF16", "<u2", mx.bfloat16, 2),
    DType("float32", 4, "F32", "<f4", mx.float32, 3),
    DType("float64", 8, "F64", "<f8"),
    DType("int8", 1, "I8", "<i1"), DType("int16", 2, "I16", "<i2"),
    DType("int32", 4, "I32", "<i4"), DType("int64", 8, "I64", "<i8"),
    DType("uint8", 1, "U8", "<u1"), DType("uint16", 2, "U16", "<u2"),
    DType("uint32", 4, "U32", "<u4"), DType("uint64", 8, "U64", "<u8"),
    DType("bool", 1, "BOOL", "|b1"),
)
BY_NAME = {d.name: d for d in _ALL}
BY_SAFETENSORS = {d.safetensors: d for d in _ALL}
# The floating dtypes a flash dir's FFN records and the models' weights may have.
FLOATS = {d.name: d for d in _ALL if d.mx is not None}


def check_float(name: str, what: str = "dtype") -> DType:
    """The floating DType `name`, or ValueError naming the choices."""
    if name not in FLOATS:
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(FLOATS)}")
    return FLOATS[name]


def to_mx(values: np.ndarray, name: str) -> mx.array:
    """Storage-dtype numpy values (uint16 bits for 16-bit floats) as an MLX array of `name`."""
    arr = mx.array(np.ascontiguousarray(values))
    d = BY_NAME[name]
    return arr.view(d.mx) if d.mx is not None and d.storage == "<u2" else arr


def to_storage(arr: mx.array, name: str) -> np.ndarray:
    """`arr` cast to floating `name`, as numpy holding the bits (uint16 for 16-bit floats)."""
    d = FLOATS[name]
    arr = arr.astype(d.mx)
    if d.itemsize == 2:
        arr = arr.view(mx.uint16)
    return np.array(arr).astype(d.storage, copy=False)  # little-endian on every supported host


def to_float32(values: np.ndarray, name: str) -> np.ndarray:
    """Storage-dtype values (uint16 bits for 16-bit floats) as numpy float32."""
    if name == "float16":
        return values.view(np.float16).astype(np.float32)
    if name == "bfloat16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32)
