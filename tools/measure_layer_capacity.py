"""Predicted mode with one cache size for every layer against rows shared out by each layer's
predicted-active fraction (`runtime.load(bench=BenchOptions(per_layer=True))`), alternating twice in one process:
flash bytes, hits and overflow per token over the same teacher-forced tokens.

    python tools/measure_layer_capacity.py CALIBRATED_FLASH_DIR TEXT --memory 25MB [--tokens 200]
"""

from __future__ import annotations

import argparse

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from mlx_flash.bench.options import BenchOptions
from mlx_flash.runtime import load


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("text")
    ap.add_argument("--memory", required=True)
    ap.add_argument("--tokens", type=int, default=200)
    a = ap.parse_args()
    text = open(a.text, encoding="utf-8").read()[: 20 * a.tokens]
    for rnd in range(2):
        for per_layer in (False, True):
            model, tok = load(a.model, memory=a.memory, mode="predicted", max_context=512,
                              bench=BenchOptions(per_layer=per_layer))
            ids = tok.encode(text)[: 20 + a.tokens]
            cache = make_prompt_cache(model)
            model(mx.array([ids[:20]]), cache=cache)
            before = model.flash.counters()
            for t in ids[20:]:  # teacher-forced: both runs see the same tokens
                mx.eval(model(mx.array([[t]]), cache=cache))
            s = model.flash.stats(since=before)
            caps = [layer.cache.capacity for layer in model.flash.runtime.layers]
            print(f"round {rnd} per_layer={per_layer}: rows {caps} bytes/token "
                  f"{s['flash_bytes_per_token']} hits {s['cache_hit_rate']} overflow/token "
                  f"{s['overflow_neurons_per_token']} I/O {s['io_ms_per_token']} ms")


if __name__ == "__main__":
    main()
