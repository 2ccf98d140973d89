"""SpanReader: parallel uncached reads of arbitrary byte spans of several files, as `storage`'s
FlashReader reads records: what streams an expert's slices of an mlx-lm dir's safetensors
(direct.py, streamed.py)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from . import platform
from .errors import FlashError
from .storage import ReadStats, aligned_empty, parallel_map


class SpanReader:
    """Parallel uncached reads of arbitrary byte spans of several files (an mlx-lm dir's
    safetensors: an expert's slice of a stacked tensor, direct.py).

    Spans need not be aligned: each is widened to the direct-I/O blocks around it, blocks that
    touch become one request (cut at `max_request_bytes`), the requests are read into an aligned
    scratch buffer by `threads` threads, and each span's bytes are copied out to its destination,
    as packed records are (`FlashReader`). Not safe to call from several threads at once."""

    def __init__(self, paths: Sequence[str | os.PathLike], threads: int = 16, *,
                 max_request_bytes: int = 1 << 20, alignment: int | None = None):
        if threads < 1:
            raise ValueError(f"threads={threads} must be >= 1")
        self.alignment = alignment or platform.direct_io_alignment()
        self.threads = threads
        self.max_request_bytes = max(self.alignment,
                                     max_request_bytes // self.alignment * self.alignment)
        self.paths = [os.fspath(p) for p in paths]
        self._fds, self.direct = [], True
        try:
            for p in self.paths:
                fd, direct = platform.open_direct(p)
                self._fds.append(fd)
                self.direct = self.direct and direct
        except OSError as e:
            self.close()
            raise FlashError(f"{e.filename or self.paths[len(self._fds)]}: cannot open for "
                             f"reading: {e.strerror}") from e
        self.sizes = [os.fstat(fd).st_size for fd in self._fds]
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="flash-read")
        self._lock = threading.Lock()
        self._stats = ReadStats()
        self._scratch: np.ndarray | None = None

    def read(self, spans: Sequence[tuple[int, int, np.ndarray]]) -> None:
        """Read each span `(file index, offset, out)`: `out.nbytes` bytes at `offset` into the
        writable uint8 array `out`. FlashError (naming the file) on an I/O error or a span past
        the end of its file."""
        t0 = time.perf_counter()
        if not spans:
            return
        a = self.alignment
        order = sorted(range(len(spans)), key=lambda i: (spans[i][0], spans[i][1]))
        reqs: list[list[int]] = []  # [file, lo, hi] of each request, in order
        where = [0] * len(spans)  # the request each span lies in
        for i in order:
            f, off, out = spans[i]
            end = off + out.nbytes
            if end > self.sizes[f]:
                raise FlashError(f"{self.paths[f]}: {out.nbytes} bytes at offset {off} lie past "
                                 f"the end of the file ({self.sizes[f]} bytes)")
            lo, hi = off // a * a, -(-end // a) * a
            if reqs and reqs[-1][0] == f and lo <= reqs[-1][2]:
                reqs[-1][2] = max(reqs[-1][2], hi)
            else:
                reqs.append([f, lo, hi])
            where[i] = len(reqs) - 1
        at, total = [], 0  # each request's place in the scratch buffer
        for _, lo, hi in reqs:
            at.append(total)
            total += hi - lo
        if self._scratch is None or self._scratch.size < total:
            grown = max(total, 0 if self._scratch is None else 2 * self._scratch.size)
            self._scratch = aligned_empty(1, grown, a)[1].reshape(-1)
        pieces = []  # (fd, file offset, scratch offset, size), at most max_request_bytes each
        cap = self.max_request_bytes
        for (f, lo, hi), dst in zip(reqs, at, strict=True):
            for p in range(lo, hi, cap):
                pieces.append((f, p, dst + p - lo, min(cap, hi - p)))
        self._run(pieces, t0)
        for i, (_, off, out) in enumerate(spans):
            _, lo, _ = reqs[where[i]]
            src = at[where[i]] + off - lo
            out.reshape(-1)[:] = self._scratch[src : src + out.nbytes]

    def _run(self, pieces: list[tuple[int, int, int, int]], t0: float) -> None:
        n_tasks = min(self.threads, len(pieces))
        cum = np.cumsum([p[3] for p in pieces])
        targets = cum[-1] * np.arange(1, n_tasks) / n_tasks
        edges = np.unique(np.concatenate(([0], np.searchsorted(cum, targets) + 1,
                                          [len(pieces)]))).tolist()
        buf = memoryview(self._scratch)

        def task(bounds: tuple[int, int]) -> None:
            for f, off, dst, size in pieces[bounds[0] : bounds[1]]:
                self._pread_full(f, buf, dst, size, off)

        ok = False
        try:
            parallel_map(self._pool, task, list(zip(edges[:-1], edges[1:], strict=True)))
            ok = True
        finally:
            done = ReadStats(int(cum[-1]) if ok else 0, len(pieces) if ok else 0,
                             time.perf_counter() - t0, 1)
            with self._lock:
                self._stats = self._stats + done

    def _pread_full(self, f: int, buf: memoryview, dst: int, size: int, offset: int) -> None:
        done, fd = 0, self._fds[f]
        while done < size:
            try:
                got = os.preadv(fd, [buf[dst + done : dst + size]], offset + done)
            except OSError as e:
                raise FlashError(f"{self.paths[f]}: read of {size - done} bytes at offset "
                                 f"{offset + done} failed: {e.strerror}") from e
            done += got
            if offset + done >= self.sizes[f]:  # a file's last block is short: the rest lies
                return                          # past its end
            if got == 0:
                raise FlashError(f"{self.paths[f]}: short read at offset {offset + done} "
                                 "(truncated after opening?)")

    def snapshot(self) -> ReadStats:
        with self._lock:
            return self._stats

    def delta(self, since: ReadStats) -> ReadStats:
        return self.snapshot() - since

    def close(self) -> None:
        """Stop the threads and close the files. Idempotent."""
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for fd in self._fds:
            os.close(fd)
        self._fds = []
