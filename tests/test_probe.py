"""`mlx-flash probe` and the cost model: a real (small) probe, profiles per volume, consistency."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_flash import probe, profiles
from mlx_flash.bench.costmodel import CostModel
from mlx_flash.errors import FlashError

SIZES = [4 << 10, 16 << 10, 64 << 10]
THREADS = [1, 4]


@pytest.fixture(scope="module")
def small_profile(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    lines = []
    p = probe.probe(root, sizes=SIZES, threads=THREADS, file_bytes=8 << 20, seconds=0.05,
                    progress=lines.append)
    assert not list(root.iterdir()), "the scratch file must be removed"
    assert len(lines) == len(SIZES) * len(THREADS)
    return p


def test_probe_measures_every_cell(small_profile):
    p = small_profile
    assert p.sizes == SIZES and p.threads == THREADS
    t = p.table()
    assert t.shape == (3, 2) and np.all(t > 0) and np.all(np.isfinite(t))
    assert p.device == os.stat(p.path).st_dev and p.file_bytes == 8 << 20
    table = probe.format_table(p)
    assert table.count("\n") == 1 + len(SIZES) and "| 16 KiB |" in table
    assert p.best_threads(16 << 10) in THREADS
    # Reading a few KiB at a time is slower per byte than 64 KiB on any disk (and in page cache).
    assert t[0].max() < t[2].max()


def test_profile_round_trip_and_reader_settings(small_profile, tmp_path, monkeypatch):
    file = tmp_path / "probe.json"
    monkeypatch.setenv("MLX_FLASH_PROBE", str(file))
    assert profiles.load_profile(small_profile.path) is None
    assert profiles.reader_settings(small_profile.path, 16384) == (16, 1 << 20)  # the defaults
    assert profiles.save_profile(small_profile) == file
    loaded = profiles.load_profile(small_profile.path)
    assert loaded == small_profile
    threads, request = profiles.reader_settings(small_profile.path, 16384)
    assert (threads, request) == small_profile.reader_settings(16384)
    assert threads in THREADS and request >= 16384 and request in SIZES
    # A broken profile file never stops the runtime: reader_settings falls back to defaults.
    file.write_text("{not json")
    assert profiles.reader_settings(small_profile.path, 16384) == (16, 1 << 20)
    with pytest.raises(FlashError, match="re-run `mlx-flash probe`"):
        profiles.load_profile(small_profile.path)


def test_profile_rejects_a_bad_table():
    d = _profile([[1.0, 2.0]], sizes=[4096, 16384]).to_dict()
    with pytest.raises(FlashError, match="re-run"):
        profiles.Profile.from_dict(d)
    d = _profile([[1.0], [2.0]], sizes=[4096, 16384]).to_dict()
    d["version"] = 99
    with pytest.raises(FlashError, match="version"):
        profiles.Profile.from_dict(d)


def test_probe_refuses_bad_arguments(tmp_path):
    with pytest.raises(FlashError, match="no such directory"):
        probe.probe(tmp_path / "missing")
    with pytest.raises(FlashError, match="multiples of"):
        probe.probe(tmp_path, sizes=[1000])


def _profile(table, sizes=(4 << 10, 16 << 10, 64 << 10, 256 << 10), threads=None):
    threads = threads or list(range(1, len(table[0]) + 1))
    return profiles.Profile(sizes=list(sizes), threads=threads, gb_per_s=table)


NOISY = [[0.05, 0.3, 0.4], [0.1, 0.9, 1.0], [0.7, 1.7, 1.6], [1.5, 1.4, 2.4]]  # like this disk


def test_cost_model_is_consistent_on_a_noisy_table():
    cm = CostModel(_profile(NOISY, threads=[1, 16, 32]))
    sizes = [2048, 4096, 6000, 16384, 40000, 65536, 262144, 1 << 20, 8 << 20]
    for t in (1, 16, 32):
        tput = [cm.throughput(s, t) for s in sizes]
        assert all(b >= a - 1e-12 for a, b in zip(tput, tput[1:])), "bigger request slower per byte"
        per_request = [cm.request_seconds(s, t) for s in sizes]
        assert all(b >= a for a, b in zip(per_request, per_request[1:])), "bigger request faster"
        assert cm.seconds(2e8, 1e4, t) > cm.seconds(1e8, 1e4, t) > 0  # more bytes, more time
        assert cm.seconds(1e8, 2e4, t) > cm.seconds(1e8, 1e4, t)  # smaller requests, more time
        assert cm.seconds(1e8, 1e4, t) >= cm.floor_seconds(1e8, 1e4) > 0
    # At a probed point that is already consistent the model returns the measurement.
    assert cm.throughput(16384, 16) == pytest.approx(0.9)
    assert cm.throughput(16384, 24) == pytest.approx(0.9)  # between probed counts: the lower one
    # Floor: best threads at that size; beyond the largest size, bandwidth bound.
    assert cm.floor_seconds(16384 * 100, 100) == pytest.approx(16384 * 100 / 1.0e9)
    assert cm.throughput(8 << 20, 32) == pytest.approx(2.4)
    assert cm.seconds(0, 0, 4) == 0.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.floats(0.01, 10.0), min_size=3, max_size=3), min_size=4, max_size=4),
       st.floats(1e3, 1e9), st.floats(1, 1e5), st.sampled_from([1, 2, 3, 8]))
def test_cost_model_properties(table, nbytes, requests, threads):
    cm = CostModel(_profile(table))
    t = cm.seconds(nbytes, requests, threads)
    assert t > 0
    assert cm.seconds(nbytes * 1.5, requests, threads) >= t * (1 - 1e-9)
    assert cm.seconds(nbytes, requests * 1.5, threads) >= t * (1 - 1e-9)
    assert cm.floor_seconds(nbytes, requests) <= t * (1 + 1e-9)
    s = nbytes / requests
    assert cm.throughput(2 * s, threads) >= cm.throughput(s, threads) * (1 - 1e-9)


def test_cli_probe_json(tmp_path):
    env = {**os.environ, "MLX_FLASH_PROBE": str(tmp_path / "probe.json")}
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_flash.cli", "probe", "--path", str(tmp_path), "--seconds",
         "0.02", "--scratch-mb", "16", "--json"],
        capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["sizes"] == list(probe.SIZES) and out["threads"] == list(probe.THREADS)
    assert len(out["gb_per_s"]) == 6 and all(len(r) == 6 for r in out["gb_per_s"])
    assert out["saved"] == str(tmp_path / "probe.json") and out["threads_16k"] in probe.THREADS
    assert profiles.load_profile(tmp_path, tmp_path / "probe.json") is not None
    assert [p.name for p in tmp_path.iterdir()] == ["probe.json"]  # the scratch file is gone


def test_plot(small_profile, tmp_path):
    pytest.importorskip("matplotlib")
    assert probe.plot(small_profile, tmp_path / "p.png").stat().st_size > 1000


def test_cli_probe_bad_path_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mlx_flash.cli", "probe", "--path",
                           str(tmp_path / "nope")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "no such directory" in proc.stderr
