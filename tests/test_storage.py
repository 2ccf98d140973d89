"""FlashReader, aligned_empty and parallel_map on real files in tmp_path."""

import errno
import os
import threading
import time

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_flash import platform
from mlx_flash.errors import FlashError
from mlx_flash.storage import FlashReader, ReadStats, aligned_empty, parallel_map

ALIGN = platform.direct_io_alignment()
N_LAYERS, N_NEURONS = 2, 64
RB = ALIGN  # smallest legal record


def write_bundles(path, n_layers=N_LAYERS, n_neurons=N_NEURONS, record_bytes=RB, seed=0):
    """A fake ffn.bundles: layers back to back, one random record per neuron."""
    data = np.random.default_rng(seed).integers(
        0, 256, (n_layers, n_neurons, record_bytes), dtype=np.uint8
    )
    path.write_bytes(data.tobytes())
    return data


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    path = tmp_path_factory.mktemp("storage") / "ffn.bundles"
    return path, write_bundles(path)


@pytest.fixture(scope="module")
def reader(bundles):
    # Small request cap so that long runs are split too.
    with FlashReader(bundles[0], RB, threads=4, max_request_bytes=3 * RB) as r:
        yield r


def layer_offset(layer):
    return layer * N_NEURONS * RB


def expected_requests(ids, cap_rows):
    runs = np.split(ids, np.flatnonzero(np.diff(ids) != 1) + 1) if len(ids) else []
    return sum(-(-len(run) // cap_rows) for run in runs)


def test_aligned_empty_is_aligned_zeroed_and_writable():
    for rows in (0, 1, 3, 17):
        arr, view = aligned_empty(rows, 2 * ALIGN, ALIGN)
        assert arr.shape == (rows, 2 * ALIGN) and arr.dtype == mx.uint8
        assert view.shape == (rows, 2 * ALIGN) and view.flags.writeable
        if rows:
            assert view.ctypes.data % ALIGN == 0
            assert not view.any()


def test_numpy_view_writes_are_seen_by_mlx():
    arr, view = aligned_empty(4, ALIGN, ALIGN)
    weights = arr.view(mx.float32)  # (4, ALIGN // 4)
    x = np.random.default_rng(1).standard_normal(ALIGN // 4).astype(np.float32)
    for seed in (2, 3):  # rewrite in place after an evaluation, as the runtime does
        w = np.random.default_rng(seed).standard_normal((4, ALIGN // 4)).astype(np.float32)
        view.view(np.float32)[:] = w
        y = weights @ mx.array(x)
        mx.eval(y)
        np.testing.assert_allclose(np.array(y), w @ x, rtol=1e-4, atol=1e-3)
    assert np.shares_memory(view, np.array(arr, copy=False))


@settings(max_examples=60, deadline=None)
@given(
    layer=st.integers(0, N_LAYERS - 1),
    ids=st.sets(st.integers(0, N_NEURONS - 1), max_size=N_NEURONS),
)
def test_read_coalesces_and_returns_the_records(reader, bundles, layer, ids):
    ids = np.array(sorted(ids), dtype=np.int64)
    _, view = aligned_empty(len(ids), RB, ALIGN)
    before = reader.snapshot()
    reader.read(layer_offset(layer), ids, view)
    np.testing.assert_array_equal(view, bundles[1][layer, ids])
    delta = reader.delta(before)
    assert delta.bytes == len(ids) * RB
    assert delta.requests == expected_requests(ids, 3)
    assert delta.calls == (1 if len(ids) else 0)


def test_counters_and_snapshot_arithmetic(bundles):
    with FlashReader(bundles[0], RB, threads=16) as r:
        assert r.snapshot() == ReadStats()
        ids = np.array([0, 1, 2, 5, 9, 10, 63])
        _, view = aligned_empty(len(ids), RB, ALIGN)
        r.read(0, ids, view)
        r.read(layer_offset(1), ids, view)
        s = r.snapshot()
        assert (s.bytes, s.requests, s.calls) == (2 * 7 * RB, 2 * 4, 2)
        assert s.seconds > 0 and s.gb_per_s > 0
        assert (s - s) == ReadStats() and (s - ReadStats()) + ReadStats() == s


def test_read_range_whole_and_partial(bundles):
    path, data = bundles
    with FlashReader(path, RB, threads=3, range_chunk_bytes=5 * RB) as r:
        _, view = aligned_empty(N_NEURONS, RB, ALIGN)
        r.read_range(layer_offset(1), N_NEURONS * RB, view)
        np.testing.assert_array_equal(view, data[1])
        assert r.snapshot().requests == -(-N_NEURONS // 5)
        _, part = aligned_empty(7, RB, ALIGN)
        r.read_range(layer_offset(0) + 10 * RB, 7 * RB, part)
        np.testing.assert_array_equal(part, data[0, 10:17])


def test_bad_arguments_are_refused(reader):
    _, view = aligned_empty(3, RB, ALIGN)
    with pytest.raises(ValueError, match="sorted"):
        reader.read(0, np.array([3, 1, 2]), view)
    with pytest.raises(ValueError, match="shape"):
        reader.read(0, np.array([1, 2]), view)
    raw = np.zeros(4 * RB + 1, np.uint8)
    unaligned = raw[(1 - raw.ctypes.data) % ALIGN :][: 3 * RB].reshape(3, RB)
    assert unaligned.ctypes.data % ALIGN == 1
    with pytest.raises(ValueError, match="aligned"):
        reader.read(0, np.array([1, 2, 3]), unaligned)
    with pytest.raises(FlashError, match="past the end"):
        reader.read(layer_offset(N_LAYERS), np.array([0, 1, 2]), view)


def test_truncated_after_open_raises_not_hangs(tmp_path):
    path = tmp_path / "ffn.bundles"
    data = write_bundles(path, n_layers=1)
    with FlashReader(path, RB, threads=4) as r:
        os.truncate(path, 40 * RB + 100)  # ends inside record 40
        ids = np.array([1, 2, 39, 40, 41, 50])
        _, view = aligned_empty(len(ids), RB, ALIGN)
        t0 = time.perf_counter()
        with pytest.raises(FlashError, match=r"ffn\.bundles.*short read at offset \d+"):
            r.read(0, ids, view)
        assert time.perf_counter() - t0 < 5
        assert r.snapshot().bytes == 0  # a failed read counts no bytes
        # What is still in the file still reads correctly.
        _, ok = aligned_empty(2, RB, ALIGN)
        r.read(0, np.array([38, 39]), ok)
        np.testing.assert_array_equal(ok, data[0, 38:40])


def test_closed_reader_refuses(bundles):
    r = FlashReader(bundles[0], RB, threads=2)
    r.close()
    r.close()
    _, view = aligned_empty(1, RB, ALIGN)
    with pytest.raises(ValueError, match="closed"):
        r.read(0, np.array([0]), view)


def test_missing_file_is_a_flash_error(tmp_path):
    with pytest.raises(FlashError, match="missing.bundles"):
        FlashReader(tmp_path / "missing.bundles", RB)


def test_parallel_map_keeps_order_and_first_error_cancels_the_rest():
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        assert parallel_map(pool, lambda x: x * x, list(range(20))) == [x * x for x in range(20)]
        started = []
        gate = threading.Event()

        def work(x):
            started.append(x)
            if x == 0:
                raise OSError("boom")
            gate.wait(0.05)
            return x

        with pytest.raises(OSError, match="boom"):
            parallel_map(pool, work, list(range(50)))
        assert len(started) < 50  # the queued tasks were cancelled


@pytest.mark.skipif(platform.process_read_bytes() is None, reason="needs /proc/self/io (Linux)")
def test_bytes_counted_equal_bytes_the_kernel_read(tmp_path):
    path = tmp_path / "big.bundles"
    n = 2048  # 8 MiB of 4 KiB records
    write_bundles(path, n_layers=1, n_neurons=n, seed=3)
    platform.evict_from_page_cache(path)
    with FlashReader(path, RB, threads=16) as r:
        if not r.direct:
            pytest.skip("file system refused O_DIRECT: readahead makes kernel counts differ")
        ids = np.sort(np.random.default_rng(4).choice(n, 300, replace=False))
        _, view = aligned_empty(len(ids), RB, ALIGN)
        before_kernel, before = platform.process_read_bytes(), r.snapshot()
        r.read(0, ids, view)
        _, whole = aligned_empty(64, RB, ALIGN)
        r.read_range(100 * RB, 64 * RB, whole)
        kernel = platform.process_read_bytes() - before_kernel
    assert r.delta(before).bytes == (300 + 64) * RB
    if kernel == 0 and os.major(os.stat(path).st_dev) == 0:
        pytest.skip("file lives on tmpfs (no block device): the kernel counts no read_bytes")
    # O_DIRECT reads are accounted exactly, and nothing else in this process reads meanwhile.
    assert kernel == r.delta(before).bytes


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="O_DIRECT is Linux-only")
def test_falls_back_when_o_direct_is_refused(bundles, monkeypatch):
    real_open = os.open

    def refuse_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refuse_direct)
    with FlashReader(bundles[0], RB, threads=4) as r:
        assert not r.direct
        ids = np.array([0, 5, 6, 7, 40])
        _, view = aligned_empty(len(ids), RB, ALIGN)
        r.read(layer_offset(1), ids, view)
        np.testing.assert_array_equal(view, bundles[1][1, ids])
