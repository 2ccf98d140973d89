"""Quantized flash dirs against mlx-lm's own 4-bit model of the same weights.

One tiny random Llama checkpoint written by transformers; `mlx_lm.convert -q` makes the mlx-lm
4-bit dir (the reference no one here wrote). Our dense model of that dir must give mlx-lm's logits
and tokens; its flash dir (4-bit records, the down projection re-quantized along d) must run in
every mode and agree with its own dense form; `--quantize 4` from the float checkpoint must shrink
the bundles and stay close to mlx-lm's 4-bit model.
"""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from mlx_flash import format as fmt
from mlx_flash import quant
from mlx_flash.convert import convert
from mlx_flash.errors import FlashError
from mlx_flash.loader import load_model
from mlx_flash.memory import NEURON_BOOKKEEPING
from mlx_flash.runtime import load

from .conftest import fixture_path

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT, NEW = 24, 12
VOCAB = 8192  # the fixture tokenizer's


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    config = transformers.AutoConfig.for_model(
        "llama", vocab_size=VOCAB, hidden_size=128, intermediate_size=320, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # spread the logits: no near-ties for greedy decoding
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.2 if p.dim() > 1 else p + torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp("quant") / "hf"
    ref.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(fixture_path("llama-relu-fixture") / name, path / name)
    return path


@pytest.fixture(scope="module")
def mlx_q4(hf_dir):
    """mlx-lm's 4-bit conversion (group 64, float32 scales: flash and dense sums then agree to
    float32 rounding, no near-tie flips) of the checkpoint."""
    from mlx_lm import convert as mlx_convert

    out = hf_dir.parent / "mlx-q4"
    mlx_convert(str(hf_dir), str(out), quantize=True, q_group_size=64, q_bits=4,
                dtype="float32")
    return out


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(4, VOCAB, PROMPT).tolist()


def _greedy(model, ids):
    """Logits of the prompt and of NEW greedy steps through mlx-lm's KV cache, and the tokens."""
    cache = make_prompt_cache(model)
    out = model(mx.array([ids]), cache=cache)[0]
    logits, tokens = [np.array(out.astype(mx.float32))], [int(mx.argmax(out[-1]))]
    for _ in range(NEW - 1):
        out = model(mx.array([tokens[-1:]]), cache=cache)[0]
        logits.append(np.array(out.astype(mx.float32)))
        tokens.append(int(mx.argmax(out[-1])))
    return np.concatenate(logits), tokens


@pytest.fixture(scope="module")
def reference(mlx_q4, ids):
    from mlx_lm import load as mlx_load

    model, _ = mlx_load(str(mlx_q4))
    return _greedy(model, ids)


@pytest.fixture(scope="module")
def exact(hf_dir, ids):
    """Prompt logits of the float32 model (ours matches transformers: tests/test_models.py)."""
    return np.array(load_model(hf_dir)(mx.array([ids]))[0])


def _close_to_mlx_lm(ours, theirs, exact):
    """Prompt logits of a model whose down projection alone is quantized differently from
    mlx-lm's (along d, not along the FFN axis): as far from the float model as mlx-lm's is."""
    def err(a):
        return float(np.abs(a - exact).mean())

    def agree(a):  # top-1 tokens equal to the float model's
        return float((a.argmax(-1) == exact.argmax(-1)).mean())

    print(f"mean |logit error| ours {err(ours):.4f}, mlx-lm's {err(theirs):.4f}; top-1 "
          f"agreement with float32 ours {agree(ours):.2f}, mlx-lm's {agree(theirs):.2f}")
    assert err(ours) <= 1.25 * err(theirs) and agree(ours) >= agree(theirs) - 0.1


def test_dense_on_an_mlx_lm_quantized_dir_gives_mlx_lms_tokens(mlx_q4, ids, reference):
    model = load_model(mlx_q4)
    assert type(model.layers[0].mlp.gate_proj).__name__ == "QuantizedLinear"
    logits, tokens = _greedy(model, ids)
    assert np.array_equal(logits, reference[0]) and tokens == reference[1]


@pytest.fixture(scope="module")
def flash_q4(mlx_q4):
    return convert(str(mlx_q4), out=mlx_q4.parent / "flash-q4", progress=False)


def test_mlx_lm_dir_converts_to_quantized_records(flash_q4, mlx_q4):
    m = fmt.read_manifest(flash_q4)
    # the down part, quantized along the FFN axis by mlx-lm, is quantized again along d at 8 bits
    assert m.quantization == quant.Quantization(4, 64, 8) and m.dtype == "float32" and m.packed
    # gate/up: 128 values at 4 bits, 2 float32 scales and 2 biases; down: at 8 bits
    assert m.payload_bytes == 2 * (64 + 8 + 8) + (128 + 8 + 8)
    assert fmt.info(flash_q4)["padding_fraction"] < 0.125
    # gate rows are the source's packed values and scales, byte for byte
    source = mx.load(str(mlx_q4 / "model.safetensors"))
    records = fmt.read_layer_records(m, 1)
    w, s, b = m.part_arrays(records, m.part("gate_proj"))
    stem = "model.layers.1.mlp.gate_proj."
    for got, key in ((w, "weight"), (s, "scales"), (b, "biases")):
        assert mx.array_equal(got, source[stem + key]).item(), key
    # resident layers stay as mlx-lm quantized them
    resident = mx.load(str(m.resident_path))
    assert mx.array_equal(resident["model.layers.0.self_attn.q_proj.weight"],
                          source["model.layers.0.self_attn.q_proj.weight"]).item()
    assert json.loads((flash_q4 / "config.json").read_text())["quantization"]["bits"] == 4


def test_flash_modes_agree_with_the_dense_form_and_with_mlx_lm(flash_q4, ids, reference, exact):
    dense, _ = load(flash_q4, mode="dense")
    want, want_tokens = _greedy(dense, ids)
    # the down projection, re-quantized along d, is the only difference from mlx-lm's model
    _close_to_mlx_lm(want[:PROMPT], reference[0][:PROMPT], exact)
    for mode, compute in (("naive", None), ("oracle", "dequantized"), ("oracle", "quantized")):
        model, _ = load(flash_q4, memory="1GB", mode=mode, compute=compute)
        assert model.flash.mode == mode
        logits, tokens = _greedy(model, ids)
        assert np.abs(logits - want).max() <= 1e-3, (mode, compute)
        assert tokens == want_tokens, (mode, compute)


def test_predicted_mode_and_calibration_run_on_quantized_records(flash_q4, ids, tmp_path):
    from mlx_flash.calibrate import calibrate

    from .conftest import CORPUS

    path = shutil.copytree(flash_q4, tmp_path / "flash")
    calibrate(path, CORPUS / "fixture-val.txt", tokens=512, seq_len=64, progress=False)
    model, _ = load(path, memory="1GB", mode="predicted")
    assert model.flash.mode == "predicted"
    logits, tokens = _greedy(model, ids)
    assert np.isfinite(logits).all() and len(tokens) == NEW
    assert model.flash.runtime.stats.per_token()["flash_bytes_per_token"] > 0


def test_dequantized_cache_costs_its_float_size_in_the_budget(flash_q4):
    model, _ = load(flash_q4, memory="1GB", mode="oracle", compute="quantized")
    q_bytes = model.flash.budget.neuron_bytes
    model, _ = load(flash_q4, memory="1GB", mode="oracle", compute="dequantized")
    extra = NEURON_BOOKKEEPING  # a cached neuron's id and age
    assert q_bytes == 2 * 80 + 144 + extra
    assert model.flash.budget.neuron_bytes == 3 * 128 * 4 + extra
    with pytest.raises(FlashError, match="unknown compute"):
        load(flash_q4, memory="1GB", mode="oracle", compute="int4")


def test_quantize_4_from_float_shrinks_the_bundles(hf_dir, mlx_q4, ids, reference, exact,
                                                   tmp_path):
    f16 = convert(str(hf_dir), out=tmp_path / "f16", dtype="float16", progress=False)
    q4 = convert(str(hf_dir), out=tmp_path / "q4", dtype="float16", quantize=4, progress=False)
    m16, m4 = fmt.read_manifest(f16), fmt.read_manifest(q4)
    assert m4.quantization == quant.Quantization(4, 64)  # first-hand: the down part at 4 bits too
    data = (m16.ffn_bytes - m16.data_offset, m4.ffn_bytes - m4.data_offset)
    assert data[1] <= 0.35 * data[0] and fmt.info(q4)["padding_fraction"] <= 0.125
    # resident layers quantized as mlx-lm quantizes them (float32 scales, as the reference):
    # the same bytes
    q4 = convert(str(hf_dir), out=tmp_path / "q4-f32", dtype="float32", quantize=4,
                 progress=False)
    ours = mx.load(str(fmt.read_manifest(q4).resident_path))
    theirs = mx.load(str(mlx_q4 / "model.safetensors"))
    for key in ("model.embed_tokens.weight", "model.layers.1.self_attn.o_proj.scales",
                "lm_head.biases"):
        assert mx.array_equal(ours[key], theirs[key]).item(), key
    model, _ = load(q4, memory="1GB", mode="oracle")
    logits, _ = _greedy(model, ids)
    _close_to_mlx_lm(logits[:PROMPT], reference[0][:PROMPT], exact)


def test_bad_quantization_requests_are_one_line_errors(hf_dir, tmp_path):
    with pytest.raises(FlashError, match="choose 4, 8 or 0"):
        convert(str(hf_dir), out=tmp_path / "a", quantize=3, progress=False)
    with pytest.raises(FlashError, match="--group-size 48"):
        convert(str(hf_dir), out=tmp_path / "b", quantize=4, group_size=48, progress=False)
    with pytest.raises(FlashError, match="needs --quantize"):
        convert(str(hf_dir), out=tmp_path / "c", group_size=32, progress=False)
    assert not list(tmp_path.iterdir())  # nothing half-written
