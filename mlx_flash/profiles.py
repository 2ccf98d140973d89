"""Probe profiles: what `mlx-flash probe` measured, one entry per volume in one JSON file.

A volume's profile gives the reader its thread count and coalescing limit (`reader_settings`)
and the cost model (bench/costmodel.py) its throughput table.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import FlashError

PROFILE_VERSION = 1
DEFAULT_THREADS = 16  # reader settings when a volume has no profile
DEFAULT_REQUEST_BYTES = 1 << 20
# Threads: the fewest reaching this share of the best throughput at a size (more only add
# contention). Coalescing: the smallest request reaching this share of the volume's best.
GOOD_ENOUGH = 0.95


@dataclass
class Profile:
    """The probe of one volume: throughput `gb_per_s[i][j]` for `sizes[i]` with `threads[j]`."""

    sizes: list[int]
    threads: list[int]
    gb_per_s: list[list[float]]
    path: str = ""
    device: int = 0
    direct: bool = True  # False: reads were served by the page cache (no O_DIRECT here)
    file_bytes: int = 0
    seconds_per_cell: float = 0.0
    created: str = ""
    platform: str = ""
    version: int = PROFILE_VERSION
    fio: dict = field(default_factory=dict)  # MAY: reference figures from fio, same sizes

    def table(self) -> np.ndarray:
        return np.asarray(self.gb_per_s, dtype=np.float64)

    def best_threads(self, size: int) -> int:
        """The fewest probed threads within GOOD_ENOUGH of the best at the probed size nearest
        to `size` (log scale)."""
        row = self.table()[self._size_index(size)]
        return self.threads[int(np.flatnonzero(row >= GOOD_ENOUGH * row.max())[0])]

    def coalesce_bytes(self) -> int:
        """Largest useful request: the smallest probed size within GOOD_ENOUGH of the best
        throughput; larger requests gain nothing and spread over fewer threads."""
        best = self.table().max(axis=1)
        return self.sizes[int(np.flatnonzero(best >= GOOD_ENOUGH * best.max())[0])]

    def reader_settings(self, record_bytes: int) -> tuple[int, int]:
        """(threads, max_request_bytes) for a reader of `record_bytes` records."""
        return self.best_threads(record_bytes), max(record_bytes, self.coalesce_bytes())

    def _size_index(self, size: int) -> int:
        return int(np.argmin(np.abs(np.log2(self.sizes) - np.log2(max(size, 1)))))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Profile:
        if d.get("version") != PROFILE_VERSION:
            raise FlashError(f"probe profile version {d.get('version')} is not "
                             f"{PROFILE_VERSION}; re-run `mlx-flash probe`")
        known = set(cls.__dataclass_fields__)
        p = cls(**{k: v for k, v in d.items() if k in known})
        t = p.table()
        if t.shape != (len(p.sizes), len(p.threads)) or not np.all(np.isfinite(t)) or t.min() <= 0:
            raise FlashError("probe profile: throughput table does not match its sizes and "
                             "threads; re-run `mlx-flash probe`")
        return p


# ---------------------------------------------------------------------------------------------
# Where profiles live: one JSON file, one entry per volume (st_dev of the probed directory)


def profile_file() -> Path:
    """`$MLX_FLASH_PROBE` or `~/.cache/mlx-flash/probe.json`."""
    env = os.environ.get("MLX_FLASH_PROBE")
    return Path(env) if env else Path.home() / ".cache" / "mlx-flash" / "probe.json"


def _read_profiles(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise FlashError(f"{file}: unreadable probe profile ({e}); delete it or re-run "
                         "`mlx-flash probe`") from None
    return data.get("volumes", {}) if isinstance(data, dict) else {}


def save_profile(profile: Profile, file: str | Path | None = None) -> Path:
    """Store `profile` as the entry of its volume (atomically); returns the file."""
    file = Path(file) if file is not None else profile_file()
    file.parent.mkdir(parents=True, exist_ok=True)
    volumes = _read_profiles(file)
    volumes[str(profile.device)] = profile.to_dict()
    partial = file.with_name(file.name + ".partial")
    partial.write_text(json.dumps({"volumes": volumes}, indent=1) + "\n")
    os.replace(partial, file)
    return file


def load_profile(for_path: str | Path, file: str | Path | None = None) -> Profile | None:
    """The saved profile of the volume holding `for_path`, or None."""
    file = Path(file) if file is not None else profile_file()
    entry = _read_profiles(file).get(str(os.stat(for_path).st_dev))
    return None if entry is None else Profile.from_dict(entry)


def profile_used(path: str | Path) -> str | None:
    """The profile file whose entry the reader of `path` follows, None when it has none."""
    try:
        return str(profile_file()) if load_profile(path) is not None else None
    except (FlashError, OSError):
        return None


def reader_settings(path: str | Path, record_bytes: int) -> tuple[int, int]:
    """(threads, max_request_bytes) for reading `path`: from its volume's profile, else
    (16, 1 MiB). A broken profile file is ignored here (the runtime must not fail on it)."""
    try:
        profile = load_profile(path)
    except (FlashError, OSError):
        profile = None
    if profile is None:
        return DEFAULT_THREADS, max(record_bytes, DEFAULT_REQUEST_BYTES)
    return profile.reader_settings(record_bytes)
