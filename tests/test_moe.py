"""Mixture-of-experts types against transformers (PyTorch CPU, fp32) and mlx-lm, dense and flash.

One tiny random checkpoint per type, written by transformers with the fixture's tokenizer: our
logits over a prompt and a greedy decode through the KV cache must match PyTorch's, dense and
from the converted flash dir with the experts streamed (naive: every routed expert read per
token; routed: through the expert cache, with room for every expert, and with room for only the
experts of one token, so every token evicts). mlx-lm's own 4-bit conversion of one of them is the
reference for quantized experts.
"""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from mlx_flash import format as fmt
from mlx_flash.convert import convert
from mlx_flash.errors import FlashError
from mlx_flash.loader import load_model
from mlx_flash.runtime import load

from .conftest import fixture_path
from .test_models import NEW, _check, _reference_greedy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT, TOL = 24, 1e-3
VOCAB = 8192  # the fixture tokenizer's
EXPERTS, TOP_K, EXPERT_FFN = 8, 2, 64
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
              eos_token_id=2, pad_token_id=0, num_experts_per_tok=TOP_K)

# case -> (model_type, config overrides)
CASES = {
    "qwen3_moe": ("qwen3_moe", dict(num_experts=EXPERTS, moe_intermediate_size=EXPERT_FFN,
                                    intermediate_size=96, head_dim=32, norm_topk_prob=True,
                                    tie_word_embeddings=True)),
    "qwen2_moe": ("qwen2_moe", dict(num_experts=EXPERTS, moe_intermediate_size=EXPERT_FFN,
                                    intermediate_size=96, shared_expert_intermediate_size=48,
                                    tie_word_embeddings=False)),  # shared expert, q/k/v biases
    "mixtral": ("mixtral", dict(num_local_experts=EXPERTS, intermediate_size=EXPERT_FFN,
                                tie_word_embeddings=False)),  # experts' w1, w2, w3
    "olmoe": ("olmoe", dict(num_experts=EXPERTS, intermediate_size=EXPERT_FFN,
                            norm_topk_prob=False, tie_word_embeddings=False)),  # q/k norms
}


def _greedy(model, ids):
    """The same through our model and mlx-lm's prompt cache."""
    cache = make_prompt_cache(model)
    out = model(mx.array([ids]), cache=cache)[0]
    logits, tokens = [np.array(out.astype(mx.float32))], [int(mx.argmax(out[-1]))]
    for _ in range(NEW - 1):
        out = model(mx.array([tokens[-1:]]), cache=cache)[0]
        logits.append(np.array(out.astype(mx.float32)))
        tokens.append(int(mx.argmax(out[-1])))
    return np.concatenate(logits), tokens


def _checkpoint(model_type, overrides, path):
    config = transformers.AutoConfig.for_model(model_type, **{**COMMON, **overrides})
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # spread the logits and the router's scores (no near-ties)
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.2 if p.dim() > 1 else p + torch.randn_like(p) * 0.1)
    ref.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(fixture_path("llama-relu-fixture") / name, path / name)
    return ref


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(checkpoint dir, prompt ids, PyTorch's logits, PyTorch's tokens)."""
    model_type, overrides = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param) / "hf"
    ref = _checkpoint(model_type, overrides, path)
    ids = np.random.default_rng(0).integers(4, VOCAB, PROMPT).tolist()
    return (path, ids, *_reference_greedy(ref, ids))


@pytest.fixture(scope="module")
def flash_dir(case):
    return convert(str(case[0]), out=case[0].parent / "flash", align=4096, progress=False)


def test_dense_matches_transformers(case):
    _check(load_model(case[0]), case)


def test_the_flash_dir_holds_each_expert_as_adjacent_records(flash_dir, case):
    m = fmt.read_manifest(flash_dir)
    assert m.experts == EXPERTS and m.expert_ffn == EXPERT_FFN and m.ffn_dim == EXPERTS * EXPERT_FFN
    assert fmt.info(flash_dir)["experts"] == EXPERTS
    # the expert's gate rows and down columns, from the checkpoint's own per-expert tensors
    dense = load_model(case[0])
    block = dense.layers[1].block_sparse_moe if m.architecture == "mixtral" else dense.layers[1].mlp
    expert = 5
    records = fmt.read_layer_records(m, 1, expert * EXPERT_FFN, EXPERT_FFN)
    gate = m.part_values(records, m.part("gate_proj"))
    down = m.part_values(records, m.part("down_proj"))
    assert mx.array_equal(gate, block.switch_mlp.gate_proj.weight[expert]).item()
    assert mx.array_equal(down.T, block.switch_mlp.down_proj.weight[expert]).item()


# slots: cache room in experts per layer (None: what the budget gives, every expert here);
# `oracle` (as `auto` below the model's size) is the routed mode: the router is the oracle
@pytest.mark.parametrize("mode,slots", [("dense", None), ("naive", None), ("oracle", None),
                                        ("oracle", TOP_K)])
def test_flash_matches_transformers(flash_dir, case, mode, slots):
    capacity = None if slots is None else slots * EXPERT_FFN
    model, _ = load(flash_dir, memory="1GB", mode=mode, capacity=capacity)
    assert model.flash.mode == {"oracle": "routed"}.get(mode, mode)
    _check(model, case)
    if mode == "oracle":
        assert model.flash.runtime.layers[0].cache.capacity == (slots or EXPERTS) * EXPERT_FFN


def test_routed_reads_at_most_a_third_of_every_expert(flash_dir, case):
    """The expert cache at half the experts per layer: flash bytes per decode token at most 1/3
    of what reading every expert each token takes."""
    m = fmt.read_manifest(flash_dir)
    every_expert = m.num_layers * m.ffn_dim * m.payload_bytes
    model, _ = load(flash_dir, memory="1GB", mode="oracle", capacity=EXPERTS // 2 * EXPERT_FFN)
    _greedy(model, case[1])
    stats = model.flash.stats()
    print(f"{stats['flash_bytes_per_token']} bytes/token, every expert {every_expert}, "
          f"hits {stats['cache_hit_rate']}")
    assert 0 < stats["flash_bytes_per_token"] <= every_expert / 3
    assert stats["cache_hit_rate"] > 0


def test_a_budget_below_one_tokens_experts_is_one_line(flash_dir):
    with pytest.raises(FlashError, match="too small for this MoE.*2 experts a token picks"):
        load(flash_dir, memory="300KB", mode="auto", max_context=16)


def test_hybrid_mode_is_refused_for_an_moe(flash_dir):
    with pytest.raises(FlashError, match="hybrid"):
        load(flash_dir, memory="1GB", mode="hybrid")


@pytest.fixture(scope="module")
def mlx_q4(tmp_path_factory):
    """mlx-lm's 4-bit conversion (group 64, float32 scales) of a tiny Qwen3-MoE checkpoint."""
    from mlx_lm import convert as mlx_convert

    path = tmp_path_factory.mktemp("moe-q4") / "hf"
    model_type, overrides = CASES["qwen3_moe"]
    _checkpoint(model_type, overrides, path)
    # the keys of Qwen's own config.json, which mlx-lm reads (transformers 5 writes others)
    config = json.loads((path / "config.json").read_text())
    config.update(num_experts=EXPERTS, rope_theta=config["rope_parameters"]["rope_theta"])
    (path / "config.json").write_text(json.dumps(config))
    out = path.parent / "mlx-q4"
    mlx_convert(str(path), str(out), quantize=True, q_group_size=64, q_bits=4, dtype="float32")
    return out


def test_quantized_experts_from_an_mlx_lm_dir(mlx_q4):
    from mlx_lm import load as mlx_load

    ids = np.random.default_rng(1).integers(4, VOCAB, PROMPT).tolist()
    theirs = mlx_load(str(mlx_q4))[0]
    dense = load_model(mlx_q4)  # ours, on mlx-lm's dir: mlx-lm's numbers
    want, want_tokens = _greedy(theirs, ids)
    got, tokens = _greedy(dense, ids)
    assert np.array_equal(got, want) and tokens == want_tokens

    flash = convert(str(mlx_q4), out=mlx_q4.parent / "flash-q4", progress=False)
    m = fmt.read_manifest(flash)
    assert m.quantization.bits == 4 and m.experts == EXPERTS
    # gate rows are mlx-lm's packed values, byte for byte, expert after expert
    source = mx.load(str(mlx_q4 / "model.safetensors"))
    w, _, _ = m.part_arrays(fmt.read_layer_records(m, 0), m.part("gate_proj"))
    stacked = source["model.layers.0.mlp.switch_mlp.gate_proj.weight"]
    assert mx.array_equal(w, stacked.reshape(-1, stacked.shape[-1])).item()
    # the flash dir's own dense form (down re-quantized along d at 8 bits), then the experts
    # streamed in every path, both cache computes
    ref, ref_tokens = _greedy(load(flash, mode="dense")[0], ids)
    assert float((ref.argmax(-1) == want.argmax(-1)).mean()) >= 0.9
    for mode, slots in (("naive", None), ("oracle", TOP_K), ("oracle", None)):
        model, _ = load(flash, memory="1GB", mode=mode,
                        capacity=None if slots is None else slots * EXPERT_FFN)
        logits, tokens = _greedy(model, ids)
        assert np.abs(logits - ref).max() <= TOL, (mode, slots)
        assert tokens == ref_tokens, (mode, slots)
    with pytest.raises(FlashError, match="stay quantized"):
        load(flash, memory="1GB", mode="oracle", compute="dequantized")


def test_calibrate_says_an_moe_needs_no_predictors(flash_dir):
    from mlx_flash.calibrate import calibrate

    from .conftest import CORPUS

    with pytest.raises(FlashError, match="router picks the experts exactly"):
        calibrate(flash_dir, CORPUS / "fixture-val.txt", tokens=256, seq_len=64, progress=False)
    assert not (flash_dir / "predictors.safetensors").exists()


def test_lookahead_changes_no_logit_and_reports_its_guesses(flash_dir, case):
    """Reads started a layer early (the next router's guess) give the same logits as reads on
    demand, with the cache at one token's experts (every token evicts) and at half the experts."""
    ids = case[1]
    for slots in (TOP_K, EXPERTS // 2):
        runs = {}
        for ahead in (False, True):
            model, _ = load(flash_dir, memory="1GB", mode="oracle", lookahead=ahead,
                            capacity=slots * EXPERT_FFN)
            runs[ahead] = (_greedy(model, ids), model.flash.stats())
        (plain, plain_tokens), plain_stats = runs[False]
        (ahead, ahead_tokens), stats = runs[True]
        assert np.array_equal(plain, ahead) and plain_tokens == ahead_tokens
        assert plain_stats["lookahead_hit_rate"] is None
        assert 0 <= stats["lookahead_hit_rate"] <= 1
        assert stats["io_wait_ms_per_token"] <= stats["io_ms_per_token"]
        print(f"{slots} slots: lookahead hit rate {stats['lookahead_hit_rate']}, bytes/token "
              f"{stats['flash_bytes_per_token']} vs {plain_stats['flash_bytes_per_token']}")


def _forced(model, ids, tokens):
    """Logits of the prompt and of decode steps fed `tokens` (PyTorch's greedy ones), each
    evaluated before the next step (the caches change in place, as in generation)."""
    cache = make_prompt_cache(model)
    logits = [np.array(model(mx.array([ids]), cache=cache)[0].astype(mx.float32))]
    logits += [np.array(model(mx.array([[t]]), cache=cache)[0].astype(mx.float32))
               for t in tokens[:-1]]
    return np.concatenate(logits)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_experts(case, dtype, tmp_path):
    """float16/bfloat16 dirs: MLX's CPU gather_mm takes float32 only; the dense model widens
    its experts, the flash paths multiply each cached expert in its own dtype (or widen the
    stream buffer). Fed PyTorch's tokens, every path is as close to its float32 logits as the
    dense form of the same dir is (half precision may flip a near-tie of the router)."""
    if case[0].parent.name != "qwen3_moe0":
        pytest.skip("one type is enough: the paths are the same for all")
    flash = convert(str(case[0]), out=tmp_path / "flash", dtype=dtype, progress=False)
    _, ids, truth, truth_tokens = case

    def err(model):
        logits = _forced(model, ids, truth_tokens)
        return (float(np.abs(logits - truth).mean()),
                float((logits.argmax(-1) == truth.argmax(-1)).mean()))

    dense_err, dense_top1 = err(load(flash, mode="dense")[0])
    for mode, slots in (("naive", None), ("oracle", TOP_K), ("oracle", None)):
        model, _ = load(flash, memory="1GB", mode=mode,
                        capacity=None if slots is None else slots * EXPERT_FFN)
        e, top1 = err(model)
        print(f"{dtype} {mode} {slots}: mean |error| {e:.4f} (dense {dense_err:.4f}), top-1 "
              f"{top1:.2f} (dense {dense_top1:.2f})")
        assert e <= 1.5 * dense_err and top1 >= dense_top1 - 0.1, (mode, slots)
