"""`mlx-flash bench --peers`: other systems beside ours on the same weights, prompt and limit."""

import os
import subprocess
import sys

import pytest

from mlx_flash import bench, platform, profiles
from mlx_flash.bench.driver import _match_gguf_tokens, _tokens_differ
from mlx_flash.errors import FlashError
from mlx_flash.loader import load_tokenizer

from .conftest import ROOT

PROMPT = "The open() function"
PROFILE = dict(sizes=[4096, 16384, 65536, 1 << 20], threads=[1, 16],
               gb_per_s=[[0.05, 0.4], [0.2, 0.9], [0.6, 1.8], [1.5, 2.0]])


@pytest.fixture(autouse=True)
def quick_disk_reference(monkeypatch):
    monkeypatch.setattr("mlx_flash.bench.driver.PROBE_NOW_SECONDS", 0.05)


def test_mlx_lm_peer_beside_ours_on_an_mlx_lm_moe_dir(tmp_path, monkeypatch):
    """The tiny synthetic Qwen3-MoE in mlx-lm's layout: the mlx-lm peer (our own venv) runs in a
    memory group of its own (limited as ours where root and cgroup v1 allow), replays the
    planted routing row by row, gives our greedy tokens, and gets a ratio; llama.cpp, whose
    venv is not there, is one row saying how to install it."""
    from tools.synthetic_moe import write_synthetic_moe_mlx_lm

    monkeypatch.setenv("MLX_FLASH_PEERS", str(tmp_path / "peers"))
    path = write_synthetic_moe_mlx_lm(tmp_path / "moe", d_model=128, layers=2, experts=8,
                                      top_k=2, expert_ffn=64, heads=4, kv_heads=2, head_dim=32,
                                      vocab=8192)
    limit = platform.memory_cgroup() is not None
    result = bench.bench(path, memory="2.2MB", tokens=6, prompt=PROMPT, strategies="dense,+cache",
                         limit=limit, profile=profiles.Profile(**PROFILE, path=str(path),
                                                               device=os.stat(path).st_dev),
                         peers="mlx-lm, llama.cpp")
    assert result["peers"] == ["mlx-lm", "llama.cpp"]
    rows = {r["strategy"]: r for r in result["rows"]}
    assert [r["system"] for r in result["rows"]] == ["mlx-flash", "mlx-flash", "mlx-lm",
                                                     "llama.cpp"]
    for name in ("dense", "+cache", "mlx-lm"):
        assert rows[name]["status"] == "ok", rows[name]
        assert rows[name]["memory"] == "2.2MB"
    peer = rows["mlx-lm"]
    assert peer["token_ids"] == rows["dense"]["token_ids"] and len(peer["token_ids"]) == 7
    assert result["tokens_differ"] == []
    assert peer["tokens"] == 6 and peer["tokens_per_s"] > 0 and peer["prefill_ms"] > 0
    # every planted row of the prompt and the tokens (one step computed ahead), per layer
    n = len(load_tokenizer(path).encode(PROMPT))
    assert peer["routing_rows"] == [n + 7] * 2
    assert peer["ours"] == "+cache"
    assert peer["ours_over_peer"] == round(rows["+cache"]["tokens_per_s"]
                                           / peer["tokens_per_s"], 2)
    if limit:  # the same limit as ours: its base RSS + the budget + 5% (in whole pages)
        assert peer["cgroup_peak_bytes"] > 0
        assert peer["limit_bytes"] == pytest.approx(
            peer["base_rss_bytes"] + result["memory_budget_bytes"] * 1.05, abs=4096)
    llama = rows["llama.cpp"]
    assert llama["status"] == "not installed"
    assert "mlx-flash bench --install-peers llama.cpp" in llama["reason"]
    table = bench.format_table(result)
    assert "| 2.2MB | mlx-lm |  | " in table and f"{peer['ours_over_peer']:.2f}x" in table
    assert "| 2.2MB | llama.cpp |  | | | | | | | | not installed: run `mlx-flash" in table


def test_peer_names_and_budget_lists_are_checked_before_any_work(tmp_path):
    with pytest.raises(FlashError, match="unknown peer 'vllm'; choose from mlx-lm, mlx-vlm"):
        bench.bench(tmp_path / "nothing-here", peers="mlx-lm,vllm")
    assert bench.parse_peers("mlx-vlm, llama.cpp,mlx-vlm") == ["mlx-vlm", "llama.cpp"]
    assert bench.parse_budgets("30%model, 50%model,70%model,none") == [
        "30%model", "50%model", "70%model", None]
    assert bench.parse_budgets("50%model") == ["50%model"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "mlx_flash.cli", "bench", "--model",
                           str(tmp_path), "--peers", "vllm"], capture_output=True, text=True,
                          timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: unknown peer 'vllm'; choose from mlx-lm, mlx-vlm, llama.cpp"]


def test_a_peer_with_other_tokens_is_caught():
    """A faster peer that computes something else shows in `tokens_differ`; a GGUF peer (other
    weights) is not compared."""
    rows = [{"strategy": "dense", "system": "mlx-flash", "status": "ok", "token_ids": [1, 2]},
            {"strategy": "mlx-vlm", "system": "mlx-vlm", "status": "ok", "token_ids": [1, 3]},
            {"strategy": "llama.cpp", "system": "llama.cpp", "status": "ok",
             "token_ids": [9, 9], "tokens_compared": False}]
    assert _tokens_differ(rows) == ["mlx-vlm"]
    for r, memory in zip(rows, ("none", "none", "50%model")):
        r["memory"] = memory
    assert _tokens_differ(rows) == ["mlx-vlm@none"]


def test_a_gguf_peer_on_our_vocabulary_says_how_many_tokens_lead_ours():
    """llama.cpp on a GGUF that tokenizes the prompt as we do: how far its greedy tokens follow
    ours is reported, not checked (its own kernels and rounding); other prompts say nothing."""
    rows = [{"system": "mlx-flash", "status": "ok", "token_ids": [5, 6, 7, 8]},
            {"system": "llama.cpp", "status": "ok", "token_ids": [5, 6, 9, 9],
             "same_prompt_tokens": True, "tokens_compared": False},
            {"system": "llama.cpp", "status": "ok", "token_ids": [5, 6, 7, 8],
             "same_prompt_tokens": True, "tokens_compared": False},
            {"system": "llama.cpp", "status": "ok", "token_ids": [5, 6, 7, 8],
             "same_prompt_tokens": False, "tokens_compared": False}]
    _match_gguf_tokens(rows)
    assert rows[1]["tokens_match_ours"] == "first 2 of 4 tokens as ours"
    assert rows[2]["tokens_match_ours"] == "first 4 of 4 tokens as ours"
    assert "tokens_match_ours" not in rows[3] and "tokens_match_ours" not in rows[0]
    assert _tokens_differ(rows) == []
