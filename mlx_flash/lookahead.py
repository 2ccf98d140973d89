"""Dense lookahead: the records layer l+1 is guessed to need, read while layer l computes.

At the top of layer l's decode its FFN input x is known; layer l+1's own active-set function (its
predictor, or in oracle mode its dense input product) is applied to it: a guess of l+1's set made
one layer early. The guessed neurons that l+1's cache lacks are read by a background thread with
a reader of its own, into one of two buffers (layers alternate), while layer l reads its own
misses, computes, and layer l+1's attention runs. Layer l+1 then takes the records it needs from
the buffer and reads only the rest itself (`Prefetched`). A wrong guess costs bandwidth, never
correctness: which neurons a layer computes with does not depend on the guess.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .storage import FlashReader, ReadStats, aligned_empty


@dataclass
class Pending:
    """A layer's records read early: ids `held` (sorted) in rows 0.. of `buffer`."""

    held: np.ndarray
    buffer: np.ndarray
    future: Future


class Prefetch:
    """The dense lookahead of one model (see the module docstring): a background thread, its
    reader and two buffers of `rows` records each."""

    def __init__(self, rt, rows: int):
        m = rt.manifest
        self.rows = rows
        self.buffers = [aligned_empty(rows, m.record_bytes)[1] for _ in range(2)]
        main = rt.reader  # the same settings (benchmarks: the same part spans)
        self.reader = FlashReader(m.ffn_path, m.record_bytes, main.threads,
                                  max_request_bytes=main.max_request_rows * m.record_bytes,
                                  part_spans=main.part_spans)
        self._owner: list = [None, None]  # the layer whose Pending each buffer holds
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="flash-lookahead")

    def start(self, layer, guess: np.ndarray) -> None:
        """Read the records of `guess` (sorted neuron ids of `layer`, a FlashMLP) that its cache
        lacks, the first `rows` of them, in the background; `layer.pending` takes them."""
        missing = guess[layer.cache.row_of[guess] < 0][: self.rows]
        b = layer.layer % 2
        owner = self._owner[b]
        if owner is not None and owner is not layer:
            owner.pending = None  # its buffer is about to be overwritten (an aborted token)
        self._owner[b] = layer
        buffer = self.buffers[b]
        future = self._pool.submit(self._read, layer.offset, missing, buffer)
        layer.pending = Pending(missing, buffer, future)

    def _read(self, offset: int, ids: np.ndarray, buffer: np.ndarray) -> ReadStats:
        before = self.reader.snapshot()
        self.reader.read(offset, ids, buffer[: len(ids)])
        return self.reader.delta(before)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.reader.close()


class Prefetched:
    """A reader for one layer's decode: the records of `held` from the lookahead's buffer, the
    others from `reader`. `used` counts the records taken from the buffer, `needed` all asked."""

    def __init__(self, pending: Pending, reader):
        self._held, self._buffer, self._reader = pending.held, pending.buffer, reader
        self.used = self.needed = 0

    def _find(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(whether each of ids is held, its row in the buffer where it is)."""
        held = self._held
        pos = np.searchsorted(held, ids)
        inside = pos < len(held)
        inside[inside] = held[pos[inside]] == ids[inside]
        self.used += int(inside.sum())
        self.needed += len(ids)
        return inside, pos

    def split(self, ids: np.ndarray):
        """(the ids held, the buffer, their rows in it, the other ids, the reader for those): a
        cache copies the held records out of the buffer itself (NeuronCache._read)."""
        inside, pos = self._find(ids)
        return ids[inside], self._buffer, pos[inside], ids[~inside], self._reader

    def read(self, layer_offset: int, ids: np.ndarray, out: np.ndarray) -> None:
        inside, pos = self._find(ids)
        rest = np.flatnonzero(~inside)
        if len(rest):  # read into the first rows (aligned), then moved to theirs
            self._reader.read(layer_offset, ids[rest], out[: len(rest)])
            if len(rest) < len(ids):
                out[rest] = out[: len(rest)].copy()
        hit = np.flatnonzero(inside)
        out[hit] = self._buffer[pos[hit]]
