"""Llama in MLX: mlx-lm's llama with the activation taken from `hidden_act`.

mlx-lm's model is SiLU-only; relufied Llamas (the sparse ones this project streams) gate with ReLU.
Attention, rope scaling (Llama 3's included), GQA and the KV cache are mlx-lm's own; only the MLP
is ours, so the flash runtime can replace it.
"""

from __future__ import annotations

from mlx_lm.models import llama

from . import _gated

ModelArgs = _gated.model_args(llama.ModelArgs, "Llama")


class Model(llama.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        _gated.use_mlp(self, args, args.hidden_act, args.mlp_bias)


FLASH = _gated.spec()
