"""`mlx-flash probe`: uncached random-read throughput of the volume that holds the models.

Reads random, aligned requests of each size with each thread count from a scratch file through
the very reader the runtime uses (`FlashReader`: O_DIRECT / F_NOCACHE `preadv` from a thread
pool, each thread a contiguous slice of the batch), so the table is what the runtime can get.
The profile it measures is stored per volume by profiles.py: it tells the reader its thread count
and coalescing limit, and gives the cost model (bench/costmodel.py) its throughput table.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from . import platform
from .errors import FlashError
from .profiles import Profile, save_profile  # noqa: F401  (`mlx-flash probe` saves through here)

SIZES = (4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20)
THREADS = (1, 2, 4, 8, 16, 32)
FILE_BYTES = 1 << 30  # scratch file: large enough that requests rarely repeat
SECONDS = 0.4  # measuring time per (size, threads) cell
BATCH_REQUESTS = 256  # requests per read call, about what one layer of a decode token asks for
BATCH_BYTES = 64 << 20


def _write_scratch(file: Path, nbytes: int) -> None:
    """Random bytes (a thin-provisioned or compressing disk could shortcut zeros), fsynced."""
    rng = np.random.default_rng(0)
    block = 16 << 20
    with open(file, "wb") as f:
        for start in range(0, nbytes, block):
            f.write(rng.integers(0, 256, min(block, nbytes - start), dtype=np.uint8).tobytes())
        f.flush()
        os.fsync(f.fileno())


def measure_cell(file: str | Path, size: int, threads: int, slots: int, seconds: float,
                 rng: np.random.Generator, out: np.ndarray) -> tuple[float, bool]:
    """GB/s of random `size`-byte reads (aligned slots 0..slots-1 of `file`) from `threads`
    threads for about `seconds`, in batches like the probe's; and whether I/O was direct.
    `out`: an aligned uint8 buffer of at least BATCH_BYTES (see storage.aligned_empty)."""
    from .storage import FlashReader

    batch = min(slots // 2, max(threads, min(BATCH_REQUESTS, BATCH_BYTES // size)))
    with FlashReader(file, size, threads, max_request_bytes=size) as reader:  # no coalescing
        def once():
            ids = np.sort(rng.choice(slots, size=batch, replace=False))
            reader.read(0, ids, out[: batch * size].reshape(batch, size))

        once()  # warm up: thread start, first touch of the buffer
        start, t0 = reader.snapshot(), time.perf_counter()
        while True:
            once()
            if time.perf_counter() - t0 >= seconds and reader.delta(start).calls >= 2:
                break
        return reader.delta(start).gb_per_s, reader.direct


def probe(
    path: str | Path | None = None,
    sizes: Sequence[int] = SIZES,
    threads: Sequence[int] = THREADS,
    file_bytes: int = FILE_BYTES,
    seconds: float = SECONDS,
    progress: Callable[[str], None] | None = None,
) -> Profile:
    """Measure the volume holding `path` (default `models/`); the scratch file is removed after.

    `progress` receives one line per measured cell.
    """
    from .convert import DEFAULT_MODELS_DIR
    from .storage import aligned_empty

    path = Path(path) if path is not None else DEFAULT_MODELS_DIR
    if not path.is_dir():
        raise FlashError(f"{path}: no such directory (--path names a directory on the volume "
                         "that holds the models)")
    sizes, threads = sorted(set(sizes)), sorted(set(threads))
    align = platform.direct_io_alignment()
    if not sizes or sizes[0] < align or any(s % align for s in sizes) or min(threads) < 1:
        raise FlashError(f"request sizes must be multiples of {align} bytes and threads >= 1")
    slots = file_bytes // sizes[-1] * sizes[-1] // sizes[0]  # in units of the smallest size
    if file_bytes < 4 * sizes[-1]:
        raise FlashError(f"scratch file of {file_bytes} bytes is too small for {sizes[-1]}-byte "
                         "requests (need at least 4)")
    file = path / f".mlx-flash-probe-{os.getpid()}.scratch"
    rng = np.random.default_rng(1)
    table = []
    direct = True
    try:
        _write_scratch(file, slots * sizes[0])
        platform.evict_from_page_cache(file)
        max_batch = max(min(BATCH_REQUESTS, BATCH_BYTES // s) for s in sizes)
        buf_bytes = max(max_batch * sizes[0], max(threads) * sizes[-1], BATCH_BYTES)
        _, out = aligned_empty(1, buf_bytes)
        out = out.reshape(-1)
        for size in sizes:
            row = []
            for t in threads:
                gbs, ok = measure_cell(file, size, t, slots * sizes[0] // size, seconds, rng, out)
                direct &= ok
                row.append(round(gbs, 4))
                if progress:
                    progress(f"{_fmt_size(size):>7} x {t:>2} threads: {gbs:.3f} GB/s")
            table.append(row)
    finally:
        file.unlink(missing_ok=True)
    return Profile(
        sizes=list(sizes), threads=list(threads), gb_per_s=table, path=str(path.resolve()),
        device=os.stat(path).st_dev, direct=direct, file_bytes=slots * sizes[0],
        seconds_per_cell=seconds, created=time.strftime("%Y-%m-%dT%H:%M:%S"),
        platform=machine(),
    )


def fio_reference(path: str | Path, sizes: Sequence[int] = (4 << 10, 16 << 10, 64 << 10, 256 << 10),
                  seconds: int = 3) -> dict:
    """The disk's own ceiling from `fio` (random reads, O_DIRECT, io_uring, queue depth 32), per
    size, in GB/s; {} when fio is not installed. For comparing the probe, never used by it."""
    import shutil
    import subprocess

    if shutil.which("fio") is None:
        return {}
    file = Path(path) / f".mlx-flash-fio-{os.getpid()}.scratch"
    out = {}
    try:
        for size in sizes:
            cmd = ["fio", "--name=probe", f"--filename={file}", "--size=1G", "--rw=randread",
                   f"--bs={size}", "--direct=1", "--ioengine=io_uring", "--iodepth=32",
                   f"--runtime={seconds}", "--time_based", "--output-format=json"]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120)
            if res.returncode != 0:
                return out
            out[str(size)] = round(json.loads(res.stdout)["jobs"][0]["read"]["bw_bytes"] / 1e9, 4)
    finally:
        file.unlink(missing_ok=True)
    return out


# ---------------------------------------------------------------------------------------------
# Output


def machine() -> str:
    """One line about this machine: OS, CPU architecture, cores, memory."""
    u = os.uname()
    return (f"{u.sysname} {u.machine}, {os.cpu_count()} cores, "
            f"{platform.physical_memory_bytes() / 2**30:.0f} GiB RAM")


def _fmt_size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def format_table(profile: Profile) -> str:
    """Markdown table: one row per request size, one column per thread count (GB/s)."""
    head = "| request | " + " | ".join(f"{t} thr" for t in profile.threads) + " | best threads |"
    lines = [head, "|" + "---|" * (len(profile.threads) + 2)]
    for size, row in zip(profile.sizes, profile.gb_per_s):
        cells = " | ".join(f"{v:.3f}" for v in row)
        lines.append(f"| {_fmt_size(size)} | {cells} | {profile.best_threads(size)} |")
    return "\n".join(lines)


def summary(profile: Profile) -> str:
    threads, request = profile.reader_settings(16 << 10)
    note = "" if profile.direct else " (NOT direct I/O: the page cache served these reads)"
    return (f"volume of {profile.path}{note}: 16 KiB records -> {threads} threads; coalesce "
            f"requests up to {_fmt_size(request)}")


def plot(profile: Profile, file: str | Path) -> Path:
    """Throughput against request size, one line per thread count (needs matplotlib)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for j, t in enumerate(profile.threads):
        ax.plot(profile.sizes, [row[j] for row in profile.gb_per_s], marker="o", label=f"{t} threads")
    if profile.fio:
        ax.plot([int(s) for s in profile.fio], list(profile.fio.values()), "k--", marker="x",
                label="fio io_uring QD32")
    ax.set_xscale("log", base=2)
    ax.set_xticks(profile.sizes, [_fmt_size(s) for s in profile.sizes])
    ax.set_xlabel("request size")
    ax.set_ylabel("GB/s (uncached random reads)")
    ax.set_title(f"mlx-flash probe: {profile.path}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)
    return Path(file)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FlashError("--plot needs matplotlib: pip install matplotlib") from None
    return plt
