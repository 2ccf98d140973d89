"""Phi-3 (and Phi-3.5, Phi-4-mini) in MLX: mlx-lm's phi3 (fused qkv_proj, partial rotary, longrope)
with our gated MLP and transformers' sliding window (every layer, when `sliding_window` is set).

Checkpoints fuse gate and up into one `mlp.gate_up_proj` (2*ffn, d); `sanitize` splits it, and the
flash records take each half as its own part (`RecordPart.fused`).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.models import phi3
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache, RotatingKVCache

from . import _gated


@dataclass
class ModelArgs(phi3.ModelArgs):
    hidden_act: str = "silu"
    rope_parameters: dict | None = None
    sliding_window: int | None = None

    def __post_init__(self):
        _gated.check_args(self, "Phi3")
        if self.rope_parameters:  # transformers >= 5; mlx-lm's phi3 reads the scaling's `type`
            params = dict(self.rope_parameters)
            self.partial_rotary_factor = params.pop("partial_rotary_factor",
                                                    self.partial_rotary_factor)
            _gated.unpack_rope(self, params)
            if self.rope_scaling:
                self.rope_scaling = {"type": self.rope_scaling.get("rope_type"), **self.rope_scaling}
        super().__post_init__()


class Phi3Model(phi3.Phi3Model):
    """mlx-lm's, with the attention mask windowed to `sliding_window` (None: causal)."""

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        h = self.embed_tokens(inputs)
        cache = cache or [None] * len(self.layers)
        mask = create_attention_mask(h, cache[0], window_size=self.args.sliding_window)
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        return self.norm(h)


class Model(phi3.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.model = Phi3Model(args)
        _gated.use_mlp(self, args, args.hidden_act)

    def sanitize(self, weights):
        """Split each `mlp.gate_up_proj` (2*ffn, d) into gate_proj, up_proj (gate first, as in
        transformers' `chunk(2)`); drop a tied head."""
        out = {}
        for k, v in weights.items():
            if k.endswith(".mlp.gate_up_proj.weight"):
                gate, up = mx.split(v, 2, axis=0)
                out[k.replace("gate_up_proj", "gate_proj")] = gate
                out[k.replace("gate_up_proj", "up_proj")] = up
            else:
                out[k] = v
        if self.args.tie_word_embeddings:
            out.pop("lm_head.weight", None)
        return out

    def make_cache(self):
        window = self.args.sliding_window
        return [KVCache() if window is None else RotatingKVCache(max_size=window)
                for _ in self.layers]


FLASH = _gated.spec(fused="gate_up_proj")
