"""NeuronCache: the paper's per-layer DRAM matrix of FFN neuron records (PAPER.md point 5).

One preallocated (capacity, record_bytes) matrix; the used rows are always rows [0:num_used], so
the FFN is one dense matmul over them with no gather. Inserting appends at `num_used`; deleting
moves the last used rows into the holes. Nothing is ever reallocated.

With `parts` (byte spans of the record), the cache keeps only those spans, each in a matrix of
its own: (capacity, span) per part, no padding, so the FFN multiplies exactly the payload. Reads
then land in a staging buffer first and the spans are copied out (a memcpy per missing record).
With `decode` as well, the matrices hold what `decode` makes of the staged records instead
(dequantized values of quantized records: `widths` gives each matrix's row bytes), `decode_rows`
records at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlx_flash.errors import FlashError
from mlx_flash.storage import FlashReader, aligned_empty


@dataclass(frozen=True)
class EnsureStats:
    """What one `NeuronCache.ensure` call did."""

    hits: int  # active ids already cached
    misses: int  # active ids read from flash
    bytes: int  # bytes read from flash
    evicted: int  # rows deleted to make room


class NeuronCache:
    """Cached neuron records of one layer, with the window bookkeeping of the paper.

    Attributes: `pointer[r]` the neuron id held by row r (-1 when unused), `last_k_active[r]`
    the last step row r was active (-1 when unused), `row_of[i]` the row holding neuron i (-1 when
    absent), `num_used`. Rows [0:num_used] are exactly the cached neurons, in no particular order.

    Ordering rule: `ensure` and `slide` write into the matrix in place. The caller must make sure
    no unevaluated MLX graph still reads it (the runtime calls `mx.eval` at the top of each layer,
    before `ensure`), and must take `weights()` again after each mutation. Not thread safe.
    """

    def __init__(
        self, capacity: int, record_bytes: int, n_neurons: int, alignment: int | None = None,
        parts: list[tuple[int, int]] | None = None, staging: np.ndarray | None = None,
        decode: Callable[[np.ndarray], list[np.ndarray]] | None = None,
        widths: list[int] | None = None, decode_rows: int | None = None,
    ):
        if capacity < 1 or n_neurons < 1:
            raise ValueError(f"capacity={capacity} and n_neurons={n_neurons} must be >= 1")
        self.capacity = capacity
        self.record_bytes = record_bytes
        self.n_neurons = n_neurons
        self.parts = parts
        if parts is None:
            # (capacity, record_bytes) uint8; MLX array and numpy view share memory.
            self.storage, self._rows = aligned_empty(capacity, record_bytes, alignment)
            self._matrices = [self._rows]
        else:
            if staging is None or staging.ndim != 2 or staging.shape[1] != record_bytes:
                raise ValueError("a cache of record parts needs a (rows, record_bytes) staging "
                                 "buffer for its reads")
            self._staging = staging
            self._plain = decode is None  # the matrices hold the parts' bytes as they are
            self._decode = decode or (lambda rows: [rows[:, lo:hi] for lo, hi in parts])
            self._decode_rows = decode_rows or len(staging)  # staged records decoded at a time
            widths = widths if decode is not None else [hi - lo for lo, hi in parts]
            held = [aligned_empty(capacity, w, alignment) for w in widths]
            self.part_storage = [arr for arr, _ in held]  # (capacity, span) uint8 each
            self._matrices = [view for _, view in held]
        self.pointer = np.full(capacity, -1, dtype=np.int64)
        self.last_k_active = np.full(capacity, -1, dtype=np.int64)
        self.row_of = np.full(n_neurons, -1, dtype=np.int64)
        self.num_used = 0

    # -- views ---------------------------------------------------------------------------------

    @property
    def row_bytes(self) -> int:
        """Bytes one cached neuron takes."""
        return sum(m.shape[1] for m in self._matrices)

    def weights(self, dtype: mx.Dtype = mx.uint8) -> mx.array:
        """The used rows as an MLX array of `dtype`: shape (num_used, record_bytes // itemsize)."""
        return self.storage[: self.num_used].view(dtype)

    def part_weights(self, dtype: mx.Dtype = mx.uint8) -> list[mx.array]:
        """Per record part, its used rows as an MLX array of `dtype` (num_used, span // itemsize)."""
        return [s[: self.num_used].view(dtype) for s in self.part_storage]

    def ids(self) -> np.ndarray:
        """Neuron id of each used row (a view: copy it before the next mutation if kept)."""
        return self.pointer[: self.num_used]

    def rows_numpy(self) -> np.ndarray:
        """The used rows as a writable numpy uint8 view, shape (num_used, record_bytes)."""
        return self._rows[: self.num_used]

    # -- operations ----------------------------------------------------------------------------

    def ensure(
        self, active_ids: np.ndarray, step: int, reader: FlashReader, layer_offset: int
    ) -> EnsureStats:
        """Make every neuron of `active_ids` cached and mark it active at `step`.

        Cached ids count as hits; missing ones are appended at `num_used` in ascending order and
        read by `reader` straight into those rows, so adjacent ids coalesce into one read. When
        they do not fit, the least recently active rows go first (rows outside the window are the
        oldest), never rows active at `step`. Raises FlashError when the active set alone exceeds
        the capacity.
        """
        ids = np.asarray(active_ids, dtype=np.int64).reshape(-1)
        if len(ids) > 1 and not np.all(ids[1:] > ids[:-1]):
            ids = np.unique(ids)
        if len(ids) and (ids[0] < 0 or ids[-1] >= self.n_neurons):
            raise ValueError(f"active ids must lie in [0, {self.n_neurons})")
        rows = self.row_of[ids]
        present = rows >= 0
        self.last_k_active[rows[present]] = step
        missing = ids[~present]
        m = len(missing)
        evicted = 0
        if m > self.capacity - self.num_used:
            evicted = self._make_room(m - (self.capacity - self.num_used), step)
        if m:
            start, end = self.num_used, self.num_used + m
            # Bookkeeping only after a successful read: a failed read leaves the cache consistent.
            missing = self._read(reader, layer_offset, missing, start)
            self.pointer[start:end] = missing
            self.last_k_active[start:end] = step
            self.row_of[missing] = np.arange(start, end)
            self.num_used = end
        return EnsureStats(int(present.sum()), m, m * self.record_bytes, evicted)

    def slide(self, step: int, window: int) -> int:
        """Delete rows not active in the last `window` steps (last active <= step - window).

        Returns how many rows were deleted.
        """
        used = self.last_k_active[: self.num_used]
        return self._delete(np.flatnonzero(used <= step - window))

    def clear(self) -> None:
        """Forget every cached neuron (the storage keeps its memory)."""
        self.row_of[self.pointer[: self.num_used]] = -1
        self.pointer[:] = -1
        self.last_k_active[:] = -1
        self.num_used = 0

    # -- internals -----------------------------------------------------------------------------

    def _read(self, reader: FlashReader, layer_offset: int, ids: np.ndarray,
              start: int) -> np.ndarray:
        """Records `ids` into rows start.. (straight in, or through the staging buffer); returns
        the ids in row order. A reader with `split` (lookahead.Prefetched) holds some records in
        memory already: those are copied from there into the first rows, once."""
        if self.parts is None:
            reader.read(layer_offset, ids, self._rows[start : start + len(ids)])
            return ids
        split = getattr(reader, "split", None)
        order = ids
        if split is not None:
            held, records, at, ids, reader = split(ids)
            self._store(records, at, start)
            start += len(held)
            order = np.concatenate([held, ids])
        stage = self._staging
        for a in range(0, len(ids), len(stage)):
            chunk = ids[a : a + len(stage)]
            reader.read(layer_offset, chunk, stage[: len(chunk)])
            self._store(stage, len(chunk), start + a)
        return order

    def _store(self, records: np.ndarray, at: np.ndarray | int, start: int) -> None:
        """Rows `at` of `records` (whole records; an int n: the first n) into rows start.. of the
        part matrices."""
        count = at if isinstance(at, int) else len(at)
        for b in range(0, count, self._decode_rows):
            e = min(b + self._decode_rows, count)
            rows = slice(b, e) if isinstance(at, int) else at[b:e]  # a slice copies once
            lo, hi = start + b, start + e
            if self._plain:  # each part's bytes gathered from the records, not whole records
                for (p_lo, p_hi), matrix in zip(self.parts, self._matrices, strict=True):
                    matrix[lo:hi] = records[rows, p_lo:p_hi]
                continue
            for piece, matrix in zip(self._decode(records[rows]), self._matrices, strict=True):
                matrix[lo:hi] = piece

    def _make_room(self, need: int, step: int) -> int:
        """Delete the `need` least recently active rows that are not active at `step`."""
        n = self.num_used
        candidates = np.flatnonzero(self.last_k_active[:n] < step)
        if len(candidates) < need:
            required = self.capacity + need - len(candidates)  # rows active now + to insert
            raise FlashError(
                f"neuron cache capacity {self.capacity} is too small: step {step} needs "
                f"{required} neurons of this layer at once; raise the memory budget"
            )
        if need < len(candidates):
            # Oldest first; ties broken by neuron id so the choice is deterministic.
            key = self.last_k_active[candidates] * self.n_neurons + self.pointer[candidates]
            candidates = candidates[np.argpartition(key, need - 1)[:need]]
        return self._delete(candidates)

    def _delete(self, holes: np.ndarray) -> int:
        """Delete `holes` (row indices < num_used) by moving the last kept rows into them."""
        d = len(holes)
        if d == 0:
            return 0
        n = self.num_used
        new_n = n - d
        self.row_of[self.pointer[holes]] = -1
        doomed = np.zeros(n, dtype=bool)
        doomed[holes] = True
        dst = np.flatnonzero(doomed[:new_n])  # holes that stay inside the used range
        src = new_n + np.flatnonzero(~doomed[new_n:])  # kept rows past the new end
        if len(dst):
            for matrix in self._matrices:
                matrix[dst] = matrix[src]  # (len(dst), row) copies
            self.pointer[dst] = self.pointer[src]
            self.last_k_active[dst] = self.last_k_active[src]
            self.row_of[self.pointer[dst]] = dst
        self.pointer[new_n:n] = -1
        self.last_k_active[new_n:n] = -1
        self.num_used = new_n
        return d
