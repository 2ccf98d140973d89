"""HF checkpoint -> flash model directory (docs/FORMAT.md), streamed one layer at a time.

At most one layer of FFN weights (plus one tensor in flight and a 32 MiB record buffer) is held in
memory, so a model larger than RAM converts. The output is built in `DIR.partial` and renamed at the
end; any failure, Ctrl-C included, removes the partial directory.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import shutil
import zlib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from . import format as fmt
from . import hub, models, platform
from .checkpoint import Checkpoint
from .dtypes import FLOATS, to_storage
from .errors import CheckpointError, FlashError
from .gguf import GGUFCheckpoint, is_gguf
from .platform import evict_from_page_cache
from .safetensors import encode_header

DEFAULT_MODELS_DIR = Path("models")
RECORD_CHUNK_BYTES = 32 << 20  # records are assembled and written this many bytes at a time
EVICT_EVERY_BYTES = 256 << 20  # flush written data and drop it from the page cache this often


def default_out(source: str | Path) -> Path:
    """`models/<name>-flash` for a repo id `owner/name`, a local directory `.../name` or a
    GGUF file `.../name.gguf`."""
    path = Path(source).expanduser()
    if is_gguf(path):
        name = path.stem
    else:
        name = path.resolve().name if path.is_dir() else str(source).rstrip("/").split("/")[-1]
    return DEFAULT_MODELS_DIR / f"{name}-flash"


def convert(
    source: str,
    out: str | Path | None = None,
    dtype: str | None = None,
    align: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Convert a checkpoint of a supported architecture (local HF dir, Hub repo id or llama.cpp
    `.gguf` file, dequantized) into a flash model dir.

    `dtype` defaults to the dtype of the source FFN weights; `align` is the record alignment in
    bytes (default `default_alignment`: the smallest that holds one neuron, at most 16 KiB).
    An existing output directory is replaced only with `force`. Returns the output path.
    """
    if dtype is not None and dtype not in FLOATS:
        raise FlashError(f"unknown dtype {dtype!r}; choose one of {', '.join(FLOATS)}")
    if align is not None:
        try:
            fmt.check_alignment(align)
        except ValueError as e:
            raise FlashError(f"--align: {e}") from None
    out = Path(out) if out is not None else default_out(source)
    _check_out(out, force)  # before any download
    ckpt = GGUFCheckpoint(source) if is_gguf(source) else _hf_checkpoint(source, out, progress)
    plan = _plan(ckpt, dtype)
    if align is None:
        align = default_alignment(plan.payload_bytes)

    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # left over from a crash (a clean failure removes it)
    partial.mkdir(parents=True)
    try:
        _write(ckpt, plan, partial, str(source), align, progress)
        _check_out(out, force)
        if out.exists():
            old = out.with_name(out.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            partial.rename(out)
            shutil.rmtree(old)
        else:
            partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def _hf_checkpoint(source: str, out: Path, progress: bool) -> Checkpoint:
    local = hub.resolve(source, progress=progress)
    if fmt.is_flash_dir(local):
        raise FlashError(f"{local}: already a flash model directory; convert the HF checkpoint")
    if out.resolve() == local.resolve():
        raise FlashError(f"{out}: the output would replace the source checkpoint; pick another --out")
    return Checkpoint(local)


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise FlashError(f"{out}: already exists; pass --force to replace it")
    if out.exists() and not fmt.is_flash_dir(out):
        raise FlashError(f"{out}: exists and is not a flash model directory; refusing to replace it")


@dataclass(frozen=True)
class _Plan:
    architecture: str
    dtype: str
    d_model: int
    ffn_dim: int
    num_layers: int
    names: dict[str, str]  # normalised HF name -> name in the checkpoint files
    biases: frozenset[str]  # record parts that have a bias
    sources: tuple[tuple[str, int, int], ...]  # per part: (checkpoint weight name, chunk, chunks)
    ffn: frozenset[str]  # normalised names of the FFN weight matrices (go to ffn.bundles)

    @property
    def payload_bytes(self) -> int:
        """Bytes of one neuron's record without padding."""
        return len(self.sources) * self.d_model * FLOATS[self.dtype].itemsize


def default_alignment(payload_bytes: int) -> int:
    """The record alignment for records of `payload_bytes`: the smallest power of two that holds
    them, at least the platform's direct-I/O block and at most the 16 KiB Apple SSD page (a
    larger neuron spans several pages; padding stays under one page)."""
    align = max(platform.direct_io_alignment(), fmt.MIN_ALIGNMENT)
    while align < min(payload_bytes, fmt.DEFAULT_ALIGNMENT):
        align *= 2
    return align


def _plan(ckpt: Checkpoint | GGUFCheckpoint, dtype: str | None) -> _Plan:
    """Check config and tensor shapes against each other before anything is written."""
    config = ckpt.config
    arch = config.get("model_type")
    if arch not in models.supported():
        raise FlashError(f"{ckpt.path}: model_type {arch!r} is not supported; supported: "
                         f"{', '.join(models.supported())}")
    spec = models.flash_spec(arch)
    dims = []
    for key in spec.dims:
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise CheckpointError(f"{ckpt.path}/config.json: {key} is {value!r}, expected a positive int")
        dims.append(value)
    d, ffn, layers = dims
    names = {spec.checkpoint_key(k): k for k in ckpt.keys()}
    sources = tuple((f"{module}.weight", chunk, chunks)
                    for module, chunk, chunks in (p.source() for p in spec.parts))
    biases = set()
    for p, (weight, _, chunks) in zip(spec.parts, sources, strict=True):
        bias = weight.format(layer=0)[: -len("weight")] + "bias"
        if bias in names and chunks > 1:
            raise CheckpointError(f"{ckpt.path}: {bias}: a bias on a fused FFN matrix is not "
                                  "supported")
        if bias in names:
            biases.add(p.name)
    parts = fmt.make_parts(arch, d, biases)
    ffn_names = set()
    for layer in range(layers):
        for p, (weight, _, chunks) in zip(parts, sources, strict=True):
            src = weight.format(layer=layer)
            want = {src: (chunks * ffn, d) if p.axis == "row" else (d, chunks * ffn)}
            if p.bias:
                want[p.bias_name(layer)] = (ffn,) if p.axis == "row" else (d,)
            for name, shape in want.items():
                if name not in names:
                    raise CheckpointError(f"{ckpt.path}: tensor {name} is missing")
                got = ckpt.shape(names[name])
                if tuple(got) != shape:
                    raise CheckpointError(f"{ckpt.path}: tensor {name} has shape {list(got)}; "
                                          f"config.json implies {list(shape)}")
            ffn_names.add(src)
    src = ckpt.dtype(names[sources[0][0].format(layer=0)])
    target = dtype or src
    if target not in FLOATS:
        raise FlashError(f"{ckpt.path}: FFN weights are {src}; pass --dtype float16|bfloat16|float32")
    return _Plan(arch, target, d, ffn, layers, names, frozenset(biases), sources,
                 frozenset(ffn_names))


class _Sink:
    """A file being written, flushed and dropped from the page cache every EVICT_EVERY_BYTES.

    Page cache is charged to the writer's memory; dirty pages cannot be reclaimed until written
    back, so a long conversion under a memory limit needs the periodic fsync.
    """

    def __init__(self, path: Path):
        self.path, self.f, self.pending, self.crc = path, open(path, "wb"), 0, 0

    def write(self, data) -> None:
        n = self.f.write(data)
        self.crc = zlib.crc32(data, self.crc)
        self.pending += n
        if self.pending >= EVICT_EVERY_BYTES:
            self.flush()

    def take_crc(self) -> int:
        """CRC-32 of what was written since the last call (verify.py checks it)."""
        crc, self.crc = self.crc, 0
        return crc

    def flush(self) -> None:
        self.f.flush()
        evict_from_page_cache(self.path)  # fsync + POSIX_FADV_DONTNEED where the OS has it
        self.pending = 0

    def close(self) -> int:
        self.flush()
        size = self.f.tell()
        self.f.close()
        return size


def _write(ckpt: Checkpoint | GGUFCheckpoint, plan: _Plan, out: Path, source: str, align: int,
           progress: bool):
    resident = {n: (plan.dtype if ckpt.dtype(k) in FLOATS else ckpt.dtype(k), ckpt.shape(k))
                for n, k in sorted(plan.names.items()) if n not in plan.ffn}
    m = fmt.new_manifest(
        out, plan.architecture, plan.dtype, plan.d_model, plan.ffn_dim, plan.num_layers,
        alignment=align, biases=set(plan.biases), resident_tensors=resident,
        source=source, created_by=_created_by(),
    )
    name = Path(source).name or source
    sums = _write_bundles(ckpt, plan, m, desc=f"convert {name}", progress=progress)
    resident_bytes, sums["resident"] = _write_resident(ckpt, plan, m, progress)
    m = dataclasses.replace(m, resident_bytes=resident_bytes,
                            extra={"checksums": {"algorithm": "crc32", **sums}})
    if isinstance(ckpt, GGUFCheckpoint):
        for file, text in ckpt.side_files().items():
            (out / file).write_text(text)
    else:
        _copy_side_files(ckpt.path, out)
    fmt.write_manifest(m)
    fmt.read_manifest(out)  # the output must pass its own reader


def _write_bundles(ckpt: Checkpoint, plan: _Plan, m: fmt.Manifest, desc: str,
                   progress: bool) -> dict:
    """Write ffn.bundles; returns its checksums: the header's and each layer's CRC-32."""
    sink = _Sink(m.ffn_path)
    sums = {"ffn_header": 0, "ffn_layers": []}
    try:
        sink.write(m.ffn_header())
        sums["ffn_header"] = sink.take_crc()
        chunk = max(1, RECORD_CHUNK_BYTES // m.record_bytes)
        for layer in tqdm(range(m.num_layers), desc=desc, unit="layer", disable=not progress):
            mats, loaded = [], {}  # per part (ffn, d) in storage dtype; a fused tensor read once
            for p, (weight, i, _) in zip(m.parts, plan.sources, strict=True):
                name = weight.format(layer=layer)
                if name not in loaded:
                    loaded[name] = to_storage(ckpt.load(plan.names[name]), m.dtype)
                mat = loaded[name].T if p.axis == "column" else loaded[name]  # (chunks*ffn, d)
                mats.append(mat[i * m.ffn_dim : (i + 1) * m.ffn_dim])
            for start in range(0, m.ffn_dim, chunk):
                stop = min(m.ffn_dim, start + chunk)
                records = np.zeros((stop - start, m.record_values), m.np_dtype)  # zero padding
                for p, mat in zip(m.parts, mats, strict=True):
                    records[:, p.offset : p.offset + p.length] = mat[start:stop]
                sink.write(memoryview(records).cast("B"))
            sums["ffn_layers"].append(sink.take_crc())
            del mats, loaded, records
            mx.clear_cache()
    finally:
        size = sink.close()
    if size != m.ffn_bytes:
        raise FlashError(f"{m.ffn_path}: wrote {size} bytes, expected {m.ffn_bytes} (internal error)")
    return sums


def _write_resident(ckpt: Checkpoint, plan: _Plan, m: fmt.Manifest,
                    progress: bool) -> tuple[int, int]:
    """Stream the resident tensors into a safetensors file, one tensor in memory at a time;
    returns its size and CRC-32."""
    head = encode_header([(name, dtype, shape) for name, (dtype, shape)
                          in m.resident_tensors.items()], {"format": "mlx"})
    sink = _Sink(m.resident_path)
    try:
        sink.write(head)
        items = tqdm(m.resident_tensors.items(), desc="resident", unit="tensor",
                     disable=not progress, leave=False)
        for name, (dtype, _) in items:
            arr = ckpt.load(plan.names[name])
            data = to_storage(arr, dtype) if dtype in FLOATS else np.array(arr)
            sink.write(memoryview(np.ascontiguousarray(data)).cast("B"))
            del arr, data
    finally:
        size = sink.close()
    mx.clear_cache()
    return size, sink.crc


def _copy_side_files(src: Path, out: Path) -> None:
    """config.json unchanged, and the tokenizer files the runtime loads."""
    shutil.copyfile(src / "config.json", out / "config.json")
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name != "config.json" and any(
                fnmatch.fnmatch(f.name, p) for p in hub.META_PATTERNS):
            shutil.copyfile(f, out / f.name)


def _created_by() -> str:
    try:
        return f"mlx-flash {metadata.version('mlx-flash')}"
    except metadata.PackageNotFoundError:
        return "mlx-flash"
