"""NeuronCache against a dict model, with records read from a real file by FlashReader."""

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from mlx_flash import platform
from mlx_flash.cache import NeuronCache
from mlx_flash.errors import FlashError
from mlx_flash.storage import FlashReader

ALIGN = platform.direct_io_alignment()
N_LAYERS, N_NEURONS, RB = 2, 48, ALIGN
LAYER = 1
LAYER_OFFSET = LAYER * N_NEURONS * RB


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "ffn.bundles"
    data = np.random.default_rng(0).integers(0, 256, (N_LAYERS, N_NEURONS, RB), dtype=np.uint8)
    path.write_bytes(data.tobytes())
    return path, data[LAYER]


@pytest.fixture(scope="module")
def reader(bundles):
    with FlashReader(bundles[0], RB, threads=4, max_request_bytes=2 * RB) as r:
        yield r


class Model:
    """The reference: neuron id -> last active step, with the same eviction policy."""

    def __init__(self, capacity):
        self.capacity, self.last = capacity, {}

    def ensure(self, ids, step):
        hits = [i for i in ids if i in self.last]
        missing = [i for i in ids if i not in self.last]
        for i in hits:
            self.last[i] = step
        need = len(missing) - (self.capacity - len(self.last))
        evicted = 0
        if need > 0:
            candidates = sorted((s, i) for i, s in self.last.items() if s < step)
            if len(candidates) < need:
                return "error"
            for _, i in candidates[:need]:
                del self.last[i]
            evicted = need
        for i in missing:
            self.last[i] = step
        return len(hits), len(missing), evicted

    def slide(self, step, window):
        old = [i for i, s in self.last.items() if s <= step - window]
        for i in old:
            del self.last[i]
        return len(old)


def check(cache, model, records):
    n = cache.num_used
    ids = cache.ids()
    assert sorted(ids.tolist()) == sorted(model.last)
    assert (cache.pointer[n:] == -1).all() and (cache.last_k_active[n:] == -1).all()
    assert (cache.row_of[ids] == np.arange(n)).all()
    assert (cache.row_of >= 0).sum() == n
    assert cache.last_k_active[:n].tolist() == [model.last[i] for i in ids.tolist()]
    np.testing.assert_array_equal(cache.rows_numpy(), records[ids])
    np.testing.assert_array_equal(np.array(cache.weights()), records[ids])


ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("ensure"),
            st.sets(st.integers(0, N_NEURONS - 1), max_size=24),
            st.integers(0, 1),  # step increment: 0 re-uses the step (several calls per token)
        ),
        st.tuples(st.just("slide"), st.integers(1, 5)),
    ),
    max_size=25,
)


@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(1, 30), ops=ops)
def test_ensure_and_slide_match_the_model(reader, bundles, capacity, ops):
    records = bundles[1]
    cache = NeuronCache(capacity, RB, N_NEURONS, ALIGN)
    model = Model(capacity)
    step = 0
    for op in ops:
        if op[0] == "ensure":
            step += op[2]
            ids = np.array(sorted(op[1]), dtype=np.int64)
            expected = model.ensure(ids.tolist(), step)
            event("capacity error" if expected == "error" else f"evicted: {expected[2] > 0}")
            if expected == "error":
                with pytest.raises(FlashError, match="capacity"):
                    cache.ensure(ids, step, reader, LAYER_OFFSET)
            else:
                stats = cache.ensure(ids, step, reader, LAYER_OFFSET)
                assert (stats.hits, stats.misses, stats.evicted) == expected
                assert stats.bytes == stats.misses * RB
                assert (cache.last_k_active[cache.row_of[ids]] == step).all()
        else:
            assert cache.slide(step, op[1]) == model.slide(step, op[1])
        check(cache, model, records)


def test_weights_view_computes_on_cached_rows(reader, bundles):
    records = bundles[1]
    cache = NeuronCache(8, RB, N_NEURONS, ALIGN)
    cache.ensure(np.array([3, 4, 5, 20]), 0, reader, LAYER_OFFSET)
    cache.ensure(np.array([4, 30]), 1, reader, LAYER_OFFSET)
    cache.slide(1, 1)  # keeps 4 and 30; 30 moves into a hole
    assert sorted(cache.ids().tolist()) == [4, 30]
    w = cache.weights(mx.float16)
    assert w.shape == (2, RB // 2)
    # Random bytes hold NaN/inf as float16; compare on finite-safe uint16 sums instead.
    expected = records[cache.ids()].view(np.uint16).astype(np.int64).sum(axis=1)
    got = cache.weights(mx.uint16).astype(mx.int64).sum(axis=1)
    assert np.array(got).tolist() == expected.tolist()


def test_capacity_too_small_is_a_clear_error(reader):
    cache = NeuronCache(4, RB, N_NEURONS, ALIGN)
    with pytest.raises(FlashError, match="capacity 4 is too small.*needs 5"):
        cache.ensure(np.arange(5), 0, reader, LAYER_OFFSET)
    assert cache.num_used == 0


def test_failed_read_leaves_the_cache_consistent(reader, bundles):
    class Broken:
        def read(self, *args):
            raise FlashError("disk gone")

    cache = NeuronCache(4, RB, N_NEURONS, ALIGN)
    cache.ensure(np.array([1, 2, 3]), 0, reader, LAYER_OFFSET)
    with pytest.raises(FlashError, match="disk gone"):
        cache.ensure(np.array([7, 8]), 1, Broken(), LAYER_OFFSET)
    model = Model(4)
    model.last = {2: 0, 3: 0}  # row of 1 (oldest, lowest id) was evicted to make room
    check(cache, model, bundles[1])


def test_unsorted_active_ids_are_accepted(reader, bundles):
    cache = NeuronCache(6, RB, N_NEURONS, ALIGN)
    stats = cache.ensure(np.array([9, 2, 5, 2]), 0, reader, LAYER_OFFSET)
    assert (stats.hits, stats.misses) == (0, 3)
    assert cache.ids().tolist() == [2, 5, 9]
    with pytest.raises(ValueError):
        cache.ensure(np.array([N_NEURONS]), 1, reader, LAYER_OFFSET)


def test_parts_cache_takes_the_lookaheads_records_from_its_buffer(reader, bundles):
    from mlx_flash.lookahead import Pending, Prefetched
    from mlx_flash.storage import aligned_empty

    records = bundles[1]
    spans = [(0, RB // 4), (RB // 2, RB // 2 + 8)]
    staging = aligned_empty(4, RB, ALIGN)[1]
    cache = NeuronCache(12, RB, N_NEURONS, ALIGN, parts=spans, staging=staging)
    cache.ensure(np.array([1, 2]), 0, reader, LAYER_OFFSET)
    held = np.array([2, 5, 7, 9, 30])  # what a lookahead read for this layer (2 is cached)
    buffer = records[held].copy()
    prefetched = Prefetched(Pending(held, buffer, None), reader)
    before = reader.snapshot()
    stats = cache.ensure(np.array([1, 5, 6, 9, 11, 30, 40]), 1, prefetched, LAYER_OFFSET)
    assert (stats.hits, stats.misses) == (1, 6)
    assert reader.delta(before).bytes == 3 * RB  # 6, 11, 40 read; 5, 9, 30 from the buffer
    assert (prefetched.used, prefetched.needed) == (3, 6)
    ids = cache.ids()
    assert sorted(ids.tolist()) == [1, 2, 5, 6, 9, 11, 30, 40]
    assert (cache.row_of[ids] == np.arange(len(ids))).all()
    for (lo, hi), got in zip(spans, cache.part_weights(), strict=True):
        np.testing.assert_array_equal(np.array(got), records[ids][:, lo:hi])
