"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B) in MLX: mlx-lm's qwen3_moe (softmax router, top-k
renormalised when `norm_topk_prob`, experts in a `SwitchGLU`), every layer an MoE layer.

The flash runtime streams the routed experts and replaces only `mlp.switch_mlp` (`_moe.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from mlx_lm.models import qwen3_moe

from . import _gated, _moe


@dataclass
class ModelArgs(qwen3_moe.ModelArgs):
    hidden_act: str = "silu"
    rope_parameters: dict | None = None
    use_sliding_window: bool = False

    @classmethod
    def from_dict(cls, params):
        params = dict(params)  # transformers >= 5 writes the count as num_local_experts
        params.setdefault("num_experts", params.get("num_local_experts"))
        if not params.get("head_dim"):
            params["head_dim"] = params["hidden_size"] // params["num_attention_heads"]
        params.setdefault("rope_theta", 10000.0)  # transformers' default; rope_parameters wins
        return super().from_dict(params)

    def __post_init__(self):
        _gated.check_args(self, "Qwen3-MoE", unsupported=("use_sliding_window",))
        _gated.unpack_rope(self)
        _moe.check_sparse_everywhere(self, "Qwen3-MoE")


class Model(qwen3_moe.Model):
    def sanitize(self, weights):
        return _moe.unflatten(super().sanitize(weights), self.args, FLASH)


FLASH = _moe.spec("mlp", "moe_intermediate_size", ("num_experts", "num_local_experts"))
