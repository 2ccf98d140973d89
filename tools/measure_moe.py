"""Flash bytes per decode token of the tiny MoE checkpoints of tests/test_moe.py, as a fraction of
reading every expert: naive, the expert cache (4 of 8 experts), + lookahead, and a cache of one
token's experts (2 of 8). Needs transformers and torch (the test extra) and ../shared (the
fixture tokenizer).

    python tools/measure_moe.py [--tokens 32]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests package

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

from mlx_flash import format as fmt  # noqa: E402
from mlx_flash.convert import convert  # noqa: E402
from mlx_flash.runtime import load  # noqa: E402
from tests.test_moe import CASES, PROMPT, VOCAB, _checkpoint  # noqa: E402

RUNS = (("naive", None, False), ("oracle", 4, False), ("oracle", 4, True), ("oracle", 2, False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32)
    a = ap.parse_args()
    ids = np.random.default_rng(0).integers(4, VOCAB, PROMPT).tolist()
    print("| type | naive | cache 4 of 8 experts | + lookahead | cache 2 of 8 |")
    print("|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model_type, overrides) in CASES.items():
            hf = Path(tmp, name, "hf")
            _checkpoint(model_type, overrides, hf)
            flash = convert(str(hf), out=hf.parent / "flash", align=4096, progress=False)
            m = fmt.read_manifest(flash)
            every = m.num_layers * m.ffn_dim * m.payload_bytes
            cells = []
            for mode, slots, ahead in RUNS:
                model, _ = load(flash, memory="1GB", mode=mode, lookahead=ahead,
                                capacity=None if slots is None else slots * m.expert_ffn)
                cache = make_prompt_cache(model)
                token = int(mx.argmax(model(mx.array([ids]), cache=cache)[0, -1]))
                for _ in range(a.tokens):
                    token = int(mx.argmax(model(mx.array([[token]]), cache=cache)[0, -1]))
                s = model.flash.stats()
                cell = f"{s['flash_bytes_per_token'] / every:.3f}"
                if s["cache_hit_rate"] is not None and not ahead:
                    cell += f" (hits {s['cache_hit_rate']:.0%})"
                if s["lookahead_hit_rate"] is not None:
                    cell += f" (guesses {s['lookahead_hit_rate']:.0%} right)"
                cells.append(cell)
            print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
