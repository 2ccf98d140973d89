"""Read Hugging Face checkpoints lazily, one tensor at a time, without torch.

Two layouts are read: `*.safetensors` (sharded or not) and PyTorch `pytorch_model*.bin` zip
checkpoints. The `.bin` files are pickles; they are read with a restricted unpickler that knows
only the globals a tensor checkpoint needs and refuses every other one before it can run.
"""

from __future__ import annotations

import collections
import json
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .dtypes import BY_NAME, BY_SAFETENSORS, FLOATS, to_mx
from .errors import CheckpointError
from .quant import Quantization
from .safetensors import read_header

# Checkpoint tensors we read: the floating ones (their safetensors tags), and the packed uint32
# values of mlx-lm's quantized layers
_ST_FLOATS = {d.safetensors: d for d in FLOATS.values()} | {"U32": BY_SAFETENSORS["U32"]}
# torch storage class name -> (our name, numpy dtype holding the raw bits)
_TORCH_STORAGES = {
    "FloatStorage": ("float32", np.float32),
    "HalfStorage": ("float16", np.float16),
    "BFloat16Storage": ("bfloat16", np.uint16),
    "LongStorage": ("int64", np.int64),
    "IntStorage": ("int32", np.int32),
    "BoolStorage": ("bool", np.bool_),
}


def load_config(path: str | Path) -> dict:
    """Return `config.json` of a model directory, with one-line errors for the usual mistakes."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a model directory)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json (is this a Hugging Face model directory?)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object")
    return config


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    # safetensors: byte range; bin: storage key, element offset and strides
    start: int = 0
    end: int = 0
    storage: str = ""
    offset: int = 0
    stride: tuple[int, ...] = ()


class Checkpoint:
    """A local HF checkpoint directory, read one tensor at a time.

    An mlx-lm quantized checkpoint (`quantization` in config.json) shows each quantized layer's
    (`weight`, `scales`, `biases`) as one logical tensor `weight` of its float shape and the
    scales' dtype: `load` dequantizes it, `quantized` gives the stored triple.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = load_config(self.path)
        self._entries: dict[str, _Entry] = {}
        st_files = sorted(self.path.glob("*.safetensors"))
        bin_files = sorted(self.path.glob("pytorch_model*.bin"))
        if st_files:
            for f in st_files:
                self._entries.update(_safetensors_entries(f))
        elif bin_files:
            for f in bin_files:
                self._entries.update(_bin_entries(f))
        else:
            raise CheckpointError(
                f"{self.path}: no weight files (*.safetensors or pytorch_model*.bin)"
            )
        self._quantized = _quantized_layers(self.path, self.config, self._entries)
        hidden = {f"{n[: -len('weight')]}{k}" for n in self._quantized for k in ("scales", "biases")}
        self._names = [k for k in self._entries if k not in hidden]

    def keys(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._quantized:
            return self._quantized[name][0]
        return self._entries[name].shape

    def dtype(self, name: str) -> str:
        if name in self._quantized:
            return self._entries[name[: -len("weight")] + "scales"].dtype
        return self._entries[name].dtype

    def quantization_of(self, name: str) -> Quantization | None:
        """How a layer's weight is quantized (None: a float tensor), without reading it."""
        entry = self._quantized.get(name)
        return None if entry is None else entry[1]

    def quantized(self, name: str) -> tuple[tuple[mx.array, ...], Quantization] | None:
        """The stored (packed, scales, biases) of a quantized layer's weight and how it was
        quantized; None for a float tensor."""
        if (q := self.quantization_of(name)) is None:
            return None
        stem = name[: -len("weight")]
        return tuple(self.raw(stem + k) for k in ("weight", "scales", "biases")), q

    def load(self, name: str) -> mx.array:
        """One tensor in its stored dtype; a quantized layer's weight dequantized (in float32,
        rounded once to the scales' dtype)."""
        if (q := self.quantized(name)) is not None:
            (w, s, b), quant = q
            return mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32),
                                 **quant.kwargs).astype(s.dtype)
        return self.raw(name)

    def raw(self, name: str) -> mx.array:
        """One stored tensor as it is in the file."""
        e = self._entries[name]
        if e.storage:
            return to_mx(_bin_tensor(e), e.dtype)
        np_dtype = BY_NAME[e.dtype].storage
        with open(e.file, "rb") as f:
            f.seek(e.start)
            buf = f.read(e.end - e.start)
        if len(buf) != e.end - e.start:
            raise CheckpointError(f"{e.file}: truncated: tensor {name} ends past the end of file")
        raw = np.frombuffer(buf, dtype=np_dtype).reshape(e.shape)
        return to_mx(raw, e.dtype)

    def load_all(self) -> dict[str, mx.array]:
        """Every stored tensor as stored (quantized layers as their triples)."""
        return {k: self.raw(k) for k in self._entries}


def _quantized_layers(path: Path, config: dict, entries: dict) -> dict:
    """weight name -> (float shape, Quantization) of each quantized layer of an mlx-lm dir."""
    quantization = config.get("quantization")
    if not quantization:
        return {}
    out = {}
    for name, e in entries.items():
        if not name.endswith(".scales"):
            continue
        stem = name[: -len("scales")]
        own = quantization.get(stem[:-1], quantization)
        own = own if isinstance(own, dict) else quantization
        weight, biases = entries.get(stem + "weight"), entries.get(stem + "biases")
        if own.get("mode", "affine") != "affine" or weight is None or biases is None:
            raise CheckpointError(f"{path}: {stem}weight: only mlx-lm's affine quantization "
                                  f"(weight, scales, biases) is supported")
        bits = own.get("bits")
        cols = weight.shape[-1] * 32 // bits if isinstance(bits, int) and bits > 0 else 0
        if not cols or cols % e.shape[-1]:
            raise CheckpointError(f"{path}: {stem}weight: shapes {list(weight.shape)} and "
                                  f"scales {list(e.shape)} do not fit {bits}-bit quantization")
        try:
            q = Quantization(bits, cols // e.shape[-1])
        except ValueError as err:
            raise CheckpointError(f"{path}: {stem}weight: {err}") from None
        out[stem + "weight"] = ((*weight.shape[:-1], cols), q)
    return out


def _safetensors_entries(file: Path) -> dict[str, _Entry]:
    def fail(field: str, problem: str) -> CheckpointError:
        if field == "header":
            return CheckpointError(f"{file}: not a safetensors file ({problem})")
        return CheckpointError(f"{file}: tensor {field}: {problem}")

    header, base = read_header(file, fail, dtypes=_ST_FLOATS)
    return {name: _Entry(file, BY_SAFETENSORS[info["dtype"]].name, tuple(info["shape"]),
                         base + info["data_offsets"][0], base + info["data_offsets"][1])
            for name, info in header.items()}


# --- PyTorch .bin (zip + pickle) without torch ------------------------------------------------


@dataclass(frozen=True)
class _StorageType:
    dtype: str
    np_dtype: type


@dataclass(frozen=True)
class _StorageRef:
    key: str
    kind: _StorageType


def _rebuild_tensor(storage, offset, size, stride, *_args, **_kwargs):
    return ("tensor", storage, int(offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *_args, **_kwargs):
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    """Knows only the globals of a tensor state dict; any other global is refused unrun."""

    _ALLOWED = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def __init__(self, file, source: Path):
        super().__init__(file)
        self.source = source

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name in _TORCH_STORAGES:
            return _StorageType(*_TORCH_STORAGES[name])
        raise CheckpointError(
            f"{self.source}: refused: the pickle references {module}.{name}, which is not part "
            "of a tensor checkpoint (convert it to safetensors, or use a checkpoint you trust)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"):
            raise CheckpointError(f"{self.source}: unsupported persistent id in pickle")
        kind = pid[1]
        if not isinstance(kind, _StorageType):
            raise CheckpointError(f"{self.source}: unsupported storage type {kind!r}")
        return _StorageRef(str(pid[2]), kind)


def _bin_entries(file: Path) -> dict[str, _Entry]:
    if not zipfile.is_zipfile(file):
        raise CheckpointError(
            f"{file}: not a zip-format PyTorch checkpoint (legacy .bin files are not supported; "
            "re-save with torch>=1.6 or convert to safetensors)"
        )
    with zipfile.ZipFile(file) as zf:
        pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise CheckpointError(f"{file}: no data.pkl inside the zip")
        prefix = pkl[0][: -len("data.pkl")]
        with zf.open(pkl[0]) as f:
            try:
                state = _RestrictedUnpickler(f, file).load()
            except CheckpointError:
                raise
            except Exception as e:  # a malformed pickle: one line, not a traceback
                raise CheckpointError(f"{file}: unreadable pickle ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: expected a state dict of tensors")
    entries = {}
    for name, t in state.items():
        if not (isinstance(t, tuple) and t and t[0] == "tensor"):
            continue  # e.g. metadata integers
        _, storage, offset, shape, stride = t
        if storage.kind.dtype not in ("float32", "float16", "bfloat16"):
            continue
        entries[name] = _Entry(
            file, storage.kind.dtype, shape,
            storage=f"{prefix}data/{storage.key}", offset=offset, stride=stride,
        )
    return entries


def _bin_tensor(e: _Entry) -> np.ndarray:
    np_dtype = np.dtype(_TORCH_STORAGES[
        {"float32": "FloatStorage", "float16": "HalfStorage", "bfloat16": "BFloat16Storage"}[e.dtype]
    ][1])
    with zipfile.ZipFile(e.file) as zf:
        buf = zf.read(e.storage)
    flat = np.frombuffer(buf, dtype=np_dtype)
    count = int(np.prod(e.shape, dtype=np.int64))
    last = e.offset + sum((s - 1) * st for s, st in zip(e.shape, e.stride)) if count else e.offset
    if count and last >= flat.size:
        raise CheckpointError(f"{e.file}: tensor points past the end of its storage")
    view = np.lib.stride_tricks.as_strided(
        flat[e.offset:], shape=e.shape, strides=[s * np_dtype.itemsize for s in e.stride]
    )
    return np.ascontiguousarray(view)
