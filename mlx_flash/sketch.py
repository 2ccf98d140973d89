"""A low-bit sketch of each layer's row parts as the predictor of a gated FFN (issue 27).

A gated FFN without exact zeros (SiLU/GELU: SmolLM2, Llama, Qwen) has every neuron active, and a
low-rank predictor trained for recall 0.95 marks ~88% of them. The sketch is a resident copy of
W_gate and W_up (each row part of the records) in 4-bit affine groups: per token it computes the
layer's |act(gate)*up| approximately and the top `keep` share of neurons by it are read and
computed exactly. No training, no data: `mlx-flash sketch DIR` writes `sketch.safetensors` from
the records. On SmolLM2 the 4-bit sketch at keep 0.6 costs +1.9% / +1.1% perplexity on two
held-out texts (the exact top 60%: +1.7% / +0.6%); its memory is 4.5/16 of the row parts'
float16 bytes, 19% of the FFN (docs/BENCHMARKS.md). The top share is fixed per token, so the
bytes a token reads are bounded.

An 8-bit sketch (`--bits 8`) is exact enough to be the values as well (SmolLM2: 0.9995 of dense
perplexity with every neuron computed from it, against 1.10 for 4 bits): each chosen neuron's
act(gate)*up is the sketch's, and only its down row is read and cached, a third of a record
("values" mode). At keep 0.6 a token reads 0.2 of the FFN for +2.5% perplexity on SmolLM2, and
the caches hold three times the neurons per byte; the sketch holds 8.5/16 of the row parts'
float16 bytes, 35% of the FFN.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from . import activations, models
from . import format as fmt
from .down_rows import DOWN_FILE, DownRows, column_span, down_problem, needs_down_file
from .errors import FlashError, FormatError
from .memory import NEURON_BOOKKEEPING, stream_rows
from .storage import FlashReader, aligned_empty
from .tensors import load_uncached, write_partial_safetensors

SKETCH_FILE = "sketch.safetensors"
SKETCH_VERSION = 1
DEFAULT_BITS = 4
# The share of each layer's neurons a token computes: the nearest measured point to the issue's
# goal (0.5 of the FFN at +3% perplexity): 0.6 costs SmolLM2 +1.9% / +1.1%, 0.5 +5.3% / +2.3%.
DEFAULT_KEEP = 0.6
BITS = (2, 3, 4, 8)
# From this many bits the sketch's own act(gate)*up is each chosen neuron's value: only the down
# rows are read ("values" mode; float records only)
VALUE_BITS = 8
FIX = "re-run `mlx-flash sketch {dir}`"


def group_size(d: int) -> int:
    """The affine group along d_model: 64 where it divides d_model, else 32."""
    for g in (64, 32):
        if d % g == 0:
            return g
    raise FlashError(f"d_model {d} is not a multiple of 32: no sketch for this model")


class Sketch:
    """One layer's sketch: the row parts quantized (`parts`: name -> (w, scales, biases)).
    Calling it on x (n, d_model) returns the bool (n, ffn) mask of each row's top `keep` share
    of neurons by the sketched |hidden|."""

    def __init__(self, parts: dict[str, tuple[mx.array, mx.array, mx.array]], spec, act,
                 keep: float, bits: int, group: int, values: bool | None = None):
        if not 0.0 < keep <= 1.0:
            raise FlashError(f"keep must be in (0, 1], got {keep}")
        self.parts, self.spec, self.act = parts, spec, act
        self.keep, self.bits, self.group = keep, bits, group
        w, scales, _ = next(iter(parts.values()))
        self.ffn_dim, self.dtype = w.shape[0], scales.dtype
        self.k = max(1, round(keep * self.ffn_dim))
        # the sketch's hidden is the value (only down is read): 8 bits, or a quantized dir's own
        self.values = bits >= VALUE_BITS if values is None else values

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for triple in self.parts.values() for a in triple)

    def hidden(self, x: mx.array) -> mx.array:
        """act(gate)*up of x (n, d_model) from the sketch, (n, ffn), in the sketch's dtype."""
        x = x.astype(self.dtype)
        rows = {name: mx.quantized_matmul(x, w, s, b, transpose=True, group_size=self.group,
                                          bits=self.bits)
                for name, (w, s, b) in self.parts.items()}
        return self.spec.hidden(rows, self.act)

    def scores(self, x: mx.array) -> mx.array:
        """|hidden| of x (n, d_model) from the sketch, (n, ffn)."""
        return mx.abs(self.hidden(x))

    def top(self, x: mx.array) -> tuple[mx.array, np.ndarray]:
        """For one token x (1, d_model): the sketch's hidden (1, ffn) and the sorted ids of its
        top `keep` share by |hidden| (values mode)."""
        h = self.hidden(x)
        if self.k >= self.ffn_dim:
            return h, np.arange(self.ffn_dim)
        top = mx.argpartition(mx.abs(h), self.ffn_dim - self.k, axis=-1)[0, self.ffn_dim - self.k :]
        return h, np.sort(np.array(top))

    def __call__(self, x: mx.array) -> mx.array:
        if self.k >= self.ffn_dim:  # every neuron: nothing to rank
            return mx.ones((x.shape[0], self.ffn_dim), dtype=mx.bool_)
        s = self.scores(x)
        top = mx.argpartition(s, self.ffn_dim - self.k, axis=-1)[:, self.ffn_dim - self.k :]
        return mx.put_along_axis(mx.zeros(s.shape, dtype=mx.bool_), top, mx.array(True), axis=-1)


def write_sketch(path: str | Path, bits: int | None = None, keep: float = DEFAULT_KEEP,
                 progress: bool = True, own: bool = False) -> dict:
    """Write `sketch.safetensors` into a flash dir (atomically, with a `sketch` manifest entry)
    from its records; an existing sketch of the same bits only gets the new `keep`. `bits`:
    where None, an existing sketch's, else `default_bits`. `own`: a quantized dir's own gate/up
    rows as the values (the default for one without a sketch)."""
    m = fmt.read_manifest(path)
    entry = m.extra.get("sketch")
    if m.experts:
        raise FlashError(f"{m.path}: a mixture of experts needs no sketch (its router picks the "
                         "experts exactly)")
    if not 0.0 < keep <= 1.0:
        raise FlashError(f"--keep {keep}: a share of each layer's neurons in (0, 1]")
    if own:
        if bits is not None:
            raise FlashError("--own keeps the dir's own rows: leave --bits out")
        return _write_own(m, keep, progress)
    if bits is None:  # an existing sketch keeps its kind, else the default one
        made = entry if isinstance(entry, dict) and has_sketch(m) else {}
        if made.get("own") or (not made and own_values(m)):
            return _write_own(m, keep, progress)
        bits = made.get("bits") if made.get("bits") in BITS else default_bits(m)
    if bits not in BITS:
        raise FlashError(f"--bits {bits}: choose one of {', '.join(map(str, BITS))}")
    spec = models.flash_spec(m.architecture)
    if bits >= VALUE_BITS:
        _check_values(m)
    group = group_size(m.d_model)
    file = m.path / SKETCH_FILE
    down = bits >= VALUE_BITS and needs_down_file(m)
    if (isinstance(entry, dict) and entry.get("bits") == bits and file.is_file()
            and not entry.get("own")
            and entry.get("bytes") == file.stat().st_size
            and (not down or down_problem(m, entry) is None)):
        fmt.update_manifest(m.path, sketch={**entry, "keep": keep})
        return {**entry, "keep": keep, "path": str(file), "rewritten": False}
    names = [p.name for p in spec.row_parts]
    tensors = {}
    rows = DownRows(m) if down else None
    partial = None
    try:
        with open(m.ffn_path, "rb") as f:
            for layer in tqdm(range(m.num_layers), desc="sketch", unit="layer",
                              disable=not progress, leave=False):
                records = fmt.read_layer_records(m, layer, file=f)
                for name in names:
                    w = m.part_values(records, m.part(name)).astype(mx.float32)
                    q, s, b = mx.quantize(w, group_size=group, bits=bits)
                    tensors[f"layers.{layer}.{name}.weight"] = q
                    tensors[f"layers.{layer}.{name}.scales"] = s.astype(m.mx_dtype)
                    tensors[f"layers.{layer}.{name}.biases"] = b.astype(m.mx_dtype)
                    mx.eval(tensors[f"layers.{layer}.{name}.biases"], q)
                if rows is not None:
                    rows.add(records)
        partial, crc = write_partial_safetensors(file, tensors, {
            "format": "mlx-flash sketch", "version": str(SKETCH_VERSION)})
        entry = {"file": SKETCH_FILE, "bits": bits, "group_size": group, "keep": keep,
                 "parts": names, "bytes": partial.stat().st_size, "crc32": crc}
        if rows is not None:  # complete before the manifest names it (its bytes are the records')
            entry["down"] = rows.finish()
        fmt.update_manifest(m.path, with_file=(partial, file), sketch=entry)
    except BaseException:
        if partial is not None:
            partial.unlink(missing_ok=True)
        raise
    finally:
        if rows is not None:
            rows.discard()
    if rows is None:  # a sketch that reads whole records: an earlier one's down rows go
        (m.path / DOWN_FILE).unlink(missing_ok=True)
    return {**entry, "path": str(file), "rewritten": True}


def own_values(m: fmt.Manifest) -> bool:
    """Whether the dir's sketch by default is its own gate/up rows: quantized records without
    biases (a quantized model's rows are as small as a sketch of them, and exact)."""
    return m.quantization is not None and not m.experts and not any(p.bias for p in m.parts)


def _write_own(m: fmt.Manifest, keep: float, progress: bool) -> dict:
    """A quantized dir's values mode: its own gate/up rows stay resident (nothing to write but
    the manifest entry and, where a down row is smaller than a block, `down.bin`)."""
    if not own_values(m):
        raise FlashError(f"{m.path}: its own gate/up rows are the values only in a quantized "
                         "dir without FFN biases: use --bits 4 or 8")
    spec = models.flash_spec(m.architecture)
    q = m.part_quantization(spec.row_parts[0])
    entry = m.extra.get("sketch")
    new = {"own": True, "bits": q.bits, "group_size": q.group_size, "keep": keep,
           "parts": [p.name for p in spec.row_parts]}
    down = needs_down_file(m)
    if (isinstance(entry, dict) and entry.get("own")
            and (not down or down_problem(m, entry) is None)):
        new = {**entry, "keep": keep}
        fmt.update_manifest(m.path, sketch=new)
        return {**new, "path": str(m.path), "rewritten": False}
    if down:
        rows = DownRows(m)
        try:
            with open(m.ffn_path, "rb") as f:
                for layer in tqdm(range(m.num_layers), desc="down rows", unit="layer",
                                  disable=not progress, leave=False):
                    rows.add(fmt.read_layer_records(m, layer, file=f))
            new["down"] = rows.finish()
        finally:
            rows.discard()
    fmt.update_manifest(m.path, sketch=new)
    (m.path / SKETCH_FILE).unlink(missing_ok=True)  # an earlier sketch of its own
    if not down:
        (m.path / DOWN_FILE).unlink(missing_ok=True)
    return {**new, "path": str(m.path), "rewritten": True}


def has_sketch(m: fmt.Manifest) -> bool:
    entry = m.extra.get("sketch")
    return isinstance(entry, dict) and (bool(entry.get("own"))
                                        or (m.path / SKETCH_FILE).is_file())


def load_sketch(m: fmt.Manifest, act_name: str, keep: float | None = None) -> list[Sketch]:
    """The validated sketch of a flash dir, one per layer (`keep`: instead of the manifest's)."""
    fix = FIX.format(dir=m.path)
    entry = m.extra.get("sketch")
    file = m.path / SKETCH_FILE
    if not has_sketch(m):
        raise FlashError(f"no sketch in {m.path}: run `mlx-flash sketch {m.path}`")
    spec = models.flash_spec(m.architecture)
    keep = entry.get("keep", DEFAULT_KEEP) if keep is None else keep
    if not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
        raise FormatError(fmt.MANIFEST, "sketch.keep", f"{keep} is not in (0, 1]", fix)
    if entry.get("own"):
        return _load_own(m, entry, spec, act_name, float(keep))
    bits, group = entry.get("bits"), entry.get("group_size")
    if bits not in BITS or group not in (32, 64) or m.d_model % group:
        raise FormatError(fmt.MANIFEST, "sketch", f"bits {bits}, group_size {group}", fix)
    if bits >= VALUE_BITS:
        _check_values(m)
        _check_down(m, entry)
    try:
        header, _ = fmt.read_safetensors_header(file, SKETCH_FILE)
    except FormatError as e:
        raise FormatError(e.file, e.field, "not a readable safetensors file", fix) from None
    words = m.d_model * bits // 32
    want = {}
    for i in range(m.num_layers):
        for p in spec.row_parts:
            key = f"layers.{i}.{p.name}"
            want[f"{key}.weight"] = ("U32", [m.ffn_dim, words])
            for k in ("scales", "biases"):
                want[f"{key}.{k}"] = (None, [m.ffn_dim, m.d_model // group])
    for name, (dtype, shape) in want.items():
        got = header.get(name)
        if got is None:
            raise FormatError(SKETCH_FILE, name, "missing tensor", fix)
        if got["shape"] != shape or (dtype and got["dtype"] != dtype):
            raise FormatError(SKETCH_FILE, name, f"{got['dtype']} {got['shape']}, expected "
                              f"{shape}", fix)
    if set(header) - set(want):
        raise FormatError(SKETCH_FILE, sorted(set(header) - set(want))[0], "unexpected tensor",
                          fix)
    tensors = load_uncached(file, SKETCH_FILE)
    act = activations.mlx_fn(act_name)
    wide = _scale_dtype(m)
    out = []
    for i in range(m.num_layers):
        parts = {}
        for p in spec.row_parts:
            parts[p.name] = _held(*(tensors[f"layers.{i}.{p.name}.{k}"]
                                    for k in ("weight", "scales", "biases")), wide)
        out.append(Sketch(parts, spec, act, float(keep), bits, group))
    return out


def _load_own(m: fmt.Manifest, entry: dict, spec, act_name: str, keep: float) -> list[Sketch]:
    """A quantized dir's own gate/up rows as its values sketch, read from the records around
    the page cache (as the resident weights are)."""
    fix = FIX.format(dir=m.path)
    if not own_values(m):
        raise FormatError(fmt.MANIFEST, "sketch.own", "set for a dir whose records are float or "
                          "have biases", fix)
    q = m.part_quantization(spec.row_parts[0])
    if (entry.get("bits"), entry.get("group_size")) != (q.bits, q.group_size):
        raise FormatError(fmt.MANIFEST, "sketch", f"bits {entry.get('bits')}, group_size "
                          f"{entry.get('group_size')}, not the records' {q.bits}, "
                          f"{q.group_size}", fix)
    _check_down(m, entry)
    act, wide = activations.mlx_fn(act_name), _scale_dtype(m)
    _, buf = aligned_empty(1, m.layer_bytes, m.alignment)
    out = []
    with FlashReader(m.ffn_path, m.record_bytes, threads=4) as reader:
        for i in range(m.num_layers):
            reader.read_range(m.layer_offset(i), m.layer_bytes, buf)
            records = buf.reshape(-1)[: m.ffn_dim * m.record_bytes].reshape(m.ffn_dim, -1)
            parts = {}
            for p in spec.row_parts:  # copies: buf is read into again
                parts[p.name] = _held(*m.part_arrays(records, m.part(p.name)), wide)
            mx.eval(parts)
            out.append(Sketch(parts, spec, act, keep, q.bits, q.group_size, values=True))
    return out


def _held(w: mx.array, scales: mx.array, biases: mx.array, wide: mx.Dtype | None) -> tuple:
    """A sketch part as it is held: the scales and biases in `wide` where given (`_scale_dtype`)."""
    return (w, scales.astype(wide), biases.astype(wide)) if wide else (w, scales, biases)


def _check_down(m: fmt.Manifest, entry: dict) -> None:
    """A values sketch's down.bin, where it needs one, matches the dir (one FormatError)."""
    if needs_down_file(m) and (problem := down_problem(m, entry)):
        raise FormatError(fmt.MANIFEST, "sketch.down", problem, FIX.format(dir=m.path))


def _check_values(m: fmt.Manifest) -> None:
    """An 8-bit sketch stands in for float gate/up rows without biases (values mode)."""
    if m.quantization is not None:
        how = (f"`mlx-flash sketch {m.path} --own` makes its own gate/up rows the values"
               if own_values(m) else "use --bits 4")
        raise FlashError(f"{m.path}: an {VALUE_BITS}-bit sketch supplies the values of float "
                         f"records; this dir is {m.quantization.bits}-bit: {how}")
    if any(p.bias for p in m.parts):
        raise FlashError(f"{m.path}: an {VALUE_BITS}-bit sketch supplies gate/up values without "
                         "biases; this model's FFN has biases: use --bits 4")


def default_bits(m: fmt.Manifest) -> int:
    """The sketch `mlx-flash sketch` writes without --bits: 8-bit values where the records are
    float without biases (only the chosen neurons' down rows are read: at keep 0.6 a token reads
    0.2 of the FFN's bytes, or with `down.bin` the blocks of those rows), else 4-bit ranking."""
    try:
        _check_values(m)
    except FlashError:
        return DEFAULT_BITS
    return VALUE_BITS


def is_values(m: fmt.Manifest) -> bool:
    """Whether the dir's sketch is a values sketch (only the down rows are read): 8 bits, or a
    quantized dir's own gate/up rows."""
    entry = m.extra.get("sketch")
    return has_sketch(m) and (bool(entry.get("own")) or entry.get("bits", 0) >= VALUE_BITS)


def values_costs(m: fmt.Manifest) -> tuple[int, int]:
    """Values mode's memory: what one cached neuron takes (its down row and bookkeeping), and
    the second reader's buffers: with `down.bin` (or a packed dir) its scratch of whole blocks
    (a row touches at most two), with `down.bin` also the staging rows the cache reads through."""
    lo, hi = column_span(m)
    row, rows = hi - lo, stream_rows(m)
    if needs_down_file(m):
        return row + NEURON_BOOKKEEPING, rows * (2 * row + 2 * m.alignment)
    return row + NEURON_BOOKKEEPING, 0


def _scale_dtype(m: fmt.Manifest) -> mx.Dtype | None:
    """What the scales and biases are held in: float32 on a CPU (MLX's CPU quantized_matmul
    takes 39 ms for SmolLM2's 1536x576 in float16, 1.0 in float32), as stored on a GPU."""
    return mx.float32 if mx.default_device().type != mx.DeviceType.gpu else None


def sketch_bytes(m: fmt.Manifest, planned: bool = False, bits: int | None = None,
                 own: bool | None = None) -> int:
    """The sketch's bytes in memory as `load_sketch` holds it; 0 without one (`planned`: what a
    sketch of `bits` would hold, made or not: `own` a quantized dir's own rows, else
    `default_bits`; without either, the default sketch)."""
    if m.experts or not (planned or has_sketch(m)):
        return 0
    entry = m.extra.get("sketch") if not planned else None
    entry = entry if isinstance(entry, dict) else {}
    spec = models.flash_spec(m.architecture)
    if planned:
        own = (own_values(m) and bits is None) if own is None else own
    else:
        own = bool(entry.get("own")) and own_values(m)  # else load_sketch says what is wrong
    if own:
        q = m.part_quantization(spec.row_parts[0])
        bits, group = q.bits, q.group_size
    else:
        bits = bits or entry.get("bits") or default_bits(m)
        group = entry.get("group_size") or group_size(m.d_model)
    scale = 4 if _scale_dtype(m) is not None else m.itemsize
    per_part = m.ffn_dim * (m.d_model * bits // 8 + 2 * (m.d_model // group) * scale)
    return m.num_layers * len(spec.row_parts) * per_part


def choices(m: fmt.Manifest) -> list[tuple[int, bool, bool, str]]:
    """The sketches `auto` may suggest, the default first: (bits, values, own, the `mlx-flash
    sketch` options that make it)."""
    if own_values(m):
        q = m.part_quantization(models.flash_spec(m.architecture).row_parts[0])
        return [(q.bits, True, True, ""), (DEFAULT_BITS, False, False, f" --bits {DEFAULT_BITS}")]
    bits = default_bits(m)
    if bits == DEFAULT_BITS:
        return [(bits, False, False, "")]
    return [(bits, True, False, ""), (DEFAULT_BITS, False, False, f" --bits {DEFAULT_BITS}")]


def expected_saving(m: fmt.Manifest, exact_rows: int, sketch_rows: int, keep: float,
                    values: bool = False) -> float:
    """The share of the exact path's FFN bytes per token that the sketch is expected to save,
    with `exact_rows` cache rows per layer without it and `sketch_rows` with it (it takes their
    memory).

    The exact path reads the ffn_dim - exact_rows uncached neurons (every one is active). The
    sketch mode reads the top `keep` share of its uncached neurons (a neuron it holds is one a
    recent token chose: measured on SmolLM2, 0.65 of them are chosen again, here taken as
    `keep`). Reads take whole blocks: an aligned record its own, but in a packed layout a block
    holds parts of (block + record) / record records and is read if any of them is chosen, so a
    scattered choice of records smaller than a block costs nearly every block (SmolLM2, 3.4 KB
    records in 4 KiB blocks: 0.54 of the FFN chosen, 0.79 read; measured 0.79)."""
    exact = max(m.ffn_dim - exact_rows, 0) / m.ffn_dim
    if exact == 0:
        return 0.0
    uncached = max(m.ffn_dim - sketch_rows, 0) / m.ffn_dim
    if values:  # only the down rows of the chosen neurons are read
        lo, hi = column_span(m)
        if needs_down_file(m):  # down.bin: a block holds parts of (block + row) / row rows
            read = (1 - (1 - keep) ** ((m.alignment + hi - lo) / (hi - lo))) * (hi - lo)
            read /= m.record_bytes
        else:  # the down span of each record, whole blocks of its own
            read = keep * (hi - lo) / m.record_bytes
    elif m.packed:
        shared = (m.alignment + m.record_bytes) / m.record_bytes
        read = 1 - (1 - keep) ** shared
    else:
        read = keep
    return 1 - uncached * read / exact
