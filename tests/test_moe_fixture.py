"""The trained Qwen3-MoE fixture shipped in models/qwen3-moe-fixture (tools/train_moe_fixture.py):
it loads in transformers and, converted by mlx-lm, in mlx-lm with the same logits; its experts
streamed from mlx-lm's 4-bit dir by `direct.load` with a small cache give mlx-lm's greedy tokens;
and its routing was learned: consecutive tokens of real text reuse experts far more often than
a uniform router's 4/32, and an LRU of half the experts hits far more than half the time."""

import json
from collections import OrderedDict

import mlx.core as mx
import numpy as np
import pytest

from mlx_flash import direct

from .conftest import CORPUS, ROOT

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

FIXTURE = ROOT / "models" / "qwen3-moe-fixture"
EXPERTS, TOP_K, LAYERS = 32, 4, 4
PROMPT, NEW = 48, 24
TOL = 1e-3


def _val_ids(n: int, offset: int = 0) -> list[int]:
    from tokenizers import Tokenizer

    text = (CORPUS / "fixture-val.txt").read_text()[offset : offset + 16 * n]
    ids = Tokenizer.from_file(str(FIXTURE / "tokenizer.json")).encode(text).ids
    assert len(ids) >= n
    return ids[:n]


@pytest.fixture(scope="module")
def mlx_dirs(tmp_path_factory):
    """(float32 dir, 4-bit group-64 dir), both converted by mlx-lm's own `convert`."""
    from mlx_lm import convert

    root = tmp_path_factory.mktemp("qwen3-moe-fixture")
    convert(str(FIXTURE), str(root / "f32"), dtype="float32")
    convert(str(FIXTURE), str(root / "q4"), quantize=True, q_bits=4, q_group_size=64)
    return root / "f32", root / "q4"


def _greedy(model, ids: list[int], new: int = NEW) -> list[int]:
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    out = model(mx.array([ids]), cache=cache)[0, -1]
    tokens = [int(mx.argmax(out))]
    for _ in range(new - 1):
        tokens.append(int(mx.argmax(model(mx.array([tokens[-1:]]), cache=cache)[0, -1])))
    return tokens


def test_the_fixture_loads_in_transformers_with_its_reported_perplexity():
    config = json.loads((FIXTURE / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["num_experts"] == EXPERTS
    assert config["num_experts_per_tok"] == TOP_K and config["num_hidden_layers"] == LAYERS
    report = json.loads((FIXTURE / "training_report.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(FIXTURE)
    ids = _val_ids(256, offset=5000)
    text = (CORPUS / "fixture-val.txt").read_text()[5000 : 5000 + 16 * 256]
    assert tok.bos_token is None and tok("The open()").input_ids[0] not in (0, 2)  # no BOS
    assert tok(text).input_ids[:256] == ids
    model = transformers.AutoModelForCausalLM.from_pretrained(FIXTURE, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))
    ppl = float(torch.exp(nll))
    print(f"perplexity {ppl:.2f} on one window, {report['val_ppl']} on all of fixture-val")
    assert ppl < 1.5 * report["val_ppl"]


def test_mlx_lm_reads_the_fixture_as_transformers_does(mlx_dirs):
    from mlx_lm import load

    ids = _val_ids(64)
    ref = transformers.AutoModelForCausalLM.from_pretrained(FIXTURE, dtype=torch.float32)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    model, _ = load(str(mlx_dirs[0]))
    got = np.array(model(mx.array([ids]))[0].astype(mx.float32))
    diff = float(np.abs(got - want).max())
    print(f"max |logit diff| {diff:.2e}")
    assert diff <= TOL * max(1.0, float(np.abs(want).max()))


def test_streamed_experts_give_mlx_lm_tokens(mlx_dirs):
    from mlx_lm import load

    ids = _val_ids(PROMPT, offset=20000)
    want = _greedy(load(str(mlx_dirs[1]))[0], ids)
    model, _ = direct.load(mlx_dirs[1], memory="1GB", capacity=TOP_K + 2, max_context=128)
    assert model.flash.mode == "routed" and model.flash.capacity == TOP_K + 2
    assert _greedy(model, ids) == want
    stats = model.flash.stats()
    assert stats["evictions_per_token"] > 0 and 0 < stats["cache_hit_rate"] < 1
    model.flash.runtime.close()


def _routing(model, ids: list[int]) -> list[np.ndarray]:
    """Each layer's top-k experts per token of `ids`: (tokens, k) per layer."""
    traces = []

    class Recorder:
        def __init__(self, gate):
            self.gate = gate

        def __call__(self, x):
            logits = self.gate(x)
            flat = np.array(logits.astype(mx.float32)).reshape(-1, EXPERTS)
            traces.append(np.argpartition(-flat, TOP_K - 1, axis=-1)[:, :TOP_K])
            return logits

    for layer in model.model.layers:
        layer.mlp.gate = Recorder(layer.mlp.gate)
    mx.eval(model(mx.array([ids])))
    return traces


def _lru_hit_rate(trace: np.ndarray, slots: int) -> float:
    cache, hits = OrderedDict(), 0
    for row in trace.tolist():
        hits += sum(e in cache for e in row)
        for e in row:
            cache[e] = True
            cache.move_to_end(e)
            if len(cache) > slots:
                cache.popitem(last=False)
    return hits / trace.size


def test_the_routing_is_learned_not_uniform(mlx_dirs):
    from mlx_lm import load

    model, _ = load(str(mlx_dirs[0]))
    traces = _routing(model, _val_ids(256, offset=40000))
    assert len(traces) == LAYERS
    chance = TOP_K / EXPERTS
    for layer, t in enumerate(traces):
        reuse = np.mean([len(np.intersect1d(a, b)) / TOP_K for a, b in zip(t[1:], t[:-1],
                                                                           strict=True)])
        hits = _lru_hit_rate(t, EXPERTS // 2)
        used = np.bincount(t.reshape(-1), minlength=EXPERTS)
        print(f"layer {layer}: reuse {reuse:.3f} (chance {chance:.3f}), LRU of half the "
              f"experts hits {hits:.1%}, experts used {np.count_nonzero(used)}")
        assert reuse > 2 * chance  # a random router: 0.125
        assert hits > 0.6  # a random router: ~0.5
        assert np.count_nonzero(used) >= EXPERTS // 2  # not collapsed onto a few experts
