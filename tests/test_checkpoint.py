"""Checkpoint reading: safetensors, .bin without torch, and the refusal of hostile pickles."""

import io
import json
import pickle
import zipfile

import mlx.core as mx
import numpy as np
import pytest

from mlx_flash.checkpoint import Checkpoint
from mlx_flash.errors import CheckpointError

from .conftest import fixture_path


def test_safetensors_match_mlx_reader():
    path = fixture_path("llama-relu-fixture")
    ckpt = Checkpoint(path)
    reference = mx.load(str(path / "model.safetensors"))
    assert sorted(ckpt.keys()) == sorted(reference)
    for name, ref in reference.items():
        got = ckpt.load(name)
        assert got.dtype == ref.dtype and got.shape == ref.shape
        assert mx.array_equal(got, ref).item(), name


def test_bin_reads_shared_and_strided_storages(tmp_path):
    torch = pytest.importorskip("torch")
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "a": base,
        "a_t": base.t(),  # strided view of the same storage
        "half": torch.randn(3, 5).half(),
        "bf16": torch.randn(7).to(torch.bfloat16),
        "tied": base,
    }
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "opt"}))
    ckpt = Checkpoint(tmp_path)
    for name, t in state.items():
        got = ckpt.load(name)
        np.testing.assert_array_equal(np.array(got.astype(mx.float32)), t.float().numpy())
    assert ckpt.dtype("bf16") == "bfloat16" and ckpt.dtype("half") == "float16"


def _hostile_zip(path, module, name, arg):
    # protocol-0 pickle: GLOBAL module.name, then call it with (arg,)
    payload = f"c{module}\n{name}\n(V{arg}\ntR.".encode()
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/version", "3\n")


@pytest.mark.parametrize(
    "module,name,arg_fmt",
    [
        ("os", "system", "touch {marker}"),
        ("builtins", "eval", "open('{marker}', 'w').close()"),
        ("posix", "system", "touch {marker}"),
    ],
)
def test_hostile_pickle_is_refused_before_running(tmp_path, module, name, arg_fmt):
    marker = tmp_path / "pwned"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "opt"}))
    _hostile_zip(tmp_path / "pytorch_model.bin", module, name, arg_fmt.format(marker=marker))
    with pytest.raises(CheckpointError) as err:
        Checkpoint(tmp_path)
    assert f"{module}.{name}" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_hostile_payload_would_run_with_plain_pickle(tmp_path):
    # Proves the test payload is live: the standard unpickler executes it.
    marker = tmp_path / "ran"
    payload = f"cos\nsystem\n(Vtouch {marker}\ntR.".encode()
    pickle.Unpickler(io.BytesIO(payload)).load()
    assert marker.exists()


def test_errors_are_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        Checkpoint(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no config.json"):
        Checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weight files"):
        Checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        Checkpoint(tmp_path)
