"""Issue 15's "everything cached" figure: decode tok/s of a flash dir whose window holds every
neuron (nothing left to read) against the dense model of the same weights, in one run.

    .venv/bin/python tools/measure_cached.py ../shared/fixtures/llama-relu-fixture [--tokens 64]

Converts the checkpoint (float32) into a scratch flash dir, loads it dense and in oracle mode
with a cache and window large enough for every neuron, warms the cache up, then times greedy
decode steps of both, alternating, twice.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import mlx.core as mx

from mlx_flash import load
from mlx_flash.bench.options import BenchOptions
from mlx_flash.convert import convert
from mlx_flash.generation import new_cache


def decode_tps(model, tok, warmup: int, tokens: int) -> float:
    cache = new_cache(model)
    y = model(mx.array([tok.encode("The open() function returns")]), cache=cache)
    y = mx.argmax(y[:, -1:], axis=-1)
    for _ in range(warmup):
        y = mx.argmax(model(y, cache=cache)[:, -1:], axis=-1)
        mx.eval(y)
    t = time.perf_counter()
    for _ in range(tokens):
        y = mx.argmax(model(y, cache=cache)[:, -1:], axis=-1)
        mx.eval(y)
    return tokens / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=48)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = convert(args.checkpoint, out=Path(tmp) / "flash", dtype="float32", progress=False)
        dense = load(out, mode="dense")
        everything = {"capacity": 1 << 30, "window": 1 << 30, "memory": "2GB"}
        oracle = load(out, mode="oracle", **everything)
        ffn = oracle[0].flash.runtime.manifest.ffn_dim
        n_layers = oracle[0].flash.runtime.manifest.num_layers
        # a stand-in predictor that marks every neuron: the runtime's own cost, no predictor's
        marks_all = [lambda x: mx.ones((x.shape[0], ffn), dtype=mx.bool_)] * n_layers
        predicted = load(out, mode="predicted", bench=BenchOptions(predictors=marks_all),
                         **everything)
        best = {}
        for _ in range(2):
            d = decode_tps(*dense, args.warmup, args.tokens)
            line = [f"dense {d:.1f} tok/s"]
            for name, (model, tok) in (("oracle", oracle), ("predicted (marks all)", predicted)):
                before = model.flash.counters()
                f = decode_tps(model, tok, args.warmup, args.tokens)
                s = model.flash.runtime.stats.since(before).per_token()
                best[name] = max(best.get(name, 0), f / d)
                line.append(f"{name} {f:.1f} tok/s = {f / d:.0%} (read "
                            f"{s['flash_bytes_per_token']} B/token, cache "
                            f"{s['cache_ms_per_token']:.2f} ms, predictor "
                            f"{s['predict_ms_per_token']:.2f} ms per token)")
            print("; ".join(line))
        print(f"{Path(args.checkpoint).name}, {n_layers} layers: flash/dense, best of 2: "
              + ", ".join(f"{k} {v:.2f}" for k, v in best.items()))


if __name__ == "__main__":
    main()
