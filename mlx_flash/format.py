"""Read a flash model directory (docs/FORMAT.md): validation into a Manifest, and readers.

Every claim of `manifest.json`, of the `ffn.bundles` header and of the `resident.safetensors` header is
checked before any tensor data is read; a failure is one FormatError naming file, field and fix.
The layout itself (names, Part, Manifest, new_manifest) lives in `layout.py`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from . import models
from .dtypes import BY_NAME, BY_SAFETENSORS, FLOATS
from .errors import FormatError
from .layout import (  # noqa: F401  (the layout's names are part of this module's API)
    CONFIG_FILE,
    DEFAULT_ALIGNMENT,
    FFN_FILE,
    FORMAT_VERSION,
    HEADER,
    HEADER_LENGTH,
    MAGIC,
    MANIFEST,
    MANIFEST_MAGIC,
    MIN_ALIGNMENT,
    READ_VERSIONS,
    RESIDENT_FILE,
    Manifest,
    Part,
    check_alignment,
    make_parts,
    new_manifest,
    part_bytes,
    record_stride,
    round_up,
)
from .quant import Quantization
from .safetensors import read_header

MAX_MANIFEST_BYTES = 64 << 20
_RECONVERT = "re-run `mlx-flash convert` on the source checkpoint"


def write_manifest(manifest: Manifest, with_file: tuple[Path, Path] | None = None) -> None:
    """Write manifest.json atomically: a crash leaves the old file or the new one, never half."""
    write_atomic(manifest.path / MANIFEST, json.dumps(manifest.to_dict(), indent=1) + "\n",
                 with_file)


def update_manifest(path: str | Path, with_file: tuple[Path, Path] | None = None,
                    **entries) -> Manifest:
    """Set top-level `entries` of a valid directory's manifest.json (re-read first, so whatever
    else was added meanwhile stays), atomically. `with_file`: (partial, final) of a file written
    beforehand that the entries describe; it is renamed into place only once the new manifest is
    on disk, so a failure (a full disk) changes neither."""
    m = read_manifest(path)
    m = dataclasses.replace(m, extra={**m.extra, **entries})
    write_manifest(m, with_file)
    return m


def write_atomic(file: Path, text: str, with_file: tuple[Path, Path] | None = None) -> None:
    """Replace `file` with `text` through `file.partial`, fsynced, then renamed over it (after
    `with_file`'s partial is renamed to its final name, if given)."""
    partial = file.with_name(file.name + ".partial")
    try:
        with open(partial, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if with_file is not None:
            os.replace(*with_file)
        os.replace(partial, file)
    finally:
        partial.unlink(missing_ok=True)
        if with_file is not None:
            with_file[0].unlink(missing_ok=True)


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
    if version not in READ_VERSIONS:
        raise _fail(MANIFEST, "format_version", f"unknown version {version} (this mlx-flash reads "
                    f"{', '.join(map(str, READ_VERSIONS))})", f"upgrade mlx-flash or {_RECONVERT}")
    arch = _get(obj, "architecture", str)
    if arch not in models.supported():
        raise _fail(MANIFEST, "architecture", f"unknown {arch!r} (known: "
                    f"{', '.join(models.supported())})")
    dtype = _get(obj, "dtype", str)
    if dtype not in FLOATS:
        raise _fail(MANIFEST, "dtype", f"unknown {dtype!r} (known: {', '.join(FLOATS)})")
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

    experts = _check_config(root, arch, dims, obj.get("experts"))
    quantization = _check_quantization(obj, version, d_model)
    parts = _check_parts(obj, arch, d_model, dtype, quantization, version)
    record_bytes = _get(obj, "record_bytes", int)
    payload = sum(p.nbytes for p in parts)
    allowed = {record_stride(payload, alignment, packed=False)}
    if version >= 2:
        allowed.add(record_stride(payload, alignment, packed=True))
    if record_bytes not in allowed:
        raise _fail(MANIFEST, "record_bytes", f"{record_bytes}, but {len(parts)} parts of "
                    f"{parts[0].nbytes} bytes make {' or '.join(map(str, sorted(allowed)))}")

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
             "source", "created_by", "quantization", "experts"}
    manifest = Manifest(
        path=root, architecture=arch, dtype=dtype, d_model=d_model, ffn_dim=ffn_dim,
        num_layers=num_layers, alignment=alignment, record_bytes=record_bytes, parts=parts,
        data_offset=data_offset, ffn_bytes=ffn_bytes, layer_offsets=offsets,
        resident_bytes=resident_bytes, resident_tensors=tensors, format_version=version,
        quantization=quantization,
        source=obj.get("source") if isinstance(obj.get("source"), str) else None,
        created_by=obj.get("created_by") if isinstance(obj.get("created_by"), str) else None,
        extra={k: v for k, v in obj.items() if k not in known}, experts=experts,
    )
    _check_ffn_file(manifest)
    _check_resident_file(manifest)
    return manifest


def _check_config(root: Path, arch: str, dims: dict[str, int], experts) -> int | None:
    """Check the manifest's dims against config.json; the routed experts' count of an MoE."""
    spec = models.flash_spec(arch)
    config = spec.text(_load_json(root / CONFIG_FILE, CONFIG_FILE))
    for ours, theirs in zip(("d_model", "ffn_dim", "num_layers"), spec.dims, strict=True):
        want = spec.neurons(config) if ours == "ffn_dim" else config.get(theirs)
        if want != dims[ours]:
            if ours == "ffn_dim" and spec.experts:
                theirs = f"{theirs} x {spec.experts[0]}"
            raise _fail(MANIFEST, ours, f"{dims[ours]} disagrees with {CONFIG_FILE} {theirs} = "
                        f"{want!r:.40}")
    if spec.num_experts(config) != experts:
        raise _fail(MANIFEST, "experts", f"{experts!r:.40} disagrees with {CONFIG_FILE} "
                    f"{(spec.experts or ('experts',))[0]} = {spec.num_experts(config)!r:.40}")
    return experts


def _check_quantization(obj: dict, version: int, d_model: int) -> Quantization | None:
    entry = obj.get("quantization")
    if entry is None:
        return None
    if version < 2 or not isinstance(entry, dict) or entry.get("mode", "affine") != "affine":
        raise _fail(MANIFEST, "quantization", f"{entry!r:.60} is not an affine quantization of "
                    "format version 2")
    try:
        column = entry.get("column_bits")
        if column is not None:
            column = _get(entry, "column_bits", int, "quantization.")
        q = Quantization(_get(entry, "bits", int, "quantization."),
                         _get(entry, "group_size", int, "quantization."), column)
        q.check_dim(d_model)
    except ValueError as e:
        raise _fail(MANIFEST, "quantization", str(e)) from None
    return q


def _check_parts(obj: dict, arch: str, d_model: int, dtype: str, quantization, version: int
                 ) -> tuple[Part, ...]:
    raw = _get(obj, "record_parts", list)
    spec = [(p.name, p.module, p.axis) for p in models.flash_spec(arch).parts]
    if len(raw) != len(spec):
        raise _fail(MANIFEST, "record_parts", f"{len(raw)} parts, a {arch} record has {len(spec)}")
    parts, offset = [], 0
    for i, (entry, (name, module, axis)) in enumerate(zip(raw, spec, strict=True)):
        where = f"record_parts[{i}]."
        if not isinstance(entry, dict):
            raise _fail(MANIFEST, where[:-1], "expected an object")
        expected = {"name": name, "tensor": f"{module}.weight", "axis": axis}
        size = part_bytes(d_model, dtype, quantization, axis)
        if version == 1:  # offsets and lengths in values
            expected.update(offset=i * d_model, length=d_model)
        else:
            expected.update({"offset": offset, "bytes": size})
        for key, want in expected.items():
            got = _get(entry, key, type(want), where)
            if got != want:
                raise _fail(MANIFEST, where + key, f"{got!r:.60} disagrees with the {arch} layout "
                            f"({want!r}, d_model {d_model})")
        bias = entry.get("bias")
        if bias not in (None, f"{module}.bias"):
            raise _fail(MANIFEST, where + "bias", f"{bias!r:.60}, expected null or {module}.bias")
        parts.append(Part(name, f"{module}.weight", axis, offset, size, bias))
        offset += size
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
            raise _fail(MANIFEST, where + "offset", f"{off}, layers must follow each other from "
                        f"{data_offset}, each padded to the alignment: expected {expect}")
        offsets.append(off)
        expect = round_up(end, alignment)
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
        if dtype not in BY_NAME:
            raise _fail(MANIFEST, where + "dtype", f"unknown {dtype!r:.40}")
        shape = _get(entry, "shape", list, where)
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
            raise _fail(MANIFEST, where + "shape", f"not a list of sizes: {shape!r:.60}")
        out[name] = (dtype, tuple(shape))
    return out


def _check_size(path: Path, file: str, field: str, want: int) -> None:
    """`path` exists and holds the `want` bytes that manifest.json's `field` says."""
    if not path.is_file():
        raise _fail(file, "-", f"missing in {path.parent}")
    size = path.stat().st_size
    if size != want:
        what = "truncated" if size < want else "too long"
        raise _fail(file, "size", f"{what}: {size} bytes, manifest.json {field} says {want}")


def _check_ffn_file(m: Manifest) -> None:
    path = m.ffn_path
    _check_size(path, FFN_FILE, "ffn_file.bytes", m.ffn_bytes)
    with open(path, "rb") as f:
        raw = f.read(HEADER_LENGTH)
    if raw[:8] != MAGIC:
        raise _fail(FFN_FILE, "magic", f"expected {MAGIC!r}, got {raw[:8]!r}")
    (_, version, header_length, alignment, num_layers, ffn_dim, record_bytes, data_offset,
     d_model, code, file_bytes) = HEADER.unpack(raw)
    if version != m.format_version:
        raise _fail(FFN_FILE, "format_version", f"header says {version}, manifest.json says "
                    f"{m.format_version}")
    if not HEADER_LENGTH <= header_length <= data_offset:
        raise _fail(FFN_FILE, "header_length", f"{header_length} outside [64, data_offset]")
    claims = {"alignment": (alignment, m.alignment), "num_layers": (num_layers, m.num_layers),
              "ffn_dim": (ffn_dim, m.ffn_dim), "record_bytes": (record_bytes, m.record_bytes),
              "data_offset": (data_offset, m.data_offset), "d_model": (d_model, m.d_model),
              "dtype": (code, FLOATS[m.dtype].code), "file_bytes": (file_bytes, m.ffn_bytes)}
    for name, (got, want) in claims.items():
        if got != want:
            raise _fail(FFN_FILE, name, f"header says {got}, manifest.json says {want}")


def read_safetensors_header(path: Path, file: str) -> tuple[dict[str, Any], int]:
    """A validated safetensors header in this directory: (tensors by name, data offset)."""
    return read_header(path, lambda fld, problem: _fail(file, fld, problem))


def _check_resident_file(m: Manifest) -> None:
    path = m.resident_path
    _check_size(path, RESIDENT_FILE, "resident_file.bytes", m.resident_bytes)
    header, _ = read_safetensors_header(path, RESIDENT_FILE)
    for name, (dtype, shape) in m.resident_tensors.items():
        if name not in header:
            raise _fail(RESIDENT_FILE, name, "missing tensor listed in manifest.json")
        got = (BY_SAFETENSORS[header[name]["dtype"]].name, tuple(header[name]["shape"]))
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
    """Records `start:start+count` of `layer` as a (count, record_bytes) uint8 array (decode a
    part with `m.part_values` / `m.part_arrays`)."""
    count = m.ffn_dim - start if count is None else count
    if not (0 <= layer < m.num_layers and 0 <= start and start + count <= m.ffn_dim):
        raise IndexError(f"layer {layer} records {start}:{start + count} out of range")
    out = np.empty((count, m.record_bytes), dtype=np.uint8)
    f = file or open(m.ffn_path, "rb")
    try:
        f.seek(m.neuron_offset(layer, start))
        if f.readinto(memoryview(out).cast("B")) != out.nbytes:
            raise _fail(FFN_FILE, f"layers[{layer}]", "short read (file changed while reading?)")
    finally:
        if file is None:
            f.close()
    return out


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
        "experts": m.experts,
        "num_layers": m.num_layers,
        "alignment": m.alignment,
        "bundle_bytes": m.record_bytes,
        "bundle_payload_bytes": m.payload_bytes,
        "quantization": None if m.quantization is None else m.quantization.to_dict(),
        "layout": "packed" if m.packed else "aligned",
        "resident_bytes": m.resident_bytes,
        "flash_bytes": m.ffn_bytes,
        "padding_fraction": round(1 - m.num_layers * m.ffn_dim * m.payload_bytes
                                  / (m.ffn_bytes - m.data_offset), 4),
        "resident_tensors": len(m.resident_tensors),
        "source": m.source,
        "calibrated": _calibration(m.extra.get("predictors")),
        "sketch": (f"{sk.get('bits')}-bit, top {sk.get('keep')} of each layer per token"
                   if isinstance(sk := m.extra.get("sketch"), dict) else None),
        "checksums": isinstance(m.extra.get("checksums"), dict),
        "verified": (m.extra.get("verified") or {}).get("at"),
    }


def _calibration(entry) -> str | None:
    """What `info` says of the predictors: None when the dir was never calibrated."""
    if not isinstance(entry, dict):
        return None
    cal = entry.get("calibration") or {}
    text = (f"{cal.get('tokens', '?')} tokens of {cal.get('data', '?')}, target recall "
            f"{entry.get('target_recall', '?')}")
    for name, rows, data in (("held out", entry.get("layers"), cal.get("data")),
                             ("second text", (entry.get("holdout") or {}).get("layers"),
                              (entry.get("holdout") or {}).get("data"))):
        recall = [r.get("recall") for r in rows or [] if isinstance(r, dict)]
        if recall and all(isinstance(v, (int, float)) for v in recall):
            text += (f"; recall {sum(recall) / len(recall):.3f} (lowest layer "
                     f"{min(recall):.3f}) on {name} {data}")
    return text
