"""What one pipeline step costs in communication between two ranks: the messages of a decode step
(`mlx_flash/pipeline.py`: a header and a payload of each layer's mask kind and the hidden state
from rank 0 to rank 1, the hidden state and rank 1's counters back), with no layers run, timed
on rank 0 as a round trip; also the same for a prefill chunk of T tokens.

    mlx.launch -n 2 --backend ring -- python tools/measure_pipeline.py [--dims 192,4096,8192]
        [--layers 32] [--steps 500] [--prefill 512]
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx
import numpy as np

from mlx_flash.pipeline import ROW, STEP, Link, _pack, _pad8


def round_trips(link: Link, d: int, tokens: int, layers: int, steps: int) -> list[float]:
    """Seconds per round trip on rank 0 (rank 1 answers each step)."""
    h = mx.zeros((1, tokens, d), mx.bfloat16)
    kinds = np.full(layers, -2, np.int64)
    payload = layers * 8 + _pad8(h.nbytes)
    reply = _pad8(h.nbytes) + ROW * 8
    out = []
    for _ in range(steps):
        if link.rank == 0:
            tic = time.perf_counter()
            link.send([STEP, 1, tokens, d], _pack([kinds, h]))
            mx.eval(link.recv(reply))
            out.append(time.perf_counter() - tic)
        else:
            link.recv_head()
            buf = link.recv(payload)
            link.send(None, _pack([buf[layers * 8 :], np.zeros(ROW)]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", default="192,4096,8192")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--prefill", type=int, default=512)
    a = ap.parse_args()
    link = Link(mx.distributed.init())
    assert link.size == 2, "run under mlx.launch -n 2"
    for d in (int(x) for x in a.dims.split(",")):
        for tokens, steps in ((1, a.steps), (a.prefill, max(10, a.steps // 20))):
            round_trips(link, d, tokens, a.layers, 10)  # warm up
            t = round_trips(link, d, tokens, a.layers, steps)
            if link.rank == 0:
                ms = sorted(t)
                print(f"d={d} tokens={tokens}: hidden state {tokens * d * 2} B, round trip "
                      f"median {1e3 * statistics.median(ms):.3f} ms, p90 "
                      f"{1e3 * ms[int(0.9 * len(ms))]:.3f} ms ({steps} steps)", flush=True)


if __name__ == "__main__":
    main()
