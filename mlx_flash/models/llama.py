"""Llama in MLX: mlx-lm's llama with the activation taken from `hidden_act`.

mlx-lm's model is SiLU-only; relufied Llamas (the sparse ones this project streams) gate with ReLU.
Attention, rope scaling (Llama 3's included), GQA and the KV cache are mlx-lm's own; only the MLP
is ours, so the flash runtime can replace it.
"""

from __future__ import annotations

from mlx_lm.models import llama

from . import _gated
from .base import GGUFSpec

ModelArgs = _gated.model_args(llama.ModelArgs, "Llama")


class Model(llama.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        _gated.use_mlp(self, args, args.hidden_act, args.mlp_bias)


FLASH = _gated.spec()

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
