"""Bamboo and TurboSparse-Mistral (PowerInfer; arXiv 2406.05955) in MLX: Mistral whose FFN is
dReLU, `down(relu(gate(x)) * relu(up(x)))` (`BambooMLP.forward` of the Bamboo model card;
PowerInfer's llama.cpp: LLM_FFN_SYM with LLM_FFN_RELU).

The checkpoints (`model_type` "bamboo", `BambooForCausalLM`, `hidden_act` "relu", custom code on
the Hub) are Mistral's config and weights otherwise. TurboSparse-Mistral also ships its own
neuron predictors (`model.layers.N.mlp.predictor.fc1/fc2`, applied by its remote code to the
pre-norm residual; their shapes are not published): convert leaves them out, and the exact
oracle (a neuron whose gate is <= 0 is an exact zero) or `mlx-flash calibrate`'s predictors
take their place. The oracle reads every neuron past the gate, though dReLU also zeroes those
whose up is <= 0; calibration labels the exact nonzeros of the product. Their sparsity and the
predictors' recall are not measured here: no trained dReLU checkpoint is at hand.
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx

from . import _gated, mistral

ModelArgs = mistral.ModelArgs


class MLP(_gated.MLP):
    """down(act(gate(x)) * act(up(x)))."""

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.act(self.up_proj(x)))


class Model(mistral.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        for layer in self.layers:
            layer.mlp = MLP(args.hidden_size, args.intermediate_size, args.hidden_act,
                            args.mlp_bias)

    def sanitize(self, weights: dict) -> dict:
        weights = {k: v for k, v in weights.items() if ".mlp.predictor." not in k}
        return super().sanitize(weights)


def _hidden(rows, act):
    return act(rows["gate_proj"]) * act(rows["up_proj"])


FLASH = dataclasses.replace(_gated.spec(default="relu"), hidden=_hidden,
                            unused_infix=(".mlp.predictor.",))
