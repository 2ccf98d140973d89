"""Low-rank activation predictors (PAPER.md 1) and their layer-by-layer calibration.

Calibration moves the hidden states of all calibration tokens through one block at a time, reading
only that block's FFN from `ffn.bundles`, so the whole model is never in memory. The maths runs in
numpy float32: MLX's CPU BLAS on Linux is ~100x slower on matrix-matrix products (DESIGN.md).
Per layer it records the FFN input and the true active set, trains `sigmoid(B(A x) + bias)` with a
class-balanced loss, and picks the threshold that reaches a target recall on held-out tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from tqdm import tqdm

from . import format as fmt
from .checkpoint import load_config
from .errors import FlashError, FormatError
from .loader import build_model, load_tokenizer
from .models.opt import POSITION_OFFSET
from .perplexity import read_tokens

PREDICTORS_FILE = "predictors.safetensors"
PREDICTORS_VERSION = 1
DEFAULT_TOKENS = 200_000
DEFAULT_TARGET_RECALL = 0.95
DEFAULT_SPARSITY = 0.5  # non-ReLU models: fraction of |act(gate)*up| counted as inactive
HELDOUT_FRACTION = 0.1
BATCH_TOKENS = 4096  # tokens per numpy block forward
TRAIN_BATCH = 1024
TRAIN_EPOCHS = 2
MIN_TRAIN_STEPS = 50
LEARNING_RATE = 5e-3
# Stored thresholds are float32 probabilities; this logit range keeps them strictly inside (0, 1).
LOGIT_RANGE = (-30.0, 15.0)
_CALIBRATE = "re-run `mlx-flash calibrate {dir} --data FILE`"


# ---------------------------------------------------------------------------------------------
# The predictor at run time (MLX)


class Predictor:
    """One layer's predictor: neuron i is active for x when sigmoid(B(A x) + bias)_i > threshold.

    `A` is (rank, d_model), `B` (ffn_dim, rank), `bias` (ffn_dim,). Calling it on x (n, d_model)
    returns a bool (n, ffn_dim) mask, computed as logits > logit(threshold) (no sigmoid).
    """

    def __init__(self, A: mx.array, B: mx.array, bias: mx.array, threshold: float):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.A, self.B, self.bias = A, B, bias
        self.threshold = float(threshold)
        self.logit_threshold = math.log(self.threshold) - math.log1p(-self.threshold)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def nbytes(self) -> int:
        return self.A.nbytes + self.B.nbytes + self.bias.nbytes

    def logits(self, x: mx.array) -> mx.array:
        return (x @ self.A.T) @ self.B.T + self.bias  # (n, ffn)

    def __call__(self, x: mx.array) -> mx.array:
        return self.logits(x) > self.logit_threshold


def load_predictors(path: str | Path, dtype: mx.Dtype | None = None) -> list[Predictor]:
    """The validated predictors of a flash dir, one per layer (`dtype` casts A, B and bias)."""
    m = fmt.read_manifest(path)
    file = m.path / PREDICTORS_FILE
    fix = _CALIBRATE.format(dir=m.path)
    if not file.is_file():
        raise FlashError(f"no predictors in {m.path}: run `mlx-flash calibrate {m.path} "
                         "--data FILE`")
    header = _read_header(file, fix)
    expected = {}
    for i in range(m.num_layers):
        rank = (header.get(f"layers.{i}.A", {}).get("shape") or [0])[0]
        expected.update({
            f"layers.{i}.A": [rank, m.d_model], f"layers.{i}.B": [m.ffn_dim, rank],
            f"layers.{i}.bias": [m.ffn_dim], f"layers.{i}.threshold": [1],
        })
    for name, shape in expected.items():
        if name not in header:
            raise FormatError(PREDICTORS_FILE, name, "missing tensor", fix)
        entry = header[name]
        if entry["dtype"] not in ("F16", "BF16", "F32"):
            raise FormatError(PREDICTORS_FILE, f"{name}.dtype", f"{entry['dtype']}, expected F16, "
                              "BF16 or F32", fix)
        if entry["shape"] != shape or (name.endswith(".A") and not 1 <= shape[0] <= m.d_model):
            raise FormatError(PREDICTORS_FILE, f"{name}.shape", f"{entry['shape']}, expected "
                              f"{shape} for d_model {m.d_model}, ffn_dim {m.ffn_dim}", fix)
    extra = sorted(set(header) - set(expected))
    if extra:
        raise FormatError(PREDICTORS_FILE, extra[0], "unexpected tensor (more layers than "
                          f"num_layers {m.num_layers}?)", fix)
    tensors = mx.load(str(file))
    out = []
    for i in range(m.num_layers):
        threshold = float(tensors[f"layers.{i}.threshold"].astype(mx.float32).item())
        if not 0.0 < threshold < 1.0:  # also rejects NaN
            raise FormatError(PREDICTORS_FILE, f"layers.{i}.threshold", f"{threshold} is not in "
                              "(0, 1)", fix)
        A, B, bias = (tensors[f"layers.{i}.{k}"] for k in ("A", "B", "bias"))
        if dtype is not None:
            A, B, bias = A.astype(dtype), B.astype(dtype), bias.astype(dtype)
        out.append(Predictor(A, B, bias, threshold))
    _check_manifest_entry(m, out, fix)
    return out


def _read_header(file: Path, fix: str) -> dict:
    try:
        header, _ = fmt.read_safetensors_header(file, PREDICTORS_FILE)
    except FormatError as e:
        # read_safetensors_header names the convert fix; keep its problem, give ours.
        problem = str(e)[len(f"{e.file}: {e.field}: "):].rsplit("; ", 1)[0]
        raise FormatError(e.file, e.field, problem, fix) from None
    return header


def _check_manifest_entry(m: fmt.Manifest, predictors: list[Predictor], fix: str) -> None:
    """The manifest's `predictors` entry, when present, must describe this very file."""
    entry = m.extra.get("predictors")
    if entry is None:
        return
    if not isinstance(entry, dict):
        raise FormatError(fmt.MANIFEST, "predictors", "expected an object", fix)
    ranks = [p.rank for p in predictors]
    thresholds = [p.threshold for p in predictors]
    for key, want in (("ranks", ranks), ("thresholds", thresholds)):
        got = entry.get(key)
        numbers = isinstance(got, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in got)
        if not numbers or len(got) != len(want) or not np.allclose(got, want, rtol=1e-6, atol=0):
            raise FormatError(fmt.MANIFEST, f"predictors.{key}", f"{str(got):.60} disagrees with "
                              f"{PREDICTORS_FILE} ({str(want):.60})", fix)


# ---------------------------------------------------------------------------------------------
# Ranks


def default_ranks(num_layers: int, d_model: int, ffn_dim: int | None = None) -> list[int]:
    """The paper's pattern scaled to d_model: d/32 for most layers, d/4 for the last eighth
    (OPT-6.7B, d=4096: 128 for 28 layers, 1024 for the last 4). Small models get at least 64
    (at most d/4): below that a predictor marks ~half the neurons (d=384, rank 16: 44% marked
    for 5% truly active)."""
    cap = min(d_model, ffn_dim or d_model)
    small = max(1, min(cap, d_model // 4, max(64, d_model // 32)))
    large = min(cap, max(small, d_model // 4))
    last = max(1, math.ceil(num_layers / 8))
    return [small] * (num_layers - last) + [large] * last


def parse_ranks(spec: str | int | None, num_layers: int, d_model: int, ffn_dim: int) -> list[int]:
    """Ranks per layer from `R` (all layers), `R0,R1,...` (one per layer) or `FIRST-LAST:R,...`
    (ranges over the default ranks); None or "default" gives `default_ranks`."""
    ranks = default_ranks(num_layers, d_model, ffn_dim)
    text = "default" if spec is None else str(spec).strip()
    usage = (f"--ranks {text!r}: expected R, one rank per layer R0,...,R{num_layers - 1}, or "
             "FIRST-LAST:R,... (layers 0 to num_layers-1)")
    try:
        if text == "default":
            pass
        elif ":" in text:
            for item in text.split(","):
                span, rank = item.split(":")
                first, _, last = span.partition("-")
                first, last = int(first), int(last or first)
                if not 0 <= first <= last < num_layers:
                    raise ValueError
                ranks[first : last + 1] = [int(rank)] * (last - first + 1)
        elif "," in text:
            ranks = [int(r) for r in text.split(",")]
            if len(ranks) != num_layers:
                raise ValueError
        else:
            ranks = [int(text)] * num_layers
    except ValueError:
        raise FlashError(usage) from None
    bad = [r for r in ranks if not 1 <= r <= min(d_model, ffn_dim)]
    if bad:
        raise FlashError(f"--ranks: rank {bad[0]} out of range 1..{min(d_model, ffn_dim)}")
    return ranks


# ---------------------------------------------------------------------------------------------
# Layer-by-layer forward in numpy


def _f32(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def _records_f32(values: np.ndarray, dtype: str) -> np.ndarray:
    """Storage-dtype record values (uint16 bits for 16-bit types) as float32."""
    if dtype == "float16":
        return values.view(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32)


def _activation(config: dict) -> str:
    return config.get("activation_function") or config.get("hidden_act") or "silu"


@dataclass
class _FFN:
    """One layer's dense FFN in float32: act(x W_in^T + b_in) [* (x W_up^T + b_up)] W_out + b."""

    w_in: np.ndarray  # (ffn, d): fc1 / gate_proj
    b_in: np.ndarray | None
    w_up: np.ndarray | None  # (ffn, d): up_proj (gated models)
    b_up: np.ndarray | None
    w_out: np.ndarray  # (ffn, d): fc2 / down_proj columns
    b_out: np.ndarray | None
    act: object  # the MLX activation (only used when not ReLU)
    relu: bool

    def hidden(self, x: np.ndarray) -> np.ndarray:
        """The intermediate activation (n, ffn) whose non-zeros (ReLU) are the active neurons."""
        z = x @ self.w_in.T
        if self.b_in is not None:
            z += self.b_in
        h = np.maximum(z, 0, out=z) if self.relu else np.array(self.act(mx.array(z)))
        if self.w_up is not None:
            up = x @ self.w_up.T
            if self.b_up is not None:
                up += self.b_up
            h *= up
        return h

    def out(self, h: np.ndarray) -> np.ndarray:
        y = h @ self.w_out
        return y if self.b_out is None else y + self.b_out


def _load_ffn(m: fmt.Manifest, resident: dict, layer: int, file, act, relu: bool) -> _FFN:
    records = fmt.read_layer_records(m, layer, file=file)  # (ffn, record_values)
    mats, biases = [], []
    for p in m.parts:
        mats.append(_records_f32(records[:, p.offset : p.offset + p.length], m.dtype))
        name = p.bias_name(layer)
        biases.append(None if name is None else _f32(resident[name]))
    if len(mats) == 2:
        mats.insert(1, None)
        biases.insert(1, None)
    return _FFN(mats[0], biases[0], mats[1], biases[1], mats[2], biases[2], act, relu)


def _norm(module, x: np.ndarray) -> np.ndarray:
    """nn.LayerNorm or nn.RMSNorm in numpy."""
    p = {k: _f32(v) for k, v in tree_flatten(module.parameters())}
    if type(module).__name__ == "RMSNorm":
        y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + module.eps)
        return y * p["weight"]
    y = x - x.mean(axis=-1, keepdims=True)
    y /= np.sqrt(np.mean(y * y, axis=-1, keepdims=True) + module.eps)
    if "weight" in p:
        y = y * p["weight"]
    return y + p["bias"] if "bias" in p else y


def _attention(attn, x: np.ndarray) -> np.ndarray:
    """Causal self-attention of the mlx-lm module `attn` over x (B, L, d), from position 0."""
    p = {k: _f32(v) for k, v in tree_flatten(attn.parameters())}

    def linear(name, v):
        y = v @ p[f"{name}.weight"].T
        return y + p[f"{name}.bias"] if f"{name}.bias" in p else y

    b, n = x.shape[:2]
    heads = attn.n_heads
    kv_heads = getattr(attn, "n_kv_heads", heads)
    head_dim = p["q_proj.weight"].shape[0] // heads
    q, k, v = (linear(f"{s}_proj", x).reshape(b, n, -1, head_dim).transpose(0, 2, 1, 3)
               for s in "qkv")  # (B, heads, L, head_dim)
    if hasattr(attn, "rope"):  # rotary embeddings: elementwise, so MLX's own op is cheap here
        q, k = np.array(attn.rope(mx.array(q))), np.array(attn.rope(mx.array(k)))
    if kv_heads != heads:
        k, v = np.repeat(k, heads // kv_heads, axis=1), np.repeat(v, heads // kv_heads, axis=1)
    s = q @ np.ascontiguousarray(k.transpose(0, 1, 3, 2))  # (B, H, L, L)
    s *= attn.scale
    s += np.triu(np.full((n, n), -np.inf, dtype=np.float32), 1)
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    o = (s @ v).transpose(0, 2, 1, 3).reshape(b, n, -1)
    return linear("o_proj" if "o_proj.weight" in p else "out_proj", o)


def _block(layer, ffn: _FFN, x: np.ndarray, record) -> np.ndarray:
    """One decoder block over x (B, L, d); `record(u, h)` sees the FFN input and activation."""

    def mlp(u):
        u2 = u.reshape(-1, u.shape[-1])
        h = ffn.hidden(u2)
        record(u2, h)
        return ffn.out(h).reshape(u.shape)

    if hasattr(layer, "input_layernorm"):  # Llama
        h = x + _attention(layer.self_attn, _norm(layer.input_layernorm, x))
        return h + mlp(_norm(layer.post_attention_layernorm, h))
    if layer.pre_norm:  # OPT
        h = x + _attention(layer.self_attn, _norm(layer.self_attn_layer_norm, x))
        return h + mlp(_norm(layer.final_layer_norm, h))
    h = _norm(layer.self_attn_layer_norm, x + _attention(layer.self_attn, x))
    return _norm(layer.final_layer_norm, h + mlp(h))


def _embed(model, seqs: np.ndarray) -> np.ndarray:
    """Input embeddings (S, L, d) of token sequences (S, L), each starting at position 0."""
    inner = model.model
    out = []
    for s in range(0, len(seqs), max(1, BATCH_TOKENS // seqs.shape[1])):
        ids = mx.array(seqs[s : s + max(1, BATCH_TOKENS // seqs.shape[1])])
        if hasattr(inner, "decoder"):  # OPT: learned positions with an offset
            dec = inner.decoder
            h = _f32(dec.embed_tokens(ids))
            if "project_in" in dec:
                h = h @ _f32(dec.project_in.weight).T
            h += _f32(dec.embed_positions(mx.arange(ids.shape[1]) + POSITION_OFFSET))
        else:
            h = _f32(inner.embed_tokens(ids))
        out.append(h)
    return np.concatenate(out)


@dataclass
class _LayerData:
    index: int
    x: np.ndarray  # (n, d) FFN inputs of all tokens
    active: np.ndarray  # (n, ffn) bool, the true active set
    act_threshold: float | None  # non-ReLU: |act(gate)*up| above this counts as active
    ffn: _FFN


def _walk(m: fmt.Manifest, config: dict, seqs: np.ndarray, sparsity: float | None,
          act_thresholds: list[float] | None, progress: bool, desc: str):
    """Yield `_LayerData` per layer while moving the hidden states of `seqs` through the model."""
    model = build_model(config)
    resident = mx.load(str(m.resident_path))
    # Only resident weights load; the MLPs keep their lazy random init, never evaluated.
    model.load_weights(list(model.sanitize(dict(resident)).items()), strict=False)
    act = _activation(config)
    relu = act == "relu"
    hidden = _embed(model, seqs)  # (S, L, d)
    S, L = seqs.shape
    per = max(1, BATCH_TOKENS // L)
    bar = tqdm(total=m.num_layers * S * L, desc=desc, unit="tok", unit_scale=True,
               disable=not progress, leave=False)
    with open(m.ffn_path, "rb") as f:
        for i, layer in enumerate(model.layers):
            ffn = _load_ffn(m, resident, i, f, layer.mlp.act, relu)
            x = np.empty((S * L, m.d_model), dtype=np.float32)
            active = np.empty((S * L, m.ffn_dim), dtype=bool) if relu else None
            for s in range(0, S, per):
                rows = slice(s * L, min(s + per, S) * L)
                rec = functools.partial(_record, x[rows], active[rows] if relu else None)
                hidden[s : s + per] = _block(layer, ffn, hidden[s : s + per], rec)
                bar.update(rows.stop - rows.start)
            threshold = None
            if not relu:
                threshold = (act_thresholds[i] if act_thresholds is not None
                             else _magnitude_threshold(ffn, x, sparsity))
                active = np.concatenate([np.abs(ffn.hidden(x[r : r + BATCH_TOKENS])) > threshold
                                         for r in range(0, len(x), BATCH_TOKENS)])
            yield _LayerData(i, x, active, threshold, ffn)
    bar.close()


def _record(x: np.ndarray, active: np.ndarray | None, u: np.ndarray, h: np.ndarray) -> None:
    x[:] = u
    if active is not None:  # ReLU: exact zeros
        np.not_equal(h, 0, out=active)


def _magnitude_threshold(ffn: _FFN, x: np.ndarray, sparsity: float) -> float:
    """The |act(gate)*up| quantile at `sparsity` over a strided sample of tokens (CATS/TEAL)."""
    sample = x[:: max(1, len(x) // 8192)]
    mags = np.concatenate([np.abs(ffn.hidden(sample[r : r + BATCH_TOKENS])).ravel()
                           for r in range(0, len(sample), BATCH_TOKENS)])
    return float(np.quantile(mags, sparsity))


# ---------------------------------------------------------------------------------------------
# Training and thresholds (numpy float32)


def _init(x: np.ndarray, ffn: _FFN, rank: int) -> list[np.ndarray]:
    """A, B, bias so that B A x + bias is the best rank-r fit of the pre-activation W_in x + b_in
    over the data (SVD of W_in Sigma^1/2, Sigma = E[x x^T])."""
    sample = x[:: max(1, len(x) // 16384)].astype(np.float64)
    evals, evecs = np.linalg.eigh(sample.T @ sample / len(sample))
    m = ffn.w_in @ (evecs * np.sqrt(np.maximum(evals, 0)))  # (ffn, d)
    # top-r left singular vectors of m from the small (d, d) problem: u = m v / s
    s2, v = np.linalg.eigh(m.T @ m)
    top = np.argsort(s2)[::-1][:rank]
    u = (m @ v[:, top]) / np.sqrt(np.maximum(s2[top], 1e-30))  # (ffn, r), orthonormal
    A = u.T @ ffn.w_in  # (r, d)
    mean = sample.mean(axis=0)
    bias = ffn.w_in @ mean - u @ (A @ mean)  # the projection's error on the mean input
    if ffn.b_in is not None:
        bias = bias + ffn.b_in
    return [A.astype(np.float32), u.astype(np.float32), bias.astype(np.float32)]


def _train(x: np.ndarray, y: np.ndarray, ffn: _FFN, rank: int, seed: int) -> list[np.ndarray]:
    """Adam on class-balanced BCE: positives weighted by neg/pos of the layer."""
    params = _init(x, ffn, rank)
    pos = float(y.mean())
    if pos in (0.0, 1.0):
        return params
    weight = np.float32((1 - pos) / pos)
    moments = [(np.zeros_like(p), np.zeros_like(p)) for p in params]
    rng = np.random.default_rng(seed)
    n = len(x)
    batch = min(TRAIN_BATCH, n)
    steps = max(MIN_TRAIN_STEPS, TRAIN_EPOCHS * n // batch)
    order, cursor = rng.permutation(n), 0
    b1, b2, eps = 0.9, 0.999, 1e-8
    for step in range(steps):
        if cursor + batch > n:  # next epoch
            order, cursor = rng.permutation(n), 0
        idx = np.sort(order[cursor : cursor + batch])
        cursor += batch
        xb, yb = x[idx], y[idx]
        A, B, bias = params
        hb = xb @ A.T  # (b, r)
        p = hb @ B.T  # (b, ffn) logits, then probabilities in place
        p += bias
        np.negative(p, out=p)
        np.exp(p, out=p)
        p += 1
        np.reciprocal(p, out=p)
        # dLoss/dlogit: p for negatives, weight * (p - 1) for positives; mean over tokens
        g = np.where(yb, weight * (p - 1), p)
        g *= np.float32(1 / batch)
        dh = g @ B
        grads = [dh.T @ xb, g.T @ hb, g.sum(axis=0)]
        lr = LEARNING_RATE * 0.5 * (1 + math.cos(math.pi * step / steps))  # cosine to zero
        t = step + 1
        scale = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        for prm, grad, (m1, m2) in zip(params, grads, moments):
            m1 *= b1
            m1 += (1 - b1) * grad
            m2 *= b2
            m2 += (1 - b2) * grad * grad
            prm -= scale * m1 / (np.sqrt(m2) + eps)
    return params


def _logits(x: np.ndarray, params: list[np.ndarray]) -> np.ndarray:
    A, B, bias = params
    return (x @ A.T) @ B.T + bias


def _pick_threshold(x: np.ndarray, y: np.ndarray, params, target_recall: float) -> float:
    """The largest logit cut with recall >= target_recall on (x, y), as a float32 probability."""
    pos = np.concatenate([_logits(x[r : r + BATCH_TOKENS], params)[y[r : r + BATCH_TOKENS]]
                          for r in range(0, len(x), BATCH_TOKENS)])
    if not len(pos):
        return 0.5
    miss = int(math.floor((1 - target_recall) * len(pos)))  # positives we may lose
    cut = float(np.partition(pos, miss)[miss])
    cut -= 1e-4 * max(1.0, abs(cut))  # strictly below it (logits > t), float32 rounding included
    cut = min(max(cut, LOGIT_RANGE[0]), LOGIT_RANGE[1])
    return float(np.float32(1 / (1 + math.exp(-cut))))


def _metrics(x: np.ndarray, y: np.ndarray, params, threshold: float) -> dict:
    """True sparsity, predicted-active fraction, recall and precision of (x, y)."""
    cut = math.log(threshold) - math.log1p(-threshold)
    true = predicted = hit = 0
    for r in range(0, len(x), BATCH_TOKENS):
        pred = _logits(x[r : r + BATCH_TOKENS], params) > cut
        yr = y[r : r + BATCH_TOKENS]
        true += int(yr.sum())
        predicted += int(pred.sum())
        hit += int(np.count_nonzero(pred & yr))
    total = y.size
    return {
        "true_sparsity": round(1 - true / total, 4),
        "predicted_active_fraction": round(predicted / total, 4),
        "recall": round(hit / true, 4) if true else 1.0,
        "precision": round(hit / predicted, 4) if predicted else 1.0,
    }


# ---------------------------------------------------------------------------------------------
# Calibration and measurement


def _sequences(path: Path, data: str | Path, tokens: int, seq_len: int) -> np.ndarray:
    """The first `tokens` tokens of the text file `data` as (S, seq_len) sequences."""
    ids = read_tokens(load_tokenizer(path), data, tokens)
    n = len(ids) // seq_len
    if n < 2:
        raise FlashError(f"{data}: {len(ids)} tokens, need at least {2 * seq_len} "
                         f"(two sequences of {seq_len})")
    return np.asarray(ids[: n * seq_len], dtype=np.int32).reshape(n, seq_len)


def calibrate(
    path: str | Path,
    data: str | Path,
    tokens: int = DEFAULT_TOKENS,
    ranks: str | int | None = None,
    target_recall: float = DEFAULT_TARGET_RECALL,
    sparsity: float | None = None,
    progress: bool = True,
    seq_len: int = 256,
) -> dict:
    """Train one predictor per layer on `tokens` tokens of the text file `data`.

    Writes `predictors.safetensors` into the flash dir (atomically) and a `predictors` entry with
    per-layer metrics into its manifest. `ranks`: see `parse_ranks`. `sparsity` (non-ReLU models
    only, default 0.5): the fraction of |act(gate)*up| values counted as inactive. Returns the
    manifest entry (JSON-able), whose `layers` is the per-layer table on held-out tokens.
    """
    start = time.perf_counter()
    m = fmt.read_manifest(path)
    config = load_config(m.path)
    relu = _activation(config) == "relu"
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
    seqs = _sequences(m.path, data, tokens, seq_len)
    held = max(1, round(len(seqs) * HELDOUT_FRACTION))
    split = (len(seqs) - held) * seq_len  # tokens of the training part

    tensors, rows, act_thresholds = {}, [], []
    for lay in _walk(m, config, seqs, sparsity, None, progress, "calibrate"):
        i = lay.index
        params = _train(lay.x[:split], lay.active[:split], lay.ffn, rank_list[i], seed=i)
        params = [p.astype(np.float16).astype(np.float32) for p in params]  # as stored
        threshold = _pick_threshold(lay.x[split:], lay.active[split:], params, target_recall)
        row = {"layer": i, "rank": rank_list[i], "threshold": threshold}
        row.update(_metrics(lay.x[split:], lay.active[split:], params, threshold))
        rows.append(row)
        act_thresholds.append(lay.act_threshold)
        for key, value in zip(("A", "B", "bias"), params):
            tensors[f"layers.{i}.{key}"] = mx.array(value.astype(np.float16))
        tensors[f"layers.{i}.threshold"] = mx.array(np.array([threshold], dtype=np.float32))
        del lay

    _save(m.path / PREDICTORS_FILE, tensors)
    entry = {
        "file": PREDICTORS_FILE,
        "version": PREDICTORS_VERSION,
        "dtype": "float16",
        "ranks": rank_list,
        "thresholds": [r["threshold"] for r in rows],
        "target_recall": target_recall,
        "activation": _activation(config),
        "sparsity": sparsity,
        "activation_thresholds": None if relu else act_thresholds,
        "calibration": {
            "data": Path(data).name,
            "tokens": int(seqs.size),
            "train_tokens": split,
            "heldout_tokens": int(seqs.size) - split,
            "seq_len": seq_len,
            "seconds": round(time.perf_counter() - start, 1),
        },
        "layers": rows,
    }
    m = fmt.read_manifest(m.path)  # fresh: keep whatever else was added meanwhile
    fmt.write_manifest(dataclasses.replace(m, extra={**m.extra, "predictors": entry}))
    return entry


def _save(file: Path, tensors: dict[str, mx.array]) -> None:
    """Atomic write: `*.partial.safetensors`, then rename (mx.save_safetensors wants the suffix)."""
    partial = file.with_name(file.stem + ".partial.safetensors")
    try:
        mx.save_safetensors(str(partial), tensors, metadata={
            "format": "mlx-flash predictors", "version": str(PREDICTORS_VERSION)})
        with open(partial, "rb") as f:
            os.fsync(f.fileno())
        os.replace(partial, file)
    finally:
        partial.unlink(missing_ok=True)


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
    entry = m.extra.get("predictors", {})
    act_thresholds = entry.get("activation_thresholds")
    if _activation(config) != "relu" and not act_thresholds:
        raise FormatError(fmt.MANIFEST, "predictors.activation_thresholds", "missing for a "
                          "non-ReLU model", _CALIBRATE.format(dir=m.path))
    seqs = _sequences(m.path, data, tokens, seq_len)
    rows = []
    for lay in _walk(m, config, seqs, None, act_thresholds, progress, "evaluate"):
        p = predictors[lay.index]
        params = [_f32(p.A), _f32(p.B), _f32(p.bias)]
        row = {"layer": lay.index, "rank": p.rank}
        row.update(_metrics(lay.x, lay.active, params, p.threshold))
        if window:
            cut = p.logit_threshold
            pred = np.concatenate([_logits(lay.x[r : r + BATCH_TOKENS], params) > cut
                                   for r in range(0, len(lay.x), BATCH_TOKENS)])
            for name, mask in (("predicted", pred), ("oracle", lay.active)):
                fresh, held = _window_fractions(mask.reshape(*seqs.shape, -1), window)
                row[f"{name}_fresh_fraction"], row[f"{name}_held_fraction"] = fresh, held
        rows.append(row)
    out = {"data": Path(data).name, "tokens": int(seqs.size), "layers": rows}
    if window:
        out["window"] = window
    return out


def _window_fractions(mask: np.ndarray, k: int) -> tuple[float, float]:
    """Mean fraction of neurons loaded fresh per token (active now, in none of the previous k
    tokens) and held after the token (active in any of the last k), mask (S, L, ffn)."""
    before, held = np.zeros_like(mask), mask.copy()
    for j in range(1, k + 1):
        before[:, j:] |= mask[:, :-j]
        if j < k:
            held[:, j:] |= mask[:, :-j]
    fresh = mask & ~before
    return (round(float(fresh[:, k:].mean()), 4), round(float(held[:, k - 1 :].mean()), 4))
