"""Issue 5's figures on the real fixtures: predictor tables, perplexity, bytes, calibration time.

For opt-fixture and llama-relu-fixture: convert to a float16 flash dir (align 4096) under /tmp,
calibrate on fixture-calib.txt, measure the per-layer table on fixture-val.txt, perplexity dense vs
predicted, and flash bytes per token with window 4 vs naive.

Predicted-mode perplexity is emulated: the dense model whose MLP zeroes every neuron the predictor
marks inactive. The windowed runtime computes a superset of that set (the union over the last k
tokens, each with its true activation), so this is the honest lower bound on predicted-mode quality.

    .venv/bin/python tools/measure_predictors.py [--tokens 200000] [--ppl-tokens N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from mlx_flash import format as fmt
from mlx_flash.calibrate import calibrate, evaluate
from mlx_flash.convert import convert
from mlx_flash.loader import load_model, load_tokenizer
from mlx_flash.perplexity import perplexity
from mlx_flash.predictor import load_predictors

SHARED = Path(os.environ.get("MLX_FLASH_SHARED", Path(__file__).resolve().parents[2] / "shared"))
FIXTURES = ("opt-fixture", "llama-relu-fixture")
WINDOW = 4


class PredictedMLP(nn.Module):
    """A dense MLP that keeps only the neurons its predictor marks active."""

    def __init__(self, mlp, predictor):
        super().__init__()
        self.mlp = mlp
        self.predictor = predictor
        self.kept = self.seen = 0

    def __call__(self, x: mx.array) -> mx.array:
        mlp = self.mlp
        keep = self.predictor(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)
        self.kept += keep.sum().item()
        self.seen += keep.size
        if hasattr(mlp, "fc1"):
            return mlp.fc2(mlp.act(mlp.fc1(x)) * keep)
        return mlp.down_proj(mlp.act(mlp.gate_proj(x)) * mlp.up_proj(x) * keep)


def measure(name: str, tokens: int, ppl_tokens: int | None, val_tokens: int) -> dict:
    out = Path("/tmp") / f"{name}-flash"
    if not fmt.is_flash_dir(out):
        convert(str(SHARED / "fixtures" / name), out=out, dtype="float16", align=4096,
                progress=False)
    calib, val = SHARED / "corpus" / "fixture-calib.txt", SHARED / "corpus" / "fixture-val.txt"
    t0 = time.perf_counter()
    report = calibrate(out, calib, tokens=tokens, progress=False)
    seconds = time.perf_counter() - t0
    table = evaluate(out, val, tokens=val_tokens, window=WINDOW, progress=False)

    m = fmt.read_manifest(out)
    rows = table["layers"]
    naive = m.num_layers * m.ffn_dim * m.record_bytes

    def per_token(key: str) -> int:
        return round(sum(r[key] for r in rows) * m.ffn_dim * m.record_bytes)

    flash = {
        "record_bytes": m.record_bytes,
        "naive_bytes_per_token": naive,
        "predicted_window4_bytes_per_token": per_token("predicted_fresh_fraction"),
        "oracle_window4_bytes_per_token": per_token("oracle_fresh_fraction"),
        "predicted_no_window_bytes_per_token": per_token("predicted_active_fraction"),
    }

    model, tokenizer = load_model(out), load_tokenizer(out)
    dense = perplexity(model, tokenizer, val, max_tokens=ppl_tokens, progress=False)
    predictors = load_predictors(out)
    wrapped = []
    for layer, pred in zip(model.layers, predictors):
        layer.mlp = PredictedMLP(layer.mlp, pred)
        wrapped.append(layer.mlp)
    predicted = perplexity(model, tokenizer, val, max_tokens=ppl_tokens, progress=False)
    predicted["kept_fraction"] = round(sum(w.kept for w in wrapped) / sum(w.seen for w in wrapped),
                                       4)
    return {
        "model": name,
        "flash_dir": str(out),
        "calibration_seconds": round(seconds, 1),
        "calibration_tokens": report["calibration"]["tokens"],
        "calibration_heldout": report["layers"],
        "validation": table,
        "perplexity_dense": dense,
        "perplexity_predicted": predicted,
        "perplexity_change": round(predicted["perplexity"] / dense["perplexity"] - 1, 4),
        "flash": flash,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
    }


def print_report(r: dict) -> None:
    print(f"\n## {r['model']}: calibrated on {r['calibration_tokens']} tokens in "
          f"{r['calibration_seconds']} s ({r['cpu_count']} cores, load {r['load_average'][0]:.1f})")
    v = r["validation"]
    print(f"Per layer on {v['data']} ({v['tokens']} tokens), window k={v['window']}:")
    print("| layer | rank | true sparsity | predicted active | recall | precision | fresh/token "
          "pred (oracle) | held pred (oracle) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in v["layers"]:
        print(f"| {row['layer']} | {row['rank']} | {row['true_sparsity']:.3f} | "
              f"{row['predicted_active_fraction']:.3f} | {row['recall']:.3f} | "
              f"{row['precision']:.3f} | {row['predicted_fresh_fraction']:.3f} "
              f"({row['oracle_fresh_fraction']:.3f}) | {row['predicted_held_fraction']:.3f} "
              f"({row['oracle_held_fraction']:.3f}) |")
    d, p = r["perplexity_dense"], r["perplexity_predicted"]
    print(f"Perplexity ({d['tokens']} scored tokens, {d['windows']} windows of {d['window']}): "
          f"dense {d['perplexity']:.3f}, predicted {p['perplexity']:.3f} "
          f"({100 * r['perplexity_change']:+.2f}%, {100 * p['kept_fraction']:.1f}% of neurons "
          "kept)")
    f = r["flash"]
    print(f"Flash bytes per token (record {f['record_bytes']} B): naive "
          f"{f['naive_bytes_per_token']:,}"
          f", predicted no window {f['predicted_no_window_bytes_per_token']:,}, predicted k=4 "
          f"{f['predicted_window4_bytes_per_token']:,}, oracle k=4 "
          f"{f['oracle_window4_bytes_per_token']:,}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=200_000, help="calibration tokens")
    ap.add_argument("--val-tokens", type=int, default=10**9, help="validation tokens (table)")
    ap.add_argument("--ppl-tokens", type=int, default=None, help="validation tokens (perplexity)")
    ap.add_argument("--models", default=",".join(FIXTURES))
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    results = []
    for name in args.models.split(","):
        results.append(measure(name, args.tokens, args.ppl_tokens, args.val_tokens))
        print_report(results[-1])
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
