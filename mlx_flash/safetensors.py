"""The one safetensors header parser: every claim checked before any tensor data is read."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .dtypes import BY_NAME, BY_SAFETENSORS

MAX_HEADER_BYTES = 100 << 20

# fail(field, problem) -> the exception to raise (each caller has its own error type)
Fail = Callable[[str, str], Exception]


def read_header(path: Path, fail: Fail, dtypes=BY_SAFETENSORS) -> tuple[dict[str, Any], int]:
    """(tensors by name, offset of the data section) of a safetensors file.

    Checks the header length, that it is a JSON object, each tensor's dtype (one of `dtypes`,
    safetensors tags), shape and byte range, that tensors lie back to back and end at the file's
    end. `__metadata__` is dropped.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise fail("header", f"file is {size} bytes, too short for a safetensors header")
        n = int.from_bytes(head, "little")
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise fail("header", f"header length {n} past the end of the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise fail("header", f"not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise fail("header", "not a JSON object")
    header.pop("__metadata__", None)
    start, spans = 8 + n, []
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise fail(name, "expected an object")
        code, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if code not in dtypes:
            raise fail(f"{name}.dtype", f"unknown {code!r:.40} (supported: {', '.join(dtypes)})")
        ok_shape = isinstance(shape, list) and all(_size(s) for s in shape)
        ok_offs = isinstance(offs, list) and len(offs) == 2 and all(_size(o) for o in offs)
        if not (ok_shape and ok_offs):
            raise fail(name, "bad shape or data_offsets")
        nbytes = math.prod(shape) * BY_SAFETENSORS[code].itemsize
        if offs[1] - offs[0] != nbytes:
            raise fail(f"{name}.data_offsets", f"{offs[1] - offs[0]} bytes, shape {shape} x "
                       f"itemsize is {nbytes}")
        spans.append((offs[0], offs[1], name))
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            raise fail(f"{name}.data_offsets", f"starts at {begin}, expected {pos} (tensors "
                       "must be back to back)")
        pos = end
    if start + pos != size:
        what = "past the end of" if start + pos > size else "short of"
        raise fail("data_offsets", f"tensors end at byte {start + pos}, {what} the file "
                   f"({size} bytes)")
    return header, start


def _size(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def encode_header(tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict) -> bytes:
    """The 8-byte length and JSON header of a safetensors file holding `tensors` (name, dtype
    name, shape) back to back in that order, padded to 8 bytes as the format recommends."""
    header, pos = {"__metadata__": metadata}, 0
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * BY_NAME[dtype].itemsize
        header[name] = {"dtype": BY_NAME[dtype].safetensors, "shape": list(shape),
                        "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw
