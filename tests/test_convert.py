"""Conversion: bit-exact round trips, record layout, atomic output, Hub resolution, bounded memory."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import huggingface_hub
import mlx.core as mx
import numpy as np
import pytest
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors

from mlx_flash import convert as convert_mod
from mlx_flash import format as fmt
from mlx_flash import hub, platform
from mlx_flash.convert import convert
from mlx_flash.dtypes import FLOATS
from mlx_flash.errors import FlashError
from mlx_flash.tensors import load_dense_weights

from .conftest import ROOT, fixture_path

DTYPES = ("float16", "bfloat16", "float32")
ST = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}


def bits(a: mx.array) -> np.ndarray:
    """The raw bits of an MLX array (numpy has no bfloat16)."""
    return np.array(a.view(mx.uint32 if a.dtype == mx.float32 else mx.uint16))


def make_checkpoint(path: Path, arch: str = "opt", d: int = 64, ffn: int = 96, layers: int = 2,
                    prefix: bool = True, bias: bool = True, extra: bool = True) -> Path:
    """A tiny random HF-layout checkpoint, written one tensor at a time (any size, little memory).

    Values are finite float16 bit patterns derived from the tensor index, so nothing big is held.
    `extra` adds a few non-FFN tensors (embeddings, norms); FFN layers are the point here.
    """
    path.mkdir(parents=True, exist_ok=True)
    if arch == "opt":
        config = {"model_type": "opt", "hidden_size": d, "ffn_dim": ffn, "num_hidden_layers": layers}
        base = ("model." if prefix else "") + "decoder.layers.{i}."
        names = {"fc1.weight": (ffn, d), "fc2.weight": (d, ffn)}
        if bias:
            names.update({"fc1.bias": (ffn,), "fc2.bias": (d,)})
        glob = {("model." if prefix else "") + "decoder.embed_tokens.weight": (16, d)}
        per_layer = {"final_layer_norm.weight": (d,)}
    else:
        config = {"model_type": "llama", "hidden_size": d, "intermediate_size": ffn,
                  "num_hidden_layers": layers, "mlp_bias": bias}
        base = "model.layers.{i}."
        names = {f"mlp.{p}_proj.weight": (ffn, d) for p in ("gate", "up")}
        names["mlp.down_proj.weight"] = (d, ffn)
        if bias:
            names.update({"mlp.gate_proj.bias": (ffn,), "mlp.up_proj.bias": (ffn,),
                          "mlp.down_proj.bias": (d,)})
        glob = {"model.embed_tokens.weight": (16, d), "model.norm.weight": (d,)}
        per_layer = {"input_layernorm.weight": (d,)}
    tensors = dict(glob) if extra else {}
    for i in range(layers):
        tensors.update({base.format(i=i) + k: s for k, s in names.items()})
        if extra:
            tensors.update({base.format(i=i) + k: s for k, s in per_layer.items()})
    header, pos = {}, 0
    for name, shape in tensors.items():
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path / "model.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for k, shape in enumerate(tensors.values()):
            n = int(np.prod(shape))
            f.write(((np.arange(n, dtype=np.uint32) * 2654435761 + k) % 0x3BFF).astype("<u2"))
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer.json").write_text("{}")
    return path


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["opt-fixture", "llama-relu-fixture"])
def test_round_trip_is_bit_identical(tmp_path, name, dtype):
    src = fixture_path(name)
    out = convert(str(src), out=tmp_path / "flash", dtype=dtype, align=4096, progress=False)
    source = mx.load(str(src / "model.safetensors"))
    rebuilt = load_dense_weights(out)
    assert sorted(rebuilt) == sorted(source)
    for key, ref in source.items():
        got = rebuilt[key]
        assert got.dtype == FLOATS[dtype].mx and got.shape == ref.shape, key
        assert np.array_equal(bits(got), bits(ref.astype(got.dtype))), key


def test_16k_alignment_layout_and_info(tmp_path):
    """The Apple SSD page as alignment (the default picks the smallest that holds a neuron:
    tests/test_new_user.py)."""
    src = fixture_path("opt-fixture")
    out = convert(str(src), out=tmp_path / "flash", align=16384, packed=False, progress=False)
    m = fmt.read_manifest(out)
    assert (m.alignment, m.record_bytes, m.dtype) == (16384, 16384, "float16")
    assert m.ffn_bytes == 16384 + 6 * 1536 * 16384 == (out / "ffn.bundles").stat().st_size
    assert {p.name: p.span for p in m.parts} == {"fc1": (0, 768), "fc2": (768, 1536)}
    # a record, read at its offset, is [fc1 row i | fc2 column i | zeros]
    source = mx.load(str(src / "model.safetensors"))
    layer, i = 3, 1000
    with open(out / "ffn.bundles", "rb") as f:
        head = f.read(64)
        f.seek(m.neuron_offset(layer, i))
        record = np.frombuffer(f.read(m.record_bytes), "<u2")
    assert head[:8] == b"MLXFLASH" and int.from_bytes(head[8:12], "little") == 2
    assert m.neuron_offset(layer, i) % 16384 == 0
    fc1 = bits(source[f"model.decoder.layers.{layer}.fc1.weight"])
    fc2 = bits(source[f"model.decoder.layers.{layer}.fc2.weight"])
    assert np.array_equal(record[:384], fc1[i]) and np.array_equal(record[384:768], fc2[:, i])
    assert not record[768:].any()
    for biasname in ("fc1.bias", "fc2.bias"):
        assert f"model.decoder.layers.{layer}.{biasname}" in m.resident_tensors
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    summary = fmt.info(out)
    json.dumps(summary)
    assert summary["bundle_bytes"] == 16384 and summary["flash_bytes"] == m.ffn_bytes
    assert summary["resident_bytes"] == (out / "resident.safetensors").stat().st_size


def test_dense_loader_reads_flash_dir(tmp_path):
    loader = pytest.importorskip("mlx_flash.loader")
    for name in ("opt-fixture", "llama-relu-fixture"):
        src = fixture_path(name)
        out = convert(str(src), out=tmp_path / name, align=4096, progress=False)
        ids = mx.array([[0, 5, 17, 300, 42, 7]])
        a, b = loader.load_model(src)(ids), loader.load_model(out)(ids)
        assert mx.array_equal(a, b).item(), name


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_synthetic_with_biases_and_unprefixed_opt_keys(tmp_path, arch):
    src = make_checkpoint(tmp_path / "src", arch=arch, prefix=False, bias=True)
    out = convert(str(src), out=tmp_path / "out", dtype="bfloat16", align=4096, progress=False)
    m = fmt.read_manifest(out)
    assert all(p.bias for p in m.parts)
    rebuilt = load_dense_weights(out)
    source = mx.load(str(src / "model.safetensors"))
    for key, ref in source.items():
        norm = "model." + key if key.startswith("decoder.") else key
        assert np.array_equal(bits(rebuilt[norm]), bits(ref.astype(mx.bfloat16))), key
    assert len(rebuilt) == len(source)


def test_existing_output_needs_force(tmp_path):
    src = make_checkpoint(tmp_path / "src")
    out = convert(str(src), out=tmp_path / "out", align=4096, progress=False)
    (out / "marker").write_text("old")
    with pytest.raises(FlashError, match="already exists; pass --force"):
        convert(str(src), out=out, align=4096, progress=False)
    assert (out / "marker").exists()
    convert(str(src), out=out, align=4096, force=True, progress=False)
    assert not (out / "marker").exists() and fmt.read_manifest(out).d_model == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    other = tmp_path / "not-flash"
    other.mkdir()
    with pytest.raises(FlashError, match="not a flash model directory"):
        convert(str(src), out=other, force=True, progress=False)


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), OSError("disk full")])
def test_failure_leaves_no_partial_dir(tmp_path, monkeypatch, exc):
    src = make_checkpoint(tmp_path / "src")

    def boom(*args, **kwargs):
        raise exc

    monkeypatch.setattr(convert_mod, "_write_resident", boom)
    with pytest.raises(type(exc)):
        convert(str(src), out=tmp_path / "out", align=4096, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_bad_options_and_sources(tmp_path):
    src = make_checkpoint(tmp_path / "src")
    with pytest.raises(FlashError, match="unknown dtype"):
        convert(str(src), out=tmp_path / "o", dtype="int8")
    with pytest.raises(FlashError, match="power of two"):
        convert(str(src), out=tmp_path / "o", align=5000)
    with pytest.raises(FlashError, match="no such directory"):
        convert(str(tmp_path / "missing" / "dir" / "x"), out=tmp_path / "o")
    (src / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(FlashError, match="not supported"):
        convert(str(src), out=tmp_path / "o", progress=False)
    bad = make_checkpoint(tmp_path / "bad", ffn=96)
    (bad / "config.json").write_text(json.dumps(
        {"model_type": "opt", "hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2}))
    with pytest.raises(FlashError, match=r"fc1.weight has shape \[96, 64\]"):
        convert(str(bad), out=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


# --- Hub ---------------------------------------------------------------------------------------


def _hf_error(cls, status=404):
    request = httpx2.Request("GET", "https://huggingface.co/api/models/nobody/nothing")
    return cls(f"{status} Client Error: Repository Not Found", response=httpx2.Response(
        status, request=request))


def _model_info(files):
    return huggingface_hub.ModelInfo(id="x/y", siblings=[{"rfilename": f} for f in files])


def test_hub_missing_repo_is_one_line(monkeypatch, tmp_path):
    def model_info(self, repo_id, **kw):
        raise _hf_error(hf_errors.RepositoryNotFoundError)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    with pytest.raises(FlashError) as e:
        hub.resolve("nobody/nothing-here", progress=False)
    assert "no such repo on the Hugging Face Hub" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FlashError, match="nobody/nothing-here: no such repo"):
        convert("nobody/nothing-here", progress=False)
    assert not (tmp_path / "models").exists()


def test_hub_gated_and_offline(monkeypatch):
    def gated(self, repo_id, **kw):
        raise _hf_error(hf_errors.GatedRepoError, 403)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", gated)
    with pytest.raises(FlashError, match="gated repo.*HF_TOKEN"):
        hub.resolve("meta-llama/Llama-2-7b-hf", progress=False)

    def offline(self, repo_id, **kw):
        raise httpx2.ConnectError("[Errno -3] Temporary failure in name resolution")

    def not_cached(repo_id, **kw):
        assert kw["local_files_only"] is True
        raise hf_errors.LocalEntryNotFoundError("no snapshot in the cache")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", offline)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_cached)
    with pytest.raises(FlashError, match="cannot reach the Hugging Face Hub") as e:
        hub.resolve("facebook/opt-1.3b", progress=False)
    assert "\n" not in str(e.value)


def test_hub_downloads_only_needed_files_and_converts(monkeypatch, tmp_path):
    snapshot = make_checkpoint(tmp_path / "snap")
    calls = []

    def model_info(self, repo_id, **kw):
        return _model_info(["config.json", "model.safetensors", "pytorch_model.bin",
                            "tokenizer.json", "README.md", "flax_model.msgpack", "tf_model.h5"])

    def download(repo_id, **kw):
        calls.append((repo_id, kw))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    monkeypatch.chdir(tmp_path)
    out = convert("facebook/opt-fake", align=4096, progress=False)
    assert out == Path("models/opt-fake-flash") and fmt.read_manifest(out).source == "facebook/opt-fake"
    (repo, kw), = calls
    patterns = kw["allow_patterns"]
    assert repo == "facebook/opt-fake" and "*.safetensors" in patterns
    assert not any("bin" in p or "msgpack" in p or "h5" in p or "README" in p for p in patterns)
    assert "pytorch_model*.bin" in hub.allow_patterns(["config.json", "pytorch_model.bin"])
    assert hub.allow_patterns(["config.json", "README.md"]) == []


def _no_network(monkeypatch, tmp_path, capsys):
    """The real huggingface_hub over a network that is down: every request fails at once.

    Returns (requests for the repo, each with the stderr printed before it; retry sleeps).
    """
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    attempts, sleeps, err = [], [], []

    def down(self, request):
        err.append(capsys.readouterr().err)
        if "/opt-1.3b" in str(request.url):  # not huggingface_hub's own side requests
            attempts.append("".join(err))
        raise httpx2.ConnectError("[Errno -2] Name or service not known", request=request)

    monkeypatch.setattr(httpx2.HTTPTransport, "handle_request", down)
    monkeypatch.setattr(time, "sleep", sleeps.append)
    return attempts, sleeps


def test_hub_unreachable_fails_fast_with_a_whole_line(monkeypatch, tmp_path, capsys):
    attempts, sleeps = _no_network(monkeypatch, tmp_path, capsys)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(FlashError) as e:
        hub.resolve("facebook/opt-1.3b", progress=False)
    msg = str(e.value)
    assert len(attempts) == 1 and sleeps == []  # one request, no back-off
    assert "fetching facebook/opt-1.3b from the Hugging Face Hub" in attempts[0]  # said first
    assert msg == ("cannot reach the Hugging Face Hub and facebook/opt-1.3b is not in the local "
                   "cache (no network, or the Hub is down); download it once online or pass a "
                   "local directory")


def test_hub_offline_mode_reads_only_the_cache(monkeypatch, tmp_path, capsys):
    attempts, _ = _no_network(monkeypatch, tmp_path, capsys)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FlashError, match=r"and facebook/opt-1\.3b is not in the local cache "
                       r"\(HF_HUB_OFFLINE=1 is set\); download it once online or pass a local "
                       r"directory$"):
        hub.resolve("facebook/opt-1.3b", progress=False)
    assert attempts == [] and "fetching" not in capsys.readouterr().err


def test_hub_offline_cli_is_one_line_and_writes_nothing(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "mlx_flash.cli", "convert", "facebook/opt-1.3b"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: cannot reach the Hugging Face Hub and facebook/opt-1.3b is not in the local cache "
        "(HF_HUB_OFFLINE=1 is set); download it once online or pass a local directory"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_one_line_cuts_long_messages_at_a_word():
    long = "To enable repo look-ups and downloads online, pass 'local_files_only=False' " * 5
    text = hub._one_line(OSError(long + "\nsecond line"))
    assert len(text) <= 204 and text.endswith(" downloads online ...")  # no cut word


def test_hub_rejects_non_paths():
    for bad in ("no_such_dir_xyz", "./a/b", "a/b/c", "/definitely/not/here"):
        with pytest.raises(FlashError, match="no such directory"):
            hub.resolve(bad, progress=False)
    assert hub.is_repo_id("facebook/opt-1.3b") and hub.is_repo_id("meta-llama/Llama-2-7b-hf")


# --- Memory --------------------------------------------------------------------------------------

_PEAK = """
import re, sys
from pathlib import Path
from mlx_flash.convert import convert
hwm = lambda: int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text())[1]) << 10
base = hwm()
convert(sys.argv[1], out=sys.argv[2], align=int(sys.argv[3]), progress=False)
print(base, hwm())
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc VmHWM")
def test_peak_memory_of_converting_opt_fixture(tmp_path):
    """Peak RSS over the import baseline stays near one layer plus one record chunk."""
    src = fixture_path("opt-fixture")
    res = subprocess.run([sys.executable, "-c", _PEAK, str(src), str(tmp_path / "out"), "16384"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    base, peak = map(int, res.stdout.split())
    m = fmt.read_manifest(tmp_path / "out")
    print(f"opt-fixture convert: import baseline {base / 2**20:.0f} MiB, peak {peak / 2**20:.0f} "
          f"MiB (+{(peak - base) / 2**20:.0f} MiB); FFN {m.ffn_bytes / 2**20:.0f} MiB on disk")
    assert peak - base < 64 * 2**20


_HOG = "import numpy as np; a = np.ones(400 << 20, np.uint8); print(int(a.sum()))"


@pytest.mark.skipif(platform.memory_cgroup() is None, reason="needs root and the cgroup v1 memory controller")
def test_converts_model_larger_than_its_memory_limit(tmp_path):
    """A 640 MiB FFN converts in a 300 MiB cgroup; a 400 MiB allocation there is killed."""
    limit = 300 << 20
    src = make_checkpoint(tmp_path / "big", d=1024, ffn=4096, layers=40, extra=False)
    ffn_source = 40 * 2 * 1024 * 4096 * 2
    assert ffn_source > 2 * limit
    group = platform.memory_cgroup() / f"mlx-flash-test-{os.getpid()}"
    group.mkdir()
    try:
        _convert_under_limit(group, limit, src, tmp_path / "out", ffn_source)
    finally:
        group.rmdir()
        shutil.rmtree(src)
        shutil.rmtree(tmp_path / "out", ignore_errors=True)


def _convert_under_limit(group: Path, limit: int, src: Path, out: Path, ffn_source: int):
    (group / "memory.limit_in_bytes").write_text(str(limit))
    if (group / "memory.memsw.limit_in_bytes").exists():
        (group / "memory.memsw.limit_in_bytes").write_text(str(limit))

    def run(code, *args):  # the shell joins the group, then becomes python
        join = 'echo $$ > "$0" && exec "$@"'
        return subprocess.run(["sh", "-c", join, str(group / "cgroup.procs"), sys.executable, "-c",
                               code, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)

    hog = run(_HOG)
    assert hog.returncode != 0, "the memory limit is not enforced"
    (group / "memory.max_usage_in_bytes").write_text("0")
    t = time.time()
    res = run(_PEAK, str(src), str(out), "4096")
    used = int((group / "memory.max_usage_in_bytes").read_text())
    assert res.returncode == 0, res.stderr[-2000:]
    base, peak = map(int, res.stdout.split())
    print(f"converted {ffn_source / 2**20:.0f} MiB of FFN under a {limit / 2**20:.0f} MiB limit "
          f"in {time.time() - t:.1f} s; process peak RSS {peak / 2**20:.0f} MiB (import baseline "
          f"{base / 2**20:.0f} MiB); cgroup peak {used / 2**20:.0f} MiB (page cache included)")
    m = fmt.read_manifest(out)
    assert m.ffn_bytes == 4096 + 40 * 4096 * 4096
    # spot check: fc1 row of the last neuron of the last layer
    header, start = fmt.read_safetensors_header(src / "model.safetensors", "model.safetensors")
    fc1 = header["model.decoder.layers.39.fc1.weight"]["data_offsets"][0] + start
    with open(src / "model.safetensors", "rb") as f:
        f.seek(fc1 + 4095 * 1024 * 2)
        want = f.read(2048)
    with open(out / "ffn.bundles", "rb") as f:
        f.seek(m.neuron_offset(39, 4095))
        assert f.read(2048) == want
