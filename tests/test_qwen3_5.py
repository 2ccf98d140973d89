"""Dense Qwen3.5 against transformers (PyTorch CPU, fp32), dense and streamed from a flash dir.

Gated-DeltaNet linear-attention layers (a convolution and a recurrent state in place of a KV
cache) beside gated full attention. Two tiny random checkpoints written by transformers: the
text model alone (`qwen3_5_text`, a tied head) and the Hub's multimodal form (`qwen3_5`: the text
config under `text_config`, the text model under `model.language_model.` beside a vision tower
and a multi-token-prediction head, which convert leaves out). Logits over a prompt and a greedy
decode through the KV caches and the linear-attention state must match PyTorch's, from the
checkpoint and from the converted flash dir under a budget below the model's size (exact path,
FFN neurons read per token) and in dense mode.
"""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from mlx_flash import format as fmt
from mlx_flash import training
from mlx_flash.bench.mmap import _mapped_model
from mlx_flash.calibrate import calibrate
from mlx_flash.convert import convert
from mlx_flash.distributed import Stage
from mlx_flash.errors import FlashError
from mlx_flash.generation import generate, new_cache
from mlx_flash.loader import load_model
from mlx_flash.runtime import load

from .conftest import CORPUS, fixture_path
from .test_models import COMMON, NEW, PROMPT, TOL, VOCAB, _check, _reference_greedy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LINEAR = dict(linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
              linear_value_head_dim=16, linear_conv_kernel_dim=4)
TEXT = dict(COMMON, **LINEAR, num_hidden_layers=4, head_dim=16, intermediate_size=512,
            layer_types=["linear_attention", "full_attention"] * 2,
            rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5))
VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
CASES = {
    "qwen3_5_text": dict(TEXT, tie_word_embeddings=True),
    "qwen3_5": dict(text_config=TEXT, vision_config=VISION, tie_word_embeddings=False),
}
MAX_CONTEXT = 64


def _checkpoint(model_type: str, path):
    """A tiny random transformers model saved to `path` (weights off their init)."""
    config = transformers.AutoConfig.for_model(model_type, **CASES[model_type])
    auto = (transformers.AutoModelForImageTextToText if model_type == "qwen3_5"  # the Hub's class
            else transformers.AutoModelForCausalLM)
    torch.manual_seed(0)
    ref = auto.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # spread the logits (no near-ties); norms off their init
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.2 if p.dim() > 1 else p + torch.randn_like(p) * 0.1)
    ref.save_pretrained(path)
    if model_type == "qwen3_5":  # the Hub's checkpoints also hold the multi-token-prediction head
        weights = mx.load(str(path / "model.safetensors"))
        weights["mtp.fc.weight"] = mx.zeros((64, 128))
        mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(fixture_path("llama-relu-fixture") / name, path / name)
    return ref


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(checkpoint dir, prompt ids, PyTorch's logits, PyTorch's tokens)."""
    path = tmp_path_factory.mktemp(request.param) / "hf"
    ref = _checkpoint(request.param, path)
    ids = np.random.default_rng(0).integers(4, VOCAB, PROMPT).tolist()
    return (path, ids, *_reference_greedy(ref, ids))


@pytest.fixture(scope="module")
def flash_dir(case):
    return convert(str(case[0]), out=case[0].parent / "flash", dtype="float32", align=4096,
                   progress=False)


def test_dense_matches_transformers(case):
    model = load_model(case[0])
    _check(model, case)
    full = np.array(model(mx.array([case[1]]))[0])  # no cache: the masks are built without one
    assert np.abs(full - case[2][:PROMPT]).max() <= TOL


@pytest.mark.parametrize("mode", ["oracle", "naive", "dense"])
def test_flash_below_the_model_size_matches_transformers(flash_dir, case, mode):
    m = fmt.read_manifest(flash_dir)
    model, tokenizer = load(flash_dir, memory="90%model", mode=mode, max_context=MAX_CONTEXT)
    assert model.flash.mode == mode and model.flash.budget.total < model.flash.budget.model
    _check(model, case)
    if mode != "dense":  # every neuron computed, the ones the caches do not hold read
        assert model.flash.capacity < m.ffn_dim
        assert model.flash.stats()["flash_bytes_per_token"] > 0
    # mlx-lm's generation loop (the CLI's) over the same caches
    assert generate(model, tokenizer, case[1], max_tokens=NEW)["tokens"] == case[3]


def test_budget_counts_the_linear_state(flash_dir, case):
    """Full-attention layers hold keys and values per token, linear ones a fixed state: the
    budget reserves exactly what the caches hold once the context is full."""
    model, _ = load(flash_dir, memory="90%model", mode="oracle", max_context=MAX_CONTEXT)
    cache = new_cache(model)
    model(mx.array([case[1]]), cache=cache)
    for _ in range(MAX_CONTEXT - PROMPT):
        model(mx.array([[5]]), cache=cache)
    mx.eval([c.state for c in cache])
    kinds = {type(c).__name__ for c in cache}
    assert kinds == {"ArraysCache", "KVCache"}
    assert sum(c.nbytes for c in cache) == model.flash.budget.kv_cache


def test_calibrate_drives_the_blocks(flash_dir, tmp_path, monkeypatch):
    """Calibration runs the linear-attention and full-attention blocks layer by layer (the
    predictors' training cut short: their quality is not what this tests)."""
    monkeypatch.setattr(training, "MIN_TRAIN_STEPS", 5)
    path = shutil.copytree(flash_dir, tmp_path / "flash")
    calibrate(path, CORPUS / "fixture-val.txt", tokens=1024, seq_len=64, holdout=None,
              progress=False)
    model, _ = load(path, memory="1GB", mode="predicted")
    assert len(model.flash.runtime.layers) == len(model.layers)
    assert len(model(mx.array([[5, 6, 7]]), cache=new_cache(model))[0]) == 3


def test_flash_dir_holds_the_text_model_only(flash_dir):
    names = mx.load(str(fmt.read_manifest(flash_dir).resident_path))
    assert names and not [n for n in names if n.startswith(("model.visual.", "mtp."))]


def test_mmap_baseline_is_refused(case):
    """The bench's mmap baseline maps tensors as stored; Qwen3.5's are converted on load."""
    with pytest.raises(FlashError, match="leave mmap out"):
        _mapped_model(case[0])


def test_pipelined_stage_is_refused(flash_dir):
    with pytest.raises(FlashError, match="linear-attention layers keep a recurrent state"):
        load(flash_dir, memory="1GB", stage=Stage(0, 2, range(0, 2), 0))


def test_experts_are_refused(case, tmp_path):
    """A Qwen3.5 config with routed experts: one line pointing at mlx-lm's dirs."""
    src = shutil.copytree(case[0], tmp_path / "hf")
    config = json.loads((src / "config.json").read_text())
    text = config.get("text_config", config)
    text.update(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)
    (src / "config.json").write_text(json.dumps(config))
    for action in (lambda: convert(str(src), out=tmp_path / "flash", progress=False),
                   lambda: load_model(src)):
        with pytest.raises(FlashError, match="mlx_lm convert"):
            action()


def test_a_kept_cache_is_reused_where_the_prompt_extends_it(case):
    """The server's prompt caches on a hybrid model: the linear-attention state cannot be cut
    back, so a kept cache is reused only by a prompt that extends every token it holds; then
    the reply equals a fresh prefill's."""
    from mlx_flash import load as load_any
    from mlx_flash.generation import stream_generate
    from mlx_flash.promptcache import PromptCaches

    def reply(model, tok, ids, cache=None):
        return [r.token for r in stream_generate(model, tok, ids, max_tokens=4,
                                                 prompt_cache=cache)]

    path, ids = case[0], case[1]
    model, tok = load_any(path)
    caches = PromptCaches(model, 1)
    entry, keep = caches.take(ids)
    assert keep == 0
    caches.give(entry, ids + reply(model, tok, ids, entry.cache))
    held = caches.entries[0].tokens
    assert len(held) > len(ids)
    longer = held + [5, 6, 7]
    entry, keep = caches.take(longer)
    assert keep == len(held)
    reused = reply(model, tok, longer[keep:], entry.cache)
    assert reused == reply(model, tok, longer)
    caches.give(entry, longer + reused)
    entry, keep = caches.take(ids[:-1] + [9, 10])
    assert keep == 0 and entry.tokens == [] and all(
        getattr(c, "offset", 0) == 0 for c in entry.cache)
