"""The flash model directory's layout (docs/FORMAT.md): names, the record Part, the Manifest.

`format.py` reads and validates a directory into a Manifest; this module only lays one out.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from . import quant
from .dtypes import FLOATS
from .models import flash_spec
from .quant import Quantization

FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)  # version 1 dirs (aligned float records) still load
RECORD_GRANULE = 16  # packed records are padded to a multiple of this many bytes
MAGIC = b"MLXFLASH"
MANIFEST_MAGIC = "mlx-flash"
MANIFEST = "manifest.json"
FFN_FILE = "ffn.bundles"
RESIDENT_FILE = "resident.safetensors"
CONFIG_FILE = "config.json"
DEFAULT_ALIGNMENT = 16384
MIN_ALIGNMENT = 4096
MAX_ALIGNMENT = 16 << 20

# magic, version, header_length, alignment, num_layers, ffn_dim, record_bytes, data_offset,
# d_model, dtype code, file_bytes
HEADER = struct.Struct("<8sIIIIQQQIIQ")
HEADER_LENGTH = HEADER.size  # 64


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def check_alignment(alignment: int) -> None:
    """Raise ValueError unless `alignment` is a power of two in [4096, 16 MiB]."""
    ok = isinstance(alignment, int) and MIN_ALIGNMENT <= alignment <= MAX_ALIGNMENT
    if not ok or alignment & (alignment - 1):
        raise ValueError(
            f"alignment must be a power of two between {MIN_ALIGNMENT} and {MAX_ALIGNMENT}, "
            f"got {alignment}"
        )


@dataclass(frozen=True)
class Part:
    """One slice of a record: row or column `neuron` of one dense FFN matrix, `nbytes` bytes at
    byte `offset` of the record (d values, or their quantized form: see quant.py)."""

    name: str
    tensor: str  # HF weight name with "{layer}"
    axis: str  # "row": row of a (ffn, d) matrix; "column": column of a (d, ffn) matrix
    offset: int  # byte offset inside the record
    nbytes: int
    bias: str | None = None  # HF bias name with "{layer}", resident

    @property
    def span(self) -> tuple[int, int]:
        return self.offset, self.offset + self.nbytes

    def tensor_name(self, layer: int) -> str:
        return self.tensor.format(layer=layer)

    def bias_name(self, layer: int) -> str | None:
        return None if self.bias is None else self.bias.format(layer=layer)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "tensor": self.tensor, "axis": self.axis,
                "offset": self.offset, "bytes": self.nbytes, "bias": self.bias}


def part_bytes(d_model: int, dtype: str, quantization: Quantization | None,
               axis: str = "row") -> int:
    """Bytes of one record part of `axis`: d values in `dtype`, or their quantized form."""
    itemsize = FLOATS[dtype].itemsize
    if quantization is None:
        return d_model * itemsize
    return quantization.for_axis(axis).part_bytes(d_model, itemsize)


def make_parts(architecture: str, d_model: int, dtype: str,
               quantization: Quantization | None = None,
               biases: set[str] = frozenset()) -> tuple[Part, ...]:
    """The record parts of `architecture`; `biases` names the parts whose bias exists."""
    parts, offset = [], 0
    for spec in flash_spec(architecture).parts:
        bias = f"{spec.module}.bias" if spec.name in biases else None
        size = part_bytes(d_model, dtype, quantization, spec.axis)
        parts.append(Part(spec.name, f"{spec.module}.weight", spec.axis, offset, size, bias))
        offset += size
    return tuple(parts)


def record_stride(payload: int, alignment: int, packed: bool) -> int:
    """Bytes from one record to the next: packed records follow each other (padded to
    RECORD_GRANULE bytes), aligned ones each start at a multiple of `alignment`."""
    return round_up(payload, RECORD_GRANULE if packed else alignment)


@dataclass(frozen=True)
class Manifest:
    """A validated `manifest.json` plus the directory it describes (see docs/FORMAT.md)."""

    path: Path
    architecture: str
    dtype: str
    d_model: int
    ffn_dim: int
    num_layers: int
    alignment: int
    record_bytes: int
    parts: tuple[Part, ...]
    data_offset: int
    ffn_bytes: int
    layer_offsets: tuple[int, ...]
    resident_bytes: int
    resident_tensors: dict[str, tuple[str, tuple[int, ...]]]
    format_version: int = FORMAT_VERSION
    quantization: Quantization | None = None  # None: records hold float values
    source: str | None = None
    created_by: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # unknown top-level keys, kept on rewrite
    experts: int | None = None  # MoE: routed experts per layer, each ffn_dim / experts records

    @property
    def expert_ffn(self) -> int:
        """Records of one routed expert (MoE), or of the whole layer."""
        return self.ffn_dim // (self.experts or 1)

    @property
    def itemsize(self) -> int:
        return FLOATS[self.dtype].itemsize

    @property
    def np_dtype(self) -> np.dtype:
        """Storage dtype of record values in numpy (bfloat16 and float16 as raw uint16)."""
        return np.dtype(FLOATS[self.dtype].storage)

    @property
    def mx_dtype(self) -> mx.Dtype:
        return FLOATS[self.dtype].mx

    @property
    def payload_bytes(self) -> int:
        """Bytes of one neuron's parts, without padding."""
        return sum(p.nbytes for p in self.parts)

    @property
    def packed(self) -> bool:
        """Whether records follow each other inside a block (reads are then widened to whole
        `alignment` blocks) instead of each starting on one."""
        return self.record_bytes % self.alignment != 0

    @property
    def layer_bytes(self) -> int:
        """Bytes from one layer's first record to the next layer's (records, then padding up to
        the alignment)."""
        return round_up(self.ffn_dim * self.record_bytes, self.alignment)

    @property
    def ffn_path(self) -> Path:
        return self.path / FFN_FILE

    @property
    def resident_path(self) -> Path:
        return self.path / RESIDENT_FILE

    def part(self, name: str) -> Part:
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(f"no record part {name!r} in a {self.architecture} record")

    def part_arrays(self, records, part: Part) -> tuple[mx.array, ...]:
        """Part `part` of n records ((n, record_bytes) uint8, numpy or MLX): `(values,)` (n, d)
        for float records, `(packed, scales, biases)` for quantized ones (quant.py)."""
        lo, hi = part.span
        raw = records[:, lo:hi]
        raw = raw if isinstance(raw, mx.array) else mx.array(np.ascontiguousarray(raw))
        if self.quantization is None:
            return (raw.view(self.mx_dtype),)
        return quant.decode(raw, self.part_quantization(part), self.d_model, self.mx_dtype)

    def part_quantization(self, part: Part) -> Quantization | None:
        """How `part` is quantized (None for float records)."""
        return None if self.quantization is None else self.quantization.for_axis(part.axis)

    def part_values(self, records, part: Part) -> mx.array:
        """Part `part` of n records as (n, d) values in the directory's dtype (dequantized)."""
        arrays = self.part_arrays(records, part)
        if self.quantization is None:
            return arrays[0]
        return mx.dequantize(*arrays, **self.part_quantization(part).kwargs).astype(self.mx_dtype)

    def layer_offset(self, layer: int) -> int:
        """Byte offset in ffn.bundles of record 0 of `layer`."""
        return self.layer_offsets[layer]

    def neuron_offset(self, layer: int, neuron: int) -> int:
        """Byte offset in ffn.bundles of the record of `neuron` in `layer`."""
        return self.layer_offsets[layer] + neuron * self.record_bytes

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to manifest.json."""
        parts = [p.to_dict() for p in self.parts]
        tensors = {k: {"dtype": d, "shape": list(s)} for k, (d, s) in self.resident_tensors.items()}
        out = dict(self.extra)
        out.update(
            magic=MANIFEST_MAGIC, format_version=self.format_version,
            architecture=self.architecture, dtype=self.dtype, d_model=self.d_model,
            ffn_dim=self.ffn_dim, num_layers=self.num_layers, alignment=self.alignment,
            record_bytes=self.record_bytes, record_parts=parts,
            quantization=None if self.quantization is None else self.quantization.to_dict(),
            ffn_file={"name": FFN_FILE, "bytes": self.ffn_bytes, "data_offset": self.data_offset},
            layers=[{"offset": o, "neurons": self.ffn_dim} for o in self.layer_offsets],
            resident_file={"name": RESIDENT_FILE, "bytes": self.resident_bytes, "tensors": tensors},
        )
        if self.source is not None:
            out["source"] = self.source
        if self.created_by is not None:
            out["created_by"] = self.created_by
        if self.experts is not None:
            out["experts"] = self.experts
        return out

    def ffn_header(self) -> bytes:
        """The ffn.bundles header padded with zeros to `data_offset`."""
        head = HEADER.pack(
            MAGIC, self.format_version, HEADER_LENGTH, self.alignment, self.num_layers,
            self.ffn_dim, self.record_bytes, self.data_offset, self.d_model,
            FLOATS[self.dtype].code, self.ffn_bytes,
        )
        return head.ljust(self.data_offset, b"\0")


def new_manifest(
    path: str | Path,
    architecture: str,
    dtype: str,
    d_model: int,
    ffn_dim: int,
    num_layers: int,
    alignment: int = DEFAULT_ALIGNMENT,
    biases: set[str] = frozenset(),
    resident_tensors: dict[str, tuple[str, tuple[int, ...]]] | None = None,
    resident_bytes: int = 0,
    source: str | None = None,
    created_by: str | None = None,
    quantization: Quantization | None = None,
    packed: bool = True,
    experts: int | None = None,
) -> Manifest:
    """Lay out a new directory: record size, header size and layer offsets follow from the dims."""
    check_alignment(alignment)
    if quantization is not None:
        quantization.check_dim(d_model)
    parts = make_parts(architecture, d_model, dtype, quantization, biases)
    record_bytes = record_stride(sum(p.nbytes for p in parts), alignment, packed)
    data_offset = alignment
    layer_bytes = round_up(ffn_dim * record_bytes, alignment)
    offsets = tuple(data_offset + i * layer_bytes for i in range(num_layers))
    return Manifest(
        path=Path(path), architecture=architecture, dtype=dtype, d_model=d_model,
        ffn_dim=ffn_dim, num_layers=num_layers, alignment=alignment, record_bytes=record_bytes,
        parts=parts, data_offset=data_offset,
        ffn_bytes=data_offset + num_layers * layer_bytes, layer_offsets=offsets,
        resident_bytes=resident_bytes, resident_tensors=dict(resident_tensors or {}),
        quantization=quantization, source=source, created_by=created_by, experts=experts,
    )
