"""The tensors of a flash dir's safetensors files as MLX arrays: the resident weights (and the
predictors and sketch) read around the page cache, a dense model rebuilt from the records; and
the partial file through which the derived files (predictors, sketch) are written."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import platform
from .dtypes import BY_SAFETENSORS
from .errors import FlashError
from .format import (
    RESIDENT_FILE,
    Manifest,
    read_layer_records,
    read_manifest,
    read_safetensors_header,
)


def write_partial_safetensors(file: Path, tensors: dict[str, mx.array],
                              metadata: dict[str, str]) -> tuple[Path, int]:
    """Write `tensors` to `*.partial.safetensors` beside `file` (mx.save_safetensors wants the
    suffix), flushed to disk; returns (the partial file, its CRC-32). The caller renames it into
    place with the manifest update (`update_manifest(with_file=...)`); a failed write leaves
    nothing behind and is one FlashError."""
    partial = file.with_name(file.stem + ".partial.safetensors")
    try:
        mx.save_safetensors(str(partial), tensors, metadata=metadata)
        crc = 0
        with open(partial, "rb") as f:  # a chunk at a time: a large model's file is GBs
            os.fsync(f.fileno())
            while chunk := f.read(1 << 24):
                crc = zlib.crc32(chunk, crc)
    except (RuntimeError, OSError) as e:  # MLX reports a failed write as a RuntimeError
        partial.unlink(missing_ok=True)
        raise FlashError(f"{file.parent}: cannot write {file.name} ({str(e).strip()}); is the "
                         "disk full? The model dir is unchanged") from None
    return partial, crc


def load_resident(m: Manifest, names=None) -> dict[str, mx.array]:
    """The resident tensors (or those in `names`) as MLX arrays (`load_uncached`)."""
    return load_uncached(m.resident_path, RESIDENT_FILE, names)


def load_uncached(path: Path, label: str, names=None) -> dict[str, mx.array]:
    """The tensors of a safetensors file (or those in `names`) as MLX arrays, each read
    straight into its own memory around the page cache (`platform.read_uncached`): under a
    memory limit that counts page cache (Linux cgroups) the weights are held once, not also as
    cached file pages, as `mx.load` leaves them. `label` names the file in errors."""
    header, start = read_safetensors_header(path, label)
    out = {}
    for name, entry in header.items():
        if names is not None and name not in names:
            continue
        dtype = BY_SAFETENSORS[entry["dtype"]]
        begin, end = entry["data_offsets"]
        raw = np.empty(end - begin, dtype=np.uint8)
        if end > begin:
            platform.read_uncached(path, start + begin, raw)
        # copied into MLX's own buffer, one tensor at a time (an MLX array viewed as numpy and
        # written into crashed the process once glibc returned freed blocks to the OS)
        target = dtype.mx if dtype.mx is not None else getattr(mx, dtype.name)
        array = mx.array(raw.view(dtype.storage)).view(target).reshape(entry["shape"])
        mx.eval(array)
        out[name] = array
        del raw
    return out


def load_dense_weights(path: str | Path, layers: range | None = None) -> dict[str, mx.array]:
    """All weights of a flash directory under HF names, FFN matrices rebuilt from the bundles
    (`layers`: only those layers' FFN matrices; the resident weights stay lazy until used).

    Quantized records give quantized row matrices (`.weight`, `.scales`, `.biases`, as mlx-lm's
    QuantizedLinear holds them) and a dequantized column matrix: the records quantize the down
    projection along d, a QuantizedLinear along the FFN axis.
    """
    m = read_manifest(path)
    weights = dict(mx.load(str(m.resident_path)))
    with open(m.ffn_path, "rb") as f:
        for layer in range(m.num_layers) if layers is None else layers:
            records = read_layer_records(m, layer, file=f)  # (ffn, record_bytes)
            for p in m.parts:
                name = p.tensor_name(layer)
                if m.quantization is not None and p.axis == "row":
                    w, s, b = m.part_arrays(records, p)
                    stem = name[: -len("weight")]
                    weights.update({name: w, stem + "scales": s, stem + "biases": b})
                    continue
                block = m.part_values(records, p)  # (ffn, d)
                weights[name] = block.T if p.axis == "column" else block
            mx.eval([weights[p.tensor_name(layer)] for p in m.parts])
            del records
    return weights
