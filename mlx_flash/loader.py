"""Build a model from a config and load it densely: from an HF checkpoint dir or a flash dir."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .checkpoint import Checkpoint, load_config
from .dtypes import check_float
from .errors import CheckpointError, FlashError
from .models import architecture
from .state import FlashState


def build_model(config: dict) -> nn.Module:
    """An uninitialised model for `config` (weights still random)."""
    model_type = config.get("model_type")
    if not model_type:
        raise CheckpointError("config.json has no model_type")
    module = architecture(model_type)
    try:
        args = module.ModelArgs.from_dict(config)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"config.json: {e}") from None
    return module.Model(args)


def quantize_modules(model: nn.Module, config: dict, weights: dict[str, mx.array]) -> None:
    """Turn the layers whose weights come quantized (a `.scales` beside the weight) into mlx-lm's
    quantized layers, as mlx_lm.utils.load_model does for a `quantization` entry in config.json."""
    quantization = config.get("quantization")
    if not quantization:
        return
    from mlx_lm.utils import infer_quant_config

    def predicate(path: str, module: nn.Module):
        if path in quantization:  # a per-layer entry
            return quantization[path]
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        return infer_quant_config(path, module, weights)

    nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"],
                mode=quantization.get("mode", "affine"), class_predicate=predicate)


def read_weights(path: Path) -> dict[str, mx.array]:
    """All weights under their HF names, from an HF checkpoint dir or a flash model dir."""
    if (path / "manifest.json").exists():
        from .tensors import load_dense_weights

        return load_dense_weights(path)
    return Checkpoint(path).load_all()


def load_model(path: str | Path, dtype: str | None = None) -> nn.Module:
    """Load every weight into memory. `dtype` casts floating weights (default: as stored)."""
    path = Path(path)
    config = load_config(path)
    model = build_model(config)
    weights = model.sanitize(read_weights(path))
    if dtype is not None:
        try:
            target = check_float(dtype).mx
        except ValueError as e:
            raise FlashError(str(e)) from None
        weights = {k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v
                   for k, v in weights.items()}
    quantize_modules(model, config, weights)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise CheckpointError(f"{path}: weights do not match config.json: {e}") from None
    mx.eval(model.parameters())
    model.eval()
    model.flash = FlashState()  # every weight in memory
    return model


def load_tokenizer(path: str | Path):
    """mlx-lm's TokenizerWrapper (streaming detokenizer, chat template, eos ids)."""
    from mlx_lm.utils import load_tokenizer as _load

    path = Path(path)
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer.model").exists():
        raise CheckpointError(f"{path}: no tokenizer files (tokenizer.json or tokenizer.model)")
    return _load(path)


def load_dense(path: str | Path, dtype: str | None = None):
    """(model, tokenizer) with every weight in memory."""
    return load_model(path, dtype), load_tokenizer(path)
