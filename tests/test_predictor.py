"""Predictors on the real fixtures: calibration, recall on held-out text, file checks, ppl."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_flash import calibrate as C
from mlx_flash import predictor as P
from mlx_flash.checkpoint import load_config
from mlx_flash.convert import convert
from mlx_flash.errors import FlashError, FormatError
from mlx_flash.format import info as fmt_info
from mlx_flash.format import read_manifest
from mlx_flash.loader import load_model, load_tokenizer
from mlx_flash.models.opt import POSITION_OFFSET
from mlx_flash.perplexity import perplexity

from .conftest import CORPUS, fixture_path

CALIB = CORPUS / "fixture-calib.txt"
VAL = CORPUS / "fixture-val.txt"
# out-of-domain text: Wikipedia articles, none of them in calibrate's default second text
WIKI = Path(__file__).parent / "data" / "wiki-val.txt"


def _flash(tmp_path_factory, name):
    out = tmp_path_factory.mktemp("flash") / name
    return convert(str(fixture_path(name)), out=out, dtype="float16", align=4096, progress=False)


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory):
    return _flash(tmp_path_factory, "opt-fixture")


@pytest.fixture(scope="module")
def opt_calibrated(tmp_path_factory, opt_dir):
    path = tmp_path_factory.mktemp("calibrated") / "opt"
    shutil.copytree(opt_dir, path)
    report = C.calibrate(path, CALIB, tokens=8192, progress=False)
    return path, report


@pytest.fixture
def opt_copy(tmp_path, opt_calibrated):
    path = tmp_path / "opt"
    shutil.copytree(opt_calibrated[0], path)
    return path


# -- the layer-by-layer walk of calibration -----------------------------------------------------


@pytest.mark.parametrize("name", ["opt-fixture", "llama-relu-fixture"])
def test_calibration_walk_matches_the_dense_model(tmp_path_factory, name):
    path = _flash(tmp_path_factory, name)
    m, config = read_manifest(path), load_config(path)
    seqs = C.sequences(path, VAL, 128, 64)  # (2, 64)
    model = load_model(path, dtype="float32")
    ids = mx.array(seqs)
    if hasattr(model.model, "decoder"):
        dec = model.model.decoder
        h = dec.embed_tokens(ids) + dec.embed_positions(mx.arange(64) + POSITION_OFFSET)
    else:
        h = model.model.embed_tokens(ids)
    inputs = []
    for layer, lay in zip(model.layers, C.walk(m, config, seqs, None, None, False, "")):
        mlp = layer.mlp
        layer.mlp = lambda u, mlp=mlp: (inputs.append(u), mlp(u))[1]
        h = layer(h, "causal", None)
        layer.mlp = mlp
        want = np.array(inputs[-1]).reshape(-1, m.d_model)
        assert np.abs(want - lay.x.read(0, len(lay.x))).max() < 1e-3
        z = want @ np.array(mlp.gate_proj.weight if hasattr(mlp, "gate_proj") else mlp.fc1.weight).T
        if hasattr(mlp, "fc1"):
            z = z + np.array(mlp.fc1.bias)
        agree = np.mean((z > 0) == lay.active.read(0, len(lay.active)))
        assert agree > 0.999


# -- calibration and its metrics ----------------------------------------------------------------


def test_calibrate_writes_file_and_manifest(opt_calibrated):
    path, report = opt_calibrated
    m = read_manifest(path)
    entry = m.extra["predictors"]
    assert entry == json.loads(json.dumps(report))
    assert entry["file"] == "predictors.safetensors" and (path / entry["file"]).is_file()
    assert not list(path.glob("*partial*"))
    assert entry["ranks"] == P.default_ranks(6, 384, 1536) == [64] * 5 + [96]
    assert entry["calibration"]["tokens"] == 8192 and entry["activation"] == "relu"
    assert [row["layer"] for row in entry["layers"]] == list(range(6))
    for row in entry["layers"]:  # held-out calibration tokens
        assert row["recall"] >= 0.95
        assert row["predicted_active_fraction"] > 1 - row["true_sparsity"]
    predictors = P.load_predictors(path)
    assert [p.rank for p in predictors] == entry["ranks"]
    assert [p.threshold for p in predictors] == entry["thresholds"]
    # the default second text (general English): half set the thresholds, half is scored
    second = entry["holdout"]
    assert second["data"] == "holdout-en.txt" and second["tokens"] == 2048
    assert second["threshold_tokens"] == 2048
    assert [row["layer"] for row in second["layers"]] == list(range(6))
    assert all(row["recall"] >= 0.93 for row in second["layers"])  # 0.954-0.964 measured
    shown = fmt_info(path)["calibrated"]
    assert "on second text holdout-en.txt" in shown and "on held out fixture-calib.txt" in shown


def test_calibrate_mixes_several_texts(opt_dir, tmp_path):
    """Two --data files: an equal share of tokens from each, their sequences in turn."""
    one, two = C.sequences(opt_dir, CALIB, 512, 64), C.sequences(opt_dir, WIKI, 512, 64)
    mixed = C.sequences(opt_dir, [CALIB, WIKI], 1024, 64)
    assert mixed.shape == (16, 64)
    assert (mixed[0::2] == one).all() and (mixed[1::2] == two).all()
    path = tmp_path / "opt"
    shutil.copytree(opt_dir, path)
    proc = subprocess.run([sys.executable, "-m", "mlx_flash.cli", "calibrate", str(path),
                           "--data", str(CALIB), "--data", str(WIKI), "--tokens", "1024",
                           "--holdout", "none", "--json"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["calibration"]["data"] == "fixture-calib.txt, wiki-val.txt"
    assert report["holdout"] is None and "second text" not in fmt_info(path)["calibrated"]


def test_recall_on_validation_text(opt_calibrated):
    table = C.evaluate(opt_calibrated[0], VAL, tokens=4096, window=4, progress=False)
    rows = table["layers"]
    assert table["tokens"] == 4096 and len(rows) == 6
    for row in rows:
        assert row["recall"] >= 0.9
        assert row["predicted_active_fraction"] < 0.7
        assert row["true_sparsity"] > 0.65  # opt-fixture: 0.72 .. 0.95 zeros
        # windowing: per-token fresh loads well under the per-token predicted set
        assert row["predicted_fresh_fraction"] < row["predicted_active_fraction"]
        assert row["oracle_fresh_fraction"] <= row["oracle_held_fraction"]
    deep = np.mean([r["predicted_active_fraction"] for r in rows[1:]])
    assert deep < 0.3  # ~0.15-0.20 measured: a few times the ~5-10% truly active


def test_predictor_call_matches_numpy(opt_calibrated):
    path = opt_calibrated[0]
    predictors = P.load_predictors(path)
    p = predictors[1]
    assert p.A.shape == (64, 384) and p.B.shape == (1536, 64) and p.bias.shape == (1536,)
    assert p.A.dtype == mx.float16
    assert p.nbytes == 2 * (64 * 384 + 1536 * 64 + 1536)
    x = mx.random.normal((5, 384), key=mx.random.key(0)).astype(mx.float16)
    mask = p(x)
    assert mask.shape == (5, 1536) and mask.dtype == mx.bool_
    z = (np.array(x, np.float32) @ np.array(p.A, np.float32).T) @ np.array(p.B, np.float32).T
    z += np.array(p.bias, np.float32)
    want = 1 / (1 + np.exp(-z)) > p.threshold
    assert np.mean(np.array(mask) == want) > 0.995  # float16 logits near the cut may differ
    f32 = P.load_predictors(path, dtype=mx.float32)[1]
    assert f32.A.dtype == mx.float32


def test_ranks_spec():
    assert P.default_ranks(32, 4096, 16384) == [128] * 28 + [1024] * 4
    assert P.parse_ranks(None, 6, 384, 1536) == [64] * 5 + [96]
    assert P.parse_ranks(32, 6, 384, 1536) == [32] * 6
    assert P.parse_ranks("1,2,3,4,5,6", 6, 384, 1536) == [1, 2, 3, 4, 5, 6]
    assert P.parse_ranks("0-1:16,5:128", 6, 384, 1536) == [16, 16, 64, 64, 64, 128]
    for bad in ("1,2", "x", "7:16", "0:0", "0:999", "3-1:8"):
        with pytest.raises(FlashError, match="rank"):
            P.parse_ranks(bad, 6, 384, 1536)


def test_calibrate_rejects_bad_options_before_work(opt_dir, tmp_path):
    with pytest.raises(FlashError, match="--sparsity is for non-ReLU"):
        C.calibrate(opt_dir, CALIB, sparsity=0.5, progress=False)
    with pytest.raises(FlashError, match="no such file"):
        C.calibrate(opt_dir, tmp_path / "missing.txt", progress=False)
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    with pytest.raises(FlashError, match="need at least"):
        C.calibrate(opt_dir, short, progress=False)
    assert not (opt_dir / "predictors.safetensors").exists()


def test_non_relu_threshold_sets_sparsity(tmp_path_factory):
    """A SiLU model: the active set is the top |act(gate)*up| at the requested sparsity."""
    path = _flash(tmp_path_factory, "llama-relu-fixture")
    config = json.loads((path / "config.json").read_text())
    config["hidden_act"] = "silu"  # same weights, dense activation: exercises the CATS path
    (path / "config.json").write_text(json.dumps(config))
    report = C.calibrate(path, CALIB, tokens=4096, ranks=32, sparsity=0.6, progress=False)
    assert report["activation"] == "silu" and report["sparsity"] == 0.6
    assert len(report["activation_thresholds"]) == 6
    assert all(t > 0 for t in report["activation_thresholds"])
    for row in report["layers"]:
        assert abs(row["true_sparsity"] - 0.6) < 0.08
        assert row["recall"] >= 0.9
    table = C.evaluate(path, VAL, tokens=1024, progress=False)
    assert all(abs(r["true_sparsity"] - 0.6) < 0.1 for r in table["layers"])


# -- file validation ----------------------------------------------------------------------------


def test_missing_predictors_says_calibrate(opt_dir):
    with pytest.raises(FlashError, match="no predictors in .*mlx-flash calibrate") as e:
        P.load_predictors(opt_dir)
    assert not isinstance(e.value, FormatError)


def test_truncated_file(opt_copy):
    file = opt_copy / "predictors.safetensors"
    with open(file, "r+b") as f:
        f.truncate(file.stat().st_size // 2)
    with pytest.raises(FormatError, match="predictors.safetensors.*calibrate") as e:
        P.load_predictors(opt_copy)
    assert "\n" not in str(e.value) and "convert" not in str(e.value)


def test_garbage_file(opt_copy):
    (opt_copy / "predictors.safetensors").write_bytes(b"\xff" * 100)
    with pytest.raises(FormatError, match="predictors.safetensors: header"):
        P.load_predictors(opt_copy)


def _rewrite(path, change):
    file = path / "predictors.safetensors"
    tensors = dict(mx.load(str(file)))
    change(tensors)
    mx.save_safetensors(str(file), tensors)


def test_shape_mismatch(opt_copy):
    _rewrite(opt_copy, lambda t: t.update({"layers.2.B": t["layers.2.B"][:, :10]}))
    with pytest.raises(FormatError, match=r"layers.2.B.shape: \[1536, 10\], expected \[1536, 64\]"):
        P.load_predictors(opt_copy)


def test_missing_layer_and_extra_tensor(opt_copy):
    _rewrite(opt_copy, lambda t: t.pop("layers.5.bias"))
    with pytest.raises(FormatError, match="layers.5.bias: missing"):
        P.load_predictors(opt_copy)
    _rewrite(opt_copy, lambda t: t.update({"layers.5.bias": mx.zeros((1536,)),
                                           "layers.6.A": mx.zeros((4, 384))}))
    with pytest.raises(FormatError, match="layers.6.A: unexpected"):
        P.load_predictors(opt_copy)


def test_bad_threshold(opt_copy):
    _rewrite(opt_copy, lambda t: t.update({"layers.0.threshold": mx.array([1.5])}))
    with pytest.raises(FormatError, match="layers.0.threshold"):
        P.load_predictors(opt_copy)


def test_manifest_must_describe_the_file(opt_copy):
    def lower_rank(t):
        t["layers.1.A"], t["layers.1.B"] = t["layers.1.A"][:32], t["layers.1.B"][:, :32]

    _rewrite(opt_copy, lower_rank)
    with pytest.raises(FormatError, match="manifest.json: predictors.ranks"):
        P.load_predictors(opt_copy)


# -- perplexity ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def opt_model(opt_dir):
    return load_model(opt_dir, dtype="float32"), load_tokenizer(opt_dir)


def test_dense_perplexity_opt(opt_model):
    model, tokenizer = opt_model
    out = perplexity(model, tokenizer, VAL, seq_len=256, max_tokens=1024, progress=False)
    assert out["windows"] == 4 and out["window"] == 256 and out["tokens"] == 4 * 255
    # README: 16.1 over the whole file; the first 1k tokens are harder (24.8 measured)
    assert math.isfinite(out["perplexity"]) and 10 < out["perplexity"] < 40


def test_token_by_token_matches_windows(opt_model):
    model, tokenizer = opt_model
    whole = perplexity(model, tokenizer, VAL, seq_len=24, max_tokens=60, progress=False)
    steps = perplexity(model, tokenizer, VAL, seq_len=24, max_tokens=60, progress=False,
                       token_by_token=True)
    assert whole["windows"] == steps["windows"] == 2 and whole["tokens"] == 46
    assert steps["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-3)


# -- predicted mode in the flash runtime --------------------------------------------------------


def test_runtime_predicted_mode(opt_calibrated):
    from mlx_flash import runtime

    path, _ = opt_calibrated
    dense, tokenizer = load_model(path), load_tokenizer(path)
    model, _ = runtime.load(path, memory="200MB", mode="predicted")
    assert model.flash.mode == "predicted"
    assert model.flash.budget.other > 0  # the predictors count against the budget
    ref = perplexity(dense, tokenizer, VAL, seq_len=64, max_tokens=256, progress=False,
                     token_by_token=True)
    got = perplexity(model, tokenizer, VAL, seq_len=64, max_tokens=256, progress=False,
                     token_by_token=True)
    assert got["tokens"] == ref["tokens"]
    # 8k calibration tokens only: quality close to dense, reads far below the whole FFN
    assert got["perplexity"] < 1.05 * ref["perplexity"]
    stats = model.flash.runtime.stats.per_token()
    naive = model.flash.runtime.manifest.num_layers * model.flash.runtime.manifest.layer_bytes
    # packed 1536-byte records, read as whole 4 KiB blocks: 2.7 neurons a block
    assert 0 < stats["flash_bytes_per_token"] < naive / 5


def test_runtime_predicted_mode_without_predictors(opt_dir):
    from mlx_flash import runtime

    with pytest.raises(FlashError, match="mlx-flash calibrate"):
        runtime.load(opt_dir, memory="200MB", mode="predicted")
    # auto: the exact set stands in (its input projections, 6.8 MiB, inside the budget) ...
    model, _ = runtime.load(opt_dir, memory="29MB", max_context=128)
    assert model.flash.mode == "oracle" and model.flash.budget.other > 6 << 20
    # ... and where they do not fit beside a neuron-cache row, hybrid reads the same bytes
    model, _ = runtime.load(opt_dir, memory="26MB", max_context=128)
    assert model.flash.mode == "hybrid" and "hybrid" in model.flash.note


@pytest.fixture(scope="module")
def llama_calibrated(tmp_path_factory):
    path = _flash(tmp_path_factory, "llama-relu-fixture")
    C.calibrate(path, CALIB, tokens=8192, progress=False)
    return path


@pytest.mark.parametrize("name", ["opt-fixture", "llama-relu-fixture"])
def test_predicted_mode_holds_on_out_of_domain_text(request, name):
    """Issue 30: predictors calibrated on technical text, scored on encyclopedia text, under a
    budget whose cache holds a small share of each layer (so the predicted sets are what is
    computed): within 3% of dense perplexity. (Measured 0.996x and 1.001x before the second
    text set thresholds too.)"""
    from mlx_flash import runtime

    path = request.getfixturevalue("opt_calibrated")[0] if name == "opt-fixture" else (
        request.getfixturevalue("llama_calibrated"))
    dense, tokenizer = load_model(path), load_tokenizer(path)
    ref = perplexity(dense, tokenizer, WIKI, seq_len=128, max_tokens=256, progress=False)
    m = read_manifest(path)
    below = m.resident_bytes + m.num_layers * m.ffn_dim * m.payload_bytes * 9 // 10
    model, _ = runtime.load(path, memory=f"{below}B", max_context=128,
                            capacity=m.ffn_dim // 8)  # an eighth of each layer cached
    assert model.flash.mode == "predicted"  # auto keeps a ReLU model's predictors
    got = perplexity(model, tokenizer, WIKI, seq_len=128, max_tokens=256, progress=False,
                     token_by_token=True)
    assert got["tokens"] == ref["tokens"] == 254
    assert got["perplexity"] < 1.03 * ref["perplexity"]
    stats = model.flash.runtime.stats.per_token()
    # and they still read less than the whole FFN (measured: 0.73 of it for llama-relu-fixture,
    # whose predictors mark ~48% of a layer, read as whole 4 KiB blocks of packed records)
    assert stats["flash_bytes_per_token"] < 0.8 * m.num_layers * m.layer_bytes
