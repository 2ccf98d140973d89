"""docs/FORMAT.md: the reader accepts what convert writes and rejects every bad claim in one line."""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_flash import format as fmt
from mlx_flash.convert import convert
from mlx_flash.errors import FlashError, FormatError
from mlx_flash.tensors import load_dense_weights

from .test_convert import make_checkpoint


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("format")
    src = make_checkpoint(root / "src", arch="opt", d=64, ffn=96, layers=3)
    return convert(str(src), out=root / "flash", align=4096, packed=False, progress=False)


@pytest.fixture
def flash(converted, tmp_path) -> Path:
    """A private copy of a valid flash dir, for a test to damage."""
    return Path(shutil.copytree(converted, tmp_path / "flash"))


def edit_manifest(path: Path, **changes) -> dict:
    obj = json.loads((path / "manifest.json").read_text())
    obj.update(changes)
    (path / "manifest.json").write_text(json.dumps(obj))
    return obj


def patch_bytes(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def rejects(path: Path, *words: str) -> FormatError:
    """Assert read_manifest fails with one line naming `words` (file, field, ...)."""
    with pytest.raises(FormatError) as e:
        fmt.read_manifest(path)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg
    assert "mlx-flash" in msg  # the fix
    assert isinstance(e.value, FlashError)
    return e.value


def test_valid_dir_reads_and_round_trips_its_manifest(flash):
    m = fmt.read_manifest(flash)
    assert fmt.is_flash_dir(flash) and not fmt.is_flash_dir(flash.parent)
    assert (m.architecture, m.dtype, m.d_model, m.ffn_dim, m.num_layers) == ("opt", "float16", 64, 96, 3)
    assert (m.record_bytes, m.payload_bytes, m.itemsize, m.packed) == (4096, 256, 2, False)
    assert m.layer_offsets == (4096, 4096 + 96 * 4096, 4096 + 2 * 96 * 4096)
    assert m.layer_offset(1) == m.neuron_offset(1, 0) and m.neuron_offset(2, 5) == m.layer_offsets[2] + 5 * 4096
    assert m.part("fc2").span == (128, 256) and m.part("fc2").axis == "column"
    assert m.to_dict() == json.loads((flash / "manifest.json").read_text())
    head = (flash / "ffn.bundles").read_bytes()[: m.data_offset]
    assert head == m.ffn_header() and not any(head[64:])
    records = fmt.read_layer_records(m, 2, start=10, count=3)
    assert records.shape == (3, 4096) and records.dtype == np.uint8 and not records[:, 256:].any()


def test_unknown_keys_are_kept(flash):
    edit_manifest(flash, calibration={"layers": [1, 2, 3]})
    m = fmt.read_manifest(flash)
    kept = {k: v for k, v in m.extra.items() if k != "checksums"}  # convert's own MAY key
    assert kept == {"calibration": {"layers": [1, 2, 3]}}
    assert m.to_dict()["calibration"] == {"layers": [1, 2, 3]}


def test_truncated_bundles(flash):
    with open(flash / "ffn.bundles", "r+b") as f:
        f.truncate(4096 * 100)
    rejects(flash, "ffn.bundles", "size", "truncated")


def test_wrong_magic(flash):
    patch_bytes(flash / "ffn.bundles", 0, b"GGUFGGUF")
    rejects(flash, "ffn.bundles", "magic")


def test_wrong_manifest_magic(flash):
    edit_manifest(flash, magic="safetensors")
    rejects(flash, "manifest.json", "magic")


def test_unknown_format_version(flash):
    edit_manifest(flash, format_version=3)
    e = rejects(flash, "manifest.json", "format_version", "unknown version 3", "upgrade mlx-flash")
    assert e.field == "format_version"


def test_unknown_version_in_bundle_header(flash):
    patch_bytes(flash / "ffn.bundles", 8, (7).to_bytes(4, "little"))
    rejects(flash, "ffn.bundles", "format_version", "header says 7, manifest.json says 2")


def test_offsets_past_end_of_file(flash):
    obj = json.loads((flash / "manifest.json").read_text())
    obj["layers"][2]["offset"] = 10 * obj["ffn_file"]["bytes"]
    edit_manifest(flash, layers=obj["layers"])
    rejects(flash, "manifest.json", "layers[2].offset", "past the end of ffn.bundles")


def test_offsets_out_of_order_or_unaligned(flash):
    obj = json.loads((flash / "manifest.json").read_text())
    layers = obj["layers"]
    layers[0]["offset"], layers[1]["offset"] = layers[1]["offset"], layers[0]["offset"]
    edit_manifest(flash, layers=layers)
    rejects(flash, "layers[0].offset", "must follow each other")
    layers[0]["offset"], layers[1]["offset"] = layers[1]["offset"] + 512, layers[0]["offset"]
    edit_manifest(flash, layers=layers)
    rejects(flash, "layers[0].offset", "not a multiple of 4096")


def test_manifest_dims_disagree_with_config(flash):
    edit_manifest(flash, d_model=128)
    rejects(flash, "manifest.json", "d_model", "config.json hidden_size")


def test_manifest_dims_disagree_with_the_tensors(flash):
    """A manifest and config edited consistently still disagree with the files they describe."""
    obj = json.loads((flash / "manifest.json").read_text())
    config = json.loads((flash / "config.json").read_text())
    config["hidden_size"] = 32
    (flash / "config.json").write_text(json.dumps(config))
    parts = obj["record_parts"]
    parts[0]["bytes"] = parts[1]["bytes"] = parts[1]["offset"] = 64
    edit_manifest(flash, d_model=32, record_parts=parts)
    rejects(flash, "ffn.bundles", "d_model", "header says 64, manifest.json says 32")


def test_ffn_dim_disagrees_with_bias_shape(flash):
    """ffn_dim 48: offsets, sizes and header all made to agree; fc1.bias (96,) still disagrees."""
    m = fmt.read_manifest(flash)
    m48 = fmt.new_manifest(flash, "opt", "float16", 64, 48, 3, 4096, {"fc1", "fc2"},
                           m.resident_tensors, m.resident_bytes)
    (flash / "manifest.json").write_text(json.dumps(m48.to_dict()))
    config = json.loads((flash / "config.json").read_text())
    (flash / "config.json").write_text(json.dumps({**config, "ffn_dim": 48}))
    with open(flash / "ffn.bundles", "r+b") as f:
        f.write(m48.ffn_header())
        f.truncate(m48.ffn_bytes)
    rejects(flash, "ffn_dim", "model.decoder.layers.0.fc1.bias", "[96]", "expected [48]")


def test_missing_resident_tensor(flash):
    tensors = mx.load(str(flash / "resident.safetensors"))
    del tensors["model.decoder.layers.1.final_layer_norm.weight"]
    mx.save_safetensors(str(flash / "resident.safetensors"), tensors)
    obj = json.loads((flash / "manifest.json").read_text())
    obj["resident_file"]["bytes"] = (flash / "resident.safetensors").stat().st_size
    edit_manifest(flash, resident_file=obj["resident_file"])
    rejects(flash, "resident.safetensors", "model.decoder.layers.1.final_layer_norm.weight",
            "missing tensor")


def test_resident_tensor_with_wrong_shape_or_dtype(flash):
    tensors = mx.load(str(flash / "resident.safetensors"))
    name = "model.decoder.layers.0.fc2.bias"
    tensors[name] = tensors[name].astype(mx.float32)
    mx.save_safetensors(str(flash / "resident.safetensors"), tensors)
    obj = json.loads((flash / "manifest.json").read_text())
    obj["resident_file"]["bytes"] = (flash / "resident.safetensors").stat().st_size
    edit_manifest(flash, resident_file=obj["resident_file"])
    rejects(flash, "resident.safetensors", name, "float32 [64]", "float16 [64]")


def test_resident_size_and_header_checks(flash):
    with open(flash / "resident.safetensors", "ab") as f:
        f.write(b"\0" * 8)
    rejects(flash, "resident.safetensors", "size")
    obj = json.loads((flash / "manifest.json").read_text())
    obj["resident_file"]["bytes"] += 8
    edit_manifest(flash, resident_file=obj["resident_file"])
    rejects(flash, "resident.safetensors", "data_offsets", "short of the file")
    patch_bytes(flash / "resident.safetensors", 0, (10**12).to_bytes(8, "little"))
    rejects(flash, "resident.safetensors", "header length")


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"dtype": "int4"}, ["dtype", "unknown 'int4'"]),
        ({"architecture": "gpt2"}, ["architecture", "unknown 'gpt2'"]),
        ({"alignment": 3000}, ["alignment", "power of two"]),
        ({"record_bytes": 8192}, ["record_bytes", "8192"]),
        ({"num_layers": "3"}, ["num_layers", "expected int, got str"]),
        ({"ffn_file": {"name": "ffn.bundles", "bytes": 4096 * 290, "data_offset": 4096}},
         ["ffn_file.bytes", "layers end at"]),
    ],
)
def test_bad_manifest_fields(flash, changes, words):
    edit_manifest(flash, **changes)
    rejects(flash, "manifest.json", *words)


def test_missing_files_and_bad_json(flash):
    (flash / "manifest.json").write_text("{not json")
    rejects(flash, "manifest.json", "not valid JSON")
    (flash / "manifest.json").write_text(json.dumps({"magic": "mlx-flash", "format_version": 1}))
    rejects(flash, "manifest.json", "architecture", "missing")


def test_missing_data_files(flash, converted):
    (flash / "ffn.bundles").unlink()
    rejects(flash, "ffn.bundles", "missing")
    shutil.copy(converted / "ffn.bundles", flash / "ffn.bundles")
    (flash / "resident.safetensors").unlink()
    rejects(flash, "resident.safetensors", "missing")


def test_info_and_dense_weights_validate_first(flash):
    summary = fmt.info(flash)
    assert summary["format_version"] == 2 and summary["alignment"] == 4096
    assert summary["flash_bytes"] == 4096 + 3 * 96 * 4096
    with open(flash / "ffn.bundles", "r+b") as f:
        f.truncate(4096)
    with pytest.raises(FormatError, match="truncated"):
        fmt.info(flash)
    with pytest.raises(FormatError, match="truncated"):
        load_dense_weights(flash)
