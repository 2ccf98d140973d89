"""Synthetic predictors: planted activity for synthetic models (tools/synthetic_flash.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import FlashError

SYNTHETIC_FILE = "synthetic_predictors.json"
SYNTHETIC_VERSION = 1
# The dense lookahead's guess of a layer's next set (its predictor applied to the previous
# layer's input), as measured on SmolLM2-135M-Instruct at 65%model (tools/measure_lookahead.py):
# 98.4% of the records the layer then loaded had been guessed, 94.7% of the guessed were used.
GUESS_RECALL, GUESS_PRECISION = 0.984, 0.947


def synthetic_spec(active: float = 0.033, false_positive_rate: float = 0.07, held: float = 0.25,
                   window: int = 4, drift: float = 0.01, seed: int = 0) -> dict:
    """Parameters of SyntheticPredictor for the paper's OPT-6.7B statistics.

    Per token `active` of the neurons are truly active and `false_positive_rate` of the others
    are predicted too, so p = active + fpr (1 - active) are predicted. A pool of q of the
    neurons flickers: each pool neuron is predicted on a token with probability r, so p = q r and
    a window of k tokens holds q (1 - (1 - r)^k) = `held`; fresh loads are then about
    p (1 - r)^k per token. `drift`: fraction of the pool swapped for other neurons per token.
    """
    p = active + false_positive_rate * (1 - active)
    target = held / p  # (1 - (1 - r)^k) / r, falling from k (r -> 0) to 1 (r = 1)
    if not 1 < target < window:
        raise ValueError(f"held={held} is unreachable with {p:.3f} predicted and window {window}")
    lo, hi = 1e-9, 1.0
    for _ in range(100):
        r = (lo + hi) / 2
        lo, hi = (r, hi) if (1 - (1 - r) ** window) / r > target else (lo, r)
    return {
        "kind": "mlx-flash synthetic predictors", "version": SYNTHETIC_VERSION, "seed": seed,
        "active": active, "false_positive_rate": false_positive_rate, "window": window,
        "held": held, "predicted_fraction": p, "pool_fraction": p / r, "flicker": r,
        "drift": drift, "expected_fresh_fraction": p * (1 - r) ** window,
    }


class SyntheticPredictor:
    """One layer's planted active sets (see `synthetic_spec`); x is ignored.

    Each call advances a seeded process by one step per row of x and returns the predicted
    (n, ffn) bool mask, so every strategy that makes the same calls sees the same sets.
    """

    nbytes = 0  # nothing in memory but the pool's ids

    def __init__(self, ffn_dim: int, layer: int, spec: dict):
        self.rng = np.random.default_rng([int(spec["seed"]), layer])
        self.guess_rng = np.random.default_rng([int(spec["seed"]), layer, 1])
        self.order = self.rng.permutation(ffn_dim)  # the first n_pool ids are the pool
        self.n_pool = max(1, round(spec["pool_fraction"] * ffn_dim))
        self.flicker, self.drift = float(spec["flicker"]), float(spec["drift"])
        self.steps = self.predicted = 0

    def step(self) -> np.ndarray:
        n, pool = self.n_pool, self.order
        swaps = min(self.rng.binomial(n, self.drift), len(pool) - n)
        if swaps:
            a = self.rng.choice(n, swaps, replace=False)
            b = n + self.rng.choice(len(pool) - n, swaps, replace=False)
            pool[a], pool[b] = pool[b], pool[a]
        mask = np.zeros(len(pool), dtype=bool)
        mask[pool[:n][self.rng.random(n) < self.flicker]] = True
        self.steps += 1
        self.predicted += int(mask.sum())
        return mask

    def __call__(self, x):
        import mlx.core as mx

        return mx.array(np.stack([self.step() for _ in range(x.shape[0])]))

    def guess(self, x):
        """The next call's (1, ffn) mask as the lookahead would guess it (GUESS_RECALL of its
        neurons, GUESS_PRECISION of the guess right), without advancing the sequence."""
        import mlx.core as mx

        saved = (self.rng.bit_generator.state, self.order.copy(), self.steps, self.predicted)
        nxt = self.step()
        self.rng.bit_generator.state, self.order, self.steps, self.predicted = saved
        true = np.flatnonzero(nxt)
        kept = true[self.guess_rng.random(len(true)) < GUESS_RECALL]
        others = np.flatnonzero(~nxt)
        wrong = min(len(others), round(len(kept) * (1 / GUESS_PRECISION - 1)))
        mask = np.zeros_like(nxt)
        mask[kept] = True
        mask[self.guess_rng.choice(others, wrong, replace=False)] = True
        return mx.array(mask[None])


def gated_spec(seed: int = 0) -> dict:
    """`synthetic_spec` with a gated MLP's statistics, as measured on SmolLM2-135M-Instruct
    (BENCHMARKS.md, calibrate at sparsity 0.5): half the neurons active, 87.5% predicted, and
    the predicted sets so alike from token to token that a window of 4 holds 99% of the FFN."""
    active = 0.503
    return synthetic_spec(active=active, false_positive_rate=(0.875 - active) / (1 - active),
                          held=0.99, window=4, drift=0.001, seed=seed)


def load_synthetic(path: str | Path, ffn_dim: int, num_layers: int) -> list | None:
    """The SyntheticPredictors of a synthetic model dir, None when it has no spec."""
    file = Path(path) / SYNTHETIC_FILE
    if not file.is_file():
        return None
    spec = json.loads(file.read_text())
    if spec.get("version") != SYNTHETIC_VERSION:
        raise FlashError(f"{file}: version {spec.get('version')} is not {SYNTHETIC_VERSION}; "
                         "re-run tools/synthetic_flash.py")
    return [SyntheticPredictor(ffn_dim, i, spec) for i in range(num_layers)]


def planted_stats(spec: dict, ffn_dim: int, steps: int = 200, window: int = 4, layer: int = 0):
    """Measured (predicted, fresh, held) fractions of one layer's planted sets over `steps`."""
    pred = SyntheticPredictor(ffn_dim, layer, spec)
    masks = np.stack([pred.step() for _ in range(steps)])  # (steps, ffn)
    held = np.stack([masks[t - window + 1 : t + 1].any(0) for t in range(window, steps)])
    before = np.stack([masks[t - window : t].any(0) for t in range(window, steps)])
    fresh = masks[window:] & ~before
    return float(masks.mean()), float(fresh.mean()), float(held.mean())
