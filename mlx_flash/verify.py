"""`mlx-flash verify`: every byte of a flash dir against the checksums written with it.

`convert` records a CRC-32 of the `ffn.bundles` header, of each layer's records and of
`resident.safetensors` in the manifest's `checksums` entry; `calibrate` one of
`predictors.safetensors` in its `predictors` entry. A flipped bit anywhere shows as a mismatch.
"""

from __future__ import annotations

import time
import zlib
from pathlib import Path

from tqdm import tqdm

from . import __version__, platform
from . import format as fmt
from .errors import FormatError

CHUNK_BYTES = 16 << 20


def _crc(path: Path, start: int, nbytes: int, bar) -> int:
    crc = 0
    with open(path, "rb") as f:
        f.seek(start)
        while nbytes > 0:
            data = f.read(min(CHUNK_BYTES, nbytes))
            if not data:
                break
            crc = zlib.crc32(data, crc)
            nbytes -= len(data)
            bar.update(len(data))
    platform.evict_from_page_cache(path)  # verifying must not push the user's pages out
    return crc


def verify(path: str | Path, progress: bool = True) -> dict:
    """Check every byte of the flash dir `path`; FormatError naming the first damaged part.

    On success the manifest records when (`verified`); returns what was checked.
    """
    m = fmt.read_manifest(path)
    sums = m.extra.get("checksums")
    if not isinstance(sums, dict) or sums.get("algorithm") != "crc32":
        raise FormatError(fmt.MANIFEST, "checksums", "missing (the dir was converted by an older "
                          "mlx-flash)", "re-run `mlx-flash convert` to get a verifiable dir")
    spans = [(fmt.FFN_FILE, "header", m.ffn_path, 0, m.data_offset, sums.get("ffn_header"))]
    layer_sums = sums.get("ffn_layers") or []
    spans += [(fmt.FFN_FILE, f"layers[{i}]", m.ffn_path, off, m.layer_bytes,
               layer_sums[i] if i < len(layer_sums) else None)
              for i, off in enumerate(m.layer_offsets)]
    spans.append((fmt.RESIDENT_FILE, "-", m.resident_path, 0, m.resident_bytes,
                  sums.get("resident")))
    for key in ("predictors", "sketch"):  # files written after convert, each with its CRC
        entry = m.extra.get(key)
        if not isinstance(entry, dict):
            continue
        # values mode's down rows (down_rows.py), also beside a quantized dir's own rows
        for item in (entry, entry.get("down")):
            if isinstance(item, dict) and "crc32" in item:
                file = m.path / str(item.get("file", f"{key}.safetensors"))
                if file.is_file():
                    spans.append((file.name, "-", file, 0, file.stat().st_size, item["crc32"]))
    bad = []
    tic = time.perf_counter()
    with tqdm(total=sum(s[4] for s in spans), desc="verify", unit="B", unit_scale=True,
              disable=not progress, leave=False) as bar:
        for name, part, file, start, nbytes, want in spans:
            if _crc(file, start, nbytes, bar) != want:
                bad.append((name, part))
    if bad:
        name, part = bad[0]
        more = f" (and {len(bad) - 1} more parts)" if len(bad) > 1 else ""
        fix = ("re-run `mlx-flash calibrate`" if name.startswith("predictors")
               else "re-run `mlx-flash sketch`" if name.startswith(("sketch", "down"))
               else "re-run `mlx-flash convert` on the source checkpoint")
        raise FormatError(name, part, f"checksum mismatch: its bytes changed after they were "
                          f"written{more}", fix)
    checked = sum(s[4] for s in spans)
    stamp = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "by": f"mlx-flash {__version__}", "bytes": checked}
    fmt.update_manifest(m.path, verified=stamp)
    return {"path": str(m.path), "ok": True, "parts": len(spans), "bytes": checked,
            "seconds": round(time.perf_counter() - tic, 2), "verified": stamp}
