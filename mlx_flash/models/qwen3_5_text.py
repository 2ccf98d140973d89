"""Qwen3.5 (text) in MLX: mlx-lm's qwen3_5 text model with our gated MLP.

Three layers in four are Gated-DeltaNet linear attention: a causal convolution and a recurrent
(heads, dk, dv) float32 state in place of a KV cache; the others are gated full attention (partial
rope, q/k norms). mlx-lm's model brings both, the cache of each layer (`make_cache`: ArraysCache
or KVCache) and `sanitize`: conv1d weights to MLX's layout, +1 on the (1 + weight) RMSNorms of an
HF checkpoint, the multi-token-prediction head (`mtp.*`) dropped. transformers writes the layers'
kinds as `layer_types`, mlx-lm reads `full_attention_interval`: `__post_init__` maps them.
Dense only: a Qwen3.5 MoE streams from an mlx-lm dir (direct.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mlx_lm.models import qwen3_5

from ..errors import FlashError
from . import _gated

UNUSED = ("mtp.",)  # the multi-token-prediction head: convert leaves it out


def dense_only(config: dict) -> None:
    """FlashError for a Qwen3.5 config with routed experts."""
    if (config.get("num_experts") or 0) > 0:
        raise FlashError(f"a Qwen3.5 MoE ({config['num_experts']} experts) streams its experts "
                         "from an mlx-lm dir: convert it with `mlx_lm convert` and load that dir")


@dataclass
class ModelArgs(qwen3_5.TextModelArgs):
    hidden_act: str = "silu"
    layer_types: list[str] | None = None

    def __post_init__(self):
        dense_only(vars(self))
        if self.rope_parameters:  # mlx-lm renames its keys in place: not config.json's dict
            self.rope_parameters = dict(self.rope_parameters)
        super().__post_init__()
        _gated.check_args(self, "Qwen3.5")
        if self.layer_types:  # mlx-lm's layout: every n-th layer full attention
            n = (self.layer_types.index("full_attention") + 1
                 if "full_attention" in self.layer_types else 0)
            every_nth = ["full_attention" if n and (i + 1) % n == 0 else "linear_attention"
                         for i in range(self.num_hidden_layers)]
            if not n or self.layer_types != every_nth:
                raise ValueError(f"Qwen3.5 layer_types {self.layer_types}: only every n-th "
                                 "layer full attention is supported")
            self.full_attention_interval = n


class Model(qwen3_5.TextModel):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        _gated.use_mlp(self, args, args.hidden_act)

    @property
    def layers(self):
        # the list itself, not mlx-lm's copy (`pipeline_layers`): calibrate puts modules in it
        return self.model.layers


FLASH = dataclasses.replace(_gated.spec(), unused=UNUSED, check=dense_only)
