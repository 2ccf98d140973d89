"""FFN activations by the name a model file declares, in MLX (runtime) and numpy (calibration)."""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

MLX = {"relu": nn.relu, "silu": nn.silu, "gelu": nn.gelu, "gelu_tanh": nn.gelu_approx}
# HF config spellings of the same functions
ALIASES = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "swish": "silu"}
# FATReLU (ProSparse, MiniCPM-S: arXiv 2402.13516): x where x > t, else 0; named in a config as
# "fatrelu" with `hidden_act_param` t (vLLM's MiniCPM reading) or as "fatrelu_<t>" (the ProSparse
# authors' code); ours is always "fatrelu_<t>"
FATRELU = "fatrelu"


def with_param(name: str, param: float | None) -> str:
    """The activation a config names: "fatrelu" takes its threshold from `hidden_act_param`."""
    if name == FATRELU:
        return f"{FATRELU}_{float(param or 0.0)!r}"
    return name


def canonical(name: str) -> str:
    """Our name for an HF activation name; ValueError for one we do not implement."""
    name = ALIASES.get(name, name)
    if name.startswith(FATRELU):
        return f"{FATRELU}_{_threshold(name)!r}"
    if name not in MLX:
        raise ValueError(f"unsupported activation {name!r}; supported: "
                         f"{', '.join(MLX)}, {FATRELU}_<threshold>")
    return name


def _threshold(name: str) -> float:
    """The t of "fatrelu" (0) or "fatrelu_<t>"; ValueError for anything else."""
    rest = name[len(FATRELU):]
    if not rest:
        return 0.0
    try:
        t = float(rest[1:]) if rest.startswith("_") else None
    except ValueError:
        t = None
    if t is None or not math.isfinite(t):
        raise ValueError(f"unsupported activation {name!r}: FATReLU is written "
                         f"{FATRELU}_<threshold>, e.g. {FATRELU}_0.01")
    return t


def mlx_fn(name: str) -> Callable[[mx.array], mx.array]:
    name = canonical(name)
    if name.startswith(FATRELU):
        t = _threshold(name)
        # compared in float32: t rounded to bfloat16 (0.01 -> 0.0100098) would move the cut
        return lambda x: mx.where(x.astype(mx.float32) > t, x, mx.zeros_like(x))
    return MLX[name]


def numpy_fn(name: str) -> Callable[[np.ndarray], np.ndarray]:
    """The activation on float32 numpy arrays: ReLU in place, the others through MLX (elementwise
    ops are fast on every MLX backend; only its CPU matmuls are slow)."""
    name = canonical(name)
    if name == "relu":
        return lambda z: np.maximum(z, 0, out=z)
    if name.startswith(FATRELU):
        t = _threshold(name)

        def fatrelu(z):
            z[z <= t] = 0
            return z
        return fatrelu
    fn = MLX[name]
    return lambda z: np.array(fn(mx.array(z)))


def oracle_cut(name: str) -> float:
    """Where the exact oracle cuts an exactly sparse activation's input z (a neuron is read where
    z > the cut): 0 for ReLU (rounding never flips z's sign far from 0, and a flip near it changes
    a value of ~0), FATReLU's t less 1% of it (the oracle's z and the compute's differ by a few
    rounding steps, and a neuron just past t is worth t * up: read it; the compute cuts at t)."""
    name = canonical(name)
    if name.startswith(FATRELU):
        t = _threshold(name)
        return t - 0.01 * abs(t)
    return 0.0


def is_exact_sparse(name: str) -> bool:
    """Whether inactive neurons are exact zeros (ReLU, FATReLU): the oracle's active set is
    exact."""
    name = canonical(name)
    return name == "relu" or name.startswith(FATRELU)
