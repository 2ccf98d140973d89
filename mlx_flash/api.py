"""`load` for any model dir: dense for an HF checkpoint, the flash runtime for a flash dir."""

from __future__ import annotations

from pathlib import Path

from . import platform
from .errors import FlashError
from .format import is_flash_dir
from .loader import load_dense


def load(
    path: str | Path,
    memory: str | float | int | None = None,
    mode: str = "auto",
    window: int | None = None,
    max_context: int | None = None,
    **kwargs,
):
    """Load `(model, tokenizer)` from an HF checkpoint dir (dense), a flash model dir, or an
    mlx-lm MoE dir (its experts streamed from its own files: `mlx_flash.direct.load`).

    For a flash dir, `memory`, `mode`, `window`, `max_context` (tokens of context the KV cache
    holds) and the other keywords go to `mlx_flash.runtime.load`. An HF checkpoint only loads
    densely (convert it first, `mlx-flash convert`, to stream it from flash); `max_context` then
    caps its context.
    """
    path = Path(path)
    base = platform.current_rss_bytes()
    model, tokenizer = _load(path, memory, mode, window, max_context, **kwargs)
    if model.flash.base_rss_bytes is None:  # a flash dir's load measures it after the tokenizer
        model.flash.base_rss_bytes = base
    return model, tokenizer


def _load(path: Path, memory, mode, window, max_context, **kwargs):
    if is_flash_dir(path):
        from . import runtime

        if window is not None:
            kwargs["window"] = window
        return runtime.load(path, memory=memory, mode=mode, max_context=max_context, **kwargs)
    from . import direct

    if mode != "dense" and direct.streamable(path):  # an mlx-lm MoE dir: experts read in place
        return direct.load(path, memory=memory, mode=mode, max_context=max_context, **kwargs)
    if mode not in ("auto", "dense") or memory is not None or window is not None:
        raise FlashError(
            f"{path} is a Hugging Face checkpoint, which loads only densely; run "
            f"`mlx-flash convert {path}` and use the flash dir for --memory/--mode/--window"
        )
    model, tokenizer = load_dense(path)
    model.flash.max_context = max_context
    return model, tokenizer
