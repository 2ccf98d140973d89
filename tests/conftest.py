"""Shared test paths. Tests may read ../shared (CI lays it beside the clone); the program may not."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MLX_FLASH_SHARED", ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures"
CORPUS = SHARED / "corpus"
EMBEDDED = ROOT / "models" / "opt-tiny"


def fixture_path(name: str) -> Path:
    path = FIXTURES / name
    if not (path / "config.json").exists():
        pytest.fail(f"fixture {path} is missing: tests need ../shared beside the clone")
    return path
