"""mlx-lm's model files for the MoE families only mlx-lm knows (direct.py streams them), and
`write_dir`: a Hugging Face checkpoint of such a family as an mlx-lm dir (stacked experts),
which direct.py then streams in place.

transformers saves the text model of a multimodal family under a `*_text` model type
(`Qwen3_5MoeForCausalLM`: `qwen3_5_moe_text`); mlx-lm has one file for both forms, whose
`ModelArgs.from_dict` takes a config without `text_config` and whose `sanitize` takes the text
model's weight names.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from .errors import FlashError

SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json", "chat_template.jinja", "chat_template.json",
              "tokenizer.model", "vocab.json", "merges.txt")


def classes(config: dict):
    """(Model, ModelArgs) of mlx-lm's file for config's model type; a `*_text` type mlx-lm has
    no file for takes its multimodal family's. ValueError as mlx-lm's own lookup."""
    from mlx_lm.utils import _get_classes

    try:
        return _get_classes(config)
    except ValueError:
        model_type = config.get("model_type") or ""
        if not model_type.endswith("_text"):
            raise
        return _get_classes({**config, "model_type": model_type.removesuffix("_text")})


# a transformers checkpoint's per-expert tensors: `...mlp.experts.<e>.<proj>.weight`
_PER_EXPERT = re.compile(r"^(.*)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def _stacking(model_class):
    """`model_class` whose `sanitize` first stacks per-expert tensors into mlx-lm's
    `switch_mlp.<proj>.weight` (experts, out, in), for the files whose own sanitize takes only
    the Hub's fused layout (Qwen3.5's); a no-op where nothing is per expert."""

    class Stacking(model_class):
        def sanitize(self, weights):
            import mlx.core as mx

            groups: dict[tuple[str, str], dict[int, object]] = {}
            for key in [k for k in weights if _PER_EXPERT.match(k)]:
                prefix, e, proj = _PER_EXPERT.match(key).groups()
                groups.setdefault((prefix, proj), {})[int(e)] = weights.pop(key)
            for (prefix, proj), experts in groups.items():
                weights[f"{prefix}.switch_mlp.{proj}.weight"] = mx.stack(
                    [experts[e] for e in sorted(experts)])
            return super().sanitize(weights)

    return Stacking


def _stacking_classes(config: dict):
    model_class, args_class = classes(config)
    return _stacking(model_class), args_class


def knows(config: dict) -> bool:
    try:
        classes(config)
        return True
    except ValueError:
        return False


def write_dir(source: Path, out: Path, quantize: int | None = 4, group_size: int | None = None,
              dtype: str | None = None) -> Path:
    """The checkpoint at `source` (HF safetensors) as an mlx-lm dir written into `out` (an empty
    dir: convert's `.partial`) by mlx-lm (its `sanitize` stacks the experts): `quantize` 4 or 8
    (affine, `group_size` default 64) or 0/None for float (`dtype`, default as stored)."""
    import mlx.core as mx
    from mlx.utils import tree_map_with_path
    from mlx_lm.utils import load_model, quantize_model, save_config, save_model

    try:
        model, config = load_model(source, lazy=True, get_model_classes=_stacking_classes)
        if dtype is not None:  # as mlx-lm's convert casts (a model may keep some in float32)
            target, keep = getattr(mx, dtype), getattr(model, "cast_predicate", lambda _: True)
            model.update(tree_map_with_path(
                lambda k, a: a.astype(target) if keep(k) and mx.issubdtype(a.dtype, mx.floating)
                else a, model.parameters()))
        if quantize:
            model, config = quantize_model(model, config, group_size or 64, quantize)
    except ValueError as e:
        raise FlashError(f"{source}: {e}") from None
    save_model(out, model, donate_model=True)
    save_config(config, out / "config.json")
    for name in SIDE_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    return out
