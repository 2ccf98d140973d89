"""Packed records: reads widened to whole direct-I/O blocks, and the runtime over them."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_flash import format as fmt
from mlx_flash.convert import convert
from mlx_flash.runtime import load
from mlx_flash.storage import FlashReader, aligned_empty

from .conftest import fixture_path


@pytest.mark.parametrize("rb", [48, 972, 3456, 6160])
def test_widened_reads_give_each_records_bytes(tmp_path, rb):
    n = 300
    data = np.random.default_rng(rb).integers(0, 256, 4096 + n * rb + 4096, dtype=np.uint8)
    (tmp_path / "f").write_bytes(data.tobytes())
    records = data[4096 : 4096 + n * rb].reshape(n, rb)
    rng = np.random.default_rng(1)
    with FlashReader(tmp_path / "f", rb, 4, max_request_bytes=8192) as r:
        for k in (1, 7, 150, n):
            ids = np.sort(rng.choice(n, k, replace=False))
            _, out = aligned_empty(k, rb)
            before = r.snapshot()
            r.read(4096, ids, out)
            got = r.delta(before)
            assert np.array_equal(out, records[ids])
            blocks = {b for i in ids.tolist()
                      for b in range((4096 + i * rb) // 4096, -(-(4096 + (i + 1) * rb) // 4096))}
            assert got.bytes == 4096 * len(blocks)  # each block holding a wanted record, once
    with FlashReader(tmp_path / "f", rb, 2, part_spans=[(0, rb // 3), (rb // 3, rb)]) as s:
        ids = np.array([0, 1, 5, n - 1])
        _, out = aligned_empty(len(ids), rb)
        s.read(4096, ids, out)
        assert np.array_equal(out, records[ids]) and s.snapshot().requests >= 2 * len(ids) - 1


@pytest.fixture(scope="module")
def packed_and_aligned(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    src = fixture_path("llama-relu-fixture")
    return (convert(str(src), out=root / "packed", packed=True, progress=False),
            convert(str(src), out=root / "aligned", packed=False, progress=False))


def test_packed_layout_reads_the_same_model(packed_and_aligned):
    packed, aligned = packed_and_aligned
    mp, ma = fmt.read_manifest(packed), fmt.read_manifest(aligned)
    assert mp.packed and not ma.packed and mp.ffn_bytes < ma.ffn_bytes
    assert fmt.info(packed)["padding_fraction"] <= 0.125
    for layer in (0, mp.num_layers - 1):
        a, b = fmt.read_layer_records(mp, layer), fmt.read_layer_records(ma, layer)
        assert np.array_equal(a[:, : mp.payload_bytes], b[:, : ma.payload_bytes])
    ids = [5, 17, 300, 301]
    outs = []
    for path in (packed, aligned):
        for mode in ("naive", "oracle"):
            model, tok = load(path, memory="90%model", mode=mode)
            logits = model(mx.array([ids]))
            outs.append(np.array(logits[0, -1].astype(mx.float32)))
    for o in outs[1:]:
        assert np.abs(o - outs[0]).max() <= 1e-2
