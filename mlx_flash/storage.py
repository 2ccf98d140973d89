"""FlashReader: aligned parallel reads of neuron records straight into MLX memory.

Neuron `i` of a layer is one record of `record_bytes` bytes at `layer_offset + i * record_bytes`
in `ffn.bundles` (docs/FORMAT.md). Reads bypass the page cache (platform.open_direct), so the
buffers they land in must be aligned: allocate them with `aligned_empty`. Records that are a
multiple of the alignment are read straight into the caller's rows; packed records (smaller, or
not a multiple) are read as the whole aligned blocks that hold them, into a scratch buffer, and
copied out: one request per run of records whose blocks touch. `spans.SpanReader` does the
same for arbitrary byte spans of several files (an mlx-lm dir's experts, direct.py);
`MappedReader` is the mmap baseline's reader of the same records.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TypeVar

import mlx.core as mx
import numpy as np

from mlx_flash import platform
from mlx_flash.errors import FlashError

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class ReadStats:
    """Cumulative reader counters; subtract two snapshots for the figures of an interval."""

    bytes: int = 0
    requests: int = 0  # preadv calls (one per coalesced run or chunk)
    seconds: float = 0.0  # wall time spent inside read() / read_range()
    calls: int = 0  # read() / read_range() calls

    def __sub__(self, other: ReadStats) -> ReadStats:
        return ReadStats(
            self.bytes - other.bytes,
            self.requests - other.requests,
            self.seconds - other.seconds,
            self.calls - other.calls,
        )

    def __add__(self, other: ReadStats) -> ReadStats:
        return ReadStats(
            self.bytes + other.bytes,
            self.requests + other.requests,
            self.seconds + other.seconds,
            self.calls + other.calls,
        )

    @property
    def gb_per_s(self) -> float:
        """Effective throughput in GB/s (1e9 bytes), 0.0 when nothing was timed."""
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


def aligned_empty(
    rows: int, row_bytes: int, alignment: int | None = None
) -> tuple[mx.array, np.ndarray]:
    """Allocate a zeroed (rows, row_bytes) uint8 MLX array whose data address is aligned.

    MLX CPU allocations are not page aligned, and O_DIRECT refuses unaligned buffers, so this
    allocates one alignment unit more and slices. Returns `(array, view)`: the MLX array (compute
    on it, e.g. `array.view(mx.float16)`) and a writable numpy view sharing its memory (read into
    it). Either keeps the memory alive. Writes through the view are seen by MLX graphs evaluated
    afterwards; never write while an unevaluated graph may still read the array.
    """
    alignment = alignment or platform.direct_io_alignment()
    if rows < 0 or row_bytes <= 0:
        raise ValueError(f"aligned_empty: bad shape ({rows}, {row_bytes})")
    nbytes = rows * row_bytes
    raw = mx.zeros((nbytes + alignment,), dtype=mx.uint8)
    mx.eval(raw)
    base = np.array(raw, copy=False).ctypes.data
    offset = -base % alignment
    array = raw[offset : offset + nbytes].reshape(rows, row_bytes)
    mx.eval(array)
    view = np.array(array, copy=False)
    if nbytes and view.ctypes.data != base + offset:
        # A copy would silently break "reads land in MLX memory"; refuse rather than degrade.
        raise RuntimeError("MLX slice did not share memory with its source; cannot align buffer")
    return array, view


def parallel_map(pool: Executor, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """Run `fn` over `items` on `pool`; return the results in order.

    The calling thread runs the first item itself (one thread handoff less per call). On the first
    error met in order, the tasks not yet started are cancelled, the running ones are waited for
    (they may be writing into the caller's buffers), and the error is raised.
    """
    futures = [pool.submit(fn, item) for item in items[1:]]
    try:
        results = [fn(items[0])] if items else []
        results.extend(f.result() for f in futures)
    except BaseException:
        for f in futures:
            f.cancel()
        wait(futures)
        raise
    return results


class FlashReader:
    """Parallel uncached reads from one file into caller-provided aligned buffers.

    A persistent pool of `threads` threads issues `os.preadv` calls; adjacent neurons are
    coalesced into one request of at most `max_request_bytes`. `direct` tells whether reads
    really bypass the page cache (False when the file system refused O_DIRECT). Not safe to
    call from several threads at once. Use as a context manager or call `close()`.

    `part_spans` (benchmarks only): byte spans `(lo, hi)` inside a record, each read as its own
    request for every neuron and never coalesced, i.e. what separate up/down matrices would cost
    instead of one bundled record (PAPER.md point 3).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        record_bytes: int,
        threads: int = 16,
        *,
        max_request_bytes: int = 1 << 20,
        range_chunk_bytes: int = 4 << 20,
        alignment: int | None = None,
        part_spans: Sequence[tuple[int, int]] | None = None,
    ):
        self.path = os.fspath(path)
        self.alignment = alignment or platform.direct_io_alignment()
        if record_bytes <= 0:
            raise ValueError(f"record_bytes={record_bytes} must be positive")
        self.widened = record_bytes % self.alignment != 0  # packed records: whole blocks read
        if threads < 1:
            raise ValueError(f"threads={threads} must be >= 1")
        self.record_bytes = record_bytes
        self.threads = threads
        self.part_spans = None
        if part_spans is not None:
            spans = np.asarray(part_spans, dtype=np.int64).reshape(-1, 2)
            unaligned = not self.widened and np.any(spans % self.alignment)
            if (len(spans) == 0 or unaligned or np.any(spans[:, 0] < 0)
                    or np.any(spans[:, 1] <= spans[:, 0]) or np.any(spans[:, 1] > record_bytes)):
                raise ValueError(f"part_spans {part_spans} must be non-empty spans inside the "
                                 f"record ({self.alignment}-aligned for aligned records)")
            self.part_spans = spans
        # Round limits down to whole records / alignment units so every request stays aligned.
        self.max_request_rows = max(1, max_request_bytes // record_bytes)
        self.range_chunk_bytes = max(
            self.alignment, range_chunk_bytes // self.alignment * self.alignment
        )
        try:
            self._fd, self.direct = platform.open_direct(self.path)
        except OSError as e:
            raise FlashError(f"{self.path}: cannot open for reading: {e.strerror}") from e
        self.file_size = os.fstat(self._fd).st_size
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="flash-read")
        self._lock = threading.Lock()
        self._stats = ReadStats()
        self._scratch: np.ndarray | None = None  # aligned blocks of packed records, grown as needed

    # -- public API ----------------------------------------------------------------------------

    def read(self, layer_offset: int, ids: np.ndarray, out: np.ndarray) -> None:
        """Read the records of neurons `ids` (sorted, unique) of the layer at `layer_offset`.

        Row k of `out`, a writable aligned uint8 array of shape (len(ids), record_bytes), receives
        neuron ids[k]. Runs of adjacent ids become one read into adjacent rows. Raises FlashError
        (naming the file and offset) on an I/O error or a file shorter than the request.
        """
        t0 = time.perf_counter()
        ids = np.asarray(ids)
        n = len(ids)
        self._check_out(out, (n, self.record_bytes))
        if ids.ndim != 1 or (n and ids.dtype.kind not in "iu"):
            raise ValueError(f"ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
        if n == 0:
            return
        ids = ids.astype(np.int64, copy=False)
        if layer_offset % self.alignment:
            raise ValueError(f"layer_offset={layer_offset} is not {self.alignment}-aligned")
        if ids[0] < 0 or (n > 1 and not np.all(ids[1:] > ids[:-1])):
            raise ValueError("ids must be sorted, unique and non-negative")
        end = layer_offset + (int(ids[-1]) + 1) * self.record_bytes
        if end > self.file_size:
            raise FlashError(
                f"{self.path}: neuron {int(ids[-1])} at offset {end - self.record_bytes} lies "
                f"past the end of the file ({self.file_size} bytes)"
            )

        rb = self.record_bytes
        if self.widened:
            self._read_widened(layer_offset, ids, out, t0)
            return
        if self.part_spans is not None:  # unbundled: one request per neuron and part
            lo, hi = self.part_spans[:, 0], self.part_spans[:, 1]
            file_off = (layer_offset + ids[:, None] * rb + lo).reshape(-1)
            dst = (np.arange(n, dtype=np.int64)[:, None] * rb + lo).reshape(-1)
            sizes = np.broadcast_to(hi - lo, (n, len(lo))).reshape(-1)
            self._run(file_off, dst, sizes, out.reshape(-1), t0)
            return

        # Requests: runs of consecutive ids, each capped at max_request_rows.
        breaks = np.flatnonzero(ids[1:] != ids[:-1] + 1) + 1
        starts = np.concatenate(([0], breaks))
        lengths = np.diff(np.concatenate((starts, [n])))
        cap = self.max_request_rows
        pieces = -(-lengths // cap)
        run = np.repeat(np.arange(len(starts)), pieces)
        first_piece = np.repeat(np.cumsum(pieces) - pieces, pieces)
        row0 = starts[run] + (np.arange(len(run)) - first_piece) * cap  # first out row
        rows = np.minimum(cap, starts[run] + lengths[run] - row0)
        file_off = layer_offset + ids[row0] * rb
        self._run(file_off, row0 * rb, rows * rb, out.reshape(-1), t0)

    def read_range(self, offset: int, nbytes: int, out: np.ndarray) -> None:
        """Read `nbytes` contiguous bytes at `offset` into `out` (aligned, C-contiguous uint8).

        Meant for prefill, which needs whole layers: the range is cut into large chunks that the
        threads read in parallel. Offset and length must be multiples of the alignment.
        """
        t0 = time.perf_counter()
        self._check_out(out, None)
        if out.nbytes != nbytes:
            raise ValueError(f"out holds {out.nbytes} bytes, expected {nbytes}")
        if offset % self.alignment or nbytes % self.alignment:
            raise ValueError(f"offset={offset}, nbytes={nbytes} must be {self.alignment}-aligned")
        if nbytes == 0:
            return
        if offset + nbytes > self.file_size:
            raise FlashError(
                f"{self.path}: range at offset {offset} of {nbytes} bytes lies past the end of "
                f"the file ({self.file_size} bytes)"
            )
        dst = np.arange(0, nbytes, self.range_chunk_bytes, dtype=np.int64)
        sizes = np.minimum(self.range_chunk_bytes, nbytes - dst)
        self._run(offset + dst, dst, sizes, out.reshape(-1), t0)

    def snapshot(self) -> ReadStats:
        """The cumulative counters now."""
        with self._lock:
            return self._stats

    def delta(self, since: ReadStats) -> ReadStats:
        """Counters accumulated since the snapshot `since`."""
        return self.snapshot() - since

    def close(self) -> None:
        """Stop the threads and close the file. Idempotent."""
        if self._fd is None:
            return
        self._pool.shutdown(wait=True)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FlashReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------

    def _read_widened(self, layer_offset: int, ids: np.ndarray, out: np.ndarray, t0: float):
        """Packed records: read the aligned blocks holding them, then copy each span out.

        Bundled, the byte ranges of all records whose blocks touch become one request (a block
        shared by two records is read once); with `part_spans`, every part of every neuron is a
        request of its own. Requests are cut at `max_request_rows` records' worth of bytes.
        """
        a, rb = self.alignment, self.record_bytes
        spans = self.part_spans if self.part_spans is not None else np.array([[0, rb]])
        starts = (layer_offset + ids[:, None] * rb + spans[:, 0]).reshape(-1)  # sorted
        ends = starts + np.tile(spans[:, 1] - spans[:, 0], len(ids))
        lo, hi = starts // a * a, -(-ends // a) * a
        if self.part_spans is None:
            first = np.concatenate(([True], lo[1:] > hi[:-1]))  # a gap: a new request
            req = np.cumsum(first) - 1
            req_lo = lo[first]
            req_hi = np.maximum.reduceat(hi, np.flatnonzero(first))
        else:
            req, req_lo, req_hi = np.arange(len(lo)), lo, hi
        sizes = req_hi - req_lo
        at = np.concatenate(([0], np.cumsum(sizes)[:-1]))  # scratch offset of each request
        total = int(sizes.sum())
        if self._scratch is None or self._scratch.size < total:
            # exactly what this read needs (no doubling: the budget counts the largest read's
            # blocks, sketch.values_costs)
            self._scratch = None
            self._scratch = aligned_empty(1, total, self.alignment)[1].reshape(-1)
        # Cut long requests into pieces of at most max_request_bytes (whole blocks).
        cap = max(a, self.max_request_rows * rb // a * a)
        pieces = -(-sizes // cap)
        which = np.repeat(np.arange(len(sizes)), pieces)
        k = np.arange(len(which)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        p_off = req_lo[which] + k * cap
        p_size = np.minimum(cap, req_hi[which] - p_off)
        end = int(req_hi[-1])
        if end > self.file_size:
            raise FlashError(f"{self.path}: neuron {int(ids[-1])} at offset {end - rb} lies "
                             f"past the end of the file ({self.file_size} bytes)")
        self._run(p_off, at[which] + k * cap, p_size, self._scratch, t0)
        pos = (at[req] + starts - req_lo[req]).reshape(len(ids), len(spans))
        for j, (s_lo, s_hi) in enumerate(spans.tolist()):
            windows = np.lib.stride_tricks.sliding_window_view(self._scratch[:total], s_hi - s_lo)
            out[:, s_lo:s_hi] = windows[pos[:, j]]

    def _check_out(self, out: np.ndarray, shape: tuple[int, int] | None) -> None:
        if self._fd is None:
            raise ValueError(f"{self.path}: read from a closed FlashReader")
        if not isinstance(out, np.ndarray) or out.dtype != np.uint8:
            raise ValueError("out must be a numpy uint8 array (see aligned_empty)")
        if shape is not None and out.shape != shape:
            raise ValueError(f"out has shape {out.shape}, expected {shape}")
        if not (out.flags.c_contiguous and out.flags.writeable):
            raise ValueError("out must be C-contiguous and writable")
        if out.size and out.ctypes.data % self.alignment:
            # O_DIRECT would fail with EINVAL; say why instead.
            raise ValueError(
                f"out is not {self.alignment}-byte aligned; allocate it with aligned_empty"
            )

    def _run(
        self, file_off: np.ndarray, dst: np.ndarray, sizes: np.ndarray, flat: np.ndarray, t0: float
    ) -> None:
        """Issue requests (file offset, flat out offset, size); each thread a contiguous slice."""
        n_req = len(sizes)
        n_tasks = min(self.threads, n_req)
        # Balance slices by bytes, not by count: coalesced requests differ in size.
        cum = np.cumsum(sizes)
        targets = cum[-1] * np.arange(1, n_tasks) / n_tasks
        edges = np.unique(np.concatenate(([0], np.searchsorted(cum, targets) + 1, [n_req])))
        file_off, dst, sizes = file_off.tolist(), dst.tolist(), sizes.tolist()
        fd, buf = self._fd, memoryview(flat)

        def task(bounds: tuple[int, int]) -> None:
            for k in range(*bounds):
                self._pread_full(fd, buf, dst[k], sizes[k], file_off[k])

        ok = False
        try:
            parallel_map(
                self._pool, task, list(zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True))
            )
            ok = True
        finally:
            # A failed call counts its time but not its bytes: they are not trustworthy.
            done = ReadStats(
                int(cum[-1]) if ok else 0, n_req if ok else 0, time.perf_counter() - t0, 1
            )
            with self._lock:
                self._stats = self._stats + done

    def _pread_full(self, fd: int, buf: memoryview, dst: int, size: int, offset: int) -> None:
        done = 0
        while done < size:
            try:
                got = os.preadv(fd, [buf[dst + done : dst + size]], offset + done)
            except OSError as e:
                raise FlashError(
                    f"{self.path}: read of {size - done} bytes at offset {offset + done} failed: "
                    f"{e.strerror}"
                ) from e
            done += got
            # Short reads of regular files mean end of file; an O_DIRECT retry from an unaligned
            # offset would fail with a confusing EINVAL, so check the size instead of retrying.
            if done < size and (got == 0 or os.fstat(fd).st_size < offset + size):
                raise FlashError(
                    f"{self.path}: short read at offset {offset}: got {done} of {size} bytes, "
                    f"the file ends at {os.fstat(fd).st_size} (truncated after opening?)"
                )


class MappedReader:
    """The mmap baseline of an MoE flash dir: `FlashReader`'s interface over a read-only memory
    map of `ffn.bundles`, so each routed expert is copied out of the page cache (what the OS
    keeps under the memory limit) as llama.cpp's mmap would fault it in; no cache of ours.
    `bytes` counts what was copied; the disk's share is the process's read bytes."""

    direct = False
    threads = 1

    def __init__(self, path, record_bytes: int):
        self.path, self.record_bytes = str(path), record_bytes
        self._map = np.memmap(path, dtype=np.uint8, mode="r")
        self.max_request_rows = len(self._map) // record_bytes
        self._stats = ReadStats()

    def read(self, layer_offset: int, ids: np.ndarray, out: np.ndarray) -> None:
        t0, rb = time.perf_counter(), self.record_bytes
        ids = np.asarray(ids, dtype=np.int64)
        breaks = np.flatnonzero(np.diff(ids) != 1) + 1  # runs of adjacent records
        starts, ends = np.r_[0, breaks], np.r_[breaks, len(ids)]
        for a, b in zip(starts, ends):
            off = layer_offset + int(ids[a]) * rb
            out[a:b] = self._map[off : off + (b - a) * rb].reshape(b - a, rb)
        self._stats += ReadStats(len(ids) * rb, len(starts), time.perf_counter() - t0, 1)

    def read_range(self, offset: int, nbytes: int, out: np.ndarray) -> None:
        self.read(offset, np.arange(nbytes // self.record_bytes), out)

    def snapshot(self) -> ReadStats:
        return self._stats

    def delta(self, since: ReadStats) -> ReadStats:
        return self._stats - since

    def close(self) -> None:
        self._map = None
