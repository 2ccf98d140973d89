"""What the mixture-of-experts decoders share: their FlashSpec and the flat-experts fix.

Each MoE model file takes mlx-lm's model, whose MoE block routes with its own router and calls
a `SwitchGLU` (`switch_mlp`) with the chosen experts' indices; the flash runtime replaces that
`switch_mlp` only, so routing, shared experts and the weighting of expert outputs stay mlx-lm's.

A flash dir holds a layer's experts as one FFN of experts * F neurons, expert-major: the gate/up
parts are rows of the stacked (experts * F, d) matrices, the down part columns of the (d,
experts * F) one. Rebuilt densely (`tensors.load_dense_weights`), those come back 2-D; `unflatten`
restores the (experts, F, d) / (experts, d, F) shapes that `SwitchGLU` holds.
"""

from __future__ import annotations

import mlx.core as mx

from .base import FlashSpec, RecordPart

PARTS = ("gate_proj", "up_proj", "down_proj")


def _hidden(rows, act):
    return act(rows["gate_proj"]) * rows["up_proj"]


def spec(block: str, ffn: str, experts: tuple[str, ...], expert_names: tuple[str, str, str] = PARTS,
         activation: str = "hidden_act") -> FlashSpec:
    """The FlashSpec of an MoE whose decoder layers hold the block at attribute `block` (`mlp`,
    `block_sparse_moe`): `ffn` is the config key of an expert's FFN size, `experts` the keys of
    the routed experts' count (the first present counts); `expert_names` the HF checkpoints' per-expert modules of gate, up,
    down (Mixtral's w1, w3, w2)."""
    stem = f"model.layers.{{layer}}.{block}"
    parts = tuple(
        RecordPart(name, f"{stem}.switch_mlp.{name}", "column" if name == "down_proj" else "row",
                   expert=f"{stem}.experts.{{expert}}.{theirs}")
        for name, theirs in zip(PARTS, expert_names, strict=True))
    return FlashSpec(
        dims=("hidden_size", ffn, "num_hidden_layers"),
        parts=parts,
        hidden=_hidden,
        activation=lambda config: config.get(activation, "silu"),
        experts=experts,
        top_k="num_experts_per_tok",
        module=f"{block}.switch_mlp",
        router=f"{block}.gate",
    )


def unflatten(weights: dict, args, spec: FlashSpec) -> dict:
    """Stacked expert matrices that a flash dir rebuilt 2-D, back in `SwitchGLU`'s 3-D shapes
    (quantized rows with their scales and biases); 3-D ones are left as they are.

    Float experts are held in float32 on MLX's CPU backend, whose `gather_mm` (SwitchGLU's
    product) takes nothing else; on a GPU they keep their dtype."""
    experts = spec.num_experts(vars(args))
    widen = mx.default_device() == mx.cpu
    for layer in range(args.num_hidden_layers):
        for p in spec.parts:
            for kind in ("weight", "scales", "biases"):
                name = f"{p.module.format(layer=layer)}.{kind}"
                w = weights.get(name)
                if w is None:
                    continue
                if w.ndim == 2 and p.axis == "row":  # (E*F, cols) -> (E, F, cols)
                    w = w.reshape(experts, -1, w.shape[-1])
                elif w.ndim == 2:  # (d, E*F) -> (E, d, F)
                    w = w.reshape(w.shape[0], experts, -1).transpose(1, 0, 2)
                quantized = f"{p.module.format(layer=layer)}.scales" in weights
                if widen and not quantized and mx.issubdtype(w.dtype, mx.floating):
                    w = w.astype(mx.float32)
                weights[name] = w
    return weights


def check_sparse_everywhere(args, model: str) -> None:
    """ValueError unless every decoder layer is an MoE layer (the flash format holds one FFN
    shape per layer; dense MLP layers between MoE ones are not supported)."""
    step = getattr(args, "decoder_sparse_step", 1) or 1
    only = getattr(args, "mlp_only_layers", None) or []
    if step != 1 or only:
        raise ValueError(f"{model}: dense MLP layers between the MoE layers (decoder_sparse_step "
                         f"{step}, mlp_only_layers {only}) are not supported")


__all__ = ["spec", "unflatten", "check_sparse_everywhere"]
