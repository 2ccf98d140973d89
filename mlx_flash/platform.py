"""Every operating-system difference of the project, and nowhere else.

Target: macOS (F_NOCACHE, 16 KiB pages). Development and CI: Linux (O_DIRECT, 4 KiB pages).
Anything else gets the Linux-like POSIX path where it exists and a harmless fallback otherwise.
"""

from __future__ import annotations

import errno
import os
import resource
import sys
from pathlib import Path
from typing import NamedTuple

IS_LINUX = sys.platform.startswith("linux")
IS_MACOS = sys.platform == "darwin"

# fcntl(F_NOCACHE) command number on macOS; Python exposes it as fcntl.F_NOCACHE there.
_F_NOCACHE = 48


def direct_io_alignment() -> int:
    """Byte alignment for uncached reads: offset, length and buffer address.

    4096 on Linux (O_DIRECT wants the logical block size; 4096 covers every common disk),
    16384 on macOS (Apple Silicon page size, the unit F_NOCACHE reads are served in).
    """
    return 16384 if IS_MACOS else 4096


class DirectFile(NamedTuple):
    """An open read-only file descriptor and whether reads bypass the page cache."""

    fd: int
    direct: bool


def open_direct(path: str | os.PathLike) -> DirectFile:
    """Open `path` read-only so that reads bypass the page cache.

    Linux: O_RDONLY | O_DIRECT. If the file system refuses O_DIRECT (EINVAL, e.g. tmpfs), fall
    back to a normal open after dropping cached pages; `direct` is then False and reads may be
    served from the page cache. macOS: plain open, then fcntl(F_NOCACHE, 1). Elsewhere: plain open,
    `direct` False. The caller owns the descriptor and closes it with `os.close`.
    """
    if IS_LINUX and hasattr(os, "O_DIRECT"):
        try:
            return DirectFile(os.open(path, os.O_RDONLY | os.O_DIRECT), True)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
        fd = os.open(path, os.O_RDONLY)
        _fadvise_dontneed(fd)
        return DirectFile(fd, False)
    fd = os.open(path, os.O_RDONLY)
    if IS_MACOS:
        import fcntl

        try:
            fcntl.fcntl(fd, getattr(fcntl, "F_NOCACHE", _F_NOCACHE), 1)
            return DirectFile(fd, True)
        except OSError:
            return DirectFile(fd, False)
    return DirectFile(fd, False)


def _fadvise_dontneed(fd: int) -> bool:
    if not hasattr(os, "posix_fadvise"):
        return False
    try:
        # Dirty pages are not dropped by DONTNEED; a freshly written file needs the fsync.
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except OSError:
        return False


def evict_from_page_cache(path: str | os.PathLike) -> bool:
    """Best effort: drop the cached pages of `path` so the next read comes from the disk.

    Returns True when the OS was asked to drop them (Linux: fsync + posix_fadvise DONTNEED),
    False when this platform offers no unprivileged way (macOS: F_NOCACHE only affects future
    reads; a cold cache there needs `sudo purge`). Never raises for an unsupported platform or
    file system; a missing file still raises FileNotFoundError.
    """
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        return _fadvise_dontneed(fd)
    finally:
        os.close(fd)


def process_read_bytes() -> int | None:
    """Bytes this process has caused to be read from storage (Linux `/proc/self/io` read_bytes).

    Counts O_DIRECT reads and page-cache misses, not cache hits. None where unavailable.
    """
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process in bytes.

    Linux: VmHWM of /proc/self/status (ru_maxrss survives exec, so a child of a big parent would
    report the parent's peak). Elsewhere ru_maxrss (bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if IS_MACOS else peak * 1024


def current_rss_bytes() -> int:
    """Current resident set size in bytes (Linux `/proc/self/statm`); the peak elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def physical_memory_bytes() -> int:
    """Installed physical memory in bytes."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        if not IS_MACOS:
            raise
    # Older macOS Pythons lack SC_PHYS_PAGES; the kernel states it directly.
    import subprocess

    return int(subprocess.check_output(["sysctl", "-n", "hw.memsize"], text=True))


def memory_cgroup() -> Path | None:
    """This process's cgroup v1 memory group when new groups may be made in it (Linux, root).

    Benchmarks and tests put a process in a child group to enforce a real memory limit (page
    cache included). None elsewhere.
    """
    root = Path("/sys/fs/cgroup/memory")
    if not IS_LINUX or os.geteuid() != 0 or not (root / "cgroup.procs").exists():
        return None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, where = line.split(":", 2)
        if "memory" in controllers.split(","):
            return root / where.lstrip("/")
    return root


def memory_limit_bytes() -> int | None:
    """The memory limit of this process's cgroup (Linux v1 `memory.limit_in_bytes` or v2
    `memory.max`, page cache included), None where there is none or it cannot be read."""
    if not IS_LINUX:
        return None
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, where = line.split(":", 2)
        where = where.lstrip("/")
        if "memory" in controllers.split(","):
            file = Path("/sys/fs/cgroup/memory") / where / "memory.limit_in_bytes"
        elif controllers == "":
            file = Path("/sys/fs/cgroup") / where / "memory.max"
        else:
            continue
        try:
            text = file.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < physical_memory_bytes():
            return int(text)  # v1 reports "no limit" as a huge number, v2 as "max"
    return None


def limit_allocator_retention() -> None:
    """Make the C allocator give freed large blocks back to the system (Linux glibc: a fixed
    128 KiB mmap and trim threshold instead of glibc's growing one, which keeps tens of MiB of
    freed numpy and reader temporaries in the process after a prefill). Elsewhere nothing."""
    if not IS_LINUX:
        return
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl): its allocator returns memory itself
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    mallopt(m_mmap_threshold, 128 << 10)
    mallopt(m_trim_threshold, 128 << 10)
    # one heap per reader thread (glibc's default, up to 8 per core) each keeps its own freed
    # memory: two heaps for the process
    mallopt(m_arena_max, 2)


def read_uncached(path: str | os.PathLike, offset: int, out,
                  chunk: int = 8 << 20) -> None:
    """Read `out.nbytes` bytes of `path` at `offset` into the writable uint8 array `out`
    without leaving them in the page cache (Linux: each chunk dropped once read; macOS:
    F_NOCACHE), so a memory limit that counts page cache sees the bytes once, not twice."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if IS_MACOS:
            import fcntl

            fcntl.fcntl(fd, fcntl.F_NOCACHE, 1)
        else:  # no readahead: pages read ahead past a chunk would stay cached (tens of MiB
            # over a file of many tensors, measured under a memory group)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        view = memoryview(out).cast("B")
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done : done + chunk]], offset + done)
            if n <= 0:
                raise OSError(f"{path}: unexpected end of file at byte {offset + done}")
            if not IS_MACOS:
                os.posix_fadvise(fd, offset + done, n, os.POSIX_FADV_DONTNEED)
            done += n
    finally:
        os.close(fd)
