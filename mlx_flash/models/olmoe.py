"""OLMoE (OLMoE-1B-7B) in MLX: mlx-lm's olmoe (softmax router, top-k, renormalised when
`norm_topk_prob`; q/k RMSNorm over all heads), every layer an MoE layer.

The flash runtime streams the routed experts and replaces only `mlp.switch_mlp` (`_moe.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from mlx_lm.models import olmoe

from . import _gated, _moe


@dataclass
class ModelArgs(olmoe.ModelArgs):
    hidden_act: str = "silu"
    rope_parameters: dict | None = None
    clip_qkv: float | None = None

    def __post_init__(self):
        _gated.check_args(self, "OLMoE", unsupported=("clip_qkv",))
        _gated.unpack_rope(self)
        super().__post_init__()


class Model(olmoe.Model):
    def sanitize(self, weights):
        return _moe.unflatten(super().sanitize(weights), self.args, FLASH)


FLASH = _moe.spec("mlp", "intermediate_size", ("num_experts",))
