"""Calibrating the predictors: the real MLX blocks, layer by layer, with a recording FFN.

The hidden states of all calibration tokens move through one block at a time, reading only that
block's FFN from `ffn.bundles`, so the whole model is never in memory; they wait between blocks
in a scratch file in the model dir, and each block runs over chunks of CHUNK_TOKENS, so memory
does not grow with the number of tokens. In each block the FFN is a `RecordingFFN`: the layer's
dense FFN in numpy float32 (rebuilt from its records) that records its inputs and true active
sets. Attention, norms and embeddings are the model file's own MLX modules (on the CPU backend
their linear products run in numpy: `NumpyLinear`). Per layer a
predictor is trained (training.py) and its threshold picked for a target recall.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map, tree_unflatten
from tqdm import tqdm

from . import activations, models
from . import format as fmt
from .checkpoint import load_config
from .errors import FlashError, FormatError
from .loader import build_model, load_tokenizer, quantize_modules
from .perplexity import read_tokens
from .predictor import (
    CALIBRATE_FIX,
    PREDICTORS_FILE,
    PREDICTORS_VERSION,
    load_predictors,
    parse_ranks,
    write_predictors,
)
from .training import (
    RowFile,
    WindowFractions,
    init_params,
    logit_cut,
    logits,
    metrics,
    pick_threshold,
    train,
)
from .units import format_bytes

DEFAULT_TOKENS = 200_000
DEFAULT_TARGET_RECALL = 0.95
DEFAULT_SPARSITY = 0.5  # non-ReLU models: fraction of |act(gate)*up| counted as inactive
HELDOUT_FRACTION = 0.1
CHUNK_TOKENS = 4096  # tokens per block forward
MAGNITUDE_SAMPLE = 8192  # tokens whose |activation| quantile sets a non-ReLU threshold
# A second text, unlike the calibration text: half of it sets the thresholds too (the target
# recall must hold on it as well), the other half is scored and reported. Out-of-domain text cost
# SmolLM2's fixture-calib predictors 3 points of recall (0.952 -> 0.923) and its predicted mode
# +19% perplexity (docs/BENCHMARKS.md).
HOLDOUT_FILE = "holdout-en.txt"
HOLDOUT_TOKENS = 4096


class DenseFFN:
    """One layer's FFN in numpy float32, from its records: `hidden(x)` is the activation whose
    non-zeros (ReLU) are the active neurons, `out(h)` the layer's output."""

    def __init__(self, spec: models.FlashSpec, weights: dict, biases: dict, act):
        self.spec, self.weights, self.biases, self.act = spec, weights, biases, act
        first = spec.parts[0].name  # the activation's input
        self.w_in, self.b_in = weights[first], biases.get(first)

    @classmethod
    def load(cls, m: fmt.Manifest, resident: dict, layer: int, file, act) -> DenseFFN:
        records = fmt.read_layer_records(m, layer, file=file)  # (ffn, record_bytes) uint8
        weights, biases = {}, {}
        for p in m.parts:
            weights[p.name] = np.array(m.part_values(records, p).astype(mx.float32))
            if p.bias is not None:
                biases[p.name] = np.array(resident[p.bias_name(layer)].astype(mx.float32))
        return cls(models.flash_spec(m.architecture), weights, biases, act)

    def hidden(self, x: np.ndarray) -> np.ndarray:
        rows = {}
        for p in self.spec.row_parts:
            z = x @ self.weights[p.name].T
            if p.name in self.biases:
                z += self.biases[p.name]
            rows[p.name] = z
        return self.spec.hidden(rows, self.act)

    def out(self, h: np.ndarray) -> np.ndarray:
        name = self.spec.column_part.name
        y = h @ self.weights[name]
        return y + self.biases[name] if name in self.biases else y


class RecordingFFN(nn.Module):
    """In place of a block's MLP: the dense FFN, recording each call's inputs (and, for ReLU,
    exact active sets) into the layer's row files from row `start` on."""

    def __init__(self, ffn: DenseFFN, x: RowFile, active: RowFile | None):
        super().__init__()
        self._ffn, self._x, self._active = ffn, x, active
        self.start = 0

    def __call__(self, u: mx.array) -> mx.array:
        u2 = np.array(u.astype(mx.float32)).reshape(-1, u.shape[-1])
        h = self._ffn.hidden(u2)
        self._x.write(self.start, u2)
        if self._active is not None:
            self._active.write(self.start, h != 0)
        self.start += len(u2)
        return mx.array(self._ffn.out(h).reshape(u.shape))


class NumpyLinear(nn.Module):
    """An nn.Linear whose product numpy computes: on MLX's CPU backend, whose BLAS is a slow
    reference one on Linux (DESIGN.md), the blocks' projections then run ~4x faster; the block
    around them (norms, rope, attention, residuals) stays the model file's own MLX code."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self._w = np.array(linear.weight.astype(mx.float32)).T.copy()  # (in, out)
        self._b = np.array(linear.bias.astype(mx.float32)) if "bias" in linear else None

    def __call__(self, x: mx.array) -> mx.array:
        y = np.array(x.astype(mx.float32)) @ self._w
        if self._b is not None:
            y += self._b
        return mx.array(y)


def _numpy_products(block: nn.Module) -> None:
    """On the CPU backend, every nn.Linear of `block` becomes a NumpyLinear (see there)."""
    if mx.default_device() != mx.cpu:
        return
    linears = [(path, NumpyLinear(mod)) for path, mod in block.named_modules()
               if type(mod) is nn.Linear]
    block.update_modules(tree_unflatten(linears))


class _Stop(Exception):
    pass


class _Tap(nn.Module):
    """Stands in for a block while the embeddings are computed: records the call's arguments
    (the mask) and passes the hidden state through; the last one stops the forward."""

    def __init__(self, inner: nn.Module, index: int, calls: dict, last: bool):
        super().__init__()
        self._inner, self._index, self._calls, self._last = inner, index, calls, last

    def __getattr__(self, name):  # the model's loop may read block attributes (sliding windows)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__.get("_inner") or super().__getattr__("_inner"), name)

    def __call__(self, x, *args, **kwargs):
        if self._index == 0:
            self._calls["input"] = x
        self._calls[self._index] = (args, kwargs)
        if self._last:
            raise _Stop
        return x


def _embed(model, ids: np.ndarray) -> tuple[mx.array, list]:
    """Layer 0's input (S, L, d) for token sequences `ids`, and each block's call arguments."""
    layers = model.layers
    real, calls = list(layers), {}
    for i, layer in enumerate(real):
        layers[i] = _Tap(layer, i, calls, last=i == len(real) - 1)
    try:
        model(mx.array(ids))
    except _Stop:
        pass
    finally:
        layers[:] = real
    return calls["input"], [calls[i] for i in range(len(real))]


@dataclass
class LayerData:
    index: int
    x: RowFile  # (n, d) FFN inputs of all tokens
    active: RowFile  # (n, ffn) bool, the true active set
    act_threshold: float | None  # non-ReLU: |act(gate)*up| above this counts as active
    ffn: DenseFFN


def walk(m: fmt.Manifest, config: dict, seqs: np.ndarray, sparsity: float | None,
         act_thresholds: list[float] | None, progress: bool, desc: str,
         label_rows: int | None = None):
    """Yield `LayerData` per layer while moving the hidden states of `seqs` (S, L) through the
    model. A layer's row files are valid until the next one is yielded. A non-ReLU model's
    magnitude threshold comes from the first `label_rows` token rows (default all): the
    calibration text, not the held-out one behind it."""
    spec = models.flash_spec(m.architecture)
    act_name = spec.activation(spec.text(config))
    exact = activations.is_exact_sparse(act_name)
    act = activations.numpy_fn(act_name)
    model = build_model(config)
    resident = dict(mx.load(str(m.resident_path)))
    weights = model.sanitize(dict(resident))
    quantize_modules(model, config, weights)
    # Only resident weights load; the MLPs keep their lazy random init, never evaluated.
    model.load_weights(list(weights.items()), strict=False)
    if config.get("quantization"):  # the blocks run in float32 below: quantized layers too
        from mlx_lm.utils import dequantize_model

        model = dequantize_model(model)
    _to_float32(model, but=model.layers)  # the blocks go to float32 one at a time, in turn
    S, L = seqs.shape
    n, per = S * L, max(1, CHUNK_TOKENS // L)  # tokens, sequences per chunk
    chunks = [(s, min(s + per, S)) for s in range(0, S, per)]
    scratch = Path(tempfile.mkdtemp(prefix=".calibrate-", dir=m.path))
    bar = tqdm(total=m.num_layers * n, desc=desc, unit="tok", unit_scale=True,
               disable=not progress, leave=False)
    try:
        hidden = RowFile(scratch / "hidden", n, m.d_model)
        block_args = {}  # sequences per chunk -> each block's call arguments
        for a, b in chunks:
            h, args = _embed(model, seqs[a:b])
            block_args.setdefault(b - a, args)
            hidden.write(a * L, np.array(h.astype(mx.float32)).reshape(-1, m.d_model))
        with open(m.ffn_path, "rb") as f:
            for i, layer in enumerate(model.layers):
                ffn = DenseFFN.load(m, resident, i, f, act)
                x = RowFile(scratch / f"x{i}", n, m.d_model)
                active = RowFile(scratch / f"active{i}", n, m.ffn_dim, bits=True)
                layer.mlp = rec = RecordingFFN(ffn, x, active if exact else None)
                _to_float32(layer)
                _numpy_products(layer)
                for a, b in chunks:
                    h = mx.array(hidden.read(a * L, b * L).reshape(b - a, L, m.d_model))
                    args, kwargs = block_args[b - a][i]
                    rec.start = a * L
                    out = layer(h, *args, **kwargs)
                    hidden.write(a * L, np.array(out).reshape(-1, m.d_model))
                    bar.update((b - a) * L)
                threshold = None
                if not exact:
                    threshold = (act_thresholds[i] if act_thresholds is not None
                                 else _magnitude_threshold(ffn, x, sparsity, label_rows))
                    for s, xb in x.blocks():
                        active.write(s, np.abs(ffn.hidden(xb)) > threshold)
                model.layers[i] = None  # done with its weights
                yield LayerData(i, x, active, threshold, ffn)
                x.close()
                active.close()
                for file in (x.path, active.path):
                    file.unlink()
                mx.clear_cache()
        hidden.close()
    finally:
        bar.close()
        shutil.rmtree(scratch, ignore_errors=True)


def _to_float32(module: nn.Module, but: list | None = None) -> None:
    """Cast `module`'s parameters to float32 in place, leaving the modules of the list `but`."""
    kept = list(but) if but is not None else []
    if but is not None:
        but[:] = []
    try:
        module.update(tree_map(lambda p: p.astype(mx.float32), module.parameters()))
    finally:
        if but is not None:
            but[:] = kept


def _check_scratch_space(m: fmt.Manifest, tokens: int) -> None:
    """Refuse before any work when the model dir's volume cannot hold the scratch files."""
    need = tokens * (2 * m.d_model * 4 + -(-m.ffn_dim // 8)) + m.num_layers * m.ffn_dim * 64
    free = shutil.disk_usage(m.path).free
    if free < need:
        raise FlashError(f"{m.path}: calibration needs about {format_bytes(need)} of scratch "
                         f"space there for {tokens} tokens, {format_bytes(free)} is free (free "
                         "some, or pass fewer --tokens)")


def _magnitude_threshold(ffn: DenseFFN, x: RowFile, sparsity: float,
                         rows: int | None = None) -> float:
    """The |act(gate)*up| quantile at `sparsity` over a strided sample of the first `rows` tokens
    (default all; CATS/TEAL)."""
    rows = len(x) if rows is None else rows
    sample = x.take(np.arange(0, rows, max(1, rows // MAGNITUDE_SAMPLE)))
    return float(np.quantile(np.abs(ffn.hidden(sample)), sparsity))


def sequences(path: Path, data, tokens: int, seq_len: int, least: int = 2) -> np.ndarray:
    """The first `tokens` tokens of the text file `data` as (S, seq_len) sequences; several
    files (a list) give a mix: an equal share of tokens from each, their sequences taken in
    turn. At least `least` sequences, else a FlashError."""
    files = list(data) if isinstance(data, (list, tuple)) else [data]
    tokenizer = load_tokenizer(path)
    parts = []
    for file in files:
        ids = read_tokens(tokenizer, file, -(-tokens // len(files)))
        n = len(ids) // seq_len
        need = -(-least // len(files))
        if n < need:
            raise FlashError(f"{file}: {len(ids)} tokens, need at least {need * seq_len} "
                             f"({_count(need, 'sequence')} of {seq_len})")
        parts.append(np.asarray(ids[: n * seq_len], dtype=np.int32).reshape(n, seq_len))
    if len(parts) == 1:
        return parts[0]
    order = sorted(((k / len(p), i, k) for i, p in enumerate(parts) for k in range(len(p))))
    return np.stack([parts[i][k] for _, i, k in order])  # interleaved: each file in turn


def _count(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def default_holdout() -> Path:
    """The general-English text shipped with mlx-flash (Wikipedia articles, CC BY-SA; see
    mlx_flash/data/README.md): unlike most calibration text, so the thresholds hold beyond it."""
    return Path(__file__).parent / "data" / HOLDOUT_FILE


def calibrate(
    path: str | Path,
    data: str | Path | list,
    tokens: int = DEFAULT_TOKENS,
    ranks: str | int | None = None,
    target_recall: float = DEFAULT_TARGET_RECALL,
    sparsity: float | None = None,
    progress: bool = True,
    seq_len: int = 256,
    holdout: str | Path | None = "default",
    holdout_tokens: int = HOLDOUT_TOKENS,
) -> dict:
    """Train one predictor per layer on `tokens` tokens of the text file `data` (or a mix of
    several files: a list).

    Writes `predictors.safetensors` into the flash dir (atomically) and a `predictors` entry with
    per-layer metrics into its manifest (atomically). `ranks`: see `parse_ranks`. `sparsity`
    (non-ReLU models only, default 0.5): the fraction of |act(gate)*up| values counted as
    inactive. `holdout`: a second text unlike `data` ("default": the general-English text
    shipped with mlx-flash; None: none), `holdout_tokens` of it: each threshold also reaches the
    target recall on half of them, and the other half is scored. Returns the manifest entry
    (JSON-able): `layers` is the per-layer table on held-out calibration tokens, `holdout` the
    same on the second text.
    """
    start = time.perf_counter()
    m = fmt.read_manifest(path)
    if m.experts:
        raise FlashError(f"{path}: a mixture of experts: its router picks the experts exactly, so "
                         "there are no predictors to train (generate streams the routed experts)")
    config = load_config(m.path)
    spec = models.flash_spec(m.architecture)
    act_name = spec.activation(spec.text(config))
    relu = activations.is_exact_sparse(act_name)
    if not 0.0 < target_recall < 1.0:
        raise FlashError(f"--target-recall must be between 0 and 1 (got {target_recall})")
    if relu and sparsity is not None:
        raise FlashError("--sparsity is for non-ReLU models; this model uses ReLU, whose exact "
                         "zeros define the active set")
    if not relu:
        sparsity = DEFAULT_SPARSITY if sparsity is None else sparsity
        if not 0.0 < sparsity < 1.0:
            raise FlashError(f"--sparsity must be between 0 and 1 (got {sparsity})")
    if seq_len < 2:
        raise FlashError(f"sequence length must be >= 2 (got {seq_len})")
    if tokens < 2 * seq_len:
        raise FlashError(f"--tokens must be at least {2 * seq_len} (two sequences of {seq_len}), "
                         f"got {tokens}")
    rank_list = parse_ranks(ranks, m.num_layers, m.d_model, m.ffn_dim)
    seqs = sequences(m.path, data, tokens, seq_len)
    if holdout == "default":
        holdout = default_holdout()
    extra = (np.empty((0, seq_len), np.int32) if holdout is None
             else sequences(m.path, holdout, holdout_tokens, seq_len, least=2))
    calib = seqs.size  # token rows of the calibration text; the second text's follow
    _check_scratch_space(m, calib + extra.size)
    held = max(1, round(len(seqs) * HELDOUT_FRACTION))
    split = (len(seqs) - held) * seq_len  # tokens of the training part
    # the second text: its first half sets thresholds with the held-out calibration tokens,
    # its second half is only scored
    half = calib + len(extra) // 2 * seq_len

    tensors, rows, out_rows, act_thresholds = {}, [], [], []
    for lay in walk(m, config, np.concatenate([seqs, extra]), sparsity, None, progress,
                    "calibrate", label_rows=calib):
        i = lay.index
        positive = sum(int(yb.sum()) for _, yb in lay.active.blocks(0, split)) / (split * m.ffn_dim)
        params = init_params(lay.x, split, lay.ffn.w_in, lay.ffn.b_in, rank_list[i])
        params = train(lay.x, lay.active, split, params, positive, seed=i)
        params = [p.astype(np.float16).astype(np.float32) for p in params]  # as stored
        threshold = pick_threshold(lay.x, lay.active, split, params, target_recall, stop=calib)
        if len(extra):
            threshold = min(threshold, pick_threshold(lay.x, lay.active, calib, params,
                                                      target_recall, stop=half))
            out_rows.append({"layer": i, **metrics(lay.x, lay.active, half, params, threshold)})
        row = {"layer": i, "rank": rank_list[i], "threshold": threshold}
        row.update(metrics(lay.x, lay.active, split, params, threshold, stop=calib))
        rows.append(row)
        act_thresholds.append(lay.act_threshold)
        for key, value in zip(("A", "B", "bias"), params):
            tensors[f"layers.{i}.{key}"] = mx.array(value.astype(np.float16))
        tensors[f"layers.{i}.threshold"] = mx.array(np.array([threshold], dtype=np.float32))

    partial, crc = write_predictors(m.path / PREDICTORS_FILE, tensors)
    entry = {
        "file": PREDICTORS_FILE,
        "version": PREDICTORS_VERSION,
        "dtype": "float16",
        "ranks": rank_list,
        "thresholds": [r["threshold"] for r in rows],
        "target_recall": target_recall,
        "activation": act_name,
        "sparsity": sparsity,
        "activation_thresholds": None if relu else act_thresholds,
        "calibration": {
            "data": ", ".join(Path(f).name for f in (data if isinstance(data, (list, tuple))
                                                     else [data])),
            "tokens": int(seqs.size),
            "train_tokens": split,
            "heldout_tokens": int(seqs.size) - split,
            "seq_len": seq_len,
            "seconds": round(time.perf_counter() - start, 1),
        },
        "layers": rows,
        # the second text's scored half (None without one)
        "holdout": None if holdout is None else {
            "data": Path(holdout).name,
            "threshold_tokens": half - calib,
            "tokens": int(calib + extra.size - half),
            "layers": out_rows,
        },
        "crc32": crc,
    }
    try:
        fmt.update_manifest(m.path, with_file=(partial, m.path / PREDICTORS_FILE),
                            predictors=entry)
    except OSError as e:
        raise FlashError(f"{m.path}: cannot update {fmt.MANIFEST} ({e.strerror}); is the disk "
                         "full? The model dir is unchanged") from None
    return entry


def evaluate(
    path: str | Path,
    data: str | Path,
    tokens: int = 20_000,
    window: int | None = None,
    progress: bool = True,
    seq_len: int = 256,
) -> dict:
    """The per-layer table (true sparsity, predicted-active fraction, recall, precision) of the
    stored predictors on `tokens` tokens of another text, e.g. held-out validation text.

    With `window` k, each row also gives the fraction of the FFN loaded fresh per token and held
    (the union of the last k tokens' sets), for the predicted and the true (oracle) sets, measured
    after the first k tokens of each `seq_len` sequence.
    """
    m = fmt.read_manifest(path)
    config = load_config(m.path)
    predictors = load_predictors(m.path)
    act_thresholds = m.extra.get("predictors", {}).get("activation_thresholds")
    spec = models.flash_spec(m.architecture)
    act_name = spec.activation(spec.text(config))
    if not activations.is_exact_sparse(act_name) and not act_thresholds:
        raise FormatError(fmt.MANIFEST, "predictors.activation_thresholds", "missing for a "
                          "non-ReLU model", CALIBRATE_FIX.format(dir=m.path))
    seqs = sequences(m.path, data, tokens, seq_len)
    block = max(1, CHUNK_TOKENS // seq_len) * seq_len  # whole sequences per block
    rows = []
    for lay in walk(m, config, seqs, None, act_thresholds, progress, "evaluate"):
        p = predictors[lay.index]
        params = [np.array(t.astype(mx.float32)) for t in (p.A, p.B, p.bias)]
        row = {"layer": lay.index, "rank": p.rank}
        row.update(metrics(lay.x, lay.active, 0, params, p.threshold))
        if window:
            fractions = {"predicted": WindowFractions(window), "oracle": WindowFractions(window)}
            for s, xb in lay.x.blocks(size=block):
                shape = (-1, seq_len, m.ffn_dim)
                fractions["predicted"].add((logits(xb, params) > logit_cut(p.threshold))
                                           .reshape(shape))
                fractions["oracle"].add(lay.active.read(s, s + len(xb)).reshape(shape))
            for name, acc in fractions.items():
                row[f"{name}_fresh_fraction"], row[f"{name}_held_fraction"] = acc.result()
        rows.append(row)
    out = {"data": Path(data).name, "tokens": int(seqs.size), "layers": rows}
    if window:
        out["window"] = window
    return out


__all__ = ["calibrate", "evaluate", "walk", "sequences", "DenseFFN"]
