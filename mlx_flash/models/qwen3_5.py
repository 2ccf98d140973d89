"""Qwen3.5 multimodal checkpoints (`Qwen3_5ForConditionalGeneration`, e.g. Qwen3.5-27B): the text
model only.

config.json keeps the text model's keys under `text_config`; the weights are the text model's
under `model.language_model.` and the head (`lm_head`), beside a vision tower (`model.visual.`)
and the multi-token-prediction head (`mtp.`), which convert leaves out and `sanitize` drops. The
text model is our qwen3_5_text, under `language_model.` as in mlx-lm: `checkpoint_key` spells
the checkpoint's names as its parameter paths. Its head is tied as the top-level
`tie_word_embeddings` says (as in transformers; mlx-lm reads text_config's).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs

from . import _gated, qwen3_5_text

PREFIX = "language_model."
UNUSED = ("model.visual.", "vision_tower.", "mtp.")  # mlx-vlm names the tower vision_tower


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    text_config: dict
    tie_word_embeddings: bool | None = None


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        text = dict(args.text_config)
        if args.tie_word_embeddings is not None:
            text["tie_word_embeddings"] = args.tie_word_embeddings
        self.language_model = qwen3_5_text.Model(qwen3_5_text.ModelArgs.from_dict(text))

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: mx.array | None = None):
        return self.language_model(inputs, cache=cache, input_embeddings=input_embeddings)

    def sanitize(self, weights):
        weights = {checkpoint_key(k): v for k, v in weights.items()}
        text = self.language_model.sanitize(
            {k[len(PREFIX):]: v for k, v in weights.items() if k.startswith(PREFIX)})
        return {PREFIX + k: v for k, v in text.items()}  # the vision tower and mtp dropped

    @property
    def layers(self):
        return self.language_model.layers

    def make_cache(self):
        return self.language_model.make_cache()


def checkpoint_key(name: str) -> str:
    """The checkpoint's names (`model.language_model.layers.0...`, `lm_head`, or the text model
    saved alone under a qwen3_5 config: `model.layers.0...`) as the model's parameter paths
    (`language_model.model.layers.0...`, `language_model.lm_head`); mlx-lm's dirs have them."""
    if name.startswith("model.language_model."):
        return f"{PREFIX}model.{name[len('model.language_model.'):]}"
    if name.startswith("lm_head."):
        return PREFIX + name
    if name.startswith("model.") and not name.startswith(UNUSED):
        return PREFIX + name
    return name


FLASH = dataclasses.replace(
    _gated.spec(module=f"{PREFIX}model.layers.{{layer}}.mlp"), checkpoint_key=checkpoint_key,
    text_config="text_config", unused=UNUSED, check=qwen3_5_text.dense_only)
