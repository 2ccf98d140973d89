"""ReLU-fied checkpoints (issue 27): ProSparse-style FATReLU Llamas and Bamboo/TurboSparse-Mistral
dReLU, each a tiny random checkpoint written by transformers, against PyTorch running the
reference MLP of the family (no transformers class has them):

- FATReLU, `down(fatrelu_t(gate(x)) * up(x))`: transformers' Llama with each MLP's activation
  replaced by vLLM's `FatreluAndMul` (`F.threshold(x, t, 0.0)` on the gate half). The config
  names it as MiniCPM-S does for vLLM (`hidden_act` "fatrelu", `hidden_act_param` t) or as the
  ProSparse authors' code does ("fatrelu_<t>").
- dReLU, `down(relu(gate(x)) * relu(up(x)))`: transformers' Mistral with each MLP's forward
  replaced by `BambooMLP.forward` of the Bamboo model card; the checkpoint carries predictor
  tensors under TurboSparse-Mistral's names (`mlp.predictor.fc1/fc2`), which convert leaves out.

Dense and flash (the exact oracle, which reads only the neurons past the gate's cut) must give
PyTorch's logits and greedy tokens.
"""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from mlx_flash import format as fmt
from mlx_flash.convert import convert
from mlx_flash.errors import FlashError
from mlx_flash.loader import load_model
from mlx_flash.runtime import load

from .conftest import fixture_path
from .test_models import COMMON, PROMPT, TOL, VOCAB, _greedy, _reference_greedy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
F = torch.nn.functional

T = 0.3  # the FATReLU threshold: gates here are ~N(0, 1.6), so it cuts a fifth of the positive


def _fatrelu(mlp):
    return lambda x: mlp.down_proj(F.threshold(mlp.gate_proj(x), T, 0.0) * mlp.up_proj(x))


def _drelu(mlp):
    return lambda x: mlp.down_proj(F.relu(mlp.gate_proj(x)) * F.relu(mlp.up_proj(x)))


# case -> (transformers model_type, our config.json edits, the reference MLP forward)
CASES = {
    "fatrelu-param": ("llama", dict(hidden_act="fatrelu", hidden_act_param=T), _fatrelu),
    "fatrelu-name": ("llama", dict(hidden_act=f"fatrelu_{T}"), _fatrelu),
    "bamboo": ("mistral", dict(model_type="bamboo", architectures=["BambooForCausalLM"],
                               hidden_act="relu"), _drelu),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(checkpoint dir, prompt ids, PyTorch's logits, its tokens, the plain-ReLU logits)."""
    model_type, edits, forward = CASES[request.param]
    config = transformers.AutoConfig.for_model(model_type, **{**COMMON, "hidden_act": "relu",
                                                              "tie_word_embeddings": False})
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.2 if p.dim() > 1 else p + torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp(request.param) / "hf"
    ref.save_pretrained(path)
    ids = np.random.default_rng(0).integers(4, VOCAB, PROMPT).tolist()
    relu_logits, _ = _reference_greedy(ref, ids)  # transformers' own MLP: down(relu(g) * u)
    for layer in ref.model.layers:
        layer.mlp.forward = forward(layer.mlp)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, **edits}))
    if request.param == "bamboo":  # TurboSparse-Mistral's own predictors ride along
        from safetensors.torch import load_file, save_file

        file = path / "model.safetensors"
        tensors = load_file(file)
        for i in range(COMMON["num_hidden_layers"]):
            tensors[f"model.layers.{i}.mlp.predictor.fc1.weight"] = torch.randn(16, 64)
            tensors[f"model.layers.{i}.mlp.predictor.fc2.weight"] = torch.randn(128, 16)
        save_file(tensors, file, metadata={"format": "pt"})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(fixture_path("llama-relu-fixture") / name, path / name)
    return (path, ids, *_reference_greedy(ref, ids), relu_logits)


def _check(model, case):
    _, ids, ref_logits, ref_tokens, relu_logits = case
    logits, tokens = _greedy(model, ids)
    assert np.abs(logits - ref_logits).max() <= TOL and tokens == ref_tokens
    # the family's activation matters here: plain ReLU's logits are far from these
    assert np.abs(relu_logits[:PROMPT] - ref_logits[:PROMPT]).max() > 100 * TOL


def test_dense_matches_the_reference(case):
    _check(load_model(case[0]), case)


def test_flash_oracle_reads_only_past_the_cut(case, tmp_path):
    """The converted dir (no predictor tensors) through the exact oracle: the reference's
    logits, every token computing only the neurons whose gate passes the activation's cut."""
    path = convert(str(case[0]), out=tmp_path / "flash", dtype="float32", align=4096,
                   progress=False)
    names = mx.load(str(fmt.read_manifest(path).resident_path))
    assert names and not [n for n in names if "predictor" in n]
    model, _ = load(path, memory="1GB", mode="oracle", window=1)
    assert model.flash.mode == "oracle"
    _check(model, case)
    s = model.flash.runtime.stats
    m = fmt.read_manifest(path)
    share = s.computed / (s.tokens * m.num_layers * m.ffn_dim)
    # random gates are ~N(0, 1.6): ReLU keeps half; FATReLU at 0.3 about 43%
    assert 0.2 < share < (0.47 if "fatrelu" in str(case[0]) else 0.55), share


def test_bad_threshold_is_one_line(tmp_path, case):
    path = shutil.copytree(case[0], tmp_path / "hf")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "hidden_act": "fatrelu_abc"}))
    with pytest.raises((FlashError, ValueError), match="fatrelu_<threshold>"):
        load_model(path)



def test_fatrelu_only_where_its_threshold_is_read():
    """A model file that does not read `hidden_act_param` refuses FATReLU instead of running it
    at threshold 0; the oracle reads a neuron from 1% below the threshold (rounding margin)."""
    from mlx_flash import activations
    from mlx_flash.models import qwen2

    args = dict(model_type="qwen2", hidden_size=64, num_hidden_layers=1, intermediate_size=128,
                num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                vocab_size=512, hidden_act="fatrelu")
    with pytest.raises(ValueError, match="Llama checkpoints only"):
        qwen2.ModelArgs.from_dict(args)
    assert activations.oracle_cut("fatrelu_0.01") == pytest.approx(0.0099)
    assert activations.oracle_cut("relu") == 0.0
