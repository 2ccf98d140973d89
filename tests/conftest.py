"""Shared test paths. Tests may read ../shared (CI lays it beside the clone); the program may not."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MLX_FLASH_SHARED", ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures"
CORPUS = SHARED / "corpus"
EMBEDDED = ROOT / "models" / "opt-tiny"


@pytest.fixture(autouse=True, scope="session")
def _embedded_default_model():
    """Calls without --model get the embedded model even where `make demo` made SmolLM2's flash
    dir (the default then): the tests of the default are written for it."""
    patch = pytest.MonkeyPatch()
    patch.setenv("MLX_FLASH_MODEL", str(EMBEDDED))
    yield
    patch.undo()


def fixture_path(name: str) -> Path:
    path = FIXTURES / name
    if not (path / "config.json").exists():
        pytest.fail(f"fixture {path} is missing: tests need ../shared beside the clone")
    return path
