"""Build a model from a config and load it densely: from an HF checkpoint dir or a flash dir."""

from __future__ import annotations

import importlib
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .checkpoint import Checkpoint, load_config
from .errors import CheckpointError, FlashError

SUPPORTED_MODEL_TYPES = ("llama", "opt")
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}


def model_module(model_type: str):
    """The `mlx_flash.models.<model_type>` module; one-line error listing the supported ones."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise FlashError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return importlib.import_module(f"mlx_flash.models.{model_type}")


def build_model(config: dict) -> nn.Module:
    """An uninitialised model for `config` (weights still random)."""
    model_type = config.get("model_type")
    if not model_type:
        raise CheckpointError("config.json has no model_type")
    module = model_module(model_type)
    try:
        args = module.ModelArgs.from_dict(config)
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"config.json: {e}") from None
    return module.Model(args)


def read_weights(path: Path) -> dict[str, mx.array]:
    """All weights under their HF names, from an HF checkpoint dir or a flash model dir."""
    if (path / "manifest.json").exists():
        from .format import load_dense_weights

        return load_dense_weights(path)
    return Checkpoint(path).load_all()


def load_model(path: str | Path, dtype: str | None = None) -> nn.Module:
    """Load every weight into memory. `dtype` casts floating weights (default: as stored)."""
    path = Path(path)
    config = load_config(path)
    model = build_model(config)
    weights = model.sanitize(read_weights(path))
    if dtype is not None:
        if dtype not in DTYPES:
            raise FlashError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        weights = {k: v.astype(DTYPES[dtype]) for k, v in weights.items()}
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise CheckpointError(f"{path}: weights do not match config.json: {e}") from None
    mx.eval(model.parameters())
    model.eval()
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
