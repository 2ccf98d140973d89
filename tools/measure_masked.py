"""Perplexity of a calibrated gated flash dir whose dense FFNs keep only the predictors' sets.

What predicted mode computes when the cache holds few rows (the predicted set of each token, no
window): run on the dense model in whole windows, so it takes seconds where predicted mode takes
minutes. Issue 30 used it to tell the predictors' misses from a decode-path fault (24.78 here
against 24.89 from `mlx-flash perplexity --mode predicted --memory 50%model`).

    python tools/measure_masked.py DIR TEXT [TEXT ...] [--max-tokens 512] [--seq-len 256]
"""

from __future__ import annotations

import argparse

import mlx.core as mx

from mlx_flash.loader import load_model, load_tokenizer
from mlx_flash.perplexity import perplexity
from mlx_flash.predictor import load_predictors


class Masked:
    """A gated MLP whose hidden units outside the predictor's set are zeroed."""

    def __init__(self, mlp, predictor):
        self.mlp, self.predictor = mlp, predictor
        self.kept = self.total = 0

    def __call__(self, x):
        m = self.mlp
        h = m.act(m.gate_proj(x)) * m.up_proj(x)
        mask = self.predictor(x)
        self.kept += mx.sum(mask).item()
        self.total += mask.size
        return m.down_proj(h * mask.astype(h.dtype))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("texts", nargs="+")
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=256)
    a = ap.parse_args()
    model, tok = load_model(a.dir), load_tokenizer(a.dir)
    predictors = load_predictors(a.dir, mx.float16)
    for text in a.texts:
        kw = dict(seq_len=a.seq_len, max_tokens=a.max_tokens, progress=False)
        dense = perplexity(model, tok, text, **kw)["perplexity"]
        originals = [layer.mlp for layer in model.layers]
        masks = [Masked(mlp, p) for mlp, p in zip(originals, predictors, strict=True)]
        for layer, masked in zip(model.layers, masks):
            layer.mlp = masked
        got = perplexity(model, tok, text, **kw)["perplexity"]
        for layer, mlp in zip(model.layers, originals):
            layer.mlp = mlp
        kept = sum(m.kept for m in masks) / sum(m.total for m in masks)
        print(f"{text}: dense {dense:.3f}, predicted sets only {got:.3f} ({got / dense:.4f}x), "
              f"{kept:.1%} of the neurons kept")


if __name__ == "__main__":
    main()
