"""What a model file declares about its architecture for flash: the `FlashSpec`.

Each `mlx_flash/models/<model_type>.py` holds the MLX model (ModelArgs, Model with `sanitize`,
`layers`) and a module-level `FLASH = FlashSpec(...)`: the config keys of its dimensions, its
activation, the parts of a neuron's record in order, and how the FFN combines the row parts.
A model file that llama.cpp GGUF files can be converted from also declares `GGUF = GGUFSpec(...)`.
Nothing outside `mlx_flash/models/` knows an architecture; it asks the spec.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RecordPart:
    """One slice of a neuron's record: row `i` of an (ffn, d) input matrix, or column `i` of the
    (d, ffn) output matrix. `module` is the HF module path (checkpoint names, `{layer}` for the
    layer index) whose `.weight` (and `.bias`, if the checkpoint has one) it comes from.

    `fused`: `(module, chunk, chunks)` when the checkpoint stores the matrix fused with others
    (gate and up as one (2*ffn, d) tensor): it is chunk `chunk` of `chunks` equal slices of that
    module's weight along the FFN axis. The converter slices it out; the flash dir and the model
    (`Model.sanitize` splits the fused tensor) know only `module`."""

    name: str
    module: str
    axis: str  # "row" or "column"
    fused: tuple[str, int, int] | None = None
    expert: str | None = None  # MoE: one expert's module in HF checkpoints, `{expert}` its index

    def source(self) -> tuple[str, int, int]:
        """(checkpoint module, chunk, chunks): where the converter reads this part's weight."""
        return self.fused or (self.module, 0, 1)


@dataclass(frozen=True)
class FlashSpec:
    """An architecture as the flash format and runtime see it.

    `parts`: the record layout, the row parts first (the first one is the activation's input,
    whose sign tells a ReLU neuron's activity), the single column part last. `hidden(rows, act)`
    combines the row products (name -> (n_tokens, n_neurons), biases added) into the activation
    that multiplies the column part; it uses only operators, so it runs on MLX and numpy arrays.
    `dims`: config.json keys of (d_model, ffn_dim, num_layers). `activation(config)`: the HF name
    of the FFN activation. `checkpoint_key(name)`: a checkpoint tensor name in the normal HF
    spelling the parts use (e.g. a missing `model.` prefix added); `Model.sanitize` starts from it.

    Mixture of experts: `experts` are the config keys of the routed experts' count (the first
    one present counts), and a layer's
    records are its experts' FFN neurons, expert-major (expert e holds neurons e*F..(e+1)*F-1,
    F = the `dims[1]` config value); the parts' modules are the stacked (experts, ...) matrices
    of mlx-lm's `SwitchGLU`, each part's `expert` the per-expert module of HF checkpoints.
    `module` is the attribute path, in a decoder layer, of what the flash runtime replaces: the
    MLP, or the MoE block's `SwitchGLU` (called with the router's indices); `router` that of
    the MoE block's router, whose logits' top-k are the experts a token picks.

    Multimodal checkpoints: `text_config` is the config.json key of the text model's config
    (its dims, heads, activation; see `text`), `unused` the prefixes of checkpoint tensors
    (vision tower, projector) convert leaves out of the flash dir.

    `check(text)`: raises a FlashError for a config (its `text` view) that the model file
    does not run, before convert reads anything (a dense-only type given experts).
    """

    dims: tuple[str, str, str]
    parts: tuple[RecordPart, ...]
    hidden: Callable[[dict[str, Any], Callable], Any]
    activation: Callable[[dict], str]
    checkpoint_key: Callable[[str], str] = lambda name: name
    experts: tuple[str, ...] = ()
    top_k: str | None = None  # MoE: config key of the experts each token picks
    module: str = "mlp"
    router: str | None = None  # MoE: attribute path of the router (a Linear) in a decoder layer
    text_config: str | None = None  # multimodal: config.json key of the text model's config
    unused: tuple[str, ...] = ()  # checkpoint name prefixes convert leaves out
    unused_infix: tuple[str, ...] = ()  # and name pieces (in every layer) it leaves out
    check: Callable[[dict], None] = lambda text: None

    def text(self, config: dict) -> dict:
        """config.json as the text model sees it: a multimodal checkpoint's `text_config`
        entries over the top-level ones (`config` itself for a text model). Every reading of
        dims, heads, activation or context from config.json goes through it."""
        if not self.text_config:
            return config
        return {**config, **(config.get(self.text_config) or {})}

    def num_experts(self, config: dict) -> int | None:
        """The routed experts' count in `config` (None: not an MoE, or the count is missing)."""
        for key in self.experts:
            if key in config:
                return config[key]
        return None

    def neurons(self, config: dict) -> int | None:
        """Records per layer: the FFN's neurons, or every routed expert's (MoE); None when
        config.json lacks a dimension."""
        ffn = config.get(self.dims[1])
        if not self.experts or not isinstance(ffn, int):
            return ffn
        experts = self.num_experts(config)
        return ffn * experts if isinstance(experts, int) else None

    @property
    def row_parts(self) -> tuple[RecordPart, ...]:
        return tuple(p for p in self.parts if p.axis == "row")

    @property
    def column_part(self) -> RecordPart:
        return self.parts[-1]


@dataclass(frozen=True)
class GGUFSpec:
    """How a llama.cpp GGUF file of this architecture maps onto its HF checkpoint (`gguf.py`).

    `tensors`: GGUF tensor name without `.weight`/`.bias` -> HF module path (`{layer}` for
    `blk.N`). `config`: GGUF metadata key after the `<architecture>.` prefix -> config.json key.
    `defaults`: config.json entries GGUF does not record. `rope_permuted`: HF module -> the
    config key of its head count, for weights whose rows llama.cpp's converter permuted into its
    interleaved rope order (HF's halves order is restored on read).
    """

    tensors: dict[str, str]
    config: dict[str, str]
    defaults: dict[str, Any]
    rope_permuted: dict[str, str]
