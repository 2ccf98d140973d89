"""Low-rank activation predictors (PAPER.md 1) at run time: the file, its checks, the ranks.

A predictor is `sigmoid(B(A x) + bias)` per layer; calibrate.py trains them (`mlx-flash
calibrate`) and writes `predictors.safetensors` with `save_predictors`.
"""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import format as fmt
from .errors import FlashError, FormatError
from .tensors import load_uncached, write_partial_safetensors

PREDICTORS_FILE = "predictors.safetensors"
PREDICTORS_VERSION = 1
CALIBRATE_FIX = "re-run `mlx-flash calibrate {dir} --data FILE`"


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
    fix = CALIBRATE_FIX.format(dir=m.path)
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
    tensors = load_uncached(file, PREDICTORS_FILE)
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


def write_predictors(file: Path, tensors: dict[str, mx.array]) -> tuple[Path, int]:
    """Write the predictors beside `file` as a flushed partial file; returns (it, its CRC-32)
    for the caller to rename into place with the manifest update."""
    return write_partial_safetensors(file, tensors, {
        "format": "mlx-flash predictors", "version": str(PREDICTORS_VERSION)})
