"""The commands that generate, under `mlx.launch -n N`: rank 0 runs the command and prints; the
other ranks serve their layers (distributed.py) and print nothing but a fatal line."""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
from collections.abc import Callable

import typer

from ..errors import FlashError

RING_NOISE = b"[ring]"  # MLX's ring backend's own lines: ten of them when a peer goes away


def pipelined(fn):
    """Run the command on rank 0 (then tell the other ranks to stop) and serve its layers on
    the others; a plain run when not launched by `mlx.launch` with several processes."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .. import distributed

        group = distributed.launched()
        if group is None:
            return fn(*args, **kwargs)
        if group.rank() > 0:
            raise typer.Exit(_serve_quietly(group))
        restore, stderr = _drop_ring_lines()
        watch = distributed.Watchdog(group, lambda line: _write(stderr, line)).start()
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # after a lost rank, whatever broke: say that it was lost
            known = (distributed.PeerLost, typer.Exit)
            if not isinstance(e, known) and (peer := watch.lost()) is not None:
                raise distributed.PeerLost(distributed.lost_line(peer)) from None
            raise
        finally:
            if watch.lost() is None:  # (the watchdog still ends a stop that cannot be sent)
                distributed.stop(group)
            watch.stop()
            restore()

    return wrapper


def _serve_quietly(group) -> int:
    """Serve this rank's layers with stdout and stderr silenced; the exit status. A fatal error
    is the one line it prints (everything with MLX_FLASH_DEBUG=1)."""
    from .. import distributed

    debug = os.environ.get("MLX_FLASH_DEBUG") == "1"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches every rank; rank 0 decides
    err = os.dup(2)
    if not debug:
        sys.stdout.flush()
        sys.stderr.flush()
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        os.close(null)
    rank = group.rank()
    watch = distributed.Watchdog(group, lambda line: _write(err, f"rank {rank}: {line}")).start()
    try:
        return 0 if distributed.serve(group) else 1  # a failed load: rank 0 says why
    except Exception as e:  # one line; the traceback with MLX_FLASH_DEBUG=1
        if debug:
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        msg = first if isinstance(e, FlashError) else f"{type(e).__name__}: {first}"
        if not isinstance(e, distributed.PeerLost) and (peer := watch.lost()) is not None:
            msg = distributed.lost_line(peer)
    finally:
        watch.stop()
    _write(err, f"rank {rank}: {msg}")
    return 1


def _write(fd: int, line: str) -> None:
    """An error line straight to a file descriptor (the terminal's stderr)."""
    os.write(fd, f"error: {line}\n".encode())


def _drop_ring_lines() -> tuple[Callable[[], None], int]:
    """Pass stderr through a thread that drops the ring backend's lines, so that a rank that
    stopped reads as the one line of ours; returns what puts stderr back, and the terminal's
    stderr meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)
    thread = threading.Thread(target=_copy_lines, args=(read, saved), daemon=True)
    thread.start()

    def restore() -> None:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer closes: the thread copies the rest and ends
        thread.join(timeout=2)
        os.close(saved)

    return restore, saved


def _copy_lines(src: int, dst: int) -> None:
    """Copy `src` to `dst` as it comes, leaving out each RING_NOISE up to the end of its line."""
    pending, dropping = b"", False
    while chunk := os.read(src, 1 << 16):
        pending, out = pending + chunk, []
        while pending:
            if dropping:
                end = pending.find(b"\n")
                pending, dropping = (b"", True) if end < 0 else (pending[end + 1 :], False)
                continue
            at = pending.find(RING_NOISE)
            if at >= 0:
                out.append(pending[:at])
                pending, dropping = pending[at:], True
                continue
            # hold back what may begin a RING_NOISE that the next read completes
            keep = next((k for k in range(len(RING_NOISE) - 1, 0, -1)
                         if pending.endswith(RING_NOISE[:k])), 0)
            out.append(pending[: len(pending) - keep])
            pending = pending[len(pending) - keep :]
            break
        if out:
            os.write(dst, b"".join(out))
    if pending and not dropping:
        os.write(dst, pending)
    os.close(src)
