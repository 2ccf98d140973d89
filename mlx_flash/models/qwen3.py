"""Qwen3 in MLX: mlx-lm's qwen3 (q/k RMSNorm per head, `head_dim` from the config, rope and
its scaling from `rope_parameters`) with our gated MLP."""

from __future__ import annotations

from dataclasses import dataclass

from mlx_lm.models import qwen3

from . import _gated


@dataclass
class ModelArgs(qwen3.ModelArgs):
    hidden_act: str = "silu"
    use_sliding_window: bool = False

    def __post_init__(self):
        super().__post_init__()
        # transformers slides from max_window_layers on when use_sliding_window; mlx-lm never
        _gated.check_args(self, "Qwen3", unsupported=("use_sliding_window",))


class Model(qwen3.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        _gated.use_mlp(self, args, args.hidden_act)


FLASH = _gated.spec()
