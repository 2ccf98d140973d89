"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B) in MLX: mlx-lm's qwen2_moe (softmax router,
top-k, a shared expert gated by a sigmoid), every layer an MoE layer.

The flash runtime streams the routed experts and replaces only `mlp.switch_mlp` (`_moe.py`): the
shared expert, used by every token, stays resident with the attention.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlx_lm.models import qwen2_moe

from . import _gated, _moe


@dataclass
class ModelArgs(qwen2_moe.ModelArgs):
    hidden_act: str = "silu"
    rope_parameters: dict | None = None
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list | None = None
    use_sliding_window: bool = False

    def __post_init__(self):
        _gated.check_args(self, "Qwen2-MoE", unsupported=("use_sliding_window", "norm_topk_prob"))
        _gated.unpack_rope(self)
        _moe.check_sparse_everywhere(self, "Qwen2-MoE")
        super().__post_init__()


class Model(qwen2_moe.Model):
    def sanitize(self, weights):
        return _moe.unflatten(super().sanitize(weights), self.args, FLASH)


FLASH = _moe.spec("mlp", "moe_intermediate_size", ("num_experts",))
