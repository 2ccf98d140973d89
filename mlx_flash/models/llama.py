"""Llama in MLX: mlx-lm's llama with the activation taken from `hidden_act`.

mlx-lm's model is SiLU-only; relufied Llamas (the sparse ones this project streams) gate with ReLU.
Attention, rope scaling (Llama 3's included), GQA and the KV cache are mlx-lm's own; only the MLP
is ours, so the flash runtime can replace it.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlx_lm.models import llama

from . import _gated


@dataclass
class ModelArgs(llama.ModelArgs):
    hidden_act: str = "silu"
    rope_parameters: dict | None = None

    def __post_init__(self):
        super().__post_init__()
        _gated.check_args(self, "Llama")
        _gated.unpack_rope(self)


class Model(llama.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        _gated.use_mlp(self, args, args.hidden_act, args.mlp_bias)


FLASH = _gated.spec()
