"""OLMo 2 in MLX: mlx-lm's olmo2 (q/k RMSNorm over all heads, norms after attention and MLP)
with our gated MLP and the rope taken from `rope_parameters`."""

from __future__ import annotations

from mlx_lm.models import olmo2

from . import _gated

ModelArgs = _gated.model_args(olmo2.ModelArgs, "OLMo2")


class Model(olmo2.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        _gated.use_mlp(self, args, args.hidden_act)

    def sanitize(self, weights):
        weights = super().sanitize(weights)
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights


FLASH = _gated.spec()
