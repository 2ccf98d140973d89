"""Every gated model type against transformers (PyTorch CPU, fp32), dense and flash.

One tiny random checkpoint per case, written by transformers with the fixture's tokenizer. Our
logits over a prompt and then a greedy decode through the KV cache must match PyTorch's, dense and
from the converted flash dir (dense, naive, and predicted with predictors that mark every neuron).
Each config turns on what its type adds: rope variants, head_dim != hidden/heads, GQA, tied and
untied heads, biases, norms, sliding windows shorter than the decode. A multimodal case (gemma3)
nests the text model's config under `text_config` beside a vision tower that convert leaves out.
"""

import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from mlx_flash import format as fmt
from mlx_flash.bench.mmap import _mapped_model
from mlx_flash.bench.worker import _decode
from mlx_flash.calibrate import calibrate
from mlx_flash.convert import convert
from mlx_flash.loader import load_model
from mlx_flash.runtime import load

from .conftest import CORPUS, fixture_path

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT, NEW, TOL = 24, 16, 1e-3
WINDOW = 8  # sliding windows shorter than the prompt, so prefill and decode both slide
VOCAB = 8192  # the fixture tokenizer's
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)

GEMMA3_TEXT = dict(
    head_dim=32, query_pre_attn_scalar=24, tie_word_embeddings=True, sliding_window=WINDOW,
    layer_types=["sliding_attention", "full_attention"], rope_parameters=dict(
        full_attention=dict(rope_type="linear", factor=2.0, rope_theta=1e6),
        sliding_attention=dict(rope_type="default", rope_theta=1e4)))
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
              image_size=28, patch_size=14)

# case -> (model_type, config overrides; a `text_config` one holds COMMON itself)
CASES = {
    "llama3-rope": ("llama", dict(tie_word_embeddings=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=32))),
    "qwen3": ("qwen3", dict(head_dim=32, tie_word_embeddings=True,
                            rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    "qwen2": ("qwen2", dict(tie_word_embeddings=False,  # q/k/v biases, randomised
                            rope_parameters=dict(rope_type="default", rope_theta=5e4))),
    "mistral": ("mistral", dict(head_dim=32, sliding_window=WINDOW, tie_word_embeddings=False)),
    "gemma3_text": ("gemma3_text", GEMMA3_TEXT),
    "gemma3": ("gemma3", dict(text_config={**COMMON, **GEMMA3_TEXT}, vision_config=VISION,
                              mm_tokens_per_image=4)),
    "phi3": ("phi3", dict(tie_word_embeddings=False, sliding_window=WINDOW, rope_parameters=dict(
        rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5))),  # fused gate_up_proj
    "olmo2": ("olmo2", dict(tie_word_embeddings=True,  # q/k norms, randomised
                            rope_parameters=dict(rope_type="default", rope_theta=5e5))),
}


def _reference_greedy(ref, ids):
    """PyTorch's logits (PROMPT + NEW - 1, vocab) and NEW greedy tokens, through its cache."""
    with torch.no_grad():
        out = ref(torch.tensor([ids]), use_cache=True)
        logits, tokens = [out.logits[0]], [int(out.logits[0, -1].argmax())]
        for _ in range(NEW - 1):
            out = ref(torch.tensor([tokens[-1:]]), cache=out.cache, use_cache=True)
            logits.append(out.logits[0])
            tokens.append(int(out.logits[0, -1].argmax()))
    return torch.cat(logits).numpy(), tokens


def _greedy(model, ids):
    """The same through our model and mlx-lm's prompt cache."""
    cache = make_prompt_cache(model)
    out = model(mx.array([ids]), cache=cache)[0]
    logits, tokens = [np.array(out)], [int(mx.argmax(out[-1]))]
    for _ in range(NEW - 1):
        out = model(mx.array([tokens[-1:]]), cache=cache)[0]
        logits.append(np.array(out))
        tokens.append(int(mx.argmax(out[-1])))
    return np.concatenate(logits), tokens


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(checkpoint dir, prompt ids, PyTorch's logits, PyTorch's tokens)."""
    model_type, overrides = CASES[request.param]
    config = transformers.AutoConfig.for_model(
        model_type, **(overrides if "text_config" in overrides else {**COMMON, **overrides}))
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # spread the logits (no near-ties); norms and biases off their init
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.2 if p.dim() > 1 else p + torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp(request.param) / "hf"
    ref.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(fixture_path("llama-relu-fixture") / name, path / name)
    ids = np.random.default_rng(0).integers(4, VOCAB, PROMPT).tolist()
    return (path, ids, *_reference_greedy(ref, ids))


@pytest.fixture(scope="module")
def flash_dir(case):
    """The case converted, with predictors that mark every neuron (A, B zero, bias +10)."""
    path = convert(str(case[0]), out=case[0].parent / "flash", dtype="float32", align=4096,
                   progress=False)
    m = fmt.read_manifest(path)
    tensors = {}
    for i in range(m.num_layers):
        tensors[f"layers.{i}.A"] = mx.zeros((1, m.d_model), m.mx_dtype)
        tensors[f"layers.{i}.B"] = mx.zeros((m.ffn_dim, 1), m.mx_dtype)
        tensors[f"layers.{i}.bias"] = mx.full((m.ffn_dim,), 10.0, m.mx_dtype)
        tensors[f"layers.{i}.threshold"] = mx.array([0.5], mx.float32)
    mx.save_safetensors(str(path / "predictors.safetensors"), tensors)
    return path


def _check(model, case):
    _, ids, ref_logits, ref_tokens = case
    logits, tokens = _greedy(model, ids)
    diff = float(np.abs(logits - ref_logits).max())
    print(f"max |logit diff| {diff:.2e}")
    assert diff <= TOL
    assert tokens == ref_tokens


def test_dense_matches_transformers(case):
    model = load_model(case[0])
    _check(model, case)
    full = np.array(model(mx.array([case[1]]))[0])  # no cache: the masks are built without one
    assert np.abs(full - case[2][:PROMPT]).max() <= TOL


@pytest.mark.parametrize("mode", ["dense", "naive", "predicted"])
def test_flash_matches_transformers(flash_dir, case, mode):
    model, _ = load(flash_dir, memory="1GB", mode=mode)
    assert model.flash.mode == mode
    _check(model, case)


def test_calibrate_drives_the_blocks(flash_dir, tmp_path):
    """Calibration runs each type's own blocks (masks, caches, sliding windows) layer by layer."""
    path = shutil.copytree(flash_dir, tmp_path / "flash")
    (path / "predictors.safetensors").unlink()
    calibrate(path, CORPUS / "fixture-val.txt", tokens=1024, seq_len=64, progress=False)
    model, _ = load(path, memory="1GB", mode="predicted")
    assert len(model.flash.runtime.layers) == len(model.layers)


def test_mmap_baseline_computes_the_dense_model(case):
    """The bench's mmap baseline runs on every type (phi3's fused gate_up_proj is mapped as two
    views): the dense model's logits through the KV cache, and the bench worker's decode loop."""
    path, ids = case[0], case[1]
    mapped, tokenizer, counters = _mapped_model(path)
    logits, tokens = _greedy(mapped, ids)
    want_logits, want_tokens = _greedy(load_model(path), ids)
    assert np.array_equal(logits, want_logits) and tokens == want_tokens
    assert counters.seconds > 0
    assert len(_decode(mapped, tokenizer, "The open() function", 2, "mmap")[1]) == 2


def test_flash_dir_holds_the_text_model_only(flash_dir):
    """A multimodal checkpoint's vision tower and projector stay out of the flash dir."""
    names = mx.load(str(fmt.read_manifest(flash_dir).resident_path))
    assert names and not [n for n in names if "vision_tower" in n or "multi_modal" in n]
