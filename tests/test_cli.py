"""The installed `mlx-flash` command, run as a user runs it: real subprocesses."""

import json
import shutil
import subprocess
import sys

import pytest

from .conftest import EMBEDDED


def run(*args, input=None):
    return subprocess.run(
        [sys.executable, "-m", "mlx_flash.cli", *args],
        capture_output=True,
        text=True,
        input=input,
        timeout=120,
    )


def assert_one_line_error(proc, *needles):
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0]


def test_help_lists_commands():
    proc = run("--help")
    assert proc.returncode == 0
    assert "generate" in proc.stdout


def test_generate_json_on_embedded_model():
    proc = run("generate", "--prompt", "The open() function returns", "--max-tokens", "8", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out["tokens"]) == 8 and out["text"].strip()
    assert out["stats"]["generation_tokens"] == 8


def test_generate_is_deterministic_with_seed():
    a = run("generate", "-p", "The", "-n", "6", "--temp", "1.0", "--seed", "3", "--json")
    b = run("generate", "-p", "The", "-n", "6", "--temp", "1.0", "--seed", "3", "--json")
    assert json.loads(a.stdout)["tokens"] == json.loads(b.stdout)["tokens"]


def test_missing_path(tmp_path):
    assert_one_line_error(
        run("generate", "-p", "x", "--model", str(tmp_path / "nope")), "no such directory"
    )


def test_no_config(tmp_path):
    assert_one_line_error(run("generate", "-p", "x", "--model", str(tmp_path)), "no config.json")


def test_unsupported_model_type(tmp_path):
    shutil.copytree(EMBEDDED, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["model_type"] = "gpt2"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    assert_one_line_error(
        run("generate", "-p", "x", "--model", str(tmp_path / "m")), "gpt2", "llama", "opt"
    )


def test_no_weight_files(tmp_path):
    shutil.copy(EMBEDDED / "config.json", tmp_path / "config.json")
    assert_one_line_error(run("generate", "-p", "x", "--model", str(tmp_path)), "no weight files")


@pytest.mark.parametrize("bad", ["{", "[]"])
def test_bad_config_json(tmp_path, bad):
    (tmp_path / "config.json").write_text(bad)
    assert_one_line_error(run("generate", "-p", "x", "--model", str(tmp_path)), "config.json")


def test_convert_info_and_flash_generate(tmp_path):
    out = tmp_path / "tiny-flash"
    proc = run("convert", str(EMBEDDED), "--out", str(out), "--align", "4096", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["architecture"] == "opt"
    again = run("convert", str(EMBEDDED), "--out", str(out))
    assert_one_line_error(again, "--force")
    info = json.loads(run("info", str(out), "--json").stdout)
    assert info["bundle_bytes"] == 768 and info["layout"] == "packed" and info["num_layers"] == 4
    dense = json.loads(run("generate", "-p", "The open() function", "-n", "12", "--json").stdout)
    converted = run("generate", "-m", str(out), "--mode", "dense", "-p", "The open() function",
                    "-n", "12", "--json")
    assert json.loads(converted.stdout)["tokens"] == dense["tokens"]  # converted dir == source
    flash = run("generate", "-m", str(out), "-p", "The open() function", "-n", "12",
                "--memory", "8.5MB", "--max-context", "256", "--json")
    assert flash.returncode == 0, flash.stderr
    result = json.loads(flash.stdout)
    stats = result["stats"]
    assert result["tokens"] == dense["tokens"]  # exact active set: same greedy tokens
    assert stats["mode"] == "oracle" and stats["memory_budget_bytes"] == 8_500_000
    for key in ("flash_bytes_per_token", "read_requests_per_token", "io_ms_per_token",
                "cache_ms_per_token", "compute_ms_per_token", "tokens_per_s", "cache_hit_rate",
                "peak_rss_bytes"):
        assert stats[key] is not None, key
    assert stats["flash_bytes_per_token"] > 0


def test_flash_options_need_a_flash_dir():
    assert_one_line_error(run("generate", "-p", "x", "--memory", "1GB"), "mlx-flash convert")


def test_bad_memory_spec(tmp_path):
    out = tmp_path / "f"
    run("convert", str(EMBEDDED), "--out", str(out), "--align", "4096")
    assert_one_line_error(run("generate", "-m", str(out), "-p", "x", "--memory", "lots"), "--memory")
    assert_one_line_error(run("generate", "-m", str(out), "-p", "x", "--mode", "fast"), "mode")
