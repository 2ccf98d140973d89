"""The flash model directory of docs/FORMAT.md: layout, Manifest, validation and readers.

Every claim of `manifest.json`, of the `ffn.bundles` header and of the `resident.safetensors` header is
checked before any tensor data is read; a failure is one FormatError naming file, field and fix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_flash.errors import FormatError

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
MAX_MANIFEST_BYTES = 64 << 20
MAX_SAFETENSORS_HEADER = 100 << 20

# magic, version, header_length, alignment, num_layers, ffn_dim, record_bytes, data_offset,
# d_model, dtype code, file_bytes
HEADER = struct.Struct("<8sIIIIQQQIIQ")
HEADER_LENGTH = HEADER.size  # 64

# Directory dtypes: itemsize, header code, safetensors name, numpy storage dtype (bfloat16 as raw u16).
DTYPES = {
    "float16": (2, 1, "F16", "<u2"),
    "bfloat16": (2, 2, "BF16", "<u2"),
    "float32": (4, 3, "F32", "<f4"),
}
MX_DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}

# Every safetensors dtype a resident tensor may carry (non-float tensors are copied unchanged).
SAFETENSORS_DTYPES = {
    "F16": ("float16", 2), "BF16": ("bfloat16", 2), "F32": ("float32", 4), "F64": ("float64", 8),
    "I8": ("int8", 1), "I16": ("int16", 2), "I32": ("int32", 4), "I64": ("int64", 8),
    "U8": ("uint8", 1), "U16": ("uint16", 2), "U32": ("uint32", 4), "U64": ("uint64", 8),
    "BOOL": ("bool", 1),
}
ST_NAME = {name: code for code, (name, _) in SAFETENSORS_DTYPES.items()}
ITEMSIZE = {name: size for name, size in SAFETENSORS_DTYPES.values()}

# Per architecture: (part name, HF module path with {layer}, axis), in record order.
ARCHITECTURES: dict[str, tuple[tuple[str, str, str], ...]] = {
    "opt": (
        ("fc1", "model.decoder.layers.{layer}.fc1", "row"),
        ("fc2", "model.decoder.layers.{layer}.fc2", "column"),
    ),
    "llama": (
        ("gate_proj", "model.layers.{layer}.mlp.gate_proj", "row"),
        ("up_proj", "model.layers.{layer}.mlp.up_proj", "row"),
        ("down_proj", "model.layers.{layer}.mlp.down_proj", "column"),
    ),
}
# config.json keys of (d_model, ffn_dim, num_layers) per architecture.
CONFIG_DIMS = {
    "opt": ("hidden_size", "ffn_dim", "num_hidden_layers"),
    "llama": ("hidden_size", "intermediate_size", "num_hidden_layers"),
}

_RECONVERT = "re-run `mlx-flash convert` on the source checkpoint"


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
    for i, (name, module, axis) in enumerate(ARCHITECTURES[architecture]):
        bias = f"{module}.bias" if name in biases else None
        parts.append(Part(name, f"{module}.weight", axis, i * d_model, d_model, bias))
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
        return DTYPES[self.dtype][0]

    @property
    def np_dtype(self) -> np.dtype:
        """Storage dtype of record values in numpy (bfloat16 and float16 as raw uint16)."""
        return np.dtype(DTYPES[self.dtype][3])

    @property
    def mx_dtype(self) -> mx.Dtype:
        return MX_DTYPES[self.dtype]

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
            DTYPES[self.dtype][1], self.ffn_bytes,
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
    record_bytes = round_up(sum(p.length for p in parts) * DTYPES[dtype][0], alignment)
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


def write_manifest(manifest: Manifest) -> None:
    text = json.dumps(manifest.to_dict(), indent=1)
    (manifest.path / MANIFEST).write_text(text + "\n", encoding="utf-8")


def is_flash_dir(path: str | Path) -> bool:
    """True if `path` is a flash model directory (it has a manifest.json); not a validation."""
    return (Path(path) / MANIFEST).is_file()


# ---------------------------------------------------------------------------------------------
# Validation


def _fail(file: str, fld: str, problem: str, fix: str | None = None) -> FormatError:
    return FormatError(file, fld, problem, fix or _RECONVERT)


def _get(obj: dict, key: str, kind: type, where: str = "", file: str = MANIFEST) -> Any:
    name = f"{where}{key}"
    if key not in obj:
        raise _fail(file, name, "missing")
    value = obj[key]
    bad_int = kind is int and isinstance(value, bool)
    if bad_int or not isinstance(value, kind):
        raise _fail(file, name, f"expected {kind.__name__}, got {type(value).__name__} {value!r:.40}")
    if kind is int and value < 0:
        raise _fail(file, name, f"must not be negative, got {value}")
    return value


def _load_json(path: Path, file: str) -> dict:
    if not path.is_file():
        raise _fail(file, "-", f"missing in {path.parent}")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise _fail(file, "-", f"larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(file, "-", f"not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise _fail(file, "-", "not a JSON object")
    return obj


def read_manifest(path: str | Path) -> Manifest:
    """Read and validate a flash model directory (all checks of docs/FORMAT.md; no tensor data)."""
    root = Path(path)
    if not root.is_dir():
        raise FormatError(str(root), "-", "not a directory", "pass a flash model directory")
    obj = _load_json(root / MANIFEST, MANIFEST)
    if obj.get("magic") != MANIFEST_MAGIC:
        raise _fail(MANIFEST, "magic", f"expected {MANIFEST_MAGIC!r}, got {obj.get('magic')!r:.40}")
    version = _get(obj, "format_version", int)
    if version != FORMAT_VERSION:
        raise _fail(MANIFEST, "format_version", f"unknown version {version} (this mlx-flash reads "
                    f"{FORMAT_VERSION})", f"upgrade mlx-flash or {_RECONVERT}")
    arch = _get(obj, "architecture", str)
    if arch not in ARCHITECTURES:
        raise _fail(MANIFEST, "architecture", f"unknown {arch!r} (known: {', '.join(ARCHITECTURES)})")
    dtype = _get(obj, "dtype", str)
    if dtype not in DTYPES:
        raise _fail(MANIFEST, "dtype", f"unknown {dtype!r} (known: {', '.join(DTYPES)})")
    dims = {k: _get(obj, k, int) for k in ("d_model", "ffn_dim", "num_layers")}
    for k, v in dims.items():
        if v == 0:
            raise _fail(MANIFEST, k, "must be positive")
    d_model, ffn_dim, num_layers = dims["d_model"], dims["ffn_dim"], dims["num_layers"]
    alignment = _get(obj, "alignment", int)
    try:
        check_alignment(alignment)
    except ValueError as e:
        raise _fail(MANIFEST, "alignment", str(e)) from None

    _check_config(root, arch, dims)
    parts = _check_parts(obj, arch, d_model)
    record_bytes = _get(obj, "record_bytes", int)
    want = round_up(sum(p.length for p in parts) * DTYPES[dtype][0], alignment)
    if record_bytes != want:
        raise _fail(MANIFEST, "record_bytes", f"{record_bytes}, but {len(parts)} parts x {d_model} "
                    f"x {DTYPES[dtype][0]} bytes aligned to {alignment} is {want}")

    ffn = _get(obj, "ffn_file", dict)
    if ffn.get("name") != FFN_FILE:
        raise _fail(MANIFEST, "ffn_file.name", f"expected {FFN_FILE!r}, got {ffn.get('name')!r:.40}")
    ffn_bytes = _get(ffn, "bytes", int, "ffn_file.")
    data_offset = _get(ffn, "data_offset", int, "ffn_file.")
    if data_offset != alignment:
        raise _fail(MANIFEST, "ffn_file.data_offset", f"{data_offset}, expected alignment {alignment}")
    offsets = _check_layers(obj, num_layers, ffn_dim, record_bytes, alignment, data_offset, ffn_bytes)

    res = _get(obj, "resident_file", dict)
    if res.get("name") != RESIDENT_FILE:
        raise _fail(MANIFEST, "resident_file.name", f"expected {RESIDENT_FILE!r}, got "
                    f"{res.get('name')!r:.40}")
    resident_bytes = _get(res, "bytes", int, "resident_file.")
    tensors = _check_tensor_list(_get(res, "tensors", dict, "resident_file."))

    known = {"magic", "format_version", "architecture", "dtype", "d_model", "ffn_dim", "num_layers",
             "alignment", "record_bytes", "record_parts", "ffn_file", "layers", "resident_file",
             "source", "created_by"}
    manifest = Manifest(
        path=root, architecture=arch, dtype=dtype, d_model=d_model, ffn_dim=ffn_dim,
        num_layers=num_layers, alignment=alignment, record_bytes=record_bytes, parts=parts,
        data_offset=data_offset, ffn_bytes=ffn_bytes, layer_offsets=offsets,
        resident_bytes=resident_bytes, resident_tensors=tensors, format_version=version,
        source=obj.get("source") if isinstance(obj.get("source"), str) else None,
        created_by=obj.get("created_by") if isinstance(obj.get("created_by"), str) else None,
        extra={k: v for k, v in obj.items() if k not in known},
    )
    _check_ffn_file(manifest)
    _check_resident_file(manifest)
    return manifest


def _check_config(root: Path, arch: str, dims: dict[str, int]) -> None:
    config = _load_json(root / CONFIG_FILE, CONFIG_FILE)
    for ours, theirs in zip(("d_model", "ffn_dim", "num_layers"), CONFIG_DIMS[arch], strict=True):
        if config.get(theirs) != dims[ours]:
            raise _fail(MANIFEST, ours, f"{dims[ours]} disagrees with {CONFIG_FILE} {theirs} = "
                        f"{config.get(theirs)!r:.40}")


def _check_parts(obj: dict, arch: str, d_model: int) -> tuple[Part, ...]:
    raw = _get(obj, "record_parts", list)
    spec = ARCHITECTURES[arch]
    if len(raw) != len(spec):
        raise _fail(MANIFEST, "record_parts", f"{len(raw)} parts, a {arch} record has {len(spec)}")
    parts, offset = [], 0
    for i, (entry, (name, module, axis)) in enumerate(zip(raw, spec, strict=True)):
        where = f"record_parts[{i}]."
        if not isinstance(entry, dict):
            raise _fail(MANIFEST, where[:-1], "expected an object")
        expected = {"name": name, "tensor": f"{module}.weight", "axis": axis, "offset": offset,
                    "length": d_model}
        for key, want in expected.items():
            got = _get(entry, key, type(want), where)
            if got != want:
                raise _fail(MANIFEST, where + key, f"{got!r:.60} disagrees with the {arch} layout "
                            f"({want!r}, d_model {d_model})")
        bias = entry.get("bias")
        if bias not in (None, f"{module}.bias"):
            raise _fail(MANIFEST, where + "bias", f"{bias!r:.60}, expected null or {module}.bias")
        parts.append(Part(name, f"{module}.weight", axis, offset, d_model, bias))
        offset += d_model
    return tuple(parts)


def _check_layers(obj, num_layers, ffn_dim, record_bytes, alignment, data_offset, ffn_bytes):
    layers = _get(obj, "layers", list)
    if len(layers) != num_layers:
        raise _fail(MANIFEST, "layers", f"{len(layers)} entries, num_layers is {num_layers}")
    offsets, expect = [], data_offset
    for i, entry in enumerate(layers):
        where = f"layers[{i}]."
        if not isinstance(entry, dict):
            raise _fail(MANIFEST, where[:-1], "expected an object")
        off, neurons = _get(entry, "offset", int, where), _get(entry, "neurons", int, where)
        if neurons != ffn_dim:
            raise _fail(MANIFEST, where + "neurons", f"{neurons}, ffn_dim is {ffn_dim}")
        end = off + neurons * record_bytes
        if end > ffn_bytes:
            raise _fail(MANIFEST, where + "offset", f"layer ends at byte {end}, past the end of "
                        f"{FFN_FILE} ({ffn_bytes} bytes)")
        if off % alignment:
            raise _fail(MANIFEST, where + "offset", f"{off} is not a multiple of {alignment}")
        if off != expect:
            raise _fail(MANIFEST, where + "offset", f"{off}, layers must be back to back from "
                        f"{data_offset}: expected {expect}")
        offsets.append(off)
        expect = end
    if expect != ffn_bytes:
        raise _fail(MANIFEST, "ffn_file.bytes", f"{ffn_bytes}, but the layers end at {expect}")
    return tuple(offsets)


def _check_tensor_list(raw: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    out = {}
    for name, entry in raw.items():
        where = f"resident_file.tensors.{name}."
        if not isinstance(entry, dict):
            raise _fail(MANIFEST, where[:-1], "expected an object")
        dtype = _get(entry, "dtype", str, where)
        if dtype not in ITEMSIZE:
            raise _fail(MANIFEST, where + "dtype", f"unknown {dtype!r:.40}")
        shape = _get(entry, "shape", list, where)
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise _fail(MANIFEST, where + "shape", f"not a list of sizes: {shape!r:.60}")
        out[name] = (dtype, tuple(shape))
    return out


def _check_ffn_file(m: Manifest) -> None:
    path = m.ffn_path
    if not path.is_file():
        raise _fail(FFN_FILE, "-", f"missing in {m.path}")
    size = path.stat().st_size
    if size != m.ffn_bytes:
        what = "truncated" if size < m.ffn_bytes else "too long"
        raise _fail(FFN_FILE, "size", f"{what}: {size} bytes, manifest.json ffn_file.bytes says "
                    f"{m.ffn_bytes}")
    with open(path, "rb") as f:
        raw = f.read(HEADER_LENGTH)
    if raw[:8] != MAGIC:
        raise _fail(FFN_FILE, "magic", f"expected {MAGIC!r}, got {raw[:8]!r}")
    (_, version, header_length, alignment, num_layers, ffn_dim, record_bytes, data_offset,
     d_model, code, file_bytes) = HEADER.unpack(raw)
    if version != FORMAT_VERSION:
        raise _fail(FFN_FILE, "format_version", f"unknown version {version} (this mlx-flash reads "
                    f"{FORMAT_VERSION})", f"upgrade mlx-flash or {_RECONVERT}")
    if not HEADER_LENGTH <= header_length <= data_offset:
        raise _fail(FFN_FILE, "header_length", f"{header_length} outside [64, data_offset]")
    claims = {"alignment": (alignment, m.alignment), "num_layers": (num_layers, m.num_layers),
              "ffn_dim": (ffn_dim, m.ffn_dim), "record_bytes": (record_bytes, m.record_bytes),
              "data_offset": (data_offset, m.data_offset), "d_model": (d_model, m.d_model),
              "dtype": (code, DTYPES[m.dtype][1]), "file_bytes": (file_bytes, m.ffn_bytes)}
    for name, (got, want) in claims.items():
        if got != want:
            raise _fail(FFN_FILE, name, f"header says {got}, manifest.json says {want}")


def read_safetensors_header(path: Path, file: str) -> tuple[dict[str, Any], int]:
    """Parse and validate a safetensors header: (tensors by name, offset of the data section)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _fail(file, "header", f"file is {size} bytes, too short for a safetensors header")
        n = int.from_bytes(head, "little")
        if n > min(MAX_SAFETENSORS_HEADER, size - 8):
            raise _fail(file, "header", f"header length {n} past the end of the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _fail(file, "header", f"not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _fail(file, "header", "not a JSON object")
    header.pop("__metadata__", None)
    start, spans = 8 + n, []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise _fail(file, name, "expected an object")
        code, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if code not in SAFETENSORS_DTYPES:
            raise _fail(file, f"{name}.dtype", f"unknown {code!r:.40}")
        ok_shape = isinstance(shape, list) and all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
        ok_offs = isinstance(offs, list) and len(offs) == 2 and all(
            isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offs)
        if not (ok_shape and ok_offs):
            raise _fail(file, name, "bad shape or data_offsets")
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[code][1]
        if offs[1] - offs[0] != nbytes:
            raise _fail(file, f"{name}.data_offsets", f"{offs[1] - offs[0]} bytes, shape {shape} x "
                        f"itemsize is {nbytes}")
        spans.append((offs[0], offs[1], name))
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            raise _fail(file, f"{name}.data_offsets", f"starts at {begin}, expected {pos} "
                        "(tensors must be back to back)")
        pos = end
    if start + pos != size:
        what = "past the end of" if start + pos > size else "short of"
        raise _fail(file, "data_offsets", f"tensors end at byte {start + pos}, {what} the file "
                    f"({size} bytes)")
    return header, start


def _check_resident_file(m: Manifest) -> None:
    path = m.resident_path
    if not path.is_file():
        raise _fail(RESIDENT_FILE, "-", f"missing in {m.path}")
    size = path.stat().st_size
    if size != m.resident_bytes:
        raise _fail(RESIDENT_FILE, "size", f"{size} bytes, manifest.json resident_file.bytes says "
                    f"{m.resident_bytes}")
    header, _ = read_safetensors_header(path, RESIDENT_FILE)
    for name, (dtype, shape) in m.resident_tensors.items():
        if name not in header:
            raise _fail(RESIDENT_FILE, name, "missing tensor listed in manifest.json")
        got = (SAFETENSORS_DTYPES[header[name]["dtype"]][0], tuple(header[name]["shape"]))
        if got != (dtype, shape):
            raise _fail(RESIDENT_FILE, name, f"{got[0]} {list(got[1])}, manifest.json says "
                        f"{dtype} {list(shape)}")
    extra = sorted(set(header) - set(m.resident_tensors))
    if extra:
        raise _fail(RESIDENT_FILE, extra[0], "tensor not listed in manifest.json")
    for p in m.parts:
        for layer in range(m.num_layers) if p.bias else ():
            want = (m.ffn_dim,) if p.axis == "row" else (m.d_model,)
            name = p.bias_name(layer)
            if name not in m.resident_tensors:
                raise _fail(RESIDENT_FILE, name, "missing bias named by manifest.json record_parts")
            if m.resident_tensors[name][1] != want:
                raise _fail(MANIFEST, "d_model" if p.axis == "column" else "ffn_dim",
                            f"bias {name} has shape {list(m.resident_tensors[name][1])}, "
                            f"expected {list(want)}")
    ffn_names = {p.tensor_name(layer) for p in m.parts for layer in range(m.num_layers)}
    for name in sorted(ffn_names & set(m.resident_tensors)):
        raise _fail(RESIDENT_FILE, name, "an FFN weight, which belongs in ffn.bundles")


# ---------------------------------------------------------------------------------------------
# Readers


def read_layer_records(m: Manifest, layer: int, start: int = 0, count: int | None = None,
                       file=None) -> np.ndarray:
    """Records `start:start+count` of `layer` as a (count, record_values) array of `m.np_dtype`."""
    count = m.ffn_dim - start if count is None else count
    if not (0 <= layer < m.num_layers and 0 <= start and start + count <= m.ffn_dim):
        raise IndexError(f"layer {layer} records {start}:{start + count} out of range")
    out = np.empty((count, m.record_values), dtype=m.np_dtype)
    f = file or open(m.ffn_path, "rb")
    try:
        f.seek(m.neuron_offset(layer, start))
        if f.readinto(memoryview(out).cast("B")) != out.nbytes:
            raise _fail(FFN_FILE, f"layers[{layer}]", "short read (file changed while reading?)")
    finally:
        if file is None:
            f.close()
    return out


def to_mx(values: np.ndarray, dtype: str) -> mx.array:
    """Storage-dtype numpy values (uint16 bits for 16-bit types) as an MLX array of `dtype`."""
    arr = mx.array(np.ascontiguousarray(values))
    return arr.view(MX_DTYPES[dtype]) if DTYPES[dtype][3] == "<u2" else arr


def load_dense_weights(path: str | Path) -> dict[str, mx.array]:
    """All weights of a flash directory under HF names, FFN matrices rebuilt dense from the bundles."""
    m = read_manifest(path)
    weights = dict(mx.load(str(m.resident_path)))
    with open(m.ffn_path, "rb") as f:
        for layer in range(m.num_layers):
            records = read_layer_records(m, layer, file=f)  # (ffn, record_values)
            for p in m.parts:
                block = records[:, p.offset : p.offset + p.length]  # (ffn, d)
                weights[p.tensor_name(layer)] = to_mx(block.T if p.axis == "column" else block,
                                                      m.dtype)
            del records
    return weights


def info(path: str | Path) -> dict[str, Any]:
    """What `mlx-flash info` prints: a JSON-able summary of a validated flash directory."""
    m = read_manifest(path)
    return {
        "path": str(m.path),
        "format_version": m.format_version,
        "architecture": m.architecture,
        "dtype": m.dtype,
        "d_model": m.d_model,
        "ffn_dim": m.ffn_dim,
        "num_layers": m.num_layers,
        "alignment": m.alignment,
        "bundle_bytes": m.record_bytes,
        "bundle_payload_bytes": m.payload_bytes,
        "resident_bytes": m.resident_bytes,
        "flash_bytes": m.ffn_bytes,
        "resident_tensors": len(m.resident_tensors),
        "source": m.source,
    }
