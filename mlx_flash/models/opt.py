"""OPT (facebook/opt-*) in MLX, mlx-lm style.

Covers the real family: learned positions with an offset of 2, pre-LN (125m, 1.3b-66b) and post-LN
with `word_embed_proj_dim != hidden_size` and project_in/project_out (350m), ReLU, biases, tied head.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs, create_attention_mask, scaled_dot_product_attention
from mlx_lm.models.cache import KVCache

from .. import activations
from .base import FlashSpec, RecordPart

# OPT's learned positional embedding table starts at row 2 (fairseq's padding offset).
POSITION_OFFSET = 2


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    ffn_dim: int
    num_attention_heads: int
    vocab_size: int
    max_position_embeddings: int
    word_embed_proj_dim: int | None = None
    do_layer_norm_before: bool = True
    _remove_final_layer_norm: bool = False
    activation_function: str = "relu"
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    tie_word_embeddings: bool = True

    def __post_init__(self):
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size
        try:
            activations.canonical(self.activation_function)
        except ValueError as e:
            raise ValueError(f"OPT activation_function: {e}") from None

    @property
    def intermediate_size(self) -> int:
        return self.ffn_dim


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, bias = args.hidden_size, args.enable_bias
        self.n_heads = args.num_attention_heads
        self.scale = (dim // self.n_heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.out_proj = nn.Linear(dim, dim, bias=bias)

    def __call__(self, x: mx.array, mask=None, cache: Any = None) -> mx.array:
        B, L, _ = x.shape
        q, k, v = (
            p(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    """fc2(act(fc1(x))): the part the flash runtime replaces."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.fc1 = nn.Linear(args.hidden_size, args.ffn_dim, bias=args.enable_bias)
        self.fc2 = nn.Linear(args.ffn_dim, args.hidden_size, bias=args.enable_bias)
        self.act = activations.mlx_fn(args.activation_function)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.act(self.fc1(x)))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        norm = dict(affine=args.layer_norm_elementwise_affine, eps=1e-5)
        self.pre_norm = args.do_layer_norm_before
        self.self_attn = Attention(args)
        self.self_attn_layer_norm = nn.LayerNorm(args.hidden_size, **norm)
        self.mlp = MLP(args)
        self.final_layer_norm = nn.LayerNorm(args.hidden_size, **norm)

    def __call__(self, x: mx.array, mask=None, cache: Any = None) -> mx.array:
        if self.pre_norm:
            h = x + self.self_attn(self.self_attn_layer_norm(x), mask, cache)
            return h + self.mlp(self.final_layer_norm(h))
        h = self.self_attn_layer_norm(x + self.self_attn(x, mask, cache))
        return self.final_layer_norm(h + self.mlp(h))


class Decoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        proj = args.word_embed_proj_dim != args.hidden_size
        self.embed_tokens = nn.Embedding(args.vocab_size, args.word_embed_proj_dim)
        self.embed_positions = nn.Embedding(
            args.max_position_embeddings + POSITION_OFFSET, args.hidden_size
        )
        if proj:
            self.project_in = nn.Linear(args.word_embed_proj_dim, args.hidden_size, bias=False)
            self.project_out = nn.Linear(args.hidden_size, args.word_embed_proj_dim, bias=False)
        if args.do_layer_norm_before and not args._remove_final_layer_norm:
            self.final_layer_norm = nn.LayerNorm(
                args.hidden_size, affine=args.layer_norm_elementwise_affine, eps=1e-5
            )
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        h = self.embed_tokens(inputs)
        if "project_in" in self:
            h = self.project_in(h)
        offset = cache[0].offset if cache else 0
        positions = mx.arange(offset, offset + inputs.shape[1]) + POSITION_OFFSET
        h = h + self.embed_positions(positions)
        cache = cache or [None] * len(self.layers)
        mask = create_attention_mask(h, cache[0])
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        if "final_layer_norm" in self:
            h = self.final_layer_norm(h)
        if "project_out" in self:
            h = self.project_out(h)
        return h


class OPTModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.decoder = Decoder(args)

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        return self.decoder(inputs, cache)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = OPTModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.word_embed_proj_dim, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings=None) -> mx.array:
        out = self.model(inputs, cache)
        if self.args.tie_word_embeddings:
            return self.model.decoder.embed_tokens.as_linear(out)
        return self.lm_head(out)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """HF names -> ours: add the `model.` prefix some repos lack; fc1/fc2 live in `mlp`."""
        out = {}
        for k, v in weights.items():
            k = re.sub(r"\.layers\.(\d+)\.(fc[12])\.", r".layers.\1.mlp.\2.", checkpoint_key(k))
            out[k] = v
        if self.args.tie_word_embeddings:
            out.pop("lm_head.weight", None)
        return out

    @property
    def layers(self):
        return self.model.decoder.layers

    def make_cache(self):
        return [KVCache() for _ in self.layers]


def checkpoint_key(name: str) -> str:
    """Some OPT repos name their tensors without the `model.` prefix."""
    return "model." + name if name.startswith("decoder.") else name


FLASH = FlashSpec(
    dims=("hidden_size", "ffn_dim", "num_hidden_layers"),
    parts=(RecordPart("fc1", "model.decoder.layers.{layer}.fc1", "row"),
           RecordPart("fc2", "model.decoder.layers.{layer}.fc2", "column")),
    hidden=lambda rows, act: act(rows["fc1"]),
    activation=lambda config: config.get("activation_function", "relu"),
    checkpoint_key=checkpoint_key,
)
