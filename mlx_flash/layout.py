"""The flash model directory's layout (docs/FORMAT.md): names, the record Part, the Manifest.

`format.py` reads and validates a directory into a Manifest; this module only lays one out.
"""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from .dtypes import FLOATS
from .models import flash_spec

FORMAT_VERSION = 1
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
    """One slice of a record: row or column `neuron` of one dense FFN matrix."""

    name: str
    tensor: str  # HF weight name with "{layer}"
    axis: str  # "row": row of a (ffn, d) matrix; "column": column of a (d, ffn) matrix
    offset: int  # element offset inside the record
    length: int  # elements (= d_model)
    bias: str | None = None  # HF bias name with "{layer}", resident

    def tensor_name(self, layer: int) -> str:
        return self.tensor.format(layer=layer)

    def bias_name(self, layer: int) -> str | None:
        return None if self.bias is None else self.bias.format(layer=layer)


def make_parts(architecture: str, d_model: int, biases: set[str] = frozenset()) -> tuple[Part, ...]:
    """The record parts of `architecture`; `biases` names the parts whose bias exists."""
    parts = []
    for i, spec in enumerate(flash_spec(architecture).parts):
        bias = f"{spec.module}.bias" if spec.name in biases else None
        parts.append(Part(spec.name, f"{spec.module}.weight", spec.axis, i * d_model, d_model,
                          bias))
    return tuple(parts)


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
    source: str | None = None
    created_by: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # unknown top-level keys, kept on rewrite

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
    def record_values(self) -> int:
        """Elements per record including padding: a record read is (record_values,) of dtype."""
        return self.record_bytes // self.itemsize

    @property
    def payload_bytes(self) -> int:
        return sum(p.length for p in self.parts) * self.itemsize

    @property
    def layer_bytes(self) -> int:
        return self.ffn_dim * self.record_bytes

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

    def layer_offset(self, layer: int) -> int:
        """Byte offset in ffn.bundles of record 0 of `layer`."""
        return self.layer_offsets[layer]

    def neuron_offset(self, layer: int, neuron: int) -> int:
        """Byte offset in ffn.bundles of the record of `neuron` in `layer`."""
        return self.layer_offsets[layer] + neuron * self.record_bytes

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to manifest.json."""
        parts = [dataclasses.asdict(p) for p in self.parts]
        tensors = {k: {"dtype": d, "shape": list(s)} for k, (d, s) in self.resident_tensors.items()}
        out = dict(self.extra)
        out.update(
            magic=MANIFEST_MAGIC, format_version=self.format_version,
            architecture=self.architecture, dtype=self.dtype, d_model=self.d_model,
            ffn_dim=self.ffn_dim, num_layers=self.num_layers, alignment=self.alignment,
            record_bytes=self.record_bytes, record_parts=parts,
            ffn_file={"name": FFN_FILE, "bytes": self.ffn_bytes, "data_offset": self.data_offset},
            layers=[{"offset": o, "neurons": self.ffn_dim} for o in self.layer_offsets],
            resident_file={"name": RESIDENT_FILE, "bytes": self.resident_bytes, "tensors": tensors},
        )
        if self.source is not None:
            out["source"] = self.source
        if self.created_by is not None:
            out["created_by"] = self.created_by
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
) -> Manifest:
    """Lay out a new directory: record size, header size and layer offsets follow from the dims."""
    check_alignment(alignment)
    parts = make_parts(architecture, d_model, biases)
    record_bytes = round_up(sum(p.length for p in parts) * FLOATS[dtype].itemsize, alignment)
    data_offset = alignment
    offsets = tuple(data_offset + i * ffn_dim * record_bytes for i in range(num_layers))
    return Manifest(
        path=Path(path), architecture=architecture, dtype=dtype, d_model=d_model,
        ffn_dim=ffn_dim, num_layers=num_layers, alignment=alignment, record_bytes=record_bytes,
        parts=parts, data_offset=data_offset,
        ffn_bytes=data_offset + num_layers * ffn_dim * record_bytes, layer_offsets=offsets,
        resident_bytes=resident_bytes, resident_tensors=dict(resident_tensors or {}),
        source=source, created_by=created_by,
    )
