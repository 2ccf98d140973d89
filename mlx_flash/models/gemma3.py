"""Gemma 3 multimodal checkpoints (`Gemma3ForConditionalGeneration`): the text model only.

config.json keeps the text model's keys under `text_config`; the weights are the text model's
under `language_model.` beside a vision tower and a projector, which convert leaves out and
`sanitize` drops. The text model is our gemma3_text (mlx-lm's with our gated MLP). mlx-lm's
gemma3.ModelArgs is not reused: it overwrites text_config's vocab_size with its own default
when config.json has no top-level one (transformers 5 writes it in text_config only).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs

from . import _gated, gemma3_text

UNUSED = ("vision_tower.", "multi_modal_projector.")
PREFIX = "language_model."
# Gemma3TextConfig's defaults where mlx-lm's gemma3_text has others (released configs omit them)
TEXT_DEFAULTS = dict(vocab_size=262208, num_attention_heads=8, num_key_value_heads=4)


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    text_config: dict
    vocab_size: int | None = None  # transformers < 5 wrote it at the top level
    tie_word_embeddings: bool | None = None


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        text = dict(args.text_config)
        for key in ("vocab_size", "tie_word_embeddings"):
            if getattr(args, key) is not None:
                text.setdefault(key, getattr(args, key))
        text = {**TEXT_DEFAULTS, **text}
        self.language_model = gemma3_text.Model(gemma3_text.ModelArgs.from_dict(text))

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: mx.array | None = None):
        return self.language_model(inputs, cache=cache, input_embeddings=input_embeddings)

    def sanitize(self, weights):
        weights = {checkpoint_key(k): v for k, v in weights.items()}
        text = self.language_model.sanitize(
            {k[len(PREFIX):]: v for k, v in weights.items() if k.startswith(PREFIX)})
        return {PREFIX + k: v for k, v in text.items()}  # the vision tower dropped

    @property
    def layers(self):
        return self.language_model.layers

    def make_cache(self):
        return self.language_model.make_cache()


def checkpoint_key(name: str) -> str:
    """transformers' in-memory names (`model.language_model.layers.0...`, `lm_head`) in the
    spelling released checkpoints use (`language_model.model.layers.0...`)."""
    if name.startswith("model.language_model."):
        return f"{PREFIX}model.{name[len('model.language_model.'):]}"
    if name.startswith("model."):
        return name[len("model."):]
    if name.startswith("lm_head."):
        return PREFIX + name
    return name


FLASH = dataclasses.replace(
    _gated.spec("hidden_activation", "gelu_pytorch_tanh", module=f"{PREFIX}model.layers.{{layer}}.mlp"),
    checkpoint_key=checkpoint_key, text_config="text_config", unused=UNUSED)
