"""Mistral in MLX: our Llama (mlx-lm serves Mistral with its llama file too), with transformers'
sliding window: when `sliding_window` is set, every layer attends to that many last tokens."""

from __future__ import annotations

from . import llama

ModelArgs = llama.ModelArgs


class Model(llama.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        if args.sliding_window is not None:
            # mlx-lm's llama windows the layers it marks: its masks and RotatingKVCaches follow
            for layer in self.layers:
                layer.use_sliding = True
            self.model.swa_idx = 0


FLASH = llama.FLASH
