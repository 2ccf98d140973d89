"""Planted routing for synthetic MoE models (tools/synthetic_moe.py): `PlantedRouter`.

A synthetic model's random router would pick experts with no temporal locality at all, which no
trained MoE has; the benchmark's cache figures would mean nothing. So each layer's router is
replaced by a seeded process with the reuse and popularity skew of a trained one:

- per token, each of the previous token's experts is kept with probability `reuse`, the others
  drawn from a Zipf-like popularity (weight 1 / rank^`popularity`, ranks shuffled per layer);
- `guess` (the lookahead's call) names the next token's experts, each right with probability
  `guess_accuracy`, from a random stream of its own, so every strategy sees the same routing.

Defaults (`routing_spec`): fitted so that an LRU pool of 42%, 63% and 84% of a layer's experts
misses 9.2%, 4.7% and 1.7% of lookups (simulated, 128 experts, top 8), against the 8.3%, 5.2%
and 3.6% streamlx reports for Qwen3.6-35B-A3B at 8, 12 and 16 GiB pools of its ~19 GiB of 4-bit
experts; its next-layer route prediction is "~70% accurate" (README of srcterm/streamlx, 2026).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import FlashError

ROUTING_FILE = "synthetic_routing.json"
ROUTING_VERSION = 1
CHOSEN, OTHER = 4.0, -4.0  # planted logits: the top-k are exactly the chosen experts


def routing_spec(popularity: float = 1.2, reuse: float = 0.6, guess_accuracy: float = 0.7,
                 seed: int = 0) -> dict:
    """The parameters of `PlantedRouter` (see the module docstring for where they come from)."""
    return {"kind": "mlx-flash synthetic routing", "version": ROUTING_VERSION, "seed": seed,
            "popularity": popularity, "reuse": reuse, "guess_accuracy": guess_accuracy,
            "source": "fitted to streamlx's Qwen3.6-35B-A3B miss rates at 8/12/16 GiB pools "
                      "and its ~70% next-layer route prediction (srcterm/streamlx README)"}


class PlantedRouter:
    """One layer's planted routing, called as the router (x (..., d) -> logits (..., experts));
    x is ignored. Each row of x advances the process by one token."""

    def __init__(self, experts: int, top_k: int, layer: int, spec: dict):
        seed = int(spec["seed"])
        self.rng = np.random.default_rng([seed, layer])
        self._guess_rng = np.random.default_rng([seed, layer, 1])
        self.experts, self.top_k = experts, top_k
        self.reuse, self.accuracy = float(spec["reuse"]), float(spec["guess_accuracy"])
        weights = 1.0 / np.arange(1, experts + 1) ** float(spec["popularity"])
        self.popularity = weights[self.rng.permutation(experts)] / weights.sum()
        self._next = self.rng.choice(experts, top_k, replace=False, p=self.popularity)

    def _draw(self, current: np.ndarray) -> np.ndarray:
        keep = current[self.rng.random(self.top_k) < self.reuse]
        p = self.popularity.copy()
        p[keep] = 0
        new = self.rng.choice(self.experts, self.top_k - len(keep), replace=False, p=p / p.sum())
        return np.concatenate([keep, new])

    def _logits(self, sets: list[np.ndarray], shape: tuple[int, ...]):
        import mlx.core as mx

        out = np.full((len(sets), self.experts), OTHER, dtype=np.float32)
        for row, chosen in enumerate(sets):
            out[row, chosen] = CHOSEN
        return mx.array(out).reshape(*shape, self.experts)

    def __call__(self, x):
        sets = []
        for _ in range(int(np.prod(x.shape[:-1]))):
            sets.append(self._next)
            self._next = self._draw(self._next)
        return self._logits(sets, x.shape[:-1])

    def guess(self, x):
        """The next call's experts as the lookahead would guess them (x: one row)."""
        guess = self._next.copy()
        wrong = self._guess_rng.random(self.top_k) >= self.accuracy
        others = np.setdiff1d(np.arange(self.experts), guess)
        guess[wrong] = self._guess_rng.choice(others, int(wrong.sum()), replace=False)
        return self._logits([guess], x.shape[:-1])


def load_routing(path: str | Path, experts: int | None, top_k: int, num_layers: int
                 ) -> list | None:
    """The PlantedRouters of a synthetic MoE dir, None when it has no routing spec."""
    file = Path(path) / ROUTING_FILE
    if not file.is_file() or not experts:
        return None
    spec = json.loads(file.read_text())
    if spec.get("version") != ROUTING_VERSION:
        raise FlashError(f"{file}: version {spec.get('version')} is not {ROUTING_VERSION}; "
                         "re-run tools/synthetic_moe.py")
    return [PlantedRouter(experts, top_k, i, spec) for i in range(num_layers)]
