"""Fresh-load fractions of the oracle runtime on the real fixtures (reproduces DESIGN.md's table).

Teacher-forced decode over fixture-val text, token by token through the flash runtime in oracle
mode, for windows 1, 4 and 8; figures come from the reader's own counters.

    python tools/measure_windows.py ../shared/fixtures ../shared/corpus/fixture-val.txt [TOKENS]
"""

import sys
import tempfile
from pathlib import Path

import mlx.core as mx

from mlx_flash import runtime
from mlx_flash.convert import convert


def measure(flash: Path, text: str, tokens: int) -> dict:
    out = {}
    for window in (1, 4, 8):
        model, tok = runtime.load(flash, memory="1GB", mode="oracle", window=window)
        m = model.flash.runtime.manifest
        ids = tok.encode(text)[: tokens + 1]
        cache = model.make_cache()
        model(mx.array([ids[:1]]), cache=cache)
        for t in ids[1:]:
            mx.eval(model(mx.array([[t]]), cache=cache))
        s = model.flash.runtime.stats.per_token()
        neurons = m.num_layers * m.ffn_dim
        held = sum(layer.mlp.cache.num_used for layer in model.layers) / neurons
        out[window] = (s["flash_bytes_per_token"] / m.record_bytes / neurons, held,
                       s["read_requests_per_token"], s["flash_bytes_per_token"])
    return out


def main():
    fixtures, val = Path(sys.argv[1]), Path(sys.argv[2])
    tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 256
    text = val.read_text()[:20000]
    print("| model | k | fresh per token | held at end | reads/token | bytes/token |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("opt-fixture", "llama-relu-fixture"):
            flash = convert(str(fixtures / name), out=str(Path(tmp) / name), dtype="float16",
                            align=4096, progress=False)
            for k, (fresh, held, reqs, nbytes) in measure(flash, text, tokens).items():
                print(f"| {name} | {k} | {fresh:.1%} | {held:.1%} | {reqs:.0f} | {nbytes} |")


if __name__ == "__main__":
    main()
