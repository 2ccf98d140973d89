"""Generate from a flash model dir: resident weights in memory, FFN neurons read per token.

`load(path, memory=..., mode=...)` returns an mlx-lm compatible model whose MLPs are `FlashMLP`s
(ffn.py: per decode token and layer the active neurons are found, the missing ones read from
`ffn.bundles` into the layer's `NeuronCache`, the FFN one matmul over it; DESIGN.md "Decode
step"), or, for a mixture of experts, whose `SwitchGLU`s are `FlashExperts` (moe.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import activations, models, platform, quant
from .bench.options import DEFAULT as DEFAULT_BENCH
from .bench.options import BenchOptions
from .checkpoint import load_config
from .down_rows import down_file
from .errors import FlashError
from .ffn import FlashMLP
from .ffn_shared import BRIDGE_DENSITY, FlashRuntime
from .format import Manifest, read_layer_records, read_manifest
from .loader import build_model, load_dense, load_tokenizer, quantize_modules
from .lookahead import Prefetch
from .memory import Budget, lookahead_row_bytes, plan_budget
from .profiles import profile_used, reader_settings
from .sketch import (
    DEFAULT_BITS,
    DEFAULT_KEEP,
    expected_saving,
    has_sketch,
    is_values,
    load_sketch,
    sketch_bytes,
    values_costs,
)
from .sketch import choices as sketch_choices
from .state import FlashState, FlashStats
from .storage import aligned_empty
from .tensors import load_resident
from .units import format_bytes

MODES = ("auto", "dense", "naive", "hybrid", "oracle", "predicted", "sketch")
DEFAULT_WINDOW = 4
# `auto` runs a non-ReLU model's predictors only where they are expected to save at least this
# share of the exact path's reads: below it they cost quality for almost nothing (SmolLM2 at
# 50%model: 0.98 of the FFN read, +19% perplexity on encyclopedia text; issue 30).
MIN_PREDICTED_SAVING = 0.10
# The model's part of the process keeps within its budget to this share (what bench and the
# tests allow it under a real memory limit; what a cgroup limit must leave beside the budget).
BUDGET_SLACK = 0.05
# What a process's RSS moves between two measurements of its base (the manifest read, a module
# imported late): the refusal below is for a budget that plainly cannot fit, not a near miss.
LIMIT_TOLERANCE = 8 << 20
ORACLE_READ_BYTES = 4 << 20  # records read at a time for the oracle's input projections


def _pop_biases(m: Manifest, weights: dict[str, mx.array]) -> dict[int, dict[str, mx.array]]:
    """Pop the FFN biases (resident, under the HF names the manifest's parts give) by layer."""
    out: dict[int, dict[str, mx.array]] = {}
    for layer in range(m.num_layers):
        for p in m.parts:
            if p.bias is not None:
                out.setdefault(layer, {})[p.name] = weights.pop(p.bias_name(layer))
    return out


def load(
    path: str | Path,
    memory: str | float | int | None = None,
    mode: str = "auto",
    window: int = DEFAULT_WINDOW,
    threads: int | None = None,
    max_context: int | None = None,
    capacity: int | None = None,
    *,
    max_request_bytes: int | None = None,
    compute: str | None = None,
    lookahead: bool | None = None,
    kv_caches: int = 1,
    stage=None,
    tokenizer=None,
    bench: BenchOptions = DEFAULT_BENCH,
):
    """Load a flash model dir as (model, tokenizer) within a memory budget.

    `memory`: bytes (`"8GB"`), a fraction of physical RAM (`0.25`) or of the model (`"50%model"`);
    default half the RAM. `mode`: `auto` (dense when the model fits the budget, else flash),
    `dense`, `naive` (whole FFN read per token), `oracle` (exact active set: the reference) or
    `predicted`. `window`: tokens whose neurons stay cached. `max_context`: tokens of KV cache
    the budget reserves (default: the model's limit, at most 2048), `kv_caches` times (a
    server's kept prompt caches, promptcache.py). `capacity` overrides the
    neuron-cache rows per layer that the budget would give. The model gains `model.flash`, a
    `FlashState`: mode, budget, runtime and the per-token figures (`model.flash.stats()`).

    `hybrid` mode keeps the budget's share of each layer (its first neurons) resident and reads
    the rest every token. `threads` and `max_request_bytes` (the reader's coalescing limit)
    default to the `mlx-flash probe` profile of the volume, else 16 threads and 1 MiB.
    `compute` (quantized records): `quantized` keeps cached neurons quantized and multiplies
    with `quantized_matmul`, `dequantized` dequantizes them on insert (float cache, counted in
    the budget); default by device (`quant.default_compute`).
    `lookahead`: read what each layer is guessed to need while the layer before it computes:
    an MoE's experts from the next router (moe.py), a dense model's neurons from the next
    predictor (oracle: the next dense input product) applied a layer early (lookahead.py; its
    buffers take at most half of what the budget leaves for the neuron caches, and 64 MiB).
    Default (None): on for an MoE, off for a dense FFN (measured: no gain on this 2-core
    machine, where its reads and predictor pass compete with compute; docs/BENCHMARKS.md).
    `stage` (a `distributed.Stage`): load only its layers (and, on rank 0, the embeddings and
    head); the budget covers only them; the other layers become placeholders. `tokenizer`: the
    dir's tokenizer, already loaded (else it is loaded first, before the base RSS is measured).
    `bench`: what only benchmarks and measuring tools change (`bench.options.BenchOptions`:
    planted predictors and routers, unbundled reads, the mmap baseline's reader, per-layer
    cache rows).
    """
    predictors, per_layer = bench.predictors, bench.per_layer
    if mode not in MODES:
        raise FlashError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    asked, note = mode, None
    if window < 1:
        raise FlashError(f"window must be >= 1 (got {window})")
    path = Path(path)
    config = load_config(path)
    manifest = read_manifest(path)
    # What is not the model's, before the budget's share is measured: the tokenizer (tens of MiB
    # for a large vocabulary) and the model file's code; then the process's RSS is the base
    # (`--memory` covers what comes after it).
    platform.limit_allocator_retention()
    tokenizer = load_tokenizer(path) if tokenizer is None else tokenizer
    models.architecture(config.get("model_type"))
    warm_up_mlx()
    base_rss = platform.current_rss_bytes()
    if compute is not None and compute not in quant.COMPUTES:
        raise FlashError(f"unknown compute {compute!r}; choose one of {', '.join(quant.COMPUTES)}")
    if manifest.quantization is None:
        compute = None
    elif manifest.experts:  # an MoE's experts are multiplied quantized (moe.py)
        if compute == "dequantized":
            raise FlashError("--compute dequantized: an MoE's cached experts stay quantized "
                             "(gather_qmm); leave --compute out")
        compute = "quantized"
    elif compute is None:
        compute = quant.default_compute()
    spec = models.flash_spec(manifest.architecture)
    text = spec.text(config)  # a multimodal model's text model
    if max_context is None:
        max_context = min(2048, text.get("max_position_embeddings") or 2048)
    model = build_model(config)  # lazy (nothing evaluated): its caches count in the budget
    if stage is not None:
        stage.check(model)
    budget = plan_budget(manifest, text, memory, max_context, compute,
                         *((stage.layers, stage.resident_bytes) if stage else ()), model=model,
                         kv_caches=kv_caches)
    if mode != "dense":
        check_memory_limit(budget.total, base_rss)
    # MLX keeps freed buffers for reuse; uncapped, the prefill's activations and the reader's
    # freed blocks would stay in the process beside the budget (a memory limit then kills it).
    mx.set_cache_limit(budget.allocator_cache)
    if mode == "dense" or (mode == "auto" and budget.fits_dense):
        model, _ = stage.load_dense(path) if stage else load_dense(path)
        model.flash = FlashState("dense", budget, max_context=max_context,
                                 base_rss_bytes=base_rss)
        return model, tokenizer
    if manifest.experts:  # MoE: the router picks the experts exactly; nothing to calibrate
        if mode == "hybrid":
            raise FlashError("--mode hybrid keeps a share of a dense FFN resident; an MoE's "
                             "experts stream in `auto` (routed) or `naive` mode")
        mode = "naive" if mode == "naive" else "routed"
        predictors = None
    elif mode == "sketch" or (mode == "auto" and predictors is None and has_sketch(manifest)
                              and not activations.is_exact_sparse(spec.activation(text))):
        # a gated FFN without exact zeros: its low-bit sketch picks each token's top share,
        # where it fits and is expected to save MIN_PREDICTED_SAVING of the exact path's reads
        if not has_sketch(manifest):  # --mode sketch on a dir without one: say how to make it
            load_sketch(manifest, spec.activation(text))
        exact_rows, neuron_bytes, buffers = budget.capacity, budget.neuron_bytes, budget.buffers
        budget.other = sketch_bytes(manifest)
        values = is_values(manifest)
        if values:  # the caches hold down rows only; a second reader
            budget.neuron_bytes, scratch = values_costs(manifest)
            budget.buffers += scratch
        keep = bench.keep or manifest.extra["sketch"].get("keep", DEFAULT_KEEP)
        saving = expected_saving(manifest, exact_rows, budget.capacity, keep, values)
        if mode == "auto" and capacity is None and (budget.capacity < 1
                                                    or saving < MIN_PREDICTED_SAVING):
            held, fits = budget.other, budget.capacity >= 1
            mode, budget.other = "oracle", 0
            budget.neuron_bytes, budget.buffers = neuron_bytes, buffers
            smaller = ""
            if values and not fits:  # would a 4-bit sketch fit and save?
                rows = budget.capacity_with(sketch_bytes(manifest, True, DEFAULT_BITS, own=False))
                if rows >= 1 and (expected_saving(manifest, exact_rows, rows, keep)
                                  >= MIN_PREDICTED_SAVING):
                    smaller = (f"; a 4-bit one would fit and read less: `mlx-flash sketch "
                               f"{path} --bits 4`")
            note = ("note: every neuron is computed (the exact path): " + (
                f"the budget leaves no room for the sketch ({format_bytes(held)}){smaller}"
                if not fits else f"at this budget the sketch is expected to read "
                f"{1 - saving:.2f}x its bytes per token (the sketch's memory would shrink the cache"
                + (", and its records share blocks)" if manifest.packed else ")"))
                + "; --mode sketch runs it")
        else:
            predictors = load_sketch(manifest, spec.activation(text), bench.keep)
            mode = "sketch"
    elif mode in ("auto", "predicted"):
        from .predictor import PREDICTORS_FILE, load_predictors

        if predictors is None and (mode == "predicted" or (path / PREDICTORS_FILE).exists()):
            predictors = load_predictors(path, manifest.mx_dtype)
        if predictors is not None:
            budget.other = sum(getattr(p, "nbytes", 0) for p in predictors)
            mode = "predicted"
        else:  # no `mlx-flash calibrate` yet: the exact set stands in (the CLI says so)
            mode = "oracle"
    else:
        predictors = None
    top_k = text.get(spec.top_k or "", 1)
    by_layer = capacity is None and mode == "predicted" and per_layer
    if lookahead is None:
        lookahead = bool(manifest.experts)
    ahead_rows = 0  # dense lookahead: its buffers come out of the budget before the caches
    if mode == "sketch" and predictors and predictors[0].values:
        lookahead = False  # values mode reads down rows only, after the sketch has chosen
    if lookahead and not manifest.experts and mode in ("oracle", "predicted", "sketch"):
        ahead_rows = budget.plan_lookahead(
            lookahead_row_bytes(manifest.record_bytes, manifest.packed))
    act = spec.activation(text)
    exact_sparse = activations.is_exact_sparse(act)
    fixed = capacity is not None
    if asked == "auto" and mode == "predicted" and not exact_sparse and not by_layer:
        # every neuron of a non-ReLU FFN is active: the exact path needs no predictor, so it
        # runs where the predictors would not fit or would save little
        rows = capacity if fixed else min(budget.capacity, manifest.ffn_dim)
        saving = predicted_saving(manifest, rows) if rows >= 1 else None
        if rows < 1 or (saving is not None and saving < MIN_PREDICTED_SAVING):
            note = ("note: every neuron is computed (the exact path): "
                    + (f"at this budget the predictors would save about {max(saving, 0):.0%} "
                       "of the bytes read per token, at a cost in quality" if rows >= 1 else
                       f"the budget leaves no room for the predictors "
                       f"({format_bytes(budget.other)})") + "; --mode predicted runs them")
            mode, predictors, budget.other = "oracle", None, 0
    if mode == "oracle" and exact_sparse and not manifest.experts:
        # the ReLU oracle holds each layer's input projection (and its bias) to find the set
        first = manifest.parts[0]
        inputs = manifest.num_layers * manifest.ffn_dim * (
            manifest.d_model * manifest.itemsize + (manifest.itemsize if first.bias else 0))
        budget.other += inputs
        if asked == "auto" and capacity is None and budget.capacity < 1:
            # no predictors, no room for the oracle's projections: the exact path without them
            budget.other -= inputs
            mode = "hybrid"
            note = (f"note: no predictors in this model dir, and the budget cannot also hold the "
                    f"exact oracle's input projections ({format_bytes(inputs)}): each layer's "
                    "first neurons stay cached and the rest are read every token (hybrid; run "
                    "`mlx-flash calibrate`)")
    if (asked == "auto" and mode == "oracle" and not exact_sparse and note is None
            and not manifest.experts and capacity is None and not has_sketch(manifest)
            and manifest.d_model % 32 == 0):
        # a gated FFN computed whole where a sketch would read less: say how to make one
        for bits, values, own, how in sketch_choices(manifest):  # the default first
            rows = _planned_sketch_rows(manifest, budget, values, bits, own)
            saving = expected_saving(manifest, budget.capacity, rows, DEFAULT_KEEP, values)
            if rows >= 1 and saving >= MIN_PREDICTED_SAVING:
                note = (f"note: every neuron is computed (the exact path); at this budget a "
                        f"sketch would read about {saving:.0%} less per token, for a little "
                        f"perplexity: run `mlx-flash sketch {path}{how}`")
                break
    if capacity is None:
        if manifest.experts:  # whole experts, at least the top-k experts of one token
            budget.require_experts(manifest.expert_ffn, top_k)
        else:
            budget.require_flash()
        capacity = budget.capacity
    capacity = max(1, min(capacity, manifest.ffn_dim))
    if manifest.experts:  # whole experts; naive mode keeps none (its cache would go unused)
        slots = top_k if mode == "naive" else max(top_k, capacity // manifest.expert_ffn)
        capacity = slots * manifest.expert_ffn
    capacities = [capacity] * manifest.num_layers
    if by_layer and (fractions := _active_fractions(manifest)):
        capacities = layer_capacities(capacity, fractions, manifest.ffn_dim)

    resident = load_resident(manifest)
    biases = _pop_biases(manifest, resident)
    weights = model.sanitize(resident)
    if stage is not None:  # the other ranks' layers become placeholders; their weights go
        weights = stage.cut(model, weights)
    quantize_modules(model, config, weights)
    profile = profile_used(manifest.ffn_path) if threads is None else None
    if threads is None or max_request_bytes is None:
        probed_threads, probed_request = reader_settings(manifest.ffn_path, manifest.record_bytes)
        threads, max_request_bytes = threads or probed_threads, max_request_bytes or probed_request
    rt = FlashRuntime(manifest, mode, window, threads, act, max_request_bytes, bench.bundled,
                      compute, bench.mapped)
    if mode == "sketch" and predictors[0].values:
        rt.read_values(threads, max_request_bytes, down_file(manifest))
    # where the reader's threads and coalescing came from (`mlx-flash probe` writes profiles)
    rt.reader_profile = profile or "defaults (no probe profile for this volume)"
    ahead = None
    if manifest.experts and lookahead and mode == "routed":
        from .moe import Lookahead

        ahead = rt.lookahead = Lookahead(rt, top_k)
    elif ahead_rows:
        rt.lookahead = Prefetch(rt, ahead_rows)
    flash = {}
    with open(manifest.ffn_path, "rb") as f:
        for i, layer in enumerate(model.layers):
            if stage is not None and i not in stage.layers:
                continue
            if manifest.experts:
                from .moe import FlashExperts

                ffn = FlashExperts(rt, i, capacities[i], ahead)
            else:
                # a ReLU oracle needs the dense input products; otherwise every neuron is active
                oracle = (_oracle(manifest, i, biases.get(i, {}), f)
                          if mode == "oracle" and exact_sparse else None)
                ffn = FlashMLP(rt, i, capacities[i], biases.get(i, {}), oracle,
                               predictors[i] if predictors else None)
            _set_module(layer, rt.spec.module, ffn)
            rt.layers.append(ffn)
            flash[i] = ffn
            if mode == "hybrid":  # the budget's share stays resident: the first neurons
                ffn.cache.ensure(np.arange(capacity), 0, rt.reader, ffn.offset)
    model.load_weights(list(weights.items()), strict=True)
    if ahead_rows:
        for before, after in zip(rt.layers, rt.layers[1:]):
            before.follow_with(after)
    if manifest.experts:
        for i in flash:
            layer = model.layers[i]
            if bench.routers is not None:
                _set_module(layer, rt.spec.router, bench.routers[i])
            if i - 1 in flash:  # layer i-1 guesses this layer's experts with this router
                router = _module(layer, rt.spec.router)
                flash[i - 1].link(flash[i], getattr(router, "guess", router))
    mx.eval(model.parameters())
    model.eval()
    model.flash = FlashState(mode, budget, rt, capacity, max_context, note=note,
                             base_rss_bytes=base_rss)
    return model, tokenizer


def warm_up_mlx() -> None:
    """Run each kind of MLX kernel a model calls once on tiny inputs: MLX's first use of its
    CPU backend (its stream thread, kernel state) takes ~4.5 MiB of RSS that belongs to the
    library, not to the model, so it lands before the base RSS is measured."""
    for dt in (mx.float16, mx.bfloat16, mx.float32):
        x, w = mx.ones((4, 64), dtype=dt), mx.ones((64, 64), dtype=dt)
        y = mx.fast.rms_norm(x, mx.ones((64,), dt), 1e-5) @ w
        q = mx.ones((1, 2, 4, 32), dt)
        q = mx.fast.rope(q, 32, traditional=False, base=1e4, scale=1.0, offset=0)
        a = mx.fast.scaled_dot_product_attention(q, q, q, scale=0.1, mask="causal")
        p = mx.softmax(y.astype(mx.float32), axis=-1)
        mx.eval(y, a, p, mx.argmax(p, -1), mx.logsumexp(p, -1), nn.silu(y), nn.gelu(y))
    wq, sc, bi = mx.quantize(mx.ones((64, 64)), 64, 4)
    mx.eval(mx.quantized_matmul(mx.ones((4, 64)), wq, sc, bi, transpose=True, group_size=64,
                                bits=4),
            mx.gather_qmm(mx.ones((4, 1, 1, 64)), wq[None], sc[None], bi[None],
                          rhs_indices=mx.zeros((4, 1), mx.uint32), transpose=True,
                          group_size=64, bits=4))


def check_memory_limit(budget: int, base_rss: int) -> None:
    """FlashError, before anything is loaded, when `budget` plus what the process already holds
    (`base_rss`) cannot fit the memory limit of its cgroup (Linux; none elsewhere)."""
    limit = platform.memory_limit_bytes()
    if limit is None or base_rss + budget <= limit + LIMIT_TOLERANCE:
        return
    room = int((limit - base_rss) / (1 + BUDGET_SLACK))
    fix = (f"give --memory at most {format_bytes(room)}" if room > 0
           else "raise the limit")
    raise FlashError(f"--memory {format_bytes(budget)} and the {format_bytes(base_rss)} this "
                     f"process holds before the model (Python, libraries, the tokenizer) exceed "
                     f"the {format_bytes(limit)} memory limit of its cgroup; {fix}")


def _planned_sketch_rows(m: Manifest, budget: Budget, values: bool, bits: int,
                         own: bool) -> int:
    """The cache rows per layer beside a sketch of `bits` (`own`: a quantized dir's own rows)
    not yet made: its memory out of the caches, and in values mode (its rows are down rows) the
    second reader's buffers."""
    other = sketch_bytes(m, planned=True, bits=bits, own=own)
    if values:
        row, scratch = values_costs(m)
        budget = dataclasses.replace(budget, neuron_bytes=row, buffers=budget.buffers + scratch)
    return budget.capacity_with(other)


def predicted_saving(m: Manifest, capacity: int) -> float | None:
    """The share of the exact path's FFN reads per token that a non-ReLU model's predictors are
    expected to save with `capacity` cache rows per layer, from calibration's predicted-active
    fraction of each layer (the larger of the calibration text's and the second text's); None
    when the manifest has no such figures or nothing is read either way.

    The exact path reads the ffn_dim - capacity uncached neurons. Predicted mode reads the
    predicted ones among them, but a share of BRIDGE_DENSITY or more is read as whole runs
    (ffn._bridge): then all of them. (The window's gain is left out: a cache that can hold the
    window's predicted sets holds nearly the whole layer at these fractions.)"""
    entry = m.extra.get("predictors") or {}
    tables = [entry.get("layers"), (entry.get("holdout") or {}).get("layers")]
    fractions = [0.0] * m.num_layers
    for rows in tables:
        if not rows:
            continue
        values = [r.get("predicted_active_fraction") if isinstance(r, dict) else None
                  for r in rows]
        if len(values) != m.num_layers or not all(isinstance(v, (int, float)) for v in values):
            return None
        fractions = [max(a, b) for a, b in zip(fractions, values)]
    if not any(fractions):
        return None
    uncached = max(m.ffn_dim - capacity, 0)
    exact = uncached * m.num_layers
    if exact == 0:
        return None
    predicted = sum(uncached * (1.0 if p >= BRIDGE_DENSITY else p) for p in fractions)
    return 1 - predicted / exact


def _active_fractions(m: Manifest) -> list[float] | None:
    """Each layer's predicted-active fraction from the manifest's calibration entry, or None."""
    rows = ((m.extra.get("predictors") or {}).get("layers")) or []
    fractions = [r.get("predicted_active_fraction") for r in rows if isinstance(r, dict)]
    ok = len(fractions) == m.num_layers and all(
        isinstance(f, (int, float)) and f > 0 for f in fractions)
    return fractions if ok else None


def layer_capacities(capacity: int, fractions: list[float], ffn_dim: int) -> list[int]:
    """The rows of `len(fractions)` caches of `capacity` rows each, shared out in proportion to
    the layers' active fractions (a layer whose predictor marks 40% of its neurons needs more
    rows than one that marks 5%), each at most `ffn_dim` (what a full layer leaves goes to the
    others) and at least 1: `capacity * layers` in all, give or take a row per layer."""
    total, n = capacity * len(fractions), len(fractions)
    out = [0] * n
    left = set(range(n))
    while left:
        weight = sum(fractions[i] for i in left)
        share = {i: total * fractions[i] / weight for i in left}
        full = {i for i in left if share[i] >= ffn_dim}
        if not full:
            for i in left:
                out[i] = max(1, int(share[i]))
            break
        for i in full:
            out[i] = ffn_dim
            total -= ffn_dim
        left -= full
    return out


def _module(layer: nn.Module, path: str) -> nn.Module:
    """The module at the dotted attribute `path` of a decoder layer (`mlp.gate`)."""
    for attr in path.split("."):
        layer = getattr(layer, attr)
    return layer


def _set_module(layer: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at the dotted attribute `path` of a decoder layer (`mlp`,
    `block_sparse_moe.switch_mlp`)."""
    *parents, name = path.split(".")
    setattr(_module(layer, ".".join(parents)) if parents else layer, name, module)


def _oracle(m: Manifest, layer: int, biases: dict, f) -> tuple[mx.array, mx.array | None]:
    """The dense input matrix (ffn, d) of one layer and its bias, for the exact activation."""
    part = m.parts[0]  # the activation's input: its sign decides a ReLU neuron's activity
    # read a slice of the layer at a time: whole records would briefly take the layer's size
    matrix, view = aligned_empty(m.ffn_dim, m.d_model * m.itemsize)
    rows = max(1, ORACLE_READ_BYTES // m.record_bytes)
    for start in range(0, m.ffn_dim, rows):
        n = min(rows, m.ffn_dim - start)
        values = m.part_values(read_layer_records(m, layer, start, n, file=f), part)
        view[start : start + n] = np.array(values.view(mx.uint8))
    return matrix.view(m.mx_dtype), biases.get(part.name)


__all__ = ["load", "FlashMLP", "FlashRuntime", "FlashState", "FlashStats", "MODES", "Budget"]
