"""One file per Hugging Face `model_type`; `architecture(model_type)` finds it.

Adding a model type is one new file here (see docs/ARCHITECTURE.md): nothing else in the
package names an architecture.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

# Every model file is built on mlx-lm's; importing it here (with what it imports: transformers,
# and torch where installed) makes that cost part of importing the package, paid once up front,
# not a surprise inside the first call that needs an architecture (a conversion, a validation).
import mlx_lm.models.base  # noqa: F401

from ..errors import FlashError
from .base import FlashSpec

_NOT_MODEL_FILES = {"base"}


def supported() -> list[str]:
    """The model types this package has a file for, sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__)
                  if m.name not in _NOT_MODEL_FILES and not m.name.startswith("_"))


def architecture(model_type: str | None) -> ModuleType:
    """The `mlx_flash.models.<model_type>` module; one-line error listing the supported ones."""
    if model_type not in supported():
        raise FlashError(f"unsupported model_type {model_type!r}; supported: "
                         f"{', '.join(supported())}")
    return importlib.import_module(f"{__name__}.{model_type}")


def flash_spec(model_type: str | None) -> FlashSpec:
    return architecture(model_type).FLASH


__all__ = ["FlashSpec", "architecture", "flash_spec", "supported"]
