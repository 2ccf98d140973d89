"""What the gated decoders (Llama and its kin) share: the MLP, its FlashSpec, the config fixes.

Each model file takes mlx-lm's model and gives every block this MLP, `down(act(gate(x)) * up(x))`
with the activation the config names, so the flash runtime can replace it and weights load
strictly under the HF names.
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import mlx.nn as nn

from .. import activations
from .base import FlashSpec, RecordPart

MLP_MODULE = "model.layers.{layer}.mlp"


class MLP(nn.Module):
    """down(act(gate(x)) * up(x)): the part the flash runtime replaces."""

    def __init__(self, dim: int, hidden: int, act: str, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act = activations.mlx_fn(act)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def use_mlp(model: nn.Module, args, act: str, bias: bool = False) -> None:
    """Give every block of `model` our MLP in place of mlx-lm's."""
    for layer in model.layers:
        layer.mlp = MLP(args.hidden_size, args.intermediate_size, act, bias)


def _hidden(rows, act):
    return act(rows["gate_proj"]) * rows["up_proj"]


def spec(activation: str = "hidden_act", default: str = "silu",
         fused: str | None = None, module: str = MLP_MODULE) -> FlashSpec:
    """The gated FFN's FlashSpec: `activation` is the config key of the activation's name.
    `fused`: the checkpoint's module holding gate then up as one (2*ffn, d) matrix.
    `module`: the MLP's HF module path (`{layer}` for the layer index)."""
    rows = tuple(
        RecordPart(name, f"{module}.{name}", "row",
                   fused=(f"{module}.{fused}", i, 2) if fused else None)
        for i, name in enumerate(("gate_proj", "up_proj")))
    return FlashSpec(
        dims=("hidden_size", "intermediate_size", "num_hidden_layers"),
        parts=(*rows, RecordPart("down_proj", f"{module}.down_proj", "column")),
        hidden=_hidden,
        activation=lambda config: activations.with_param(config.get(activation, default),
                                                         config.get("hidden_act_param")),
    )


def check_args(args, model: str, activation: str = "hidden_act",
               unsupported: tuple[str, ...] = ()) -> None:
    """ValueError naming the config field: an activation we do not implement, or a feature
    (`unsupported` fields) that is set but that mlx-lm's model lacks."""
    try:
        name = activations.canonical(getattr(args, activation))
    except ValueError as e:
        raise ValueError(f"{model} {activation}: {e}") from None
    if name.startswith(activations.FATRELU) and not hasattr(args, "hidden_act_param"):
        raise ValueError(f"{model} {activation}: FATReLU (ProSparse) is supported for Llama "
                         "checkpoints only")
    for field in unsupported:
        if getattr(args, field):
            raise ValueError(f"{model} {field}: not supported (it is {getattr(args, field)!r})")


def unpack_rope(args, params: dict | None = None) -> None:
    """transformers >= 5 keeps rope_theta and the scaling together under `rope_parameters`:
    set mlx-lm's `rope_theta` and `rope_scaling` (None for the default rope) from them."""
    params = dict((args.rope_parameters if params is None else params) or {})
    args.rope_theta = params.pop("rope_theta", args.rope_theta)
    if params.get("rope_type", params.get("type", "default")) != "default":
        args.rope_scaling = params


def model_args(base: type, model: str) -> type:
    """`base` (an mlx-lm ModelArgs) with `hidden_act` (the activation we implement, SiLU by
    default; "fatrelu" with `hidden_act_param` its threshold) and transformers 5's
    `rope_parameters` unpacked into mlx-lm's rope fields."""

    def post_init(self):
        base.__post_init__(self)
        self.hidden_act = activations.with_param(self.hidden_act, self.hidden_act_param)
        check_args(self, model)
        unpack_rope(self)

    return dataclasses.make_dataclass(
        "ModelArgs", [("hidden_act", str, "silu"), ("hidden_act_param", float | None, None),
                      ("rope_parameters", dict | None, None)],
        bases=(base,), namespace={"__post_init__": post_init, "__module__": base.__module__})
