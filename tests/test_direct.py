"""The 2026 MoE families streamed straight from mlx-lm dirs (direct.py) against transformers.

One tiny random transformers checkpoint per type (fp32; the Hub's layouts where transformers
writes another: gpt-oss's fused (experts, 2F, d) experts, Qwen3.5's multimodal form with the text
model under `text_config` and a vision tower), converted by mlx-lm's own `convert`, then loaded
with its experts streamed from the mlx-lm dir's files: logits over a prompt and a greedy decode
through the KV cache and the linear-attention state within 1e-3 of PyTorch's, tokens equal, with
room for only one token's experts per layer (every token evicts) and nothing written to the dir.
mlx-lm's own 4-bit and mxfp4 conversions give mlx-lm's tokens.
"""

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_flash import api, direct
from mlx_flash.errors import FlashError

from .conftest import ROOT
from .test_models import _reference_greedy
from .test_moe import COMMON, VOCAB, _checkpoint, _greedy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT, TOL = 24, 1e-3
EXPERTS, TOP_K, FFN = 8, 2, 32
HYBRID = dict(layer_types=["linear_attention", "full_attention"] * 2, num_hidden_layers=4,
              full_attention_interval=2, linear_num_value_heads=4, linear_num_key_heads=2,
              linear_key_head_dim=16, linear_value_head_dim=16, linear_conv_kernel_dim=4,
              num_experts=EXPERTS, moe_intermediate_size=FFN, shared_expert_intermediate_size=48,
              head_dim=16)
# type -> transformers config overrides (beside test_moe's COMMON)
CASES = {
    # sliding layers (window below the prompt), attention sinks, biased clamped-SwiGLU experts
    "gpt_oss": dict(num_local_experts=EXPERTS, intermediate_size=FFN, head_dim=16,
                    sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                    rope_parameters={"rope_type": "default", "rope_theta": 150000.0}),
    # a first dense layer, a shared expert, the sigmoid router's group-limited choice
    "glm4_moe": dict(n_routed_experts=EXPERTS, moe_intermediate_size=FFN, intermediate_size=96,
                     first_k_dense_replace=1, n_shared_experts=1, n_group=2, topk_group=1,
                     head_dim=16, num_hidden_layers=3, norm_topk_prob=True,
                     partial_rotary_factor=0.5),
    # MLA attention beside the same routing (Kimi-K2's configs are this type)
    "deepseek_v3": dict(n_routed_experts=EXPERTS, moe_intermediate_size=FFN,
                        intermediate_size=96, first_k_dense_replace=1, n_shared_experts=1,
                        n_group=2, topk_group=1, kv_lora_rank=32, q_lora_rank=48,
                        qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                        num_hidden_layers=3, num_key_value_heads=4),
    # Gated-DeltaNet layers beside full attention, a gated shared expert
    "qwen3_next": dict(HYBRID, intermediate_size=96, norm_topk_prob=True),
    "qwen3_5_moe": dict(text_config=dict(COMMON, **HYBRID, vocab_size=VOCAB),
                        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64,
                                           num_heads=2, out_hidden_size=64)),
    "minimax_m2": dict(num_local_experts=EXPERTS, intermediate_size=FFN, head_dim=16,
                       rotary_dim=8),
}


def _for_mlx_lm(model_type: str, hf) -> None:
    """What mlx-lm reads where transformers 5 writes something else: rope keys at the top of
    config.json, and the Hub's tensor layouts (see the module docstring)."""
    config = json.loads((hf / "config.json").read_text())
    rope = config.get("rope_parameters") or {}
    config.update({k: v for k, v in rope.items() if k != "rope_type" and k not in config})
    config.setdefault("rope_scaling", None)
    if model_type == "minimax_m2":
        config.setdefault("shared_intermediate_size", 0)
    weights = mx.load(str(hf / "model.safetensors"))
    if model_type == "gpt_oss":  # (experts, 2F, d) and (experts, d, F), as the Hub's
        for k in list(weights):
            if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
                weights[k + ".weight"] = mx.contiguous(weights.pop(k).swapaxes(-1, -2))
    if model_type == "qwen3_5_moe":  # transformers saved the text model alone, per expert
        config = {"model_type": "qwen3_5_moe", "text_config": config,
                  "tie_word_embeddings": config.get("tie_word_embeddings", False)}
        weights = {k.replace("model.", "model.language_model.", 1): v
                   for k, v in weights.items()}
        weights["model.visual.patch_embed.proj.weight"] = mx.zeros((4, 4))
        for layer in range(HYBRID["num_hidden_layers"]):
            pre = f"model.language_model.layers.{layer}.mlp.experts"
            stack = {p: mx.stack([weights.pop(f"{pre}.{e}.{p}.weight") for e in range(EXPERTS)])
                     for p in ("gate_proj", "up_proj", "down_proj")}
            weights[f"{pre}.gate_up_proj"] = mx.concatenate(
                [stack["gate_proj"], stack["up_proj"]], axis=1)
            weights[f"{pre}.down_proj"] = stack["down_proj"]
    mx.save_safetensors(str(hf / "model.safetensors"), weights, metadata={"format": "pt"})
    (hf / "config.json").write_text(json.dumps(config))


def _mlx_dir(model_type: str, root, overrides=None, **quantize):
    from mlx_lm import convert as mlx_convert

    hf = root / "hf"
    if not hf.exists():
        ref = _checkpoint(model_type, overrides or CASES[model_type], hf)
        _for_mlx_lm(model_type, hf)
    else:
        ref = None
    out = root / ("mlx-" + "-".join(map(str, quantize.values())) if quantize else "mlx")
    mlx_convert(str(hf), str(out), dtype="float32", **quantize)
    return ref, out


def _snapshot(path):
    return sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """type -> (mlx-lm dir, prompt ids, PyTorch's logits, PyTorch's tokens), each built once."""
    done = {}

    def get(model_type):
        if model_type not in done:
            ref, out = _mlx_dir(model_type, tmp_path_factory.mktemp(model_type))
            ids = np.random.default_rng(0).integers(4, VOCAB, PROMPT).tolist()
            done[model_type] = (out, ids, *_reference_greedy(ref, ids))
        return done[model_type]

    return get


@pytest.fixture(params=list(CASES))
def case(request, built):
    return built(request.param)


def test_streamed_from_the_mlx_lm_dir_matches_transformers(case):
    path, ids, ref_logits, ref_tokens = case
    assert direct.streamable(path)
    before = _snapshot(path)
    model, _ = direct.load(path, memory="1GB", capacity=TOP_K)  # every token evicts
    assert model.flash.mode == "routed" and model.flash.capacity == TOP_K
    logits, tokens = _greedy(model, ids)
    diff = float(np.abs(logits - ref_logits).max())
    print(f"max |logit diff| {diff:.2e}")
    assert diff <= TOL and tokens == ref_tokens
    stats = model.flash.stats()
    assert stats["flash_bytes_per_token"] > 0 and stats["prefill_flash_bytes"] > 0
    assert stats["evictions_per_token"] > 0
    assert stats["lookahead_hit_rate"] is not None  # each layer guessed the next one's experts
    assert _snapshot(path) == before  # nothing written beside the model


def test_the_lookahead_changes_no_logit(built):
    """Layer l reads what layer l+1's router would pick on its input ahead of time; a guess
    only moves a read, so the logits are those without it, and what was read early counts."""
    path, ids = built("qwen3_next")[:2]
    runs = {}
    for ahead in (False, True):
        model, _ = direct.load(path, memory="1GB", capacity=TOP_K, lookahead=ahead)
        runs[ahead] = (*_greedy(model, ids), model.flash.stats())
        assert (model.flash.runtime.lookahead is not None) == ahead
    (off, off_tokens, off_stats), (on, on_tokens, on_stats) = runs[False], runs[True]
    assert np.array_equal(off, on) and off_tokens == on_tokens
    assert off_stats["lookahead_hit_rate"] is None and on_stats["lookahead_hit_rate"] > 0
    # the same experts come in either way: the bytes differ by the wrong guesses only
    assert on_stats["flash_bytes_per_token"] >= off_stats["flash_bytes_per_token"]


AFFINE = dict(quantize=True, q_bits=4, q_group_size=32)


@pytest.mark.parametrize("model_type,quantize", [
    ("qwen3_next", dict(quantize=True, q_bits=4, q_group_size=64)),
    ("gpt_oss", AFFINE), ("glm4_moe", AFFINE), ("minimax_m2", AFFINE), ("qwen3_5_moe", AFFINE),
    ("gpt_oss", dict(quantize=True, q_mode="mxfp4", q_bits=4, q_group_size=32)),
    # mixed precision: per-layer bits in config.json (the experts of some layers at 6 bits)
    ("deepseek_v3", dict(quantize=True, quant_predicate="mixed_3_6", q_group_size=32)),
])
def test_mlx_lm_quantized_dirs_give_mlx_lm_tokens(model_type, quantize, tmp_path):
    from mlx_lm import load as mlx_load

    _, out = _mlx_dir(model_type, tmp_path, **quantize)
    ids = np.random.default_rng(1).integers(4, VOCAB, PROMPT).tolist()
    want, want_tokens = _greedy(mlx_load(str(out))[0], ids)
    model, _ = direct.load(out, memory="1GB", capacity=TOP_K + 1, max_context=64)
    assert model.flash.mode == "routed" and model.flash.capacity == TOP_K + 1
    got, tokens = _greedy(model, ids)
    assert tokens == want_tokens
    # MLX's CPU kernels in float32 where mlx-lm's run in the dir's dtype: close, not equal
    assert np.abs(got - want).max() <= 1e-3 * max(1.0, float(np.abs(want).max()))
    assert model.flash.stats()["flash_bytes_per_token"] > 0


def test_cli_generate_on_an_mlx_lm_dir(tmp_path):
    # experts that outweigh the embeddings, so a budget below the model's size holds a few
    wide = dict(CASES["minimax_m2"], num_local_experts=32, intermediate_size=128)
    _, path = _mlx_dir("minimax_m2", tmp_path / "wide", wide)
    before = _snapshot(path)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_flash.cli", "generate", "-m", str(path), "--raw", "-p",
         "hello world", "-n", "4", "--memory", str(int(size * 0.8)) + "B", "--max-context",
         "64", "--json"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["stats"]["mode"] == "routed" and out["stats"]["flash_bytes_per_token"] > 0
    assert out["stats"]["memory_budget_bytes"] < size
    assert _snapshot(path) == before


def test_too_small_a_budget_and_other_modes_are_one_line(built):
    path = built("glm4_moe")[0]
    with pytest.raises(FlashError, match="too small for this MoE"):
        direct.load(path, memory="40KB")
    with pytest.raises(FlashError, match="needs a flash dir"):
        api.load(path, memory="1GB", mode="oracle")


def test_a_text_only_checkpoint_converts_to_a_streamed_mlx_lm_dir(tmp_path):
    """`qwen3_5_moe_text`, what transformers' `Qwen3_5MoeForCausalLM` saves (per-expert tensors;
    mlx-lm has no file of that name): `convert` writes it as mlx-lm's dir with mlx-lm's
    qwen3_5_moe file (experts stacked), which streams as it is, within 1e-3 of PyTorch."""
    from mlx_flash.convert import convert

    ref = _checkpoint("qwen3_5_moe_text", dict(HYBRID), tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == (
        "qwen3_5_moe_text")
    ids = np.random.default_rng(2).integers(4, VOCAB, PROMPT).tolist()
    ref_logits, ref_tokens = _reference_greedy(ref, ids)
    out = convert(str(tmp_path / "hf"), out=tmp_path / "mlx", quantize=0, progress=False)
    assert direct.streamable(out) and (out / "tokenizer.json").is_file()
    assert not (tmp_path / "mlx.partial").exists()
    model, _ = direct.load(out, memory="1GB", capacity=TOP_K)
    logits, tokens = _greedy(model, ids)
    assert np.abs(logits - ref_logits).max() <= TOL and tokens == ref_tokens
    assert model.flash.stats()["flash_bytes_per_token"] > 0
    with pytest.raises(FlashError, match="already exists"):
        convert(str(tmp_path / "hf"), out=out, progress=False)


def test_a_hub_repo_of_an_mlx_lm_moe_streams_from_its_snapshot(built, monkeypatch, tmp_path):
    """`--model owner/name` of an mlx-lm MoE repo: the snapshot is used as it is (no
    `models/<name>-flash` copy); the download itself is huggingface_hub's (stood in for)."""
    from mlx_flash import hub
    from mlx_flash.cli.options import model_path

    snapshot = built("glm4_moe")[0]
    monkeypatch.setattr(hub, "_download", lambda repo_id, progress: snapshot)
    monkeypatch.chdir(tmp_path)
    assert model_path("mlx-community/glm-fake-4bit", progress=False) == snapshot
    assert not (tmp_path / "models").exists()


def test_info_describes_an_mlx_lm_dir(built):
    """`mlx-flash info` on an mlx-lm MoE dir says what streams from it (not a missing manifest)."""
    from typer.testing import CliRunner

    from mlx_flash.cli import app

    path = built("glm4_moe")[0]
    result = CliRunner().invoke(app, ["info", str(path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["architecture"] == "glm4_moe" and data["experts"] == EXPERTS
    assert data["top_k"] == TOP_K and data["layout"].startswith("mlx-lm")
    # the routed experts of the two MoE layers (layer 0 is dense): 3 float32 projections each
    assert data["expert_bytes"] == 2 * EXPERTS * 3 * FFN * 64 * 4
