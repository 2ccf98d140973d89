"""The messages of a pipeline of ranks (distributed.py) and its steps: rank 0's `Pipeline`
sends the hidden state around the ring, ranks > 0 run their layers on it (`serve_steps`).

Every message is a header of HEADER int64 values (its kind, then fields) and most have a payload
of bytes whose size the header gives. A step from rank r-1 to rank r carries each layer's mask
kind (int64 per layer), the distinct mask arrays, the hidden state and the counters of ranks
1..r-1 (float64 rows); the last rank sends rank 0 the hidden state and every rank's counters.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import select
import socket
import stat
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .errors import FlashError
from .state import FlashStats, state_of

HEADER = 32  # int64 values: kind, then its fields
STOP, SETUP, READY, STEP = 0, 1, 2, 3
NO_MASK, CAUSAL = -2, -1  # a layer's mask: None, "causal", else the index of an array
MAX_MASKS = 4
DTYPES = (mx.bool_, mx.uint8, mx.int32, mx.int64, mx.float16, mx.bfloat16, mx.float32)


class PeerLost(FlashError):
    """A rank stopped: its connection closed while this one sent to it or waited for it."""


def lost_line(peer: int) -> str:
    return f"rank {peer} stopped (its connection closed); ending"


class Link:
    """This rank's two neighbours on the ring: it receives from `prev` and sends to `next`.

    The ring backend waits for a message by polling its socket (a core at 100% for as long as
    the other ranks compute, or rank 0 waits for a user); a receive here first waits in
    `select` until the message begins to arrive (the backend reads no further than asked)."""

    def __init__(self, group):
        self.group, self.rank, self.size = group, group.rank(), group.size()
        self.next, self.prev = (self.rank + 1) % self.size, (self.rank - 1) % self.size
        self.incoming = [fd for fd, _, incoming in ring_sockets(self.rank, self.size)
                         if incoming]

    def _wait(self) -> None:
        if self.incoming:
            select.select(self.incoming, [], [])

    def _guard(self, peer: int, fn):
        try:
            return fn()
        except RuntimeError:  # the ring backend: "connection to a peer was lost"
            raise PeerLost(lost_line(peer)) from None

    def send(self, head: list[int] | None, payload: mx.array | None = None) -> None:
        """A header (None: none) and a payload (None: none) to the next rank."""
        parts = [] if payload is None else [payload]
        if head is not None:
            values = np.zeros(HEADER, np.int64)
            values[: len(head)] = head
            parts.insert(0, mx.array(values))
        for x in parts:
            self._guard(self.next, lambda x=x: mx.eval(
                mx.distributed.send(x, self.next, group=self.group, stream=mx.cpu)))

    def recv_head(self) -> np.ndarray:
        self._wait()
        return self._guard(self.prev, lambda: np.array(mx.distributed.recv(
            (HEADER,), mx.int64, self.prev, group=self.group, stream=mx.cpu)))

    def recv(self, n: int) -> mx.array:
        """`n` bytes of payload (uint8)."""
        self._wait()

        def get():
            buf = mx.distributed.recv((n,), mx.uint8, self.prev, group=self.group, stream=mx.cpu)
            mx.eval(buf)
            return buf
        return self._guard(self.prev, get)

    def send_json(self, kind: int, obj) -> None:
        data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
        self.send([kind, data.size], mx.array(data))

    def recv_json(self, kind: int, head: np.ndarray | None = None):
        head = self.recv_head() if head is None else head
        if head[0] != kind:
            raise FlashError(f"out of step with rank {self.prev} (message {int(head[0])}, "
                             f"expected {kind})")
        return json.loads(np.array(self.recv(int(head[1]))).tobytes())


def ring_sockets(rank: int, size: int) -> list[tuple[int, int, bool]]:
    """(fd, neighbour, incoming) of each ring connection of this process: the ring backend
    connects to the next rank's address in MLX_HOSTFILE (it sends to the next rank there) and
    accepts the previous rank's on its own (`incoming`: it receives from the previous rank
    there). Empty for other backends."""
    try:
        with open(os.environ["MLX_HOSTFILE"]) as f:
            hosts = json.load(f)
        listen = {_address(a): k for k, addrs in enumerate(hosts) for a in addrs}
    except (KeyError, OSError, ValueError, TypeError, AttributeError):
        return []  # another backend: it reports a lost peer itself, or not at all
    out = []
    for name in os.listdir("/dev/fd"):
        try:
            fd = int(name)
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            with socket.socket(fileno=os.dup(fd)) as s:
                local, peer = s.getsockname()[:2], s.getpeername()[:2]
        except (OSError, ValueError):
            continue
        if peer in listen:
            out.append((fd, listen[peer], False))
        elif listen.get(local) == rank:
            out.append((fd, (rank - 1) % size, True))
    return out


def _address(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host, int(port)


def closed(fd: int) -> bool:
    """Whether the peer of socket `fd` closed it (a peek: nothing is read)."""
    try:
        with socket.socket(fileno=os.dup(fd)) as s:
            return s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _pad8(n: int) -> int:
    return -(-n // 8) * 8


def _pack(parts: list) -> mx.array:
    """The bytes of numpy and MLX arrays back to back, each padded to 8 bytes: one payload."""
    out = []
    for a in parts:
        b = mx.array(np.ascontiguousarray(a).view(np.uint8).reshape(-1)) \
            if isinstance(a, np.ndarray) else a.reshape(-1).view(mx.uint8)
        out.append(b)
        if b.size % 8:
            out.append(mx.zeros((8 - b.size % 8,), mx.uint8))
    return mx.concatenate(out)


def _take(buf: mx.array, at: int, shape: tuple, dtype) -> tuple[mx.array, int]:
    """The array of `shape` and `dtype` at byte `at` of a payload, and the next offset."""
    n = math.prod(shape) * dtype.size
    return buf[at : at + n].view(dtype).reshape(shape), at + _pad8(n)


def _numbers(buf: mx.array, at: int, count: int, dtype) -> tuple[np.ndarray, int]:
    n = count * np.dtype(dtype).itemsize
    return np.array(buf[at : at + n]).view(dtype), at + _pad8(n)


def _row(streaming: bool, rss: int, s: FlashStats) -> np.ndarray:
    """A rank's counters as float64 numbers: whether it streams, its peak RSS, FlashStats'."""
    values = [float(streaming), float(rss)]
    for f in _STAT_FIELDS:
        v = getattr(s, f)
        values += [float(getattr(v, g.name)) for g in dataclasses.fields(v)] \
            if dataclasses.is_dataclass(v) else [float(v)]
    return np.asarray(values, np.float64)


def _unrow(row: np.ndarray) -> tuple[bool, int, FlashStats]:
    values, s = [float(v) for v in row[2:]], FlashStats()
    for f in _STAT_FIELDS:
        v = getattr(s, f)
        if dataclasses.is_dataclass(v):
            kinds = [type(getattr(v, g.name)) for g in dataclasses.fields(v)]
            setattr(s, f, type(v)(*(k(values.pop(0)) for k in kinds)))
        else:
            setattr(s, f, type(v)(values.pop(0)))
    return bool(row[0]), int(row[1]), s


def _my_row(model) -> np.ndarray:
    from . import platform

    rt = state_of(model).runtime
    return _row(rt is not None, platform.peak_rss_bytes(), rt.stats if rt else FlashStats())


_STAT_FIELDS = [f.name for f in dataclasses.fields(FlashStats)
                if f.name not in ("last_token_start", "ranks")]
ROW = len(_row(False, 0, FlashStats()))


# -- one step: rank 0's hidden state through the other ranks' layers ------------------------------


def _step_head(h: mx.array, offset: int, cached: bool, masks: list[mx.array]) -> list[int]:
    head = [STEP, *h.shape, DTYPES.index(h.dtype), offset, int(cached), len(masks)]
    for a in masks:
        head += [DTYPES.index(a.dtype), a.ndim, *a.shape, *[1] * (4 - a.ndim)]
    return head


@dataclass
class _Step:
    """A step's payload as a rank > 0 reads it: each layer's mask kind, the mask arrays, the
    hidden state, the counters of the ranks before it, and where the masks end (`forward`)."""

    kinds: np.ndarray
    masks: list[mx.array]
    h: mx.array
    rows: np.ndarray
    forward: int

    def mask(self, layer: int):
        k = int(self.kinds[layer])
        return None if k == NO_MASK else "causal" if k == CAUSAL else self.masks[k]


def _step_size(head: np.ndarray, layers: int, rows: int) -> int:
    b, t, d, code, _, _, n = (int(v) for v in head[1:8])
    size = layers * 8 + _pad8(b * t * d * DTYPES[code].size) + rows * ROW * 8
    for j in range(n):
        code, ndim, *dims = (int(v) for v in head[8 + 6 * j : 14 + 6 * j])
        size += _pad8(math.prod(dims[:ndim]) * DTYPES[code].size)
    return size


def _read_step(head: np.ndarray, buf: mx.array, layers: int, rows: int) -> _Step:
    b, t, d, code, _, _, n = (int(v) for v in head[1:8])
    kinds, at = _numbers(buf, 0, layers, np.int64)
    masks = []
    for j in range(n):
        mcode, ndim, *dims = (int(v) for v in head[8 + 6 * j : 14 + 6 * j])
        mask, at = _take(buf, at, tuple(dims[:ndim]), DTYPES[mcode])
        masks.append(mask)
    forward = at
    h, at = _take(buf, at, (b, t, d), DTYPES[code])
    counters, _ = _numbers(buf, at, rows * ROW, np.float64)
    return _Step(kinds, masks, h, counters.reshape(rows, ROW), forward)


class Pipeline:
    """Rank 0's side: the `Elsewhere` layers of its model call `layer`; the last of them sends
    the hidden state around the ring and returns what comes back. Also holds the other ranks'
    layer ranges, what they loaded (`infos`) and their latest counters."""

    def __init__(self, link: Link, ranges: list[range], infos: list[dict]):
        self.link, self.ranges, self.infos = link, ranges, infos
        self.first, self.last = ranges[1].start, ranges[-1].stop - 1
        self.num_layers = ranges[-1].stop
        self.remote = [(False, 0, FlashStats()) for _ in ranges[1:]]
        self._h, self._offset, self._cached, self._masks = None, 0, False, {}

    def layer(self, i: int, x: mx.array, mask, cache) -> mx.array:
        if i == self.first:
            self._h, self._masks = x, {}
            self._offset, self._cached = (cache.offset, True) if cache is not None else (0, False)
        self._masks[i] = mask
        if cache is not None:  # width 1: only the offset counts
            tiny = mx.zeros((x.shape[0], 1, x.shape[1], 1), x.dtype)
            cache.update_and_fetch(tiny, tiny)
        return x if i < self.last else self._step()

    def _step(self) -> mx.array:
        h, arrays = self._h, []
        kinds = np.full(self.num_layers, NO_MASK, np.int64)
        for i, m in self._masks.items():
            if isinstance(m, str) and m == "causal":
                kinds[i] = CAUSAL
            elif isinstance(m, mx.array):
                j = next((j for j, a in enumerate(arrays) if a is m), None)
                if j is None:  # layers of one kind share one mask: send it once
                    arrays.append(m)
                    j = len(arrays) - 1
                kinds[i] = j
            elif m is not None:
                raise FlashError(f"layer {i}: a mask of type {type(m).__name__} cannot be sent")
        if len(arrays) > MAX_MASKS:
            raise FlashError(f"{len(arrays)} different attention masks; at most {MAX_MASKS}")
        self.link.send(_step_head(h, self._offset, self._cached, arrays),
                       _pack([kinds, *arrays, h]))
        self._h, self._masks = None, {}
        rows = len(self.ranges) - 1
        size = _pad8(h.size * h.dtype.size)
        buf = self.link.recv(size + rows * ROW * 8)
        out, at = _take(buf, 0, h.shape, h.dtype)
        counters, _ = _numbers(buf, at, rows * ROW, np.float64)
        self.remote = [_unrow(r) for r in counters.reshape(rows, ROW)]
        return out

    def counters(self, runtime) -> FlashStats:
        """A snapshot of rank 0's counters, with the other ranks' (`ranks`)."""
        local = runtime.stats if runtime is not None else FlashStats()
        return dataclasses.replace(local, ranks=tuple(
            dataclasses.replace(s) for _, _, s in self.remote))

    def stats(self, state, since: FlashStats | None) -> dict:
        """`distributed_world_size`, the flash bytes per token of all ranks together and, per
        rank, its layers, what it loaded and its figures (since the snapshot `since`)."""
        from . import platform

        before = list(since.ranks) if since is not None and since.ranks else []
        before += [FlashStats()] * (len(self.remote) - len(before))
        rt = state.runtime
        local = None if rt is None else rt.stats if since is None else rt.stats.since(since)
        counts = [(local, platform.peak_rss_bytes())] + [
            (s.since(b) if on else None, rss) for (on, rss, s), b in zip(self.remote, before,
                                                                         strict=True)]
        ranks = []
        for info, (s, rss) in zip(self.infos, counts, strict=True):
            entry = {**info, "peak_rss_bytes": rss}
            if s is not None:
                entry.update(s.per_token(), flash_bytes=s.io.bytes)
            ranks.append(entry)
        tokens = max((e.get("decode_tokens") or 0) for e in ranks)
        streamed = [e["flash_bytes"] for e in ranks if "flash_bytes" in e]
        return {"distributed_world_size": len(ranks),
                "distributed_flash_bytes_per_token":
                    round(sum(streamed) / max(tokens, 1)) if streamed else None,
                "distributed_ranks": ranks}


def _sync(caches: list, layers: range, offset: int, model) -> list:
    """This rank's KV caches at rank 0's `offset`: as they are, trimmed, or new (offset 0)."""
    from mlx_lm.models.cache import can_trim_prompt_cache

    from .generation import new_cache

    own = [caches[i] for i in layers]
    now = own[0].offset
    if now == offset:
        return caches
    if offset == 0:
        return new_cache(model)
    if now < offset or not can_trim_prompt_cache(own):
        raise FlashError(f"out of step: rank 0's KV cache holds {offset} tokens, this "
                         f"rank's {now}")
    for c in own:
        c.trim(c.offset - offset)
    return caches


def serve_steps(link: Link, model, ranges: list[range]) -> None:
    """Ranks > 0: run this rank's layers for each step rank 0 sends until it says stop."""
    from .generation import new_cache

    layers, num_layers = ranges[link.rank], ranges[-1].stop
    caches = new_cache(model) if model is not None else []
    last = link.rank == link.size - 1
    while True:
        head = link.recv_head()
        if head[0] == STOP:
            if not last:
                link.send([STOP])
            return
        if head[0] != STEP or model is None:
            raise FlashError(f"out of step with rank {link.prev} (message {int(head[0])})")
        buf = link.recv(_step_size(head, num_layers, link.rank - 1))
        step = _read_step(head, buf, num_layers, link.rank - 1)
        b, t, _, _, offset, cached = (int(v) for v in head[1:7])
        if cached:
            caches = _sync(caches, layers, offset, model)
        _count(model, b, t)
        h = step.h
        for i in layers:
            h = model.layers[i](h, step.mask(i), caches[i] if cached else None)
        rows = np.concatenate([step.rows.reshape(-1), _my_row(model)])
        if last:
            link.send(None, _pack([h, rows]))
        else:
            link.send(head.tolist(), _pack([buf[: step.forward], h, rows]))


def _count(model, b: int, t: int) -> None:
    """Count a step as FlashMLP counts it at layer 0, which this rank does not hold."""
    rt = state_of(model).runtime
    if rt is None:
        return
    s = rt.stats
    if t > 1:
        s.prefill_tokens += b * t
        s.last_token_start = None
        return
    s.token_boundary()


