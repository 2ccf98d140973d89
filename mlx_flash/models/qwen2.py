"""Qwen2 (and Qwen2.5) in MLX: mlx-lm's qwen2 (q/k/v biases, GQA, its `sanitize`) with our gated
MLP and the rope taken from `rope_parameters`."""

from __future__ import annotations

from dataclasses import dataclass

from mlx_lm.models import qwen2

from . import _gated


@dataclass
class ModelArgs(qwen2.ModelArgs):
    hidden_act: str = "silu"
    rope_parameters: dict | None = None
    use_sliding_window: bool = False

    def __post_init__(self):
        # transformers slides from max_window_layers on when use_sliding_window; mlx-lm never
        _gated.check_args(self, "Qwen2", unsupported=("use_sliding_window",))
        _gated.unpack_rope(self)


class Model(qwen2.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        _gated.use_mlp(self, args, args.hidden_act)

    @property
    def layers(self):
        # mlx-lm's is a fresh slice (its pipeline's share); calibration edits the list in place
        return self.model.layers


FLASH = _gated.spec()
