"""Layers pipelined across ranks (`mlx.launch -n 2 --backend ring`, local processes): the same
tokens as one process, each rank's share of the memory and flash reads, a lost rank ends the
other within seconds."""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_flash import distributed
from mlx_flash.convert import convert
from mlx_flash.errors import FlashError
from mlx_flash.format import read_manifest
from tools.synthetic_flash import write_synthetic_flash
from tools.synthetic_moe import write_synthetic_moe

from .conftest import CORPUS, EMBEDDED, ROOT, fixture_path

LAUNCH = Path(sys.executable).parent / "mlx.launch"
if not LAUNCH.exists():
    LAUNCH = Path(shutil.which("mlx.launch") or LAUNCH)
pytestmark = pytest.mark.skipif(
    not mx.distributed.is_available("ring") or not LAUNCH.exists(),
    reason="needs mx.distributed's ring backend and mlx.launch")
PROMPT = "The open() function returns"
# every rank's budget holds all of its neuron caches: the same cache rows as one process
FLASH = ["--memory", "1GB", "--max-context", "256"]
ORACLE = ["--mode", "oracle", *FLASH]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return {
        "opt-tiny": convert(str(EMBEDDED), out=str(root / "opt-tiny"), align=4096,
                            progress=False),
        "llama-relu-fixture": convert(str(fixture_path("llama-relu-fixture")),
                                      out=str(root / "llama"), align=4096, progress=False),
        # layers large beside the embeddings, as in real models: resident bytes split evenly
        "synthetic": write_synthetic_flash(root / "syn", d_model=512, ffn_dim=1024, layers=16,
                                           vocab=8192, max_pos=256, dtype="bfloat16"),
        # qwen3_moe, 4-bit: mlx-lm's model, whose `layers` is a slice of the list it holds
        "moe": write_synthetic_moe(root / "moe", d_model=256, layers=4, experts=8, top_k=2,
                                   expert_ffn=128, heads=4, kv_heads=2, head_dim=64, vocab=8192),
    }


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}


def _ports(n: int) -> int:
    """A base port with `n` free ports after it (the ring backend listens on base + rank)."""
    for _ in range(50):
        base = random.randint(20000, 60000)
        try:
            socks = [socket.create_server(("127.0.0.1", base + i)) for i in range(n)]
        except OSError:
            continue
        for s in socks:
            s.close()
        return base
    raise RuntimeError("no free ports")


def cli(*args, ranks: int = 1, launcher: bool = False, timeout: int = 120):
    """`mlx-flash ARGS` as one process, or on `ranks` local ranks of the ring backend: started
    as `mlx.launch` starts them (MLX_RANK, MLX_HOSTFILE), or by `mlx.launch` itself, whose
    output threads spin (select on an always-writable stdin): on 2 cores, 3x slower to start.
    Returns rank 0's stdout and every rank's stderr."""
    cmd = [sys.executable, "-m", "mlx_flash.cli", *args]
    base = _ports(ranks)
    if launcher:
        cmd = [str(LAUNCH), "-n", str(ranks), "--backend", "ring", "-p", str(base), "--", *cmd]
    if ranks == 1 or launcher:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())
    with tempfile.TemporaryDirectory() as tmp:
        hostfile = Path(tmp) / "hosts.json"
        hostfile.write_text(json.dumps([[f"127.0.0.1:{base + r}"] for r in range(ranks)]))
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE if r == 0 else subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True,
                                  env={**_env(), "MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)})
                 for r in range(ranks)]
        try:
            outs = [p.communicate(timeout=timeout) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
    return subprocess.CompletedProcess(cmd, procs[0].returncode, outs[0][0],
                                       "".join(err for _, err in outs))


def json_out(proc: subprocess.CompletedProcess) -> dict:
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout)


# -- which rank holds which layers ---------------------------------------------------------------


def test_layers_split_by_bytes_and_by_hand(dirs):
    m = read_manifest(dirs["synthetic"])
    per, rest = distributed.resident_bytes(m)
    assert sum(per) + rest == m.resident_bytes and len(set(per)) == 1
    ranges = distributed.plan_layers(m, 2)
    assert ranges[0].start == 0 and ranges[0].stop == ranges[1].start and ranges[1].stop == 16
    assert 0 < len(ranges[0]) < 8  # rank 0 also holds the embeddings: fewer layers
    assert distributed.plan_layers(m, 3, "5,5,6") == [range(0, 5), range(5, 10), range(10, 16)]
    for bad in ("8,9", "16,0", "x,8", "8"):
        with pytest.raises(FlashError, match="--layers-split"):
            distributed.plan_layers(m, 2, bad)
    with pytest.raises(FlashError, match="at least one layer"):
        distributed.plan_layers(m, 17)


def test_layers_split_needs_ranks(dirs):
    proc = cli("generate", "-m", str(dirs["opt-tiny"]), "-p", "x", "--layers-split", "2,2")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "error: --layers-split splits the layers between the processes of `mlx.launch -n N`; "
        "this is a single process"]


# -- two ranks against one process ----------------------------------------------------------------


# An MoE runs naive here: in routed mode a layer guesses the next one's experts and reads them
# early, which it cannot do for a next layer on another rank (other reads, the same tokens).
@pytest.mark.parametrize("name, launcher, mode", [
    ("opt-tiny", True, "oracle"), ("llama-relu-fixture", False, "oracle"),
    ("moe", False, "naive")])
def test_generate_on_two_ranks_equals_one_process(dirs, name, launcher, mode):
    args = ["generate", "-m", str(dirs[name]), "-p", PROMPT, "-n", "12", "--json", *FLASH,
            "--mode", mode]
    one = json_out(cli(*args))
    two = json_out(cli(*args, ranks=2, launcher=launcher))
    assert two["tokens"] == one["tokens"] and two["text"] == one["text"]
    s1, s2 = one["stats"], two["stats"]
    ranks = s2["distributed_ranks"]
    print(name, "resident bytes per rank:", [r["resident_bytes"] for r in ranks],
          "flash bytes/token:", [r["flash_bytes_per_token"] for r in ranks],
          "single:", s1["flash_bytes_per_token"])
    assert s2["distributed_world_size"] == 2 and [r["rank"] for r in ranks] == [0, 1]
    layers = read_manifest(dirs[name]).num_layers
    assert ranks[0]["layers"][0] == 0 and ranks[0]["layers"][1] == ranks[1]["layers"][0]
    assert ranks[1]["layers"][1] == layers
    # the same cache rows per layer, the same decode steps: the same reads, split by rank
    assert {r["neuron_cache_rows_per_layer"] for r in ranks} == {s1["neuron_cache_rows_per_layer"]}
    assert {r["decode_tokens"] for r in ranks} == {s1["decode_tokens"]}
    # all ranks' bytes over the decode tokens (one rounding) == one process's figure
    assert s2["distributed_flash_bytes_per_token"] == s1["flash_bytes_per_token"]
    assert abs(sum(r["flash_bytes_per_token"] for r in ranks) - s1["flash_bytes_per_token"]) <= 1
    assert sum(r["prefill_flash_bytes"] for r in ranks) == s1["prefill_flash_bytes"]
    assert s2["flash_bytes_per_token"] == ranks[0]["flash_bytes_per_token"]  # rank 0's own


def test_each_rank_holds_about_half_the_resident_weights(dirs):
    path = dirs["synthetic"]
    proc = cli("generate", "-m", str(path), "-p", PROMPT, "-n", "4", "--json", *ORACLE, ranks=2)
    ranks = json_out(proc)["stats"]["distributed_ranks"]
    total = read_manifest(path).resident_bytes
    shares = [r["resident_bytes"] / total for r in ranks]
    print("resident bytes per rank:", [r["resident_bytes"] for r in ranks], "of", total,
          "layers:", [r["layers"] for r in ranks], "peak RSS:", [r["peak_rss_bytes"] for r in ranks])
    assert sum(r["resident_bytes"] for r in ranks) == total
    assert all(0.35 <= s <= 0.65 for s in shares), shares
    split = cli("generate", "-m", str(path), "-p", PROMPT, "-n", "2", "--json",
                "--layers-split", "3,13", *ORACLE, ranks=2)
    assert [r["layers"] for r in json_out(split)["stats"]["distributed_ranks"]] == [[0, 3], [3, 16]]


def test_perplexity_on_two_ranks_equals_one_process(dirs):
    # token by token through the KV caches (windows start fresh: the other rank's caches too)
    args = ["perplexity", "-m", str(dirs["opt-tiny"]), "--data", str(CORPUS / "fixture-val.txt"),
            "--max-tokens", "150", "--seq-len", "64", "--json", "--mode", "oracle",
            "--memory", "1GB"]
    one, two = json_out(cli(*args)), json_out(cli(*args, ranks=2))
    assert two["perplexity"] == one["perplexity"] and two["tokens"] == one["tokens"] == 126


def test_a_bad_split_is_one_line_and_every_rank_ends(dirs):
    proc = cli("generate", "-m", str(dirs["opt-tiny"]), "-p", "x", "--layers-split", "1,2,1",
               *ORACLE, ranks=2, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "error: --layers-split 1,2,1: give 2 counts of at least 1 (one per rank) that add up to "
        "the model's 4 layers"]


# -- a rank that stops ----------------------------------------------------------------------------


@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_rank_ends_the_other_within_seconds(dirs, tmp_path, victim):
    hostfile = tmp_path / "hosts.json"
    base = _ports(2)
    hostfile.write_text(json.dumps([[f"127.0.0.1:{base}"], [f"127.0.0.1:{base + 1}"]]))
    cmd = [sys.executable, "-m", "mlx_flash.cli", "perplexity", "-m", str(dirs["opt-tiny"]),
           "--data", str(CORPUS / "fixture-val.txt"), "--max-tokens", "20000", "--mode", "oracle",
           "--memory", "1GB"]  # minutes of steps; progress on rank 0's stderr
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"{r}.err", "w"),
                              env={**_env(), "MLX_RANK": str(r), "MLX_HOSTFILE": str(hostfile)})
             for r in (0, 1)]
    try:
        deadline = time.monotonic() + 60
        while "perplexity:" not in (tmp_path / "0.err").read_text():  # steps are running
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.2)
        time.sleep(0.5)
        procs[victim].send_signal(signal.SIGKILL)
        tic = time.monotonic()
        survivor = 1 - victim
        rc = procs[survivor].wait(timeout=10)
        took = time.monotonic() - tic
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    err = (tmp_path / f"{survivor}.err").read_text()
    lines = [s for s in err.replace("\r", "\n").splitlines() if s.strip()
             and not s.startswith("perplexity:")]
    print(f"rank {survivor} ended {took:.2f} s after rank {victim} was killed: {lines}")
    assert rc == 1 and took < 5
    assert "[ring]" not in err and "Traceback" not in err
    line = (err.replace("\r", "\n").strip().splitlines() or [""])[-1]
    prefix = "error: " if survivor == 0 else "error: rank 1: "
    assert line.endswith(f"{prefix}rank {victim} stopped (its connection closed); ending"), err
