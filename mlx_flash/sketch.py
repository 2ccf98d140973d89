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

import os
import zlib
from pathlib import Path

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from . import activations, models
from . import format as fmt
from .errors import FlashError, FormatError
from .layout import round_up
from .memory import NEURON_BOOKKEEPING, stream_rows
from .tensors import load_uncached, write_partial_safetensors

SKETCH_FILE = "sketch.safetensors"
# values mode where a record's down span does not fill whole blocks of its own (SmolLM2: 1,152
# bytes in a 4 KiB block, so reading it alone read 3.6x its bytes): each layer's down rows again,
# one after another, so a token's chosen rows share their blocks
DOWN_FILE = "down.bin"
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
                 keep: float, bits: int, group: int):
        if not 0.0 < keep <= 1.0:
            raise FlashError(f"keep must be in (0, 1], got {keep}")
        self.parts, self.spec, self.act = parts, spec, act
        self.keep, self.bits, self.group = keep, bits, group
        w, scales, _ = next(iter(parts.values()))
        self.ffn_dim, self.dtype = w.shape[0], scales.dtype
        self.k = max(1, round(keep * self.ffn_dim))
        self.values = bits >= VALUE_BITS  # the sketch's hidden is the value (only down is read)

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
                 progress: bool = True) -> dict:
    """Write `sketch.safetensors` into a flash dir (atomically, with a `sketch` manifest entry)
    from its records; an existing sketch of the same bits only gets the new `keep`. `bits`:
    where None, an existing sketch's, else `default_bits`."""
    m = fmt.read_manifest(path)
    entry = m.extra.get("sketch")
    if bits is None and not m.experts:  # an existing sketch keeps its bits
        made = entry.get("bits") if isinstance(entry, dict) and has_sketch(m) else None
        bits = made if made in BITS else default_bits(m)
    if m.experts:
        raise FlashError(f"{m.path}: a mixture of experts needs no sketch (its router picks the "
                         "experts exactly)")
    if bits not in BITS:
        raise FlashError(f"--bits {bits}: choose one of {', '.join(map(str, BITS))}")
    if not 0.0 < keep <= 1.0:
        raise FlashError(f"--keep {keep}: a share of each layer's neurons in (0, 1]")
    spec = models.flash_spec(m.architecture)
    if bits >= VALUE_BITS:
        _check_values(m)
    group = group_size(m.d_model)
    file = m.path / SKETCH_FILE
    down = bits >= VALUE_BITS and needs_down_file(m)
    if (isinstance(entry, dict) and entry.get("bits") == bits and file.is_file()
            and entry.get("bytes") == file.stat().st_size
            and (not down or _down_problem(m, entry) is None)):
        fmt.update_manifest(m.path, sketch={**entry, "keep": keep})
        return {**entry, "keep": keep, "path": str(file), "rewritten": False}
    names = [p.name for p in spec.row_parts]
    tensors = {}
    rows = _DownRows(m) if down else None
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
    finally:
        if rows is not None:
            rows.discard()
    fmt.update_manifest(m.path, with_file=(partial, file), sketch=entry)
    if rows is None:  # a sketch that reads whole records: an earlier one's down rows go
        (m.path / DOWN_FILE).unlink(missing_ok=True)
    return {**entry, "path": str(file), "rewritten": True}


class _DownRows:
    """Writes `down.bin`: each layer's down rows (the records' column part, as stored) one after
    another, the layer padded to the dir's alignment, through a partial file renamed into place
    by `finish`; `discard` removes whatever is left of the partial file."""

    def __init__(self, m: fmt.Manifest):
        self.m, self.span = m, column_span(m)
        self.file = m.path / DOWN_FILE
        self.partial = m.path / (DOWN_FILE + ".partial")
        self.crc, self.layers = 0, 0
        self.f = self._io(lambda: open(self.partial, "wb"))

    def add(self, records) -> None:
        lo, hi = self.span
        data = np.ascontiguousarray(records[:, lo:hi]).tobytes()
        data += bytes(down_layer_bytes(self.m) - len(data))
        self.crc = zlib.crc32(data, self.crc)
        self._io(lambda: self.f.write(data))
        self.layers += 1

    def finish(self) -> dict:
        def close():
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            os.replace(self.partial, self.file)
        self._io(close)
        lo, hi = self.span
        return {"file": DOWN_FILE, "row_bytes": hi - lo, "layer_bytes": down_layer_bytes(self.m),
                "bytes": self.layers * down_layer_bytes(self.m), "crc32": self.crc}

    def discard(self) -> None:
        self.f.close()
        self.partial.unlink(missing_ok=True)

    def _io(self, op):
        try:
            return op()
        except OSError as e:
            self.partial.unlink(missing_ok=True)
            raise FlashError(f"{self.m.path}: cannot write {DOWN_FILE} ({e.strerror}); is the "
                             "disk full? The model dir is unchanged") from None


def needs_down_file(m: fmt.Manifest) -> bool:
    """Whether values mode reads its down rows from `down.bin`: where a record's down span does
    not fill whole blocks of its own (packed records, or a down row smaller than a block)."""
    lo, hi = column_span(m)
    return m.packed or lo % m.alignment != 0 or hi % m.alignment != 0


def down_layer_bytes(m: fmt.Manifest) -> int:
    """One layer's down rows in `down.bin`, padded to the dir's alignment."""
    lo, hi = column_span(m)
    return round_up(m.ffn_dim * (hi - lo), m.alignment)


def down_file(m: fmt.Manifest) -> tuple[Path, int, int] | None:
    """Values mode's `down.bin`: (path, row bytes, layer bytes); None where the down rows are
    read from the records."""
    if not needs_down_file(m):
        return None
    entry = m.extra["sketch"]["down"]
    return m.path / entry["file"], entry["row_bytes"], entry["layer_bytes"]


def _down_problem(m: fmt.Manifest, entry: dict) -> str | None:
    """What is wrong with a values sketch's `down` entry and file, or None."""
    down = entry.get("down")
    lo, hi = column_span(m)
    want = {"file": DOWN_FILE, "row_bytes": hi - lo, "layer_bytes": down_layer_bytes(m),
            "bytes": m.num_layers * down_layer_bytes(m)}
    if not isinstance(down, dict):
        return "missing (the down rows of values mode)"
    for k, v in want.items():
        if down.get(k) != v:
            return f"{k} {down.get(k)!r}, expected {v!r}"
    file = m.path / DOWN_FILE
    if not file.is_file() or file.stat().st_size != want["bytes"]:
        return f"{DOWN_FILE} is missing or not {want['bytes']} bytes"
    return None


def has_sketch(m: fmt.Manifest) -> bool:
    return isinstance(m.extra.get("sketch"), dict) and (m.path / SKETCH_FILE).is_file()


def load_sketch(m: fmt.Manifest, act_name: str, keep: float | None = None) -> list[Sketch]:
    """The validated sketch of a flash dir, one per layer (`keep`: instead of the manifest's)."""
    fix = FIX.format(dir=m.path)
    entry = m.extra.get("sketch")
    file = m.path / SKETCH_FILE
    if not isinstance(entry, dict) or not file.is_file():
        raise FlashError(f"no sketch in {m.path}: run `mlx-flash sketch {m.path}`")
    spec = models.flash_spec(m.architecture)
    bits, group = entry.get("bits"), entry.get("group_size")
    keep = entry.get("keep", DEFAULT_KEEP) if keep is None else keep
    if bits not in BITS or group not in (32, 64) or m.d_model % group:
        raise FormatError(fmt.MANIFEST, "sketch", f"bits {bits}, group_size {group}", fix)
    if not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
        raise FormatError(fmt.MANIFEST, "sketch.keep", f"{keep} is not in (0, 1]", fix)
    if bits >= VALUE_BITS:
        _check_values(m)
        if needs_down_file(m) and (problem := _down_problem(m, entry)):
            raise FormatError(fmt.MANIFEST, "sketch.down", problem, fix)
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
            w, s, b = (tensors[f"layers.{i}.{p.name}.{k}"] for k in ("weight", "scales", "biases"))
            parts[p.name] = (w, s.astype(wide), b.astype(wide)) if wide else (w, s, b)
        out.append(Sketch(parts, spec, act, float(keep), bits, group))
    return out


def _check_values(m: fmt.Manifest) -> None:
    """An 8-bit sketch stands in for float gate/up rows without biases (values mode)."""
    if m.quantization is not None:
        raise FlashError(f"{m.path}: an {VALUE_BITS}-bit sketch supplies the values of float "
                         f"records; this dir is {m.quantization.bits}-bit: use --bits 4 (or "
                         "fewer than its own bits)")
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
    """Whether the dir's sketch is a values sketch (only the down rows are read)."""
    entry = m.extra.get("sketch")
    return has_sketch(m) and isinstance(entry, dict) and entry.get("bits", 0) >= VALUE_BITS


def column_span(m: fmt.Manifest) -> tuple[int, int]:
    """The byte span of the column part (down) in a record."""
    return m.part(models.flash_spec(m.architecture).column_part.name).span


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


def sketch_bytes(m: fmt.Manifest, planned: bool = False, bits: int | None = None) -> int:
    """The sketch's bytes in memory as `load_sketch` holds it; 0 without one (`planned`: what a
    sketch of `bits` (default: `default_bits`) would hold, made or not)."""
    if m.experts or not (planned or has_sketch(m)):
        return 0
    entry = m.extra.get("sketch") if not planned else None
    entry = entry if isinstance(entry, dict) else {}
    bits = bits or entry.get("bits") or default_bits(m)
    group = entry.get("group_size") or group_size(m.d_model)
    scale = 4 if _scale_dtype(m) is not None else m.itemsize
    parts = len(models.flash_spec(m.architecture).row_parts)
    per_part = m.ffn_dim * (m.d_model * bits // 8 + 2 * (m.d_model // group) * scale)
    return m.num_layers * parts * per_part


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
