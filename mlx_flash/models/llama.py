"""Llama in MLX: mlx-lm's llama with the activation taken from `hidden_act`.

mlx-lm's model is SiLU-only; relufied Llamas (the sparse ones this project streams) gate with ReLU.
Attention, rope scaling, GQA and the KV cache are mlx-lm's own; only the MLP is ours, so the flash
runtime can replace it.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama

ACTIVATIONS = {"silu": nn.silu, "relu": nn.relu, "gelu": nn.gelu}


@dataclass
class ModelArgs(llama.ModelArgs):
    hidden_act: str = "silu"
    # transformers >= 5 keeps rope_theta and rope scaling together under `rope_parameters`
    rope_parameters: dict | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"unsupported Llama hidden_act {self.hidden_act!r}; "
                f"supported: {', '.join(ACTIVATIONS)}"
            )
        if self.rope_parameters:
            params = dict(self.rope_parameters)
            self.rope_theta = params.pop("rope_theta", self.rope_theta)
            if params.get("rope_type", params.get("type", "default")) != "default":
                self.rope_scaling = params


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)): the part the flash runtime replaces."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hidden, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act = ACTIVATIONS[args.hidden_act]

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Model(llama.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        for layer in self.model.layers:
            layer.mlp = MLP(args)
