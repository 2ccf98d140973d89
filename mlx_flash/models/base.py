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
    """

    dims: tuple[str, str, str]
    parts: tuple[RecordPart, ...]
    hidden: Callable[[dict[str, Any], Callable], Any]
    activation: Callable[[dict], str]
    checkpoint_key: Callable[[str], str] = lambda name: name

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
