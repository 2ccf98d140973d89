"""Issue 15's lookahead figures: a flash dir's greedy decode with the dense lookahead on and off,
beside its dense form, alternating in one process (this machine's speed drifts by the minute).

    .venv/bin/python tools/measure_lookahead.py DIR --memory 50%model --max-context 256 \
        [--tokens 24] [--rounds 2] [--mode predicted]

Prints, per round and setting, tok/s (decode steps only) and the per-token flash figures (bytes,
I/O time and the part of it the decode waited for, cache, predictor, lookahead precision and
recall), then each flash setting's tok/s over dense's.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx

from mlx_flash import load
from mlx_flash.generation import new_cache

PROMPT = "What is the capital of France? Answer in one long paragraph about its history."


def decode(model, tok, tokens: int) -> tuple[float, list[int]]:
    """Greedy decode after the prompt: (tokens/s of the decode steps, the tokens)."""
    cache = new_cache(model)
    y = model(mx.array([tok.encode(PROMPT)]), cache=cache)
    y = mx.argmax(y[:, -1:], axis=-1)
    mx.eval(y)
    out = []
    t = time.perf_counter()
    for _ in range(tokens):
        y = mx.argmax(model(y, cache=cache)[:, -1:], axis=-1)
        mx.eval(y)
        out.append(int(y.item()))
    return tokens / (time.perf_counter() - t), out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--memory", default="50%model")
    ap.add_argument("--max-context", type=int, default=256)
    ap.add_argument("--mode", default="predicted")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    kw = {"memory": args.memory, "max_context": args.max_context, "mode": args.mode}
    models = {"dense": load(args.model, mode="dense"),
              "lookahead on": load(args.model, lookahead=True, **kw),
              "lookahead off": load(args.model, lookahead=False, **kw)}
    ratios: dict[str, list[float]] = {}
    for r in range(args.rounds):
        dense_tps, dense_tokens = decode(*models["dense"], args.tokens)
        print(f"round {r + 1}: dense {dense_tps:.2f} tok/s")
        for name in ("lookahead on", "lookahead off"):
            model, tok = models[name]
            before = model.flash.counters()
            tps, tokens = decode(model, tok, args.tokens)
            s = model.flash.runtime.stats.since(before).per_token()
            ratios.setdefault(name, []).append(tps / dense_tps)
            same = sum(a == b for a, b in zip(tokens, dense_tokens, strict=True))
            print(f"  {name}: {tps:.2f} tok/s = {tps / dense_tps:.0%} of dense; "
                  f"{s['flash_bytes_per_token'] / 1e6:.1f} MB/token, I/O "
                  f"{s['io_ms_per_token']:.1f} ms (waited {s['io_wait_ms_per_token']:.1f}), cache "
                  f"{s['cache_ms_per_token']:.1f} ms, predictor {s['predict_ms_per_token']:.1f} ms, "
                  f"lookahead precision {s['lookahead_hit_rate']} recall "
                  f"{s['lookahead_recall']}; {same}/{args.tokens} tokens as dense; cache rows "
                  f"{model.flash.capacity}")
    print("flash/dense tok/s per round: " + "; ".join(
        f"{k} " + ", ".join(f"{v:.2f}" for v in vs) for k, vs in ratios.items()))


if __name__ == "__main__":
    main()
