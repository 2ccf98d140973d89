"""Mixtral (8x7B, 8x22B) in MLX: mlx-lm's mixtral (top-k of the router's logits, softmax over
those k, experts in a `SwitchGLU`); HF checkpoints name an expert's gate, down, up w1, w2, w3.

The flash runtime streams the routed experts and replaces only `block_sparse_moe.switch_mlp`
(`_moe.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from mlx_lm.models import mixtral

from . import _gated, _moe


@dataclass
class ModelArgs(mixtral.ModelArgs):
    hidden_act: str = "silu"
    rope_parameters: dict | None = None
    sliding_window: int | None = None

    def __post_init__(self):
        _gated.check_args(self, "Mixtral", unsupported=("sliding_window",))
        _gated.unpack_rope(self)
        super().__post_init__()


class Model(mixtral.Model):
    def sanitize(self, weights):
        return _moe.unflatten(super().sanitize(weights), self.args, FLASH)


FLASH = _moe.spec("block_sparse_moe", "intermediate_size", ("num_local_experts",),
                  expert_names=("w1", "w3", "w2"))
