"""One model's layers pipelined across processes or Macs on MLX's own engine (`mx.distributed`,
started by `mlx.launch`); docs/DISTRIBUTED.md says how to run it and what it costs.

Rank r holds a contiguous range of decoder layers (a `Stage`): their resident weights, KV caches
and neuron caches, within its own `--memory`. Rank 0 also holds the embeddings and the head; it
tokenizes, samples and prints. In rank 0's model the other ranks' layers are `Elsewhere`
placeholders: the last of them sends the hidden state, each layer's attention mask and the KV
offset around the ring (0 -> 1 -> ... -> N-1 -> 0); ranks > 0 answer in `serve` until rank 0 says
stop, and the last one sends each rank's counters back with the hidden state (pipeline.py).
A `Watchdog` notices a neighbour that stopped even where the ring backend would leave a
receive waiting.
"""

from __future__ import annotations

import math
import os
import re
import select
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .dtypes import BY_NAME
from .errors import FlashError
from .format import Manifest, is_flash_dir, read_manifest
from .pipeline import (
    READY,
    SETUP,
    STOP,
    Link,
    PeerLost,
    Pipeline,
    closed,
    lost_line,
    ring_sockets,
    serve_steps,
)
from .state import state_of

LAUNCH_ENV = ("MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")  # set by mlx.launch / mpirun
LOAD_KEYS = ("memory", "mode", "window", "max_context", "compute", "lookahead")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def launched():
    """The `mx.distributed` group of an `mlx.launch` run of several processes, else None."""
    if not any(k in os.environ for k in LAUNCH_ENV):
        return None
    try:
        group = mx.distributed.init()
    except RuntimeError as e:
        raise FlashError(f"mx.distributed did not start: {e}") from None
    return group if group.size() > 1 else None


class Watchdog:
    """Watches this rank's ring connections (`mlx.launch`'s ring backend) from a thread: when a
    neighbour's closes, `say(line)` and end the process unless `stop` comes within `grace`
    seconds (the main thread saw it too and ends with its own line). Once a peer is gone, a
    receive of the ring backend may wait forever, or return garbage, instead of raising.
    Started in the main thread, it also takes SIGTERM (mlx.launch's end for the other ranks
    when one fails), which a main thread waiting inside MLX would not see: unless the main
    thread ends (or `serve`'s own handler stops the server) within `grace`, one line, then end.
    And it ends the rank when its parent, the launcher, is gone (killed, it leaves its ranks)."""

    def __init__(self, group, say: Callable[[str], None], period: float = 0.5,
                 grace: float = 1.0):
        self.rank, self.size = group.rank(), group.size()
        self.say, self.period, self.grace = say, period, grace
        self.done = threading.Event()
        self.sockets = [(fd, peer) for fd, peer, _ in ring_sockets(self.rank, self.size)]
        self.parent = os.getppid()
        self._wake: int | None = None

    def start(self) -> Watchdog:
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL):
            read, write = os.pipe()
            os.set_blocking(write, False)
            if signal.set_wakeup_fd(write) == -1:  # nobody else's: the signal's number lands here
                signal.signal(signal.SIGTERM, lambda *_: None)
                self._wake = read
            else:
                signal.set_wakeup_fd(-1)
        threading.Thread(target=self._watch, daemon=True, name="mlx-flash-watchdog").start()
        return self

    def stop(self) -> None:
        self.done.set()
        if self._wake is not None and threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def lost(self) -> int | None:
        """The neighbour whose connection closed, or None."""
        return next((peer for fd, peer in self.sockets if closed(fd)), None)

    def _watch(self) -> None:
        while not self.done.is_set():
            signalled = False
            if self._wake is None:
                self.done.wait(self.period)
            else:
                ready = select.select([self._wake], [], [], self.period)[0]
                signalled = bool(ready) and signal.SIGTERM in os.read(self._wake, 64)
            if self.done.is_set():
                return
            peer = self.lost()
            if (signalled or peer is not None) and not self.done.wait(self.grace):
                self._end(lost_line(peer) if peer is not None else
                          "ended by SIGTERM (mlx.launch ends every rank once one fails)")
            if self.parent != 1 and os.getppid() != self.parent:
                self._end(f"the launcher (process {self.parent}) is gone; ending")

    def _end(self, line: str) -> None:
        try:
            self.say(line)
        except OSError:  # no terminal left to say it to
            pass
        os._exit(1)


# -- which rank holds which layers ----------------------------------------------------------------


def resident_bytes(m: Manifest) -> tuple[list[int], int]:
    """Bytes of each decoder layer's resident weights, and of the rest of resident.safetensors
    (embeddings, final norm, head, header: what rank 0 holds besides its layers)."""
    per = [0] * m.num_layers
    for name, (dtype, shape) in m.resident_tensors.items():
        hit = _LAYER.search(name)
        if hit and int(hit.group(1)) < m.num_layers:
            per[int(hit.group(1))] += BY_NAME[dtype].itemsize * math.prod(shape)
    return per, m.resident_bytes - sum(per)


def plan_layers(m: Manifest, world: int, split: str | None = None) -> list[range]:
    """Each rank's contiguous layers: `split` ("14,18": layers per rank), else by bytes (each
    layer's resident weights and FFN records; rank 0 also carries the embeddings and head)."""
    n = m.num_layers
    if world > n:
        raise FlashError(f"{world} ranks for {n} layers: each rank needs at least one layer; "
                         f"launch at most {n}")
    if split is not None:
        try:
            counts = [int(c) for c in split.split(",")]
        except ValueError:
            counts = []
        if len(counts) != world or min(counts) < 1 or sum(counts) != n:
            raise FlashError(f"--layers-split {split}: give {world} counts of at least 1 "
                             f"(one per rank) that add up to the model's {n} layers")
    else:
        per, rest = resident_bytes(m)
        cum = np.cumsum([rest] + [b + m.ffn_dim * m.payload_bytes for b in per])
        cuts = [0]
        for k in range(1, world):  # the cut nearest rank k's share, leaving a layer per rank
            options = range(cuts[-1] + 1, n - (world - k) + 1)
            cuts.append(min(options, key=lambda c: abs(cum[c] - cum[-1] * k / world)))
        counts = np.diff(cuts + [n]).tolist()
    bounds = np.cumsum([0] + counts).tolist()
    return [range(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


@dataclass(frozen=True)
class Stage:
    """What one rank loads: `layers` of the model's, and `resident_bytes` of resident weights
    (rank 0: with the embeddings and head). `runtime.load(stage=...)` uses it."""

    rank: int
    world: int
    layers: range
    resident_bytes: int

    def check(self, model: nn.Module) -> None:
        """FlashError unless every layer of `model` keeps a KV cache: the ring passes each
        layer's mask and KV offset, not a linear-attention layer's recurrent state."""
        from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

        if not all(isinstance(c, (KVCache, RotatingKVCache)) for c in make_prompt_cache(model)):
            raise FlashError("mlx.launch pipelines models whose every layer has a KV cache; this "
                             "one's linear-attention layers keep a recurrent state: run it in "
                             "one process")

    def cut(self, model: nn.Module, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Put `Elsewhere` in place of the other ranks' layers and return the weights this rank
        keeps; ranks > 0 keep no embeddings, final norm or head (empty arrays stand in)."""
        prefix = _layers_prefix(model)
        layers = _layer_list(model)
        for i, layer in enumerate(layers):
            if i not in self.layers:
                layers[i] = Elsewhere(i, layer)

        def ours(key: str) -> bool:
            return (self.rank == 0) if not key.startswith(prefix) else (
                int(key[len(prefix):].split(".", 1)[0]) in self.layers)

        kept = {k: v for k, v in weights.items() if ours(k)}
        if self.rank > 0:
            empty = {k: mx.zeros((0,), v.dtype) for k, v in tree_flatten(model.parameters())
                     if not k.startswith(prefix)}
            model.update(tree_unflatten(list(empty.items())))
            kept.update(empty)
        return kept

    def load_dense(self, path: Path):
        """(model, tokenizer) with this stage's weights all in memory."""
        from .checkpoint import load_config
        from .loader import build_model, load_tokenizer, quantize_modules
        from .tensors import load_dense_weights

        config = load_config(path)
        model = build_model(config)
        weights = self.cut(model, model.sanitize(load_dense_weights(path, self.layers)))
        quantize_modules(model, config, weights)
        model.load_weights(list(weights.items()), strict=True)
        mx.eval(model.parameters())
        model.eval()
        return model, load_tokenizer(path)


def _layer_list(model: nn.Module) -> list:
    """The list in the model's tree that holds its decoder layers (`model.layers` may be a
    copy: mlx-lm's pipelined models return a slice of it)."""
    first = model.layers[0]
    for _, module in model.named_modules():
        for value in module.values():
            if isinstance(value, list) and value and value[0] is first:
                return value
    raise FlashError(f"{type(model).__name__}: its decoder layers are not a list in its tree")


def _layers_prefix(model: nn.Module) -> str:
    """Where the decoder layers' weights live in the model's tree ("model.layers.")."""
    first = model.layers[0]
    return next(name for name, m in model.named_modules() if m is first)[: -len("0")]


class Elsewhere(nn.Module):
    """A decoder layer another rank holds. On rank 0 it hands the hidden state to the other
    ranks (`relay`, a Pipeline); it keeps the layer's plain flags the model reads
    (`use_sliding`) and a KV cache of width 1, so masks and cache trims see the right offsets."""

    def __init__(self, index: int, layer: nn.Module):
        super().__init__()
        for k, v in vars(layer).items():
            if not k.startswith("_") and isinstance(v, (bool, int, float, str)):
                setattr(self, k, v)
        self.index = index
        self.relay = None

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        if self.relay is None:
            raise FlashError(f"layer {self.index} is held by another rank")
        return self.relay.layer(self.index, x, mask, cache)


# -- loading and serving ---------------------------------------------------------------------------


def _load_stage(setup: dict, rank: int):
    """(model, tokenizer, what it loaded) of this rank's stage, as rank 0's `setup` says."""
    from .api import load as load_model

    path = Path(setup["path"])
    if not is_flash_dir(path):
        raise FlashError(f"{path}: no flash model dir there on rank {rank}'s machine; every "
                         f"machine needs the same flash dir at the same path")
    ranges = [range(a, b) for a, b in setup["ranges"]]
    per, rest = resident_bytes(read_manifest(path))
    stage = Stage(rank, len(ranges), ranges[rank],
                  sum(per[i] for i in ranges[rank]) + (rest if rank == 0 else 0))
    kwargs = {k: setup[k] for k in LOAD_KEYS if setup.get(k) is not None}
    model, tokenizer = load_model(path, stage=stage, **kwargs)
    state = state_of(model)
    info = {"rank": rank, "layers": [stage.layers.start, stage.layers.stop], "mode": state.mode,
            "resident_bytes": stage.resident_bytes,
            "memory_budget_bytes": state.budget.total if state.budget else None,
            "neuron_cache_rows_per_layer": state.capacity}
    return model, tokenizer, info


def load(path: str | Path, group, layers_split: str | None = None, **options):
    """Rank 0 of an `mlx.launch` run: (model, tokenizer) holding its stage of the flash dir
    `path`, whose other layers the other ranks (in `serve`) load and run. `options` are
    `api.load`'s (memory, mode, window, max_context, compute), the same on every rank: each
    rank's `memory` is its own budget. `layers_split` ("14,18"): layers per rank, default by
    bytes (`plan_layers`). Rank 0 must end with `stop(group)`."""
    link = Link(group)
    path = Path(path)
    if not is_flash_dir(path):
        raise FlashError(f"{path}: mlx.launch runs stream a flash dir; run `mlx-flash convert "
                         f"{path}` first")
    ranges = plan_layers(read_manifest(path), link.size, layers_split)
    setup = {"path": str(path), "ranges": [[r.start, r.stop] for r in ranges],
             **{k: options.get(k) for k in LOAD_KEYS}}
    link.send_json(SETUP, setup)
    try:
        model, tokenizer, info = _load_stage(setup, 0)
    finally:  # the other ranks' answers, also when this rank failed
        ready = link.recv_json(READY)
    for r in ready:
        if r.get("error"):
            raise FlashError(f"rank {r['rank']}: {r['error']}")
    pipe = Pipeline(link, ranges, [info, *ready])
    model.flash.pipeline = pipe
    for layer in model.layers:
        if isinstance(layer, Elsewhere):
            layer.relay = pipe
    return model, tokenizer


def serve(group) -> bool:
    """Ranks > 0 of an `mlx.launch` run: load this rank's stage when rank 0 says, then run its
    layers for each step rank 0 sends until it says stop. False when this rank's load failed
    (rank 0 reports why); `PeerLost` when a rank stopped."""
    link = Link(group)
    head = link.recv_head()
    if head[0] == STOP:
        if link.rank < link.size - 1:
            link.send([STOP])
        return True
    setup = link.recv_json(SETUP, head)
    if link.rank < link.size - 1:  # the next ranks load meanwhile
        link.send_json(SETUP, setup)
    model = None
    try:
        model, _, info = _load_stage(setup, link.rank)
    except FlashError as e:
        info = {"rank": link.rank, "error": str(e).splitlines()[0]}
    ready = [] if link.rank == 1 else link.recv_json(READY)
    link.send_json(READY, [*ready, info])
    serve_steps(link, model, [range(a, b) for a, b in setup["ranges"]])
    return model is not None


def stop(group) -> None:
    """Rank 0: tell the other ranks to end (nothing if they already have)."""
    try:
        Link(group).send([STOP])
    except PeerLost:
        pass
