"""Gemma 3 (text) in MLX: mlx-lm's gemma3_text with our gated MLP (GELU-tanh, `hidden_activation`).

mlx-lm's model brings what Gemma adds: embeddings scaled by sqrt(hidden_size), (1 + weight)
RMSNorms around attention and MLP, q/k norms, `query_pre_attn_scalar`, and sliding-window layers
(their own rope base, RotatingKVCaches) between the global ones. transformers >= 5 writes
`layer_types` and one `rope_parameters` per layer type where mlx-lm reads `sliding_window_pattern`,
`rope_theta`, `rope_local_base_freq` and `rope_scaling`: `__post_init__` maps them back.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlx_lm.models import gemma3_text

from . import _gated


@dataclass
class ModelArgs(gemma3_text.ModelArgs):
    hidden_activation: str = "gelu_pytorch_tanh"
    tie_word_embeddings: bool = True
    layer_types: list[str] | None = None
    rope_parameters: dict | None = None
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None

    def __post_init__(self):
        # mlx-lm's gemma3_text has no soft-capping (Gemma 2 had it; Gemma 3 models set none)
        _gated.check_args(self, "Gemma3", "hidden_activation",
                          ("final_logit_softcapping", "attn_logit_softcapping"))
        if self.rope_parameters:
            _gated.unpack_rope(self, self.rope_parameters.get("full_attention") or {})
            local = dict(self.rope_parameters.get("sliding_attention") or {})
            self.rope_local_base_freq = local.pop("rope_theta", self.rope_local_base_freq)
            if local.get("rope_type", "default") != "default":
                raise ValueError("Gemma3 rope_parameters.sliding_attention: only the default "
                                 "rope is supported")
        if self.layer_types:
            # mlx-lm's layout: every n-th layer global, the others sliding
            n = self.layer_types.index("full_attention") + 1 if "full_attention" in \
                self.layer_types else 0
            every_nth = ["full_attention" if (i + 1) % n == 0 else "sliding_attention"
                         for i in range(len(self.layer_types))] if n else None
            if self.layer_types != every_nth:
                raise ValueError(f"Gemma3 layer_types {self.layer_types}: only every n-th layer "
                                 "global is supported")
            self.sliding_window_pattern = n


class Model(gemma3_text.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        _gated.use_mlp(self, args, args.hidden_activation)
        self.tie_word_embeddings = args.tie_word_embeddings
        if args.tie_word_embeddings:
            self.pop("lm_head")

    def sanitize(self, weights):
        """The head follows config.json's `tie_word_embeddings`, as in transformers (mlx-lm's
        infers it from the weights by changing the model, which is not idempotent)."""
        if self.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights


FLASH = _gated.spec("hidden_activation", "gelu_pytorch_tanh")
