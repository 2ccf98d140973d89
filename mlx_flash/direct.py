"""An MoE's routed experts streamed straight from an mlx-lm dir's own safetensors: no flash dir,
no second copy on disk (`load`).

mlx-lm builds the model (its model file, config.json's quantization, `sanitize`) with every
weight lazy. Each `SwitchGLU` or `SwitchMLP` in it (the routed experts of an MoE block, in any
family mlx-lm has a file for) is given a cache of `slots` experts in its own layout: its
projections' (experts, out, in) weights, scales and biases become (slots, out, in) arrays, and
`StreamedExperts` calls mlx-lm's module over them with each chosen expert mapped to its slot. The
block's router, shared experts, dense layers and the weighting of the expert outputs stay
mlx-lm's, and the arithmetic is mlx-lm's own. The other weights load from the same files.

In mlx-lm's stacked tensors expert e's weight, scales and biases are each one contiguous slice
(bytes e*S .. (e+1)*S of the tensor): a cache miss reads those slices (`storage.SpanReader`:
widened to the direct-I/O blocks around them, copied out). The least recently used experts
leave first. A prompt (many tokens) is computed expert-major: the experts any of its tokens
chose pass through the cache a cache-full at a time, each group's tokens multiplied together.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from . import platform
from .checkpoint import load_config
from .dtypes import to_float32
from .errors import CheckpointError, FlashError
from .memory import (
    ACTIVATION_SHARE,
    ALLOCATOR_CACHE_BYTES,
    ALLOCATOR_CACHE_SHARE,
    MIN_PREFILL_TOKENS,
    NEURON_BOOKKEEPING,
    PREFILL_TOKENS,
    Budget,
    activation_bytes,
    parse_memory,
)
from .safetensors import read_header
from .state import FlashState, FlashStats
from .storage import ReadStats, SpanReader

# config keys of the routed experts' count and of the experts a token picks, by family
EXPERT_COUNT = ("num_experts", "num_local_experts", "n_routed_experts")
TOP_K = ("num_experts_per_tok", "experts_per_token", "moe_topk", "top_k")
MODES = ("auto", "dense")
# mlx-lm's stacked experts: `...switch_mlp.gate_proj.weight` (experts, out, in); a transformers
# checkpoint's fused `...experts.gate_up_proj` has no `.weight` and is not read in place
_STACKED = re.compile(r"\.(gate_proj|up_proj|down_proj|fc1|fc2)\.weight$")


def expert_count(config: dict) -> int | None:
    """The routed experts per MoE layer that config.json (or its `text_config`) names."""
    for c in (config, config.get("text_config") or {}):
        for key in EXPERT_COUNT:
            if isinstance(c.get(key), int) and c[key] > 1:
                return c[key]
    return None


def _top_k(config: dict) -> int:
    for c in (config, config.get("text_config") or {}):
        for key in TOP_K:
            if isinstance(c.get(key), int) and c[key] >= 1:
                return c[key]
    raise FlashError(f"config.json names no experts per token (one of {', '.join(TOP_K)})")


def weight_files(path: Path) -> list[Path]:
    return sorted(path.glob("model*.safetensors"))


def tensors(path: Path) -> dict[str, tuple[int, int, int, tuple[int, ...]]]:
    """Every tensor of the dir's safetensors files: name -> (file index, absolute offset of its
    data, bytes, shape); each header checked before use."""
    out = {}
    for i, file in enumerate(weight_files(path)):
        def fail(field, problem, file=file):
            return CheckpointError(f"{file}: {field}: {problem}")

        header, start = read_header(file, fail)
        for name, e in header.items():
            lo, hi = e["data_offsets"]
            out[name] = (i, start + lo, hi - lo, tuple(e["shape"]))
    return out


def streamable(path: str | Path) -> bool:
    """Whether `path` is an mlx-lm dir of an MoE whose experts are stored stacked (experts, ...)
    (what `load` streams); False for anything else, without raising."""
    path = Path(path)
    try:
        experts = expert_count(load_config(path))
        if experts is None or not weight_files(path):
            return False
        return any(len(shape) == 3 and shape[0] == experts and _STACKED.search(name)
                   for name, (_, _, _, shape) in tensors(path).items())
    except (CheckpointError, OSError):
        return False


class DirectRuntime:
    """What the `StreamedExperts` of one model share: the reader and the counters."""

    def __init__(self, reader: SpanReader, top_k: int, naive: bool = False):
        self.mode = "naive" if naive else "routed"
        self.naive = naive  # benchmarks: every routed expert read at every step
        self.window = 1
        self.reader = reader
        self.top_k = top_k
        self.stats = FlashStats()
        self.layers: list[StreamedExperts] = []
        self.lookahead = None
        self.reader_profile = "defaults (no probe profile for this volume)"

    def close(self) -> None:
        self.reader.close()


class _Slice:
    """One stacked tensor of a layer's experts: where expert e's bytes lie, and the cache's
    (slots, ...) copy of it (numpy bytes view, and the MLX array the module multiplies).

    `widen`: 16-bit values held as float32 (quantized experts' scales and biases on MLX's CPU
    backend, whose `gather_qmm` is ~35x faster in float32, moe.py); read into `stage` first."""

    def __init__(self, where: tuple[int, int, int, tuple[int, ...]], like: mx.array, slots: int,
                 widen: bool, stage_rows: int):
        self.file, self.offset, nbytes, shape = where
        self.bytes = nbytes // shape[0]
        self.widen = widen and like.dtype in (mx.float16, mx.bfloat16)
        self.dtype = "float16" if like.dtype == mx.float16 else "bfloat16"
        held = self.bytes * (2 if self.widen else 1)
        raw = mx.zeros((slots, held), dtype=mx.uint8)
        mx.eval(raw)
        self.view = np.array(raw, copy=False)  # (slots, bytes): reads land here
        self.stage = np.empty((stage_rows, self.bytes), np.uint8) if self.widen else None
        target = mx.float32 if self.widen else like.dtype
        self.array = raw.view(target).reshape(slots, *shape[1:])
        mx.eval(self.array)

    def target(self, slot: int, j: int) -> np.ndarray:
        """Where the read of the j-th expert of a batch going to `slot` lands."""
        return self.stage[j] if self.widen else self.view[slot]

    def settle(self, slots: np.ndarray) -> None:
        """Widen the staged experts of a batch into their slots."""
        if self.widen:
            for j, slot in enumerate(slots.tolist()):
                self.view[slot] = to_float32(self.stage[j].view("<u2"), self.dtype).view(np.uint8)


class _Cache:
    """Which expert each slot holds and when each was last used (the LRU's bookkeeping)."""

    def __init__(self, experts: int, slots: int):
        self.slot_of = np.full(experts, -1, dtype=np.int64)
        self.expert_at = np.full(slots, -1, dtype=np.int64)
        self.last = np.full(slots, -1, dtype=np.int64)


class StreamedExperts(nn.Module):
    """mlx-lm's `SwitchGLU`/`SwitchMLP` of one MoE layer over a cache of its experts;
    `__call__(x, indices)` as the module's own."""

    def __init__(self, inner: nn.Module, position: int, slots: int, where: dict,
                 rt: DirectRuntime):
        super().__init__()
        self.inner = inner
        self._rt, self._position, self.slots = rt, position, slots
        self._step = 0
        params = tree_flatten(inner.parameters())
        self.experts = params[0][1].shape[0]
        quantized = any(name.endswith(".scales") for name, _ in params)
        self.widened = quantized and mx.default_device() == mx.cpu
        self._slices = []
        for name, array in params:  # "gate_proj.weight" -> the cache's (slots, ...) array
            widen = self.widened and name.endswith((".scales", ".biases"))
            s = _Slice(where[name], array, slots, widen, rt.top_k)
            owner, attr = _owner(inner, name)
            setattr(owner, attr, s.array)
            self._slices.append(s)
        self.expert_bytes = sum(s.bytes for s in self._slices)
        self._lru = _Cache(self.experts, slots)

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        mx.eval(x, indices)  # the router's choice decides the reads
        k = indices.shape[-1]
        x2 = x.reshape(-1, x.shape[-1])
        chosen = np.array(indices).reshape(-1, k).astype(np.int64)
        if len(x2) > 1:
            return self._expert_major(x2, chosen).reshape(*indices.shape, x.shape[-1])
        t0 = time.perf_counter()
        hits, misses, evicted, io = self._ensure(np.unique(chosen[0]))
        slots = mx.array(self._lru.slot_of[chosen].astype(np.uint32)).reshape(indices.shape)
        y = self._inner(x, slots)
        self._count_decode(io, time.perf_counter() - t0 - io.seconds, hits, misses, evicted)
        return y

    def _inner(self, x: mx.array, slots: mx.array) -> mx.array:
        if not self.widened:
            return self.inner(x, slots)
        return self.inner(x.astype(mx.float32), slots).astype(x.dtype)

    def _ensure(self, experts: np.ndarray) -> tuple[int, int, int, ReadStats]:
        """Make the `experts` (unique, at most `slots`) cached, used at this step: read the
        missing ones into free slots or the least recently used ones'."""
        c, step = self._lru, self._step
        self._step += 1
        if self._rt.naive:  # nothing kept from the last step
            c.slot_of[:], c.expert_at[:], c.last[:] = -1, -1, -1
        have = c.slot_of[experts] >= 0
        c.last[c.slot_of[experts[have]]] = step
        miss = experts[~have]
        free = np.flatnonzero(c.expert_at < 0)
        evicted = 0
        if len(miss) > len(free):
            old = np.flatnonzero((c.expert_at >= 0) & (c.last < step))
            out = old[np.argsort(c.last[old], kind="stable")[: len(miss) - len(free)]]
            c.slot_of[c.expert_at[out]] = -1
            c.expert_at[out] = -1
            free, evicted = np.concatenate([free, out]), len(out)
        rt = self._rt
        before = rt.reader.snapshot()
        targets = free[: len(miss)]
        for a in range(0, len(miss), rt.top_k):  # a token's worth at a time: small scratch
            batch, into = miss[a : a + rt.top_k], targets[a : a + rt.top_k]
            rt.reader.read([(s.file, s.offset + int(e) * s.bytes, s.target(int(t), j))
                            for j, (e, t) in enumerate(zip(batch, into, strict=True))
                            for s in self._slices])
            for s in self._slices:
                s.settle(into)
        c.slot_of[miss], c.expert_at[targets], c.last[targets] = targets, miss, step
        return int(have.sum()), len(miss), evicted, rt.reader.delta(before)

    def _expert_major(self, x: mx.array, chosen: np.ndarray) -> mx.array:
        """Every expert any row chose, a cache-full at a time (the cached ones first), each
        group's (token, expert) pairs multiplied together: (tokens * k, d)."""
        rt = self._rt
        n_tok, k = chosen.shape
        flat = chosen.reshape(-1)  # pair p = (token p // k, slot p % k)
        needed = np.unique(flat)
        needed = needed[np.argsort(self._lru.slot_of[needed] < 0, kind="stable")]
        y = mx.zeros((n_tok * k, x.shape[-1]), dtype=x.dtype)
        before = rt.reader.snapshot()
        for start in range(0, len(needed), self.slots):
            group = needed[start : start + self.slots]
            self._ensure(np.sort(group))
            pairs = np.flatnonzero(np.isin(flat, group))
            slots = mx.array(self._lru.slot_of[flat[pairs]].astype(np.uint32))[:, None]
            out = self._inner(x[mx.array(pairs // k)], slots)  # (pairs, 1, d)
            y[mx.array(pairs)] = out[:, 0]
            mx.eval(y)  # the next group may take these slots
        s = rt.stats
        s.prefill_io = s.prefill_io + rt.reader.delta(before)
        if self._position == 0:
            s.prefill_tokens += n_tok
            s.last_token_start = None  # a new prompt: the gap is not a token
        return y

    def _count_decode(self, io: ReadStats, cache_s: float, hits: int, misses: int,
                      evicted: int) -> None:
        s = self._rt.stats
        s.io = s.io + io
        s.io_wait_s += io.seconds
        s.cache_s += max(cache_s, 0.0)
        s.hits += hits
        s.misses += misses
        s.evictions += evicted
        if self._position == 0:  # the first MoE layer of token t+1 starts after token t
            now = time.perf_counter()
            if s.last_token_start is not None:
                s.timed_tokens += 1
                s.token_s += now - s.last_token_start
            s.last_token_start = now
            s.tokens += 1


def _expert_bytes(switch: nn.Module) -> tuple[int, int, int]:
    """(bytes of one expert on disk, in the cache, and of its widened slices' staging)."""
    params = tree_flatten(switch.parameters())
    widened = (mx.default_device() == mx.cpu
               and any(name.endswith(".scales") for name, _ in params))
    disk = held = staged = 0
    for name, a in params:
        one = a.nbytes // a.shape[0]
        disk += one
        widen = (widened and name.endswith((".scales", ".biases"))
                 and a.dtype in (mx.float16, mx.bfloat16))
        held += 2 * one if widen else one
        staged += one if widen else 0
    return disk, held, staged


def _owner(module: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    *path, attr = dotted.split(".")
    for p in path:
        module = module[int(p)] if p.isdigit() else getattr(module, p)
    return module, attr


def _switches(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """mlx-lm's routed-expert modules of `model`, in layer order."""
    from mlx_lm.models.switch_layers import SwitchGLU, SwitchMLP

    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, (SwitchGLU, SwitchMLP))]
    return sorted(found, key=lambda nm: [int(t) if t.isdigit() else -1
                                         for t in re.findall(r"\d+|\D+", nm[0])])


def _plant(model: nn.Module, switches: list, routers: list, path: Path) -> None:
    """Each MoE block's router (the `gate` or `router` beside its switch) replaced by the
    benchmark's planted one of its layer."""
    if len(routers) != len(switches):
        raise FlashError(f"{path}: {len(routers)} planted routers for {len(switches)} MoE layers")
    for (name, _), router in zip(switches, routers, strict=True):
        block, _ = _owner(model, name)
        attr = next((a for a in ("gate", "router") if isinstance(getattr(block, a, None),
                                                                 (nn.Linear, nn.QuantizedLinear))),
                    None)
        if attr is None:
            raise FlashError(f"{path}: the MoE block of {name} has no linear router to plant")
        setattr(block, attr, router)


def kv_bytes(model: nn.Module, config: dict, max_context: int, itemsize: int) -> int:
    """What mlx-lm's cache of `model` holds for `max_context` tokens: each attention layer's keys
    and values (a sliding layer's at most its window), and each linear-attention layer's
    recurrent and convolution state (fixed, whatever the context)."""
    from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

    c = config.get("text_config") or config
    heads = c.get("num_attention_heads", 1)
    if c.get("kv_lora_rank"):  # MLA: mlx-lm caches the expanded keys and values per head
        per_token = heads * (c.get("qk_nope_head_dim", 0) + c.get("qk_rope_head_dim", 0)
                             + c.get("v_head_dim", 0)) * itemsize
    else:
        head_dim = c.get("head_dim") or c["hidden_size"] // heads
        per_token = 2 * (c.get("num_key_value_heads") or heads) * head_dim * itemsize
    hv, dv = c.get("linear_num_value_heads", 0), c.get("linear_value_head_dim", 0)
    hk, dk = c.get("linear_num_key_heads", 0), c.get("linear_key_head_dim", 0)
    conv = max(c.get("linear_conv_kernel_dim", 4) - 1, 0)
    state = 4 * hv * dv * dk + itemsize * conv * (2 * hk * dk + hv * dv)
    total = 0
    for cache in make_prompt_cache(model):
        if isinstance(cache, RotatingKVCache):
            total += per_token * min(cache.max_size, max_context)
        elif isinstance(cache, KVCache):
            total += per_token * max_context
        else:
            total += state
    return total


def plan(path: str | Path, memory=None, max_context: int | None = None) -> SimpleNamespace:
    """The model of the mlx-lm MoE dir `path` built lazily (nothing read but headers) and its
    budget: a namespace of model, config, switches (name, module), where (tensors), top_k,
    expert_bytes, max_context and budget."""
    from mlx_lm.utils import load_model

    path = Path(path)
    try:
        model, config = load_model(path, lazy=True)
    except ValueError as e:
        raise FlashError(f"{path}: {e}") from None
    text = config.get("text_config") or config
    if max_context is None:
        max_context = min(2048, text.get("max_position_embeddings") or 2048)
    switches = _switches(model)
    where = tensors(path)
    top_k = _top_k(config)
    streamed, expert_bytes, held_bytes, stage_bytes = set(), 0, 0, 0
    for name, switch in switches:
        for pname, array in tree_flatten(switch.parameters()):
            key = f"{name}.{pname}"
            got = where.get(key)
            if got is None or got[3] != tuple(array.shape) or got[2] != array.nbytes:
                raise FlashError(f"{path}: {key} is not stored as mlx-lm's stacked "
                                 f"{list(array.shape)} tensor; convert the checkpoint with "
                                 "`mlx_lm convert` or `mlx-flash convert`")
            streamed.add(id(array))
        disk, held, staged = _expert_bytes(switch)
        expert_bytes, held_bytes = max(expert_bytes, disk), max(held_bytes, held)
        stage_bytes += top_k * staged
    if not switches:
        raise FlashError(f"{path}: no routed experts to stream (mlx-lm builds no SwitchGLU); "
                         "`mlx-flash convert` it to stream a dense FFN")
    params = tree_flatten(model.parameters())
    resident = sum(a.nbytes for _, a in params if id(a) not in streamed)
    experts_on_disk = sum(a.nbytes for _, a in params if id(a) in streamed)
    n_experts = tree_flatten(switches[0][1].parameters())[0][1].shape[0]
    itemsize = max((a.dtype.size for _, a in params if id(a) not in streamed
                    and mx.issubdtype(a.dtype, mx.floating)), default=2)
    shape = SimpleNamespace(d_model=text.get("hidden_size", 0), experts=n_experts, expert_ffn=1)
    budget = Budget(
        total=parse_memory(memory, resident + experts_on_disk), model=resident + experts_on_disk,
        resident=resident, kv_cache=kv_bytes(model, config, max_context, itemsize),
        # the reader's scratch (a token's experts, each slice widened by up to two blocks),
        # the widened slices' staging, the caches' slot of every expert
        buffers=(top_k * (expert_bytes + 2 * 4096 * 9) + stage_bytes
                 + len(switches) * n_experts * 8),
        dense_ffn=experts_on_disk, neuron_bytes=held_bytes + NEURON_BOOKKEEPING,
        num_layers=len(switches), ffn_dim=n_experts, max_context=max_context)
    budget.allocator_cache = min(ALLOCATOR_CACHE_BYTES, budget.total // ALLOCATOR_CACHE_SHARE)
    activation_of = lambda t: activation_bytes(shape, text, t, max_context, top_k)  # noqa: E731
    tokens = PREFILL_TOKENS
    while tokens > MIN_PREFILL_TOKENS and activation_of(tokens) > budget.total // ACTIVATION_SHARE:
        tokens //= 2
    budget.prefill_tokens, budget.activation_of = tokens, activation_of
    budget.activations = activation_of(tokens)
    return SimpleNamespace(model=model, config=config, switches=switches, where=where,
                           top_k=top_k, expert_bytes=expert_bytes, n_experts=n_experts,
                           max_context=max_context, budget=budget)


def load(path: str | Path, memory=None, mode: str = "auto", max_context: int | None = None,
         threads: int | None = None, tokenizer=None, capacity: int | None = None,
         routers: list | None = None, naive: bool = False, stream: bool = False, **ignored):
    """Load an mlx-lm MoE dir as (model, tokenizer) within a memory budget, its routed experts
    streamed from its own files (nothing written), or densely where the whole model fits.

    `memory` as `runtime.load`'s (`50%model`: of the dir's weights). `threads`: the reader's
    (default: the `mlx-flash probe` profile of the volume, else 16). `capacity` (tests,
    benchmarks): experts cached per layer instead of what the budget gives. Benchmarks only:
    `routers` (per MoE layer, x -> logits: bench/routing.py's planted routing) replace the
    blocks' routers (an `nn.Linear` each); `naive` reads every routed expert at every step (a
    token's experts only held); `stream` streams the experts even where the whole model fits.
    The model gains
    `model.flash` (mode `routed`, the budget and the per-token figures)."""
    from mlx_lm.utils import _get_classes

    from .loader import load_tokenizer
    from .profiles import profile_used, reader_settings
    from .runtime import check_memory_limit, warm_up_mlx

    if mode not in MODES:
        raise FlashError(f"--mode {mode} needs a flash dir (`mlx-flash convert`); an mlx-lm "
                         f"dir's experts stream in auto mode (or load with --mode dense)")
    path = Path(path)
    config = load_config(path)
    platform.limit_allocator_retention()
    tokenizer = load_tokenizer(path) if tokenizer is None else tokenizer
    try:
        _get_classes(config)  # the model file's code is not the model's memory
    except ValueError as e:
        raise FlashError(f"{path}: {e}") from None
    warm_up_mlx()
    base_rss = platform.current_rss_bytes()
    p = plan(path, memory, max_context)
    model, config, switches, where, top_k = p.model, p.config, p.switches, p.where, p.top_k
    budget, max_context, expert_bytes, n_experts = p.budget, p.max_context, p.expert_bytes, \
        p.n_experts
    mx.set_cache_limit(budget.allocator_cache)
    if routers is not None:
        _plant(model, switches, routers, path)
    if mode == "dense" or (budget.fits_dense and capacity is None and not (naive or stream)):
        mx.eval(model.parameters())
        model.eval()
        model.flash = FlashState("dense", budget, max_context=max_context, base_rss_bytes=base_rss)
        return model, tokenizer
    check_memory_limit(budget.total, base_rss)
    if capacity is None:
        budget.require_experts(1, top_k)
    slots = top_k if naive else min(n_experts, max(top_k, capacity or budget.capacity))
    files = weight_files(path)
    if threads is None:
        threads, request = reader_settings(files[0], expert_bytes)
    else:
        request = max(1 << 20, expert_bytes)
    rt = DirectRuntime(SpanReader(files, threads, max_request_bytes=request), top_k, naive)
    rt.reader_profile = profile_used(files[0]) or rt.reader_profile
    for i, (name, switch) in enumerate(switches):
        mine = {pname: where[f"{name}.{pname}"] for pname, _ in tree_flatten(switch.parameters())}
        layer = StreamedExperts(switch, i, slots, mine, rt)
        owner, attr = _owner(model, name)
        setattr(owner, attr, layer)
        rt.layers.append(layer)
    mx.eval(model.parameters())  # the resident weights, read once
    for file in files:  # and not also held as cached file pages (a memory limit counts them)
        platform.evict_from_page_cache(file)
    model.eval()
    model.flash = FlashState("routed", budget, rt, slots, max_context, base_rss_bytes=base_rss)
    return model, tokenizer
