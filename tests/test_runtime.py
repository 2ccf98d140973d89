"""The flash runtime against the dense model: exact in oracle mode, honest in its counters."""

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_flash import platform, runtime
from mlx_flash.convert import convert
from mlx_flash.errors import FlashError
from mlx_flash.loader import load_dense

from .conftest import fixture_path

PROMPT = "The open() function returns a file descriptor. The read() call"
NEW = 64
# Above the largest single-token active set of any layer (521 of 1536 for opt-fixture, 736 of
# 1024 for llama-relu-fixture on this prompt), below what a window of 4 needs in layer 0:
# eviction happens every token.
TINY_CAPACITY = {"opt-fixture": 560, "llama-relu-fixture": 760}


@pytest.fixture(scope="session")
def flash_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flash")
    return {
        name: convert(str(fixture_path(name)), out=str(root / name), dtype="float32",
                      align=4096, progress=False)
        for name in ("opt-fixture", "llama-relu-fixture")
    }


def _greedy_logits(model, tokenizer, n=NEW):
    """Greedy decode step by step through the KV cache; returns (tokens, logits per step)."""
    cache = model.make_cache()
    ids = tokenizer.encode(PROMPT)
    logits = model(mx.array([ids]), cache=cache)[0, -1]
    tokens, steps = [], []
    for _ in range(n):
        mx.eval(logits)
        steps.append(np.array(logits))
        tok = int(mx.argmax(logits))
        tokens.append(tok)
        logits = model(mx.array([[tok]]), cache=cache)[0, -1]
    return tokens, np.stack(steps)


@pytest.mark.parametrize("variant", ["window4", "window1", "tiny-capacity", "overflow",
                                     "lookahead", "lookahead-overflow"])
@pytest.mark.parametrize("name", ["opt-fixture", "llama-relu-fixture"])
def test_oracle_is_exact(flash_dirs, name, variant):
    path = flash_dirs[name]
    dense, tok = load_dense(path)
    kwargs = {"window1": dict(window=1), "tiny-capacity": dict(capacity=TINY_CAPACITY[name]),
              "overflow": dict(capacity=64),  # below one token's active set: streamed past the cache
              "lookahead": dict(lookahead=True),  # records read a layer early, from a guess
              "lookahead-overflow": dict(lookahead=True, capacity=64)}
    flash, _ = runtime.load(path, memory="1GB", mode="oracle", **kwargs.get(variant, {}))
    ref_tokens, ref_logits = _greedy_logits(dense, tok)
    tokens, logits = _greedy_logits(flash, tok)
    assert tokens == ref_tokens
    assert np.abs(logits - ref_logits).max() <= 1e-4
    stats = flash.flash.runtime.stats.per_token()
    assert stats["decode_tokens"] == NEW
    assert 0 < stats["flash_bytes_per_token"] < flash.flash.budget.dense_ffn
    if variant == "tiny-capacity":
        assert stats["evictions_per_token"] >= 1 and stats["overflow_neurons_per_token"] == 0
    elif variant.endswith("overflow"):
        assert stats["overflow_neurons_per_token"] > 0
    if variant.startswith("lookahead"):  # some loads came from the guess, the rest were read
        assert 0 < stats["lookahead_recall"] < 1 and stats["io_wait_ms_per_token"] > 0
    elif variant not in ("tiny-capacity", "overflow"):
        assert stats["evictions_per_token"] == 0


def test_overflow_read_as_whole_runs_is_exact(flash_dirs, monkeypatch):
    """Overflow runs read whole (the wanted neurons masked in) give the dense model's logits;
    the gaps are read too, so more bytes than reading the wanted records alone."""
    from mlx_flash import ffn_shared

    path = flash_dirs["llama-relu-fixture"]
    dense, tok = load_dense(path)
    ref_tokens, ref_logits = _greedy_logits(dense, tok, n=16)
    per_token = {}
    for density in (2.0, 0.0):  # never bridged; always bridged where a run has a gap
        monkeypatch.setattr(ffn_shared, "BRIDGE_DENSITY", density)
        flash, _ = runtime.load(path, memory="1GB", mode="oracle", capacity=64)
        tokens, logits = _greedy_logits(flash, tok, n=16)
        assert tokens == ref_tokens
        assert np.abs(logits - ref_logits).max() <= 1e-4
        per_token[density] = flash.flash.runtime.stats.per_token()["flash_bytes_per_token"]
    assert per_token[0.0] > per_token[2.0]


def test_bridge_cuts_sorted_ids_into_masked_runs():
    from mlx_flash.ffn import _bridge

    ids = np.array([0, 1, 3, 4, 5, 7, 20, 40, 41, 42, 43])
    pieces, keeps = _bridge(ids, 8)
    # [0, 8): 6 of 8 wanted -> read whole; 20 and 40-43 too sparse together -> read as they are
    assert [p.tolist() for p in pieces] == [list(range(8)), [20, 40, 41, 42, 43]]
    assert np.array(keeps[0]).tolist() == [[1, 1, 0, 1, 1, 1, 0, 1]] and keeps[1] is None
    wanted = np.concatenate([p[np.array(k)[0] > 0] if k is not None else p
                             for p, k in zip(pieces, keeps, strict=True)])
    assert wanted.tolist() == ids.tolist()


def test_fresh_loads_shrink_with_the_window(flash_dirs):
    """Windowing must cut reads: k=4 reads fewer bytes per token than k=1 (DESIGN.md table)."""
    path = flash_dirs["opt-fixture"]
    per_token = {}
    for k in (1, 4):
        model, tok = runtime.load(path, memory="1GB", mode="oracle", window=k)
        _greedy_logits(model, tok, n=32)
        per_token[k] = model.flash.runtime.stats.per_token()["flash_bytes_per_token"]
    assert per_token[4] < 0.8 * per_token[1]


def test_naive_reads_the_whole_ffn_every_token(flash_dirs):
    path = flash_dirs["opt-fixture"]
    model, tok = runtime.load(path, memory="1GB", mode="naive")
    dense, _ = load_dense(path)
    assert _greedy_logits(model, tok, n=8)[0] == _greedy_logits(dense, tok, n=8)[0]
    layer_bytes = model.flash.runtime.manifest.layer_bytes
    assert model.flash.runtime.stats.per_token()["flash_bytes_per_token"] == 6 * layer_bytes


def test_reader_bytes_equal_os_read_bytes(flash_dirs):
    path = flash_dirs["llama-relu-fixture"]
    model, tok = runtime.load(path, memory="1GB", mode="oracle", lookahead=True)
    if not model.flash.runtime.reader.direct or platform.process_read_bytes() is None:
        pytest.skip("needs O_DIRECT and /proc/self/io")
    assert platform.evict_from_page_cache(path / "ffn.bundles")
    rt = model.flash.runtime
    assert rt.lookahead is not None  # its reader counts too
    readers = [rt.reader, rt.lookahead.reader]
    before_os, before = platform.process_read_bytes(), [r.snapshot() for r in readers]
    counters = model.flash.counters()
    _greedy_logits(model, tok, n=16)
    read_os = platform.process_read_bytes() - before_os
    read = [r.delta(b).bytes for r, b in zip(readers, before, strict=True)]
    assert read_os == sum(read) and min(read) > 0
    s = rt.stats.since(counters)
    assert s.io.bytes + s.prefill_io.bytes == sum(read)  # what --json reports


def test_auto_mode_loads_dense_when_the_model_fits(flash_dirs):
    model, _ = runtime.load(flash_dirs["opt-fixture"], memory="1GB")
    assert model.flash.mode == "dense"
    model, _ = runtime.load(flash_dirs["opt-fixture"], memory="55MB")
    assert model.flash.mode != "dense" and 0 < model.flash.capacity < 1536


def test_budget_too_small_says_what_is_needed(flash_dirs):
    with pytest.raises(FlashError, match=r"too small: resident weights need .* give at least"):
        runtime.load(flash_dirs["opt-fixture"], memory="10MB", mode="oracle")


def test_read_error_surfaces_clearly(flash_dirs, tmp_path):
    import shutil

    path = shutil.copytree(flash_dirs["opt-fixture"], tmp_path / "m")
    model, tok = runtime.load(path, memory="1GB", mode="oracle")
    with open(path / "ffn.bundles", "r+b") as f:  # truncated after load
        f.truncate(4096 * 10)
    with pytest.raises(FlashError, match="ffn.bundles"):
        _greedy_logits(model, tok, n=4)


PEAK_RSS_SCRIPT = r"""
import json, sys
import mlx.core as mx
from mlx_flash import platform, runtime
from mlx_flash.loader import load_tokenizer
model, tok = runtime.load(sys.argv[1], memory="90%model", mode="oracle", max_context=256)
base = model.flash.base_rss_bytes  # the libraries, tokenizer and model code: not the budget's
cache = model.make_cache()
logits = model(mx.array([tok.encode("The open() function returns")]), cache=cache)
for _ in range(48):
    logits = model(mx.argmax(logits[:, -1:], axis=-1), cache=cache)
    mx.eval(logits)
oracle = sum(a.nbytes for m in model.layers for a in m.mlp._oracle if a is not None)
print(json.dumps({"base": base, "peak": platform.peak_rss_bytes(), "oracle": oracle,
                  "budget": model.flash.budget.as_dict(model.flash.mode), "stats": model.flash.runtime.stats.per_token()}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="RSS accounting checked on Linux")
def test_peak_rss_within_budget(tmp_path):
    """A model whose FFN dominates (like a 7B), random weights with planted ~3% activity."""
    from tools.make_synthetic import make_synthetic_opt

    src = make_synthetic_opt(tmp_path / "hf", d_model=1024, ffn_dim=8192, layers=2, vocab=512)
    path = convert(str(src), out=str(tmp_path / "flash"), dtype="float16", align=4096, progress=False)
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(path)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    used = r["peak"] - r["base"]
    assert r["budget"]["other"] == r["oracle"]  # the oracle's input projections are the budget's
    assert used <= r["budget"]["total"] * 1.05, r


def test_layer_capacities_follow_the_active_fractions():
    from mlx_flash.runtime import layer_capacities

    caps = layer_capacities(100, [0.5, 0.1, 0.1, 0.2], ffn_dim=1000)
    assert caps == [222, 44, 44, 88] and sum(caps) <= 400
    # a layer's share past its FFN goes to the others
    caps = layer_capacities(600, [0.9, 0.1, 0.1], ffn_dim=1000)
    assert caps[0] == 1000 and caps[1] == caps[2] == 400
    assert layer_capacities(1, [1.0, 0.001], ffn_dim=10) == [1, 1]
