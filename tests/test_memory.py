"""The `--memory` grammar and what the budget errors say; no model needed."""

import os
import subprocess
import sys

import pytest

from mlx_flash import memory, platform
from mlx_flash.convert import convert
from mlx_flash.errors import FlashError
from mlx_flash.memory import Budget, parse_memory

from .conftest import EMBEDDED, ROOT

RAM = 16 * 2**30
MODEL = 1000


@pytest.fixture(autouse=True)
def ram(monkeypatch):
    monkeypatch.setattr(platform, "physical_memory_bytes", lambda: RAM)


@pytest.mark.parametrize("spec, want", [
    ("8GB", 8 * 10**9), ("512MiB", 512 * 2**20), ("8B", 8), ("6.5MB", 6_500_000),
    ("13MiB", 13 * 2**20), ("2 gb", 2 * 10**9), ("10TB", 10 * 10**12),
    ("0.5", RAM // 2), (".25", RAM // 4), ("1", RAM), (0.25, RAM // 4), (None, RAM // 2),
    ("25%", RAM // 4), ("100%", RAM), ("50%model", 500), ("200%model", 2000),
])
def test_memory_specs(spec, want):
    assert parse_memory(spec, MODEL) == want


@pytest.mark.parametrize("spec, needle", [
    ("8", "a bare number is a fraction of RAM, at most 1; add a unit for bytes (8GB, 8MiB) or "
          "write a fraction like 0.5"),
    (8589934592, "(8589934592B)"),
    ("1.5", "at most 1"),
    ("200%", "a share of RAM is at most 100%; for a share of the model write 200%model"),
    ("0", "more than 0"), ("0%model", "more than 0"), ("0.1B", "more than 0"),
    ("lots", "not understood"), ("8XB", "not understood"), ("-1GB", "not understood"),
])
def test_ambiguous_or_bad_specs_are_refused(spec, needle):
    with pytest.raises(FlashError) as e:
        parse_memory(spec, MODEL)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_budget_above_ram_is_allowed_with_a_note():
    assert memory.budget_note(parse_memory("10TB", MODEL)).startswith(
        "note: the memory budget 9313.23 GiB is more than this machine's RAM (16.00 GiB)")
    assert memory.budget_note(parse_memory("100%", MODEL)) is None


def test_too_small_names_the_option_that_shrinks_the_kv_cache():
    b = Budget(total=2**20, model=10 * 2**20, resident=2**20, kv_cache=3 * 2**20, buffers=0,
               dense_ffn=9 * 2**20, neuron_bytes=1024, num_layers=2, ffn_dim=100, max_context=2048)
    with pytest.raises(FlashError, match=r"too small: resident weights need .* give at least") as e:
        b.require_flash()
    assert str(e.value).endswith(
        "or lower --max-context (the KV cache for 2048 tokens takes 3.0 MiB)")


@pytest.fixture(scope="module")
def flash_dir(tmp_path_factory):
    return convert(EMBEDDED, out=tmp_path_factory.mktemp("m") / "tiny-flash", align=4096,
                   progress=False)


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "mlx_flash.cli", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_cli_refuses_a_bare_number_before_any_work(flash_dir, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": 1, "prompt": "x"}\n')
    for args in (["batch", str(inp), "--out", str(tmp_path / "out.jsonl"), "--memory", "8"],
                 ["generate", "-p", "x", "--memory", "200%"]):
        proc = _cli(*args, "-m", str(flash_dir), cwd=tmp_path)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: --memory {args[-1]}: "), lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no output started


def test_cli_warns_of_a_budget_above_ram(flash_dir, tmp_path):
    proc = _cli("generate", "-m", str(flash_dir), "-p", "The", "-n", "1", "--memory", "10TB",
                "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "note: the memory budget 9313.23 GiB is more than this machine's RAM" in proc.stderr
