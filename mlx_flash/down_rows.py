"""`down.bin`: values mode's down rows where a record's down span does not fill whole blocks of
its own (sketch.py). SmolLM2's 1,152-byte down row read alone from its record costs the
record's 4 KiB block; here each layer's down rows lie one after another, so a token's chosen
rows share their blocks (docs/FORMAT.md)."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from . import format as fmt
from . import models
from .errors import FlashError
from .layout import round_up

DOWN_FILE = "down.bin"


def column_span(m: fmt.Manifest) -> tuple[int, int]:
    """The byte span of the column part (down) in a record."""
    return m.part(models.flash_spec(m.architecture).column_part.name).span


class DownRows:
    """Writes `down.bin`: each layer's down rows (the records' column part, as stored) one after
    another, the layer padded to the dir's alignment, through a partial file renamed into place
    by `finish`; `discard` removes whatever is left of the partial file."""

    def __init__(self, m: fmt.Manifest):
        self.m, self.span = m, column_span(m)
        self.file = m.path / DOWN_FILE
        self.partial = m.path / (DOWN_FILE + ".partial")
        self.crc, self.layers = 0, 0
        self.f = self._io(lambda: open(self.partial, "wb"))

    def add(self, records) -> None:
        lo, hi = self.span
        data = np.ascontiguousarray(records[:, lo:hi]).tobytes()
        data += bytes(down_layer_bytes(self.m) - len(data))
        self.crc = zlib.crc32(data, self.crc)
        self._io(lambda: self.f.write(data))
        self.layers += 1

    def finish(self) -> dict:
        def close():
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            os.replace(self.partial, self.file)
        self._io(close)
        lo, hi = self.span
        return {"file": DOWN_FILE, "row_bytes": hi - lo, "layer_bytes": down_layer_bytes(self.m),
                "bytes": self.layers * down_layer_bytes(self.m), "crc32": self.crc}

    def discard(self) -> None:
        self.f.close()
        self.partial.unlink(missing_ok=True)

    def _io(self, op):
        try:
            return op()
        except OSError as e:
            self.partial.unlink(missing_ok=True)
            raise FlashError(f"{self.m.path}: cannot write {DOWN_FILE} ({e.strerror}); is the "
                             "disk full? The model dir is unchanged") from None


def needs_down_file(m: fmt.Manifest) -> bool:
    """Whether values mode reads its down rows from `down.bin`: where a record's down span does
    not fill whole blocks of its own (packed records, or a down row smaller than a block)."""
    lo, hi = column_span(m)
    return m.packed or lo % m.alignment != 0 or hi % m.alignment != 0


def down_layer_bytes(m: fmt.Manifest) -> int:
    """One layer's down rows in `down.bin`, padded to the dir's alignment."""
    lo, hi = column_span(m)
    return round_up(m.ffn_dim * (hi - lo), m.alignment)


def down_file(m: fmt.Manifest) -> tuple[Path, int, int] | None:
    """Values mode's `down.bin`: (path, row bytes, layer bytes); None where the down rows are
    read from the records."""
    if not needs_down_file(m):
        return None
    entry = m.extra["sketch"]["down"]
    return m.path / entry["file"], entry["row_bytes"], entry["layer_bytes"]


def down_problem(m: fmt.Manifest, entry: dict) -> str | None:
    """What is wrong with a values sketch's `down` entry and file, or None."""
    down = entry.get("down")
    lo, hi = column_span(m)
    want = {"file": DOWN_FILE, "row_bytes": hi - lo, "layer_bytes": down_layer_bytes(m),
            "bytes": m.num_layers * down_layer_bytes(m)}
    if not isinstance(down, dict):
        return "missing (the down rows of values mode)"
    for k, v in want.items():
        if down.get(k) != v:
            return f"{k} {down.get(k)!r}, expected {v!r}"
    file = m.path / DOWN_FILE
    if not file.is_file() or file.stat().st_size != want["bytes"]:
        return f"{DOWN_FILE} is missing or not {want['bytes']} bytes"
    return None


