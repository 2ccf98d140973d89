"""`mlx-flash bench`: strategies on real sparsity (opt-fixture), the synthetic model, baselines."""

import gc
import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_flash import bench, platform, profiles, runtime
from mlx_flash import format as fmt
from mlx_flash.bench.mmap import _mapped_model
from mlx_flash.convert import convert
from mlx_flash.loader import load_dense
from mlx_flash.storage import FlashReader, aligned_empty
from tools.synthetic_flash import write_synthetic_flash

from .conftest import ROOT, fixture_path

PROMPT = "The open() function returns a file descriptor."
# A plausible disk: slow small reads, fast large ones (the bench only needs a profile to compare).
PROFILE = dict(sizes=[4096, 16384, 65536, 1 << 20], threads=[1, 16],
               gb_per_s=[[0.05, 0.4], [0.2, 0.9], [0.6, 1.8], [1.5, 2.0]])


def _profile(path) -> profiles.Profile:
    return profiles.Profile(**PROFILE, path=str(path), device=os.stat(path).st_dev)


@pytest.fixture(autouse=True)
def quick_disk_reference(monkeypatch):
    monkeypatch.setattr("mlx_flash.bench.driver.PROBE_NOW_SECONDS", 0.05)


def _exact_predictors(path) -> None:
    """predictors.safetensors that predict exactly the active set: rank d, A = I, B = fc1."""
    m = fmt.read_manifest(path)
    resident = mx.load(str(m.resident_path))
    tensors = {}
    for i in range(m.num_layers):
        records = fmt.read_layer_records(m, i)
        tensors[f"layers.{i}.A"] = mx.eye(m.d_model, dtype=m.mx_dtype)
        tensors[f"layers.{i}.B"] = m.part_values(records, m.parts[0])
        tensors[f"layers.{i}.bias"] = resident[f"model.decoder.layers.{i}.fc1.bias"]
        tensors[f"layers.{i}.threshold"] = mx.array([0.5], dtype=mx.float32)
    mx.save_safetensors(str(path / "predictors.safetensors"), tensors)


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    path = convert(str(fixture_path("opt-fixture")), out=str(tmp_path_factory.mktemp("b") / "f"),
                   dtype="float16", align=4096, packed=False, progress=False)
    _exact_predictors(path)
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    out = write_synthetic_flash(root / "flash", d_model=256, ffn_dim=2048, layers=2, vocab=8192,
                                max_pos=64, checkpoint=root / "hf")
    return out, root / "hf"


# -- synthetic model ---------------------------------------------------------------------------


def test_planted_statistics():
    """The paper's OPT-6.7B figures: ~10% predicted (3.3% active + 7% false positives), window
    of 4 holding ~25% of the FFN, ~2.4% fresh per token."""
    spec = bench.synthetic_spec()
    predicted, fresh, held = bench.planted_stats(spec, 8192, steps=300)
    assert predicted == pytest.approx(0.033 + 0.07 * 0.967, abs=0.005)
    assert held == pytest.approx(0.25, abs=0.015)
    assert fresh == pytest.approx(0.024, abs=0.004)
    assert spec["expected_fresh_fraction"] == pytest.approx(0.0224, abs=0.001)
    with pytest.raises(ValueError, match="unreachable"):
        bench.synthetic_spec(held=0.5)


def test_synthetic_predictor_is_deterministic_per_layer():
    spec = bench.synthetic_spec()
    a, b, c = (bench.SyntheticPredictor(1024, layer, spec) for layer in (0, 0, 1))
    x = mx.zeros((3, 8))
    ma, mb, mc = (np.array(p(x)) for p in (a, b, c))
    assert ma.shape == (3, 1024) and ma.dtype == np.bool_
    assert np.array_equal(ma, mb) and not np.array_equal(ma, mc)
    assert a.steps == 3 and a.predicted == int(ma.sum())


def test_synthetic_flash_dir_matches_its_checkpoint(synthetic):
    flash, hf = synthetic
    m = fmt.read_manifest(flash)
    assert (m.d_model, m.ffn_dim, m.num_layers, m.dtype) == (256, 2048, 2, "bfloat16")
    assert m.source == str(hf.resolve()) and (flash / bench.SYNTHETIC_FILE).is_file()
    a, tok = load_dense(flash)
    b, _ = load_dense(hf)
    ids = mx.array([tok.encode(PROMPT)])
    assert np.array_equal(np.array(a(ids).astype(mx.float32)), np.array(b(ids).astype(mx.float32)))
    assert not (flash.parent / "flash.partial").exists()


def test_llama_shaped_synthetic_dir_is_a_llama(tmp_path):
    """`--arch llama`: SwiGLU records, grouped-query attention; the flash dir equals its HF
    checkpoint, which transformers reads as a Llama with the same logits; the planted sets
    are a gated MLP's (87.5% predicted) and predicted-mode decode runs on them."""
    import torch
    from transformers import AutoModelForCausalLM

    flash = write_synthetic_flash(tmp_path / "flash", d_model=256, ffn_dim=1024, layers=2,
                                  vocab=8192, max_pos=64, checkpoint=tmp_path / "hf",
                                  arch="llama", kv_heads=1)
    m = fmt.read_manifest(flash)
    assert m.architecture == "llama" and [p.name for p in m.parts] == [
        "gate_proj", "up_proj", "down_proj"]
    a, tok = load_dense(flash)
    b, _ = load_dense(tmp_path / "hf")
    ids = [tok.encode(PROMPT)]
    got = np.array(a(mx.array(ids)).astype(mx.float32))
    assert np.array_equal(got, np.array(b(mx.array(ids)).astype(mx.float32)))
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32)
    assert ref.config.num_key_value_heads == 1
    with torch.no_grad():
        want = ref(torch.tensor(ids)).logits.numpy()
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()  # bfloat16 against float32
    spec = json.loads((flash / bench.SYNTHETIC_FILE).read_text())
    assert spec["predicted_fraction"] == pytest.approx(0.875)
    model, tok = runtime.load(flash, memory="1GB", mode="predicted", lookahead=True,
                              bench=bench.BenchOptions(predictors=bench.load_synthetic(
                                  flash, m.ffn_dim, m.num_layers)))
    _greedy(model, tok, n=4)
    s = model.flash.stats()
    assert s["decode_tokens"] == 4 and s["lookahead_recall"] > 0.5


def test_quantized_synthetic_dir_is_a_quantized_flash_dir(tmp_path):
    """`--quantize 4`: packed records of MLX affine parts whose values stay small, quantized
    attention and embedding; flash decode (both compute paths) gives the dense model's tokens."""
    out = write_synthetic_flash(tmp_path / "q4", d_model=256, ffn_dim=2048, layers=2, vocab=8192,
                                max_pos=64, quantize=4)
    m = fmt.read_manifest(out)
    assert m.quantization.to_dict() == {"mode": "affine", "bits": 4, "group_size": 64}
    assert m.packed and m.record_bytes == 2 * (128 + 2 * 4 * 2)  # 2 parts of 256 4-bit values
    values = np.array(m.part_values(fmt.read_layer_records(m, 1), m.parts[1]).astype(mx.float32))
    assert values.shape == (2048, 256) and 0.005 < np.abs(values).max() <= 0.0165
    assert 0.001 < values.std() < 0.01
    dense, tok = load_dense(out)
    assert type(dense.model.decoder.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"
    assert type(dense.model.decoder.embed_tokens).__name__ == "QuantizedEmbedding"
    want = _greedy(dense, tok)
    for compute in ("quantized", "dequantized"):
        flash, _ = runtime.load(out, memory="4MiB", mode="naive", compute=compute)
        assert _greedy(flash, tok) == want, compute
    # flash modes cap MLX's cache of freed buffers (else they sit beside the budget), and the
    # budget counts the cap
    cap = flash.flash.budget.allocator_cache
    assert 0 < cap <= 4 * 2**20 // 64 and mx.set_cache_limit(cap) == cap
    budget = flash.flash.budget  # what %model takes a share of: the dir's bytes on disk
    assert budget.model == m.resident_bytes + m.num_layers * m.ffn_dim * m.record_bytes
    with pytest.raises(SystemExit, match="not with --quantize"):
        write_synthetic_flash(tmp_path / "q", d_model=256, ffn_dim=2048, layers=1, vocab=8192,
                              quantize=4, checkpoint=tmp_path / "hf")


@pytest.mark.parametrize("compute", ["dequantized", "quantized"])
def test_quantized_decode_stays_inside_the_budget(tmp_path, compute):
    """MLX's memory while decoding a quantized dir in naive mode (every record streamed) stays
    within the budget, give or take one stream chunk: the streamed path multiplies records with
    quantized_matmul and a dequantized cache dequantizes in counted pieces (MLX's CPU dequantize
    holds ~5x its output: 64.8 MB peak on a 20.0 MB budget before)."""
    from mlx_flash.generation import new_cache
    from mlx_flash.memory import stream_rows

    out = write_synthetic_flash(tmp_path / "q4", d_model=1024, ffn_dim=8192, layers=2,
                                vocab=8192, max_pos=64, quantize=4)
    gc.collect()
    before = mx.get_active_memory()  # what earlier tests left in this process
    model, _ = runtime.load(out, memory="95%model", mode="naive", compute=compute, max_context=64)
    cache = new_cache(model)
    mx.eval(model(mx.array([[1, 2, 3]]), cache=cache))
    mx.reset_peak_memory()
    for _ in range(2):
        mx.eval(model(mx.array([[7]]), cache=cache))
    m = model.flash.runtime.manifest
    slack = stream_rows(m) * m.record_bytes
    assert mx.get_peak_memory() - before <= model.flash.budget.total + slack


def test_mapped_baseline_computes_the_dense_model(synthetic):
    _, hf = synthetic
    dense, tok = load_dense(hf)
    mapped, _, counters = _mapped_model(hf)
    assert _greedy(mapped, tok) == _greedy(dense, tok)
    assert counters.seconds > 0 and len(counters.buffers) == 16  # one layer's tensors, reused


def test_mapped_baseline_runs_llama():
    """mlx-lm's Llama reads attributes of its layers (`use_sliding`): the mapped layer forwards
    them, and computes the dense model's logits, prefill and decode through the KV cache."""
    hf = fixture_path("llama-relu-fixture")
    dense, tok = load_dense(hf)
    mapped, _, counters = _mapped_model(hf)
    ids = mx.array([tok.encode(PROMPT)])
    caches = dense.make_cache(), mapped.make_cache()
    for step in range(3):
        want, got = (model(ids, cache=c)[:, -1].astype(mx.float32)
                     for model, c in zip((dense, mapped), caches))
        assert np.array_equal(np.array(got), np.array(want)), f"step {step}"
        ids = mx.argmax(want, axis=-1).reshape(1, 1)
    assert counters.seconds > 0 and len(counters.buffers) == 9  # one layer's tensors, reused


# -- runtime pieces the bench needs ------------------------------------------------------------


def test_unbundled_reads_fetch_the_same_bytes_in_two_requests_per_neuron(tmp_path):
    rb = 16384
    data = np.random.default_rng(0).integers(0, 256, 64 * rb, dtype=np.uint8)
    (tmp_path / "f").write_bytes(data.tobytes())
    ids = np.array([1, 2, 3, 10, 40])
    _, bundled = aligned_empty(len(ids), rb)
    _, split = aligned_empty(len(ids), rb)
    with FlashReader(tmp_path / "f", rb, 4) as r, \
            FlashReader(tmp_path / "f", rb, 4, part_spans=[(0, 8192), (8192, 16384)]) as s:
        r.read(0, ids, bundled)
        s.read(0, ids, split)
        assert r.snapshot().requests == 3  # 1-3 coalesce
        assert s.snapshot().requests == 10 and s.snapshot().bytes == r.snapshot().bytes
    assert np.array_equal(bundled, split)
    assert np.array_equal(split, data.reshape(64, rb)[ids])
    with pytest.raises(ValueError, match="aligned for aligned records"):
        FlashReader(tmp_path / "f", rb, 1, part_spans=[(0, 100)])


def _greedy(model, tok, n=8):
    cache = model.make_cache()
    y = mx.argmax(model(mx.array([tok.encode(PROMPT)]), cache=cache)[0, -1])
    out = []
    for _ in range(n):
        out.append(int(y))
        y = mx.argmax(model(y.reshape(1, 1), cache=cache)[0, -1])
    return out


def test_hybrid_and_unbundled_modes_are_exact(fixture_dir):
    dense, tok = load_dense(fixture_dir)
    want = _greedy(dense, tok)
    m = fmt.read_manifest(fixture_dir)
    hybrid, _ = runtime.load(fixture_dir, memory="1GB", mode="hybrid", capacity=500)
    assert _greedy(hybrid, tok) == want
    s = hybrid.flash.runtime.stats.per_token()
    assert s["flash_bytes_per_token"] == m.num_layers * (m.ffn_dim - 500) * m.record_bytes
    split, _ = runtime.load(fixture_dir, memory="1GB", mode="predicted", lookahead=False,
                            bench=bench.BenchOptions(bundled=False))  # guesses would read more
    assert _greedy(split, tok) == want  # exact predictors: the oracle's tokens
    s = split.flash.runtime.stats.per_token()
    neurons = split.flash.runtime.stats.misses + split.flash.runtime.stats.overflow
    # Parts of 768 bytes share one 4 KiB page: two reads of it per neuron.
    assert s["read_requests_per_token"] * s["decode_tokens"] == 2 * neurons
    assert s["flash_bytes_per_token"] * s["decode_tokens"] == 2 * neurons * m.record_bytes


# -- the bench -----------------------------------------------------------------------------------


def test_bench_on_opt_fixture(fixture_dir):
    m = fmt.read_manifest(fixture_dir)
    # 120%: the exact predictors add half the FFN again, and a dense FFN streams through two buffers
    result = bench.bench(fixture_dir, memory="120%model", tokens=4, prompt=PROMPT,
                         strategies="naive,predicted,window,all,lookahead,mmap",
                         profile=_profile(fixture_dir))
    rows = {r["strategy"]: r for r in result["rows"]}
    assert not result["synthetic"]
    for name in ("naive", "predicted", "+window", "all", "+lookahead"):
        assert rows[name]["status"] == "ok", rows[name]
        r = rows[name]
        assert r["tokens"] == 4 and r["token_ms"] > 0 and r["peak_rss_bytes"] > 0
        assert r["predicted_io_ms"] > 0 and r["floor_ms"] > 0 and r["probe_now_gb_per_s"] > 0
        assert r["token_ms"] >= r["io_ms"] + r["cache_ms"] - 1e-6
    assert rows["naive"]["flash_bytes_per_token"] == m.num_layers * m.ffn_dim * m.record_bytes
    # Real sparsity: predicted reads a fraction; the window cuts fresh reads further; bundling
    # halves them here (two 768-byte parts per 4 KiB page read separately without it).
    assert rows["predicted"]["flash_bytes_per_token"] < 0.5 * rows["naive"]["flash_bytes_per_token"]
    assert rows["+window"]["flash_bytes_per_token"] < rows["predicted"]["flash_bytes_per_token"]
    assert rows["all"]["flash_bytes_per_token"] == pytest.approx(
        rows["+window"]["flash_bytes_per_token"] / 2, rel=0.01)
    # the lookahead reads some of the next layer's records early, some of them wrongly guessed
    # (opt-fixture, exact predictors, 4 tokens: 32% of the loads read early, 60% of guesses right)
    ahead = rows["+lookahead"]
    assert ahead["lookahead_recall"] > 0.1 and ahead["lookahead_hit_rate"] > 0.1
    assert ahead["flash_bytes_per_token"] >= rows["all"]["flash_bytes_per_token"]
    assert ahead["io_wait_ms"] <= ahead["io_ms"] and rows["all"]["lookahead_recall"] is None
    assert rows["+window"]["fresh_fraction"] < rows["predicted"]["fresh_fraction"]
    assert rows["all"]["threads"] == 16 and rows["all"]["max_request_bytes"] == 1 << 20
    # The mmap baseline: under a memory cgroup when root, otherwise skipped with the reason.
    if platform.memory_cgroup() is None:
        assert rows["mmap"]["status"] == "skipped" and "memory limit" in rows["mmap"]["reason"]
    else:
        assert rows["mmap"]["status"] == "ok", rows["mmap"]
        assert rows["mmap"]["cgroup_peak_bytes"] <= rows["mmap"]["limit_bytes"]
    claims = {c["claim"].split(":")[0] for c in result["summary"]}
    assert "flash bytes per token" in claims and "end to end" in claims
    table = bench.format_table(result)
    assert "| naive |" in table and "| +window |" in table and "SYNTHETIC" not in table
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == 1 + 6


def test_bench_cli_on_the_synthetic_model(synthetic, tmp_path):
    flash, _ = synthetic
    file = tmp_path / "probe.json"
    profiles.save_profile(_profile(flash), file)
    env = {**os.environ, "MLX_FLASH_PROBE": str(file), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_flash.cli", "bench", "--model", str(flash), "--memory",
         "150%model", "--tokens", "3", "--strategies", "dense,hybrid,+bundling,mmap-nolimit",
         "--json"], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["synthetic"] and result["checkpoint"] == str(synthetic[1].resolve())
    rows = {r["strategy"]: r for r in result["rows"]}
    assert all(r["status"] == "ok" for r in rows.values()), {
        k: r.get("reason") for k, r in rows.items()}
    m = fmt.read_manifest(flash)
    resident = round(rows["hybrid"]["capacity_fraction"] * m.ffn_dim)
    assert rows["hybrid"]["flash_bytes_per_token"] == m.num_layers * (m.ffn_dim - resident) * m.record_bytes
    assert 0.05 < rows["+bundling"]["predicted_fraction"] < 0.15  # planted ~10%
    assert rows["dense"]["io_ms"] == 0 and rows["mmap-nolimit"]["io_ms"] > 0


def test_bench_rejects_unknown_strategies(fixture_dir):
    from mlx_flash.errors import FlashError

    with pytest.raises(FlashError, match="unknown strategy 'fast'"):
        bench.bench(fixture_dir, strategies="naive,fast", profile=_profile(fixture_dir))
    assert bench.parse_strategies("window, bundling ,all") == ["+window", "+bundling", "all"]


def test_planted_routing_reuses_experts_and_guesses_as_planned():
    from mlx_flash.bench.routing import PlantedRouter, routing_spec

    spec = routing_spec()
    a, b = PlantedRouter(128, 8, 3, spec), PlantedRouter(128, 8, 3, spec)
    x = mx.zeros((1, 16))
    sets, right = [], 0
    for step in range(400):
        guess = np.argsort(-np.array(a.guess(x))[0])[:8]
        if step % 2:  # guesses draw from their own stream: routing is the same without them
            b.guess(x)
        chosen = np.argsort(-np.array(a(x))[0])[:8]
        assert np.array_equal(np.sort(chosen), np.sort(np.argsort(-np.array(b(x))[0])[:8]))
        assert len(set(chosen)) == 8
        right += len(np.intersect1d(guess, chosen))
        sets.append(set(chosen))
    reuse = np.mean([len(s & t) / 8 for s, t in zip(sets, sets[1:])])
    assert 0.6 <= reuse <= 0.8  # kept with p 0.6, plus redraws of popular experts
    assert 0.6 <= right / (8 * 400) <= 0.8  # planted 0.7


def test_bench_on_an_mlx_lm_moe_dir(tmp_path):
    """The same tiny synthetic Qwen3-MoE in mlx-lm's layout (stacked switch_mlp tensors): bench
    streams its experts from the dir's own safetensors (zero-copy), mlx-lm's dense load gives
    the same greedy tokens, the cache reads less than naive, the lookahead guesses, and nothing
    is written to the dir."""
    from mlx_flash import direct
    from tools.synthetic_moe import write_synthetic_moe_mlx_lm

    path = write_synthetic_moe_mlx_lm(tmp_path / "moe", d_model=128, layers=2, experts=8,
                                      top_k=2, expert_ffn=64, heads=4, kv_heads=2, head_dim=32,
                                      vocab=8192)
    assert direct.streamable(path) and not fmt.is_flash_dir(path)
    before = sorted((f.name, f.stat().st_mtime_ns) for f in path.iterdir())
    result = bench.bench(path, memory="2.2MB", tokens=12, prompt="The open() function",
                         strategies="dense,naive,+cache,all", limit=False,
                         profile=_profile(path))
    assert result["layout"] == "mlx-lm" and result["num_layers"] == 2
    rows = {r["strategy"]: r for r in result["rows"]}
    for name in ("dense", "naive", "+cache", "all"):
        assert rows[name]["status"] == "ok", rows[name]
    assert len(rows["dense"]["token_ids"]) == 13 and result["tokens_differ"] == []
    expert = result["record_bytes"]  # one expert's bytes in the dir
    every_routed = 2 * 2 * expert  # layers x top 2
    # each expert's nine slices widened to the 4 KiB blocks around them
    assert every_routed <= rows["naive"]["flash_bytes_per_token"] <= every_routed + 2 * 2 * 9 * 8192
    assert rows["naive"]["cache_hit_rate"] == 0
    assert rows["+cache"]["flash_bytes_per_token"] < rows["naive"]["flash_bytes_per_token"] / 2
    assert rows["+cache"]["cache_hit_rate"] > 0.5
    # the lookahead: the planted guesses (70% right) read early, the same experts in the end
    assert rows["+cache"]["lookahead_hit_rate"] is None
    assert 0.3 < rows["all"]["lookahead_hit_rate"] <= 1
    # its buffer of a token's experts comes out of the budget: a cache no larger
    assert rows["all"]["capacity_fraction"] <= rows["+cache"]["capacity_fraction"]
    assert rows["all"]["cache_hit_rate"] > 0.5
    assert rows["dense"].get("flash_bytes_per_token") is None  # mlx-lm's load: nothing streamed
    assert sorted((f.name, f.stat().st_mtime_ns) for f in path.iterdir()) == before


def test_bench_on_a_synthetic_moe(tmp_path):
    """The MoE strategies on a tiny synthetic Qwen3-MoE: naive reads every routed expert each
    token, the cache and lookahead read less, the mmap baseline maps the records."""
    from tools.synthetic_moe import write_synthetic_moe

    flash = write_synthetic_moe(tmp_path / "moe", d_model=128, layers=2, experts=8, top_k=2,
                                expert_ffn=64, heads=4, kv_heads=2, head_dim=32, vocab=8192)
    m = fmt.read_manifest(flash)
    assert m.experts == 8 and m.quantization.bits == 4
    result = bench.bench(flash, memory="2.2MB", tokens=12, prompt="The open() function",
                         limit=False, profile=_profile(flash))
    rows = {r["strategy"]: r for r in result["rows"]}
    assert [r for r in rows] == ["dense", "naive", "+cache", "all", "mmap"]
    assert rows["mmap"]["status"] == "skipped"  # needs the real limit (limit=False here)
    for name in ("dense", "naive", "+cache", "all"):
        assert rows[name]["status"] == "ok", rows[name]
    every_routed = m.num_layers * 2 * m.expert_ffn * m.record_bytes  # top 2 of 8
    # packed records: the whole 4 KiB blocks that hold an expert's records are read
    assert every_routed <= rows["naive"]["flash_bytes_per_token"] < 1.25 * every_routed
    assert rows["+cache"]["flash_bytes_per_token"] < every_routed / 3
    assert rows["+cache"]["cache_hit_rate"] > 0.5 and rows["+cache"]["lookahead_hit_rate"] is None
    assert 0.4 <= rows["all"]["lookahead_hit_rate"] <= 1
