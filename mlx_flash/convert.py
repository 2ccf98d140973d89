"""HF checkpoint -> flash model directory (docs/FORMAT.md), streamed one layer at a time.

At most one layer of FFN weights (plus one tensor in flight and a 32 MiB record buffer) is held in
memory, so a model larger than RAM converts. The output is built in `DIR.partial` and renamed at the
end; any failure, Ctrl-C included, removes the partial directory.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import shutil
import zlib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from . import direct, hub, mlxlm, models, platform, quant
from . import format as fmt
from .checkpoint import Checkpoint
from .dtypes import FLOATS, to_storage
from .errors import CheckpointError, FlashError
from .experts import ExpertView
from .gguf import GGUFCheckpoint, is_gguf
from .platform import evict_from_page_cache
from .quant import Quantization
from .safetensors import encode_header

DEFAULT_MODELS_DIR = Path("models")
DEFAULT_GROUP_SIZE = 64  # mlx-lm's default
COLUMN_BITS = 8  # a quantized source's down projection, quantized again along d
MAX_PADDING = 0.125  # of ffn.bundles, at most (records are packed when aligning would pad more)
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
    quantize: int | None = None,
    group_size: int | None = None,
    packed: bool | None = None,
) -> Path:
    """Convert a checkpoint of a supported architecture (local HF dir, mlx-lm quantized dir, Hub
    repo id or llama.cpp `.gguf` file) into a flash model dir.

    `dtype` defaults to the dtype of the source FFN weights (a quantized source's scales);
    `quantize` = 4 or 8 quantizes records and resident layers (MLX affine, `group_size`
    values per scale, default 64), 0 keeps float values; default: as the source (a quantized
    source keeps its bits and group size). `align` is the block size (default: the platform's
    direct-I/O block). `packed` records follow each other inside the blocks, else each starts on
    a block; default `choose_packed`. An existing output directory is replaced only with `force`.
    An MoE of a family only mlx-lm has a model file for is written as mlx-lm's dir instead
    (experts stacked, `quantize` 4 by default), which `load` streams as it is (direct.py).
    """
    if dtype is not None and dtype not in FLOATS:
        raise FlashError(f"unknown dtype {dtype!r}; choose one of {', '.join(FLOATS)}")
    if quantize not in (None, 0, 4, 8):
        raise FlashError(f"--quantize {quantize}: choose 4, 8 or 0 (float records)")
    if group_size is not None and group_size not in quant.GROUP_SIZES:
        raise FlashError(f"--group-size {group_size}: choose one of "
                         f"{', '.join(map(str, quant.GROUP_SIZES))}")
    if align is not None:
        try:
            fmt.check_alignment(align)
        except ValueError as e:
            raise FlashError(f"--align: {e}") from None
    out = Path(out) if out is not None else default_out(source)
    _check_out(out, force)  # before any download
    ckpt = GGUFCheckpoint(source) if is_gguf(source) else _hf_checkpoint(source, out, progress)
    arch = ckpt.config.get("model_type")
    mlx_lm_only = _mlx_lm_only(ckpt)  # an MoE family only mlx-lm has: its dir, as it streams
    if not mlx_lm_only:
        if arch in models.supported() and models.flash_spec(arch).experts:
            ckpt = ExpertView(ckpt, models.flash_spec(arch))  # experts stacked per record part
        plan = _plan(ckpt, dtype, quantize, group_size)
        if align is None:
            align = max(platform.direct_io_alignment(), fmt.MIN_ALIGNMENT)
        if packed is None:
            packed = choose_packed(plan.payload_bytes, align)

    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # left over from a crash (a clean failure removes it)
    partial.mkdir(parents=True)
    try:
        if mlx_lm_only:
            mlxlm.write_dir(ckpt.path, partial, 4 if quantize is None else quantize, group_size,
                            dtype)
        else:
            _write(ckpt, plan, partial, str(source), align, packed, progress)
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
    if out.exists() and not (fmt.is_flash_dir(out) or direct.streamable(out)):
        raise FlashError(f"{out}: exists and is not a flash model directory; refusing to replace it")


def _mlx_lm_only(ckpt) -> bool:
    """An MoE checkpoint of a family with no flash model file that mlx-lm builds (gpt-oss,
    GLM-4.x, DeepSeek-V3, Qwen3-Next, Qwen3.5, MiniMax-M2...): convert writes it as mlx-lm's
    dir, whose experts direct.py streams in place."""
    config = ckpt.config
    return (isinstance(ckpt, Checkpoint) and config.get("model_type") not in models.supported()
            and direct.expert_count(config) is not None and mlxlm.knows(config))


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
    quantization: Quantization | None  # of the records (and of resident layers we quantize)
    quantizable: frozenset[str]  # resident weights of layers mlx-lm can quantize
    experts: int | None = None  # MoE: routed experts per layer (ffn_dim counts all their neurons)

    @property
    def payload_bytes(self) -> int:
        """Bytes of one neuron's record without padding."""
        return sum(p.nbytes for p in fmt.make_parts(self.architecture, self.d_model, self.dtype,
                                                      self.quantization))


def choose_packed(payload_bytes: int, align: int) -> bool:
    """Records start on a block when that pads them by at most MAX_PADDING (each neuron is then
    read alone, no neighbour's bytes); else they are packed (a read takes the whole blocks that
    hold the neuron)."""
    return 1 - payload_bytes / fmt.round_up(payload_bytes, align) > MAX_PADDING


def _plan(ckpt: Checkpoint | GGUFCheckpoint, dtype: str | None, quantize: int | None = None,
          group_size: int | None = None) -> _Plan:
    """Check config and tensor shapes against each other before anything is written."""
    config = ckpt.config
    arch = config.get("model_type")
    if arch not in models.supported():
        raise FlashError(f"{ckpt.path}: model_type {arch!r} is not supported; supported: "
                         f"{', '.join(models.supported())}")
    spec = models.flash_spec(arch)
    text = spec.text(config)  # a multimodal checkpoint's text model
    spec.check(text)
    dims = []
    for key in spec.dims:
        value = text.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise CheckpointError(f"{ckpt.path}/config.json: {key} is {value!r}, expected a positive int")
        dims.append(value)
    d, ffn, layers = dims
    ffn = spec.neurons(text)  # every routed expert's neurons, for an MoE
    if not isinstance(ffn, int) or ffn <= 0:
        raise CheckpointError(f"{ckpt.path}/config.json: {spec.experts[0]} is "
                              f"{spec.num_experts(text)!r}, expected a positive int")
    names = {spec.checkpoint_key(k): k for k in ckpt.keys()}
    names = {n: k for n, k in names.items()  # a vision tower, a model's own predictors
             if not n.startswith(spec.unused) and not any(i in n for i in spec.unused_infix)}
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
    parts = fmt.make_parts(arch, d, "float32", None, biases)  # names and axes only
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
    first = names[sources[0][0].format(layer=0)]
    src = ckpt.dtype(first)
    target = dtype or src
    if target not in FLOATS:
        raise FlashError(f"{ckpt.path}: FFN weights are {src}; pass --dtype float16|bfloat16|float32")
    q = _target_quantization(ckpt, first, quantize, group_size)
    if q is not None and d % q.group_size:
        raise FlashError(f"{ckpt.path}: hidden size {d} is not a multiple of the group size "
                         f"{q.group_size}; pass --group-size 32")
    quantizable = frozenset()
    if q is not None:
        from .loader import build_model

        modules = dict(build_model(config).named_modules())  # lazy: no weights are made
        quantizable = frozenset(
            n for n in names if n not in ffn_names and n.endswith(".weight")
            and hasattr(modules.get(n[: -len(".weight")]), "to_quantized")
            and len(ckpt.shape(names[n])) == 2 and ckpt.shape(names[n])[-1] % q.group_size == 0)
    return _Plan(arch, target, d, ffn, layers, names, frozenset(biases), sources,
                 frozenset(ffn_names), q, quantizable, spec.num_experts(text))


def _target_quantization(ckpt, ffn_weight: str, quantize: int | None,
                         group_size: int | None) -> Quantization | None:
    """The records' quantization: as asked, else as the source's FFN weights.

    A quantized source holds the down projection quantized along the FFN axis; the records
    need it along d, so it is quantized a second time, from its dequantized values, at
    COLUMN_BITS (8: at 4 bits, the second rounding costs SmolLM2 6.4% perplexity, at 8 bits
    0.1%; BENCHMARKS.md)."""
    source = ckpt.quantization_of(ffn_weight)
    if quantize == 0:
        return None
    if quantize is None and source is None:
        if group_size is not None:
            raise FlashError("--group-size needs --quantize 4|8 (the source is not quantized)")
        return None
    bits = quantize or source.bits
    group = group_size or (source.group_size if source is not None else DEFAULT_GROUP_SIZE)
    column = max(bits, COLUMN_BITS) if source is not None else None
    return Quantization(bits, group, column)


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
           packed: bool, progress: bool):
    resident = _resident_tensors(ckpt, plan)
    m = fmt.new_manifest(
        out, plan.architecture, plan.dtype, plan.d_model, plan.ffn_dim, plan.num_layers,
        alignment=align, biases=set(plan.biases),
        resident_tensors={n: (d, s) for n, (d, s, _) in resident.items()},
        source=source, created_by=_created_by(), quantization=plan.quantization, packed=packed,
        experts=plan.experts,
    )
    name = Path(source).name or source
    sums = _write_bundles(ckpt, plan, m, desc=f"convert {name}", progress=progress)
    resident_bytes, sums["resident"] = _write_resident(ckpt, resident, m, progress)
    m = dataclasses.replace(m, resident_bytes=resident_bytes,
                            extra={"checksums": {"algorithm": "crc32", **sums}})
    if isinstance(ckpt, GGUFCheckpoint):
        for file, text in ckpt.side_files().items():
            (out / file).write_text(text)
    else:
        _copy_side_files(ckpt.path, out)
    quantized = [n for n in resident if n.endswith(".scales")]
    config = json.loads((out / "config.json").read_text())
    if quantized and "quantization" not in config:
        # mlx-lm quantizes the layers that have `.scales` (their own sizes come from the shapes)
        q = plan.quantization
        config["quantization"] = config["quantization_config"] = q.kwargs
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    fmt.write_manifest(m)
    fmt.read_manifest(out)  # the output must pass its own reader


class _Quantized:
    """The (packed, scales, biases) of one resident layer, made once for its three tensors."""

    def __init__(self, ckpt, name: str, q: Quantization | None, dtype: str):
        self.ckpt, self.name, self.dtype = ckpt, name, dtype
        self.quantization = ckpt.quantization_of(name) or q
        self._triple, self._taken = None, 0

    def part(self, k: int) -> np.ndarray:
        """Tensor k (0 packed, 1 scales, 2 biases) as stored; the layer is forgotten once all
        three were taken."""
        if self._triple is None:
            stored = self.ckpt.quantized(self.name)
            if stored is not None:  # kept exactly as the source quantized it
                w, s, b = stored[0]
            else:
                w, s, b = quant.quantize(self.ckpt.load(self.name), self.quantization,
                                         FLOATS[self.dtype].mx)
            self._triple = (np.array(w), to_storage(s, self.dtype), to_storage(b, self.dtype))
        out = self._triple[k]
        self._taken += 1
        if self._taken == 3:
            self._triple = None
        return out

    def shapes(self) -> list[tuple[int, ...]]:
        rows, cols = self.ckpt.shape(self.name)
        g, bits = self.quantization.group_size, self.quantization.bits
        return [(rows, cols * bits // 32), (rows, cols // g), (rows, cols // g)]


def _resident_tensors(ckpt, plan: _Plan) -> dict[str, tuple[str, tuple[int, ...], object]]:
    """Output name -> (dtype, shape, producer) of every resident tensor, in name order.

    A producer is `_Quantized` (a layer stored quantized in the source, or one to quantize)
    or None (the tensor as stored, floats cast to the plan's dtype)."""
    out = {}
    for n, k in sorted(plan.names.items()):
        if n in plan.ffn:
            continue
        if plan.quantization is not None and (ckpt.quantization_of(k) is not None
                                              or n in plan.quantizable):
            q = _Quantized(ckpt, k, plan.quantization, plan.dtype)
            stem = n[: -len("weight")]
            for i, (kind, shape) in enumerate(zip(("weight", "scales", "biases"), q.shapes(),
                                                  strict=True)):
                out[stem + kind] = ("uint32" if i == 0 else plan.dtype, shape, (q, i))
            continue
        out[n] = (plan.dtype if ckpt.dtype(k) in FLOATS else ckpt.dtype(k), ckpt.shape(k), k)
    return dict(sorted(out.items()))


def _part_bytes(ckpt, plan: _Plan, m: fmt.Manifest, p: fmt.Part, name: str, chunk: int,
                loaded: dict) -> np.ndarray:
    """One part of every record of a layer: (ffn, p.nbytes) uint8."""
    rows = slice(chunk * m.ffn_dim, (chunk + 1) * m.ffn_dim)
    q, dtype = m.part_quantization(p), m.mx_dtype
    source = plan.names[name]
    if p.axis == "row" and q is not None and ckpt.quantization_of(source) == q:
        # rows quantized along d as the records want them: kept exactly
        w, s, b = (a[rows] for a in ckpt.quantized(source)[0])
        return quant.encode(w, s.astype(dtype), b.astype(dtype))
    if name not in loaded:  # a fused tensor is read once for its parts
        loaded[name] = ckpt.load(plan.names[name])
    mat = loaded[name].T if p.axis == "column" else loaded[name]  # (chunks*ffn, d)
    if q is None:
        return np.ascontiguousarray(to_storage(mat[rows], m.dtype)).view(np.uint8)
    return quant.encode(*quant.quantize(mat[rows].astype(mx.float32), q, dtype))


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
            loaded: dict = {}
            parts = [_part_bytes(ckpt, plan, m, p, weight.format(layer=layer), i, loaded)
                     for p, (weight, i, _) in zip(m.parts, plan.sources, strict=True)]
            del loaded
            for start in range(0, m.ffn_dim, chunk):
                stop = min(m.ffn_dim, start + chunk)
                records = np.zeros((stop - start, m.record_bytes), np.uint8)  # zero padding
                for p, values in zip(m.parts, parts, strict=True):
                    records[:, p.offset : p.offset + p.nbytes] = values[start:stop]
                sink.write(memoryview(records).cast("B"))
            tail = m.layer_bytes - m.ffn_dim * m.record_bytes  # pads the layer to a block
            if tail:
                sink.write(bytes(tail))
            sums["ffn_layers"].append(sink.take_crc())
            del parts, records
            mx.clear_cache()
    finally:
        size = sink.close()
    if size != m.ffn_bytes:
        raise FlashError(f"{m.ffn_path}: wrote {size} bytes, expected {m.ffn_bytes} (internal error)")
    return sums


def _write_resident(ckpt, resident: dict, m: fmt.Manifest, progress: bool) -> tuple[int, int]:
    """Stream the resident tensors into a safetensors file, one tensor (or one quantized layer)
    in memory at a time; returns its size and CRC-32."""
    head = encode_header([(name, dtype, shape) for name, (dtype, shape)
                          in m.resident_tensors.items()], {"format": "mlx"})
    sink = _Sink(m.resident_path)
    try:
        sink.write(head)
        items = tqdm(resident.items(), desc="resident", unit="tensor", disable=not progress,
                     leave=False)
        for _, (dtype, _, producer) in items:
            if isinstance(producer, tuple):  # (a _Quantized layer, which of its three)
                data = producer[0].part(producer[1])
            else:
                arr = ckpt.load(producer)
                data = to_storage(arr, dtype) if dtype in FLOATS else np.array(arr)
            sink.write(memoryview(np.ascontiguousarray(data)).cast("B"))
            del data
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
