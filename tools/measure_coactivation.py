"""Neuron order by co-activation (issue 15, Ripple-style), measured before building it into
`calibrate`: would placing neurons that fire together next to each other on disk cut the reads?

    .venv/bin/python tools/measure_coactivation.py DIR TEXT [--mode oracle|predicted] \
        [--fit 300] [--eval 300] [--window 4] [--rounds 3]

1. Teacher-forced decode of TEXT's first fit+eval tokens through the flash runtime (memory large
   enough to hold every neuron), recording each layer's active set per token (`--mode oracle`:
   the exact set of a ReLU model; `predicted`: the predictor's).
2. On the first `--fit` tokens, per layer, a co-activation order: a greedy chain that starts at
   the most often active neuron and appends the unplaced neuron most often active together with
   the last one placed (ties: the more often active).
3. On the next `--eval` tokens, the fresh loads of a window of `--window` tokens (active now, not
   active in the window before), as they would be read in file order (ids) and in co-activation
   order (positions in the chain): requests per token after the reader's coalescing, and real
   reads of exactly those record positions from the dir's `ffn.bundles` with the probed reader
   settings, alternating the two orders `--rounds` times. The bytes read at the reordered
   positions are other neurons' records; the I/O pattern is the one a reordered file would get.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import numpy as np

from mlx_flash import ffn, profiles, runtime
from mlx_flash import format as fmt
from mlx_flash.generation import new_cache
from mlx_flash.storage import FlashReader, aligned_empty


def record_active(path: str, text: str, tokens: int, mode: str) -> list[np.ndarray]:
    """(tokens, ffn) bool masks per layer of the decode steps over text's first tokens."""
    model, tok = runtime.load(path, memory="1000%model", mode=mode, window=1)
    ids = tok.encode(text)[: tokens + 1]
    m = model.flash.runtime.manifest
    masks = [np.zeros((len(ids) - 1, m.ffn_dim), dtype=bool) for _ in range(m.num_layers)]
    step = {"t": 0}
    original = ffn.FlashMLP._active

    def active(self, x):
        got = original(self, x)
        masks[self.layer][step["t"], got] = True
        return got

    ffn.FlashMLP._active = active
    try:
        cache = new_cache(model)
        model(mx.array([ids[:1]]), cache=cache)  # the first token: prefill, not recorded
        for t, token in enumerate(ids[1:]):
            step["t"] = t
            mx.eval(model(mx.array([[token]]), cache=cache))
    finally:
        ffn.FlashMLP._active = original
    return masks


def chain_order(mask: np.ndarray) -> np.ndarray:
    """Neuron ids in co-activation order (see the module docstring)."""
    a = mask.astype(np.float32)
    together = a.T @ a  # (ffn, ffn) tokens active together
    freq = np.diag(together).copy()
    n = len(freq)
    placed = np.zeros(n, dtype=bool)
    order = np.empty(n, dtype=np.int64)
    cur = int(np.argmax(freq))
    for k in range(n):
        order[k], placed[cur] = cur, True
        if k + 1 == n:
            break
        score = together[cur] + freq * 1e-6  # ties: the more often active
        score[placed] = -1
        cur = int(np.argmax(score))
    return order


def fresh_sets(mask: np.ndarray, window: int) -> list[np.ndarray]:
    out = []
    for t in range(window, len(mask)):
        before = mask[t - window : t].any(axis=0)
        out.append(np.flatnonzero(mask[t] & ~before))
    return out


def requests(ids: np.ndarray, cap: int) -> int:
    """Requests the reader makes for sorted ids: runs of adjacent ids, cut at `cap` rows."""
    if len(ids) == 0:
        return 0
    breaks = np.flatnonzero(ids[1:] != ids[:-1] + 1) + 1
    lengths = np.diff(np.concatenate(([0], breaks, [len(ids)])))
    return int((-(-lengths // cap)).sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("text")
    ap.add_argument("--mode", default="oracle")
    ap.add_argument("--fit", type=int, default=300)
    ap.add_argument("--eval", type=int, default=300)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    m = fmt.read_manifest(args.model)
    text = open(args.text, encoding="utf-8").read()
    t0 = time.perf_counter()
    masks = record_active(args.model, text, args.fit + args.eval, args.mode)
    print(f"recorded {len(masks[0])} tokens x {m.num_layers} layers in "
          f"{time.perf_counter() - t0:.0f} s")
    threads, max_bytes = profiles.reader_settings(args.model, m.record_bytes)
    cap = max(1, max_bytes // m.record_bytes)
    plans = {"file order": [], "co-activation order": []}  # per token: (layer, sorted positions)
    for layer, mask in enumerate(masks):
        order = chain_order(mask[: args.fit])
        position = np.empty_like(order)
        position[order] = np.arange(len(order))
        print(f"layer {layer}: active {mask[args.fit:].mean():.1%} of {m.ffn_dim} per token")
        for t, ids in enumerate(fresh_sets(mask[args.fit :], args.window)):
            plans["file order"].append((t, layer, ids))
            plans["co-activation order"].append((t, layer, np.sort(position[ids])))
    tokens = len(masks[0]) - args.fit - args.window
    for name, plan in plans.items():
        reqs = sum(requests(ids, cap) for _, _, ids in plan)
        n = sum(len(ids) for _, _, ids in plan)
        print(f"{name}: {n / tokens:.0f} fresh records/token in {reqs / tokens:.1f} requests/token")
    out = aligned_empty(m.ffn_dim, m.record_bytes)[1]
    with FlashReader(m.ffn_path, m.record_bytes, threads, max_request_bytes=max_bytes) as reader:
        for r in range(args.rounds):
            for name, plan in plans.items():
                before = reader.snapshot()
                t = time.perf_counter()
                for _, layer, ids in plan:
                    if len(ids):
                        reader.read(m.layer_offset(layer), ids, out[: len(ids)])
                wall = time.perf_counter() - t
                d = reader.delta(before)
                print(f"round {r + 1} {name}: {d.requests / tokens:.1f} requests/token, "
                      f"{d.bytes / tokens / 1e6:.2f} MB/token, {d.seconds * 1000 / tokens:.2f} ms"
                      f"/token in the reader ({d.bytes / d.seconds / 1e9:.2f} GB/s), wall "
                      f"{wall * 1000 / tokens:.2f} ms/token ({threads} threads, requests up to "
                      f"{max_bytes >> 10} KiB)")


if __name__ == "__main__":
    main()
