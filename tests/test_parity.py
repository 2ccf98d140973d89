"""Our MLX models against transformers (PyTorch CPU, fp32) on the same weights.

Real fixtures plus random tiny checkpoints written by transformers for the shapes the fixtures do
not cover: OPT-350m style (post-LN, project_in/out) and Llama SiLU with GQA, untied head and rope
scaling. Each also as a PyTorch `.bin`, read without torch.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step

from mlx_flash.loader import load_model

from .conftest import CORPUS, fixture_path

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SEQ = 64
NEW = 32


def _reference(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def _ids_from_corpus(path, n=SEQ):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    text = (CORPUS / "fixture-val.txt").read_text()[:4000]
    ids = tok(text)["input_ids"][:n]
    assert len(ids) == n
    return ids


def _check_parity(path, ids):
    ref = _reference(path)
    ours = load_model(path, dtype="float32")

    with torch.no_grad():
        ref_logits = ref(torch.tensor([ids])).logits[0].numpy()
    our_logits = np.array(ours(mx.array([ids]))[0])
    assert np.abs(ref_logits - our_logits).max() <= 1e-3

    prompt = ids[:16]
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            pad_token_id=0,
        )
    ref_tokens = out[0, len(prompt) :].tolist()
    our_tokens = [int(t) for t, _ in generate_step(mx.array(prompt), ours, max_tokens=NEW)]
    assert our_tokens == ref_tokens


@pytest.mark.parametrize("name", ["opt-fixture", "llama-relu-fixture"])
def test_fixture_parity(name):
    path = fixture_path(name)
    _check_parity(path, _ids_from_corpus(path))


def _random_checkpoint(tmp_path, config, bin_format):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # spread the logits so greedy decoding has no near-ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    model.save_pretrained(tmp_path)
    if bin_format:
        for f in tmp_path.glob("*.safetensors"):
            f.unlink()
        torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    return tmp_path


def _opt350m_style():
    return transformers.OPTConfig(
        vocab_size=512,
        hidden_size=64,
        word_embed_proj_dim=32,
        ffn_dim=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=128,
        do_layer_norm_before=False,
        activation_function="relu",
        enable_bias=True,
    )


def _llama_silu_gqa():
    return transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        tie_word_embeddings=False,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0},
    )


@pytest.mark.parametrize("bin_format", [False, True], ids=["safetensors", "bin"])
@pytest.mark.parametrize(
    "make_config", [_opt350m_style, _llama_silu_gqa], ids=["opt350m", "llama-silu-gqa"]
)
def test_random_checkpoint_parity(tmp_path, make_config, bin_format):
    path = _random_checkpoint(tmp_path, make_config(), bin_format)
    assert any(path.glob("*.bin")) == bin_format
    rng = np.random.default_rng(0)
    _check_parity(path, rng.integers(4, 512, SEQ).tolist())


def test_fixture_bin_parity(tmp_path):
    src = fixture_path("opt-fixture")
    model = _reference(src)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    config = json.loads((src / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    _check_parity(tmp_path, _ids_from_corpus(src))
