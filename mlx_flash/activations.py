"""FFN activations by the name a model file declares, in MLX (runtime) and numpy (calibration)."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

MLX = {"relu": nn.relu, "silu": nn.silu, "gelu": nn.gelu, "gelu_tanh": nn.gelu_approx}
# HF config spellings of the same functions
ALIASES = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "swish": "silu"}


def canonical(name: str) -> str:
    """Our name for an HF activation name; ValueError for one we do not implement."""
    name = ALIASES.get(name, name)
    if name not in MLX:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(MLX)}")
    return name


def mlx_fn(name: str) -> Callable[[mx.array], mx.array]:
    return MLX[canonical(name)]


def numpy_fn(name: str) -> Callable[[np.ndarray], np.ndarray]:
    """The activation on float32 numpy arrays: ReLU in place, the others through MLX (elementwise
    ops are fast on every MLX backend; only its CPU matmuls are slow)."""
    name = canonical(name)
    if name == "relu":
        return lambda z: np.maximum(z, 0, out=z)
    fn = MLX[name]
    return lambda z: np.array(fn(mx.array(z)))


def is_exact_sparse(name: str) -> bool:
    """Whether inactive neurons are exact zeros (ReLU): the oracle's active set is exact."""
    return canonical(name) == "relu"
