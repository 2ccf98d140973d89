"""Llama in MLX: mlx-lm's llama with the activation taken from `hidden_act`.

mlx-lm's model is SiLU-only; relufied Llamas (the sparse ones this project streams) gate with ReLU.
Attention, rope scaling, GQA and the KV cache are mlx-lm's own; only the MLP is ours, so the flash
runtime can replace it.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import llama

from .. import activations
from .base import FlashSpec, GGUFSpec, RecordPart


@dataclass
class ModelArgs(llama.ModelArgs):
    hidden_act: str = "silu"
    # transformers >= 5 keeps rope_theta and rope scaling together under `rope_parameters`
    rope_parameters: dict | None = None

    def __post_init__(self):
        super().__post_init__()
        try:
            activations.canonical(self.hidden_act)
        except ValueError as e:
            raise ValueError(f"Llama hidden_act: {e}") from None
        if self.rope_parameters:
            params = dict(self.rope_parameters)
            self.rope_theta = params.pop("rope_theta", self.rope_theta)
            if params.get("rope_type", params.get("type", "default")) != "default":
                self.rope_scaling = params


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)): the part the flash runtime replaces."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hidden, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act = activations.mlx_fn(args.hidden_act)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Model(llama.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        for layer in self.model.layers:
            layer.mlp = MLP(args)


FLASH = FlashSpec(
    dims=("hidden_size", "intermediate_size", "num_hidden_layers"),
    parts=(RecordPart("gate_proj", "model.layers.{layer}.mlp.gate_proj", "row"),
           RecordPart("up_proj", "model.layers.{layer}.mlp.up_proj", "row"),
           RecordPart("down_proj", "model.layers.{layer}.mlp.down_proj", "column")),
    hidden=lambda rows, act: act(rows["gate_proj"]) * rows["up_proj"],
    activation=lambda config: config.get("hidden_act", "silu"),
)

# llama.cpp's names (its convert_hf_to_gguf.py tensor map) for the HF Llama modules
_LAYER = "model.layers.{layer}"
GGUF = GGUFSpec(
    tensors={
        "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
        "blk.{layer}.attn_norm": f"{_LAYER}.input_layernorm",
        "blk.{layer}.attn_q": f"{_LAYER}.self_attn.q_proj",
        "blk.{layer}.attn_k": f"{_LAYER}.self_attn.k_proj",
        "blk.{layer}.attn_v": f"{_LAYER}.self_attn.v_proj",
        "blk.{layer}.attn_output": f"{_LAYER}.self_attn.o_proj",
        "blk.{layer}.ffn_norm": f"{_LAYER}.post_attention_layernorm",
        "blk.{layer}.ffn_gate": f"{_LAYER}.mlp.gate_proj",
        "blk.{layer}.ffn_up": f"{_LAYER}.mlp.up_proj",
        "blk.{layer}.ffn_down": f"{_LAYER}.mlp.down_proj",
    },
    config={
        "context_length": "max_position_embeddings", "embedding_length": "hidden_size",
        "block_count": "num_hidden_layers", "feed_forward_length": "intermediate_size",
        "attention.head_count": "num_attention_heads",
        "attention.head_count_kv": "num_key_value_heads",
        "attention.key_length": "head_dim", "rope.freq_base": "rope_theta",
        "attention.layer_norm_rms_epsilon": "rms_norm_eps", "vocab_size": "vocab_size",
    },
    defaults={"architectures": ["LlamaForCausalLM"], "hidden_act": "silu"},
    # llama.cpp stores Llama's q/k rows with each rope pair adjacent; mlx-lm's rope wants halves
    rope_permuted={f"{_LAYER}.self_attn.q_proj": "num_attention_heads",
                   f"{_LAYER}.self_attn.k_proj": "num_key_value_heads"},
)
