"""An MoE's routed experts streamed straight from an mlx-lm dir's own safetensors: no flash dir,
no second copy on disk (`load`).

mlx-lm builds the model (its model file, config.json's quantization, `sanitize`) with every
weight lazy. Each `SwitchGLU` or `SwitchMLP` in it (the routed experts of an MoE block, in any
family mlx-lm has a file for) is replaced by a `streamed.StreamedExperts`: a cache of experts in
the module's own layout, filled by reads of each expert's slices of the stacked tensors. The
block's router, shared experts, dense layers and the weighting of the expert outputs stay
mlx-lm's, and the arithmetic is mlx-lm's own. The other weights load from the same files.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import mlxlm, platform
from .checkpoint import load_config
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
    kv_bytes,
    parse_memory,
)
from .safetensors import read_header
from .spans import SpanReader
from .state import FlashState
from .streamed import DirectRuntime, ExpertLookahead, StreamedExperts, _owner, guesser

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


def info(path: str | Path) -> dict:
    """What `mlx-flash info` says of an mlx-lm MoE dir: the family, its experts, their share of
    the files and the quantization, from config.json and the safetensors headers alone."""
    path = Path(path)
    config = load_config(path)
    where = tensors(path)
    experts = expert_count(config)
    stacked = {name.rsplit(".", 1)[0] for name, (_, _, _, shape) in where.items()
               if len(shape) == 3 and shape[0] == experts and _STACKED.search(name)}
    streamed = sum(n for name, (_, _, n, _) in where.items()  # weights, scales, biases
                   if name.rsplit(".", 1)[0] in stacked)
    text = config.get("text_config") or config
    quant = config.get("quantization") or {}
    return {"path": str(path), "layout": "mlx-lm (streamed as it is; no flash dir)",
            "architecture": config.get("model_type"), "num_layers": text.get("num_hidden_layers"),
            "d_model": text.get("hidden_size"), "experts": experts, "top_k": _top_k(config),
            "quantization": {k: quant[k] for k in ("bits", "group_size", "mode") if k in quant}
            or None,
            "model_bytes": sum(n for _, _, n, _ in where.values()),
            "expert_bytes": streamed, "files": len(weight_files(path))}


def plan(path: str | Path, memory=None, max_context: int | None = None,
         lookahead: bool = True, kv_caches: int = 1) -> SimpleNamespace:
    """The model of the mlx-lm MoE dir `path` built lazily (nothing read but headers) and its
    budget (with the lookahead's buffer where `lookahead`): a namespace of model, config,
    switches (name, module), where (tensors), top_k, expert_bytes, max_context and budget."""
    from mlx_lm.utils import load_model

    path = Path(path)
    try:
        model, config = load_model(path, lazy=True, get_model_classes=mlxlm.classes)
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
        resident=resident, kv_cache=kv_caches * kv_bytes(model, config, max_context, itemsize),
        kv_caches=kv_caches,
        # the reader's scratch (a token's experts, each slice widened by up to two blocks),
        # the widened slices' staging, the caches' slot of every expert, the lookahead's
        # buffer of a token's experts
        buffers=(top_k * (expert_bytes + 2 * 4096 * 9) + stage_bytes
                 + len(switches) * n_experts * 8 + (top_k * expert_bytes if lookahead else 0)),
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
         routers: list | None = None, naive: bool = False, stream: bool = False,
         lookahead: bool | None = None, kv_caches: int = 1, **ignored):
    """Load an mlx-lm MoE dir as (model, tokenizer) within a memory budget, its routed experts
    streamed from its own files (nothing written), or densely where the whole model fits.

    `memory` as `runtime.load`'s (`50%model`: of the dir's weights). `threads`: the reader's
    (default: the `mlx-flash probe` profile of the volume, else 16). `capacity` (tests,
    benchmarks): experts cached per layer instead of what the budget gives. Benchmarks only:
    `routers` (per MoE layer, x -> logits: bench/routing.py's planted routing) replace the
    blocks' routers (an `nn.Linear` each); `naive` reads every routed expert at every step (a
    token's experts only held); `stream` streams the experts even where the whole model fits.
    `lookahead` (default on): read the experts each MoE layer is guessed to pick (its router on
    the layer before's input) while that layer computes (streamed.py). `kv_caches`: contexts of
    KV cache the budget reserves (a server's kept prompt caches). The model gains
    `model.flash` (mode `routed`, the budget and the per-token figures)."""
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
        mlxlm.classes(config)  # the model file's code is not the model's memory
    except ValueError as e:
        raise FlashError(f"{path}: {e}") from None
    warm_up_mlx()
    base_rss = platform.current_rss_bytes()
    lookahead = not naive if lookahead is None else lookahead and not naive
    p = plan(path, memory, max_context, lookahead, kv_caches)
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
    if lookahead:
        rt.lookahead = ExpertLookahead(rt, expert_bytes)
        for (name, _), before, layer in zip(switches[1:], rt.layers, rt.layers[1:]):
            guess = guesser(_owner(model, name)[0], top_k)
            if guess is not None:
                before.link(layer, guess)
    mx.eval(model.parameters())  # the resident weights, read once
    for file in files:  # and not also held as cached file pages (a memory limit counts them)
        platform.evict_from_page_cache(file)
    model.eval()
    model.flash = FlashState("routed", budget, rt, slots, max_context, base_rss_bytes=base_rss)
    return model, tokenizer
