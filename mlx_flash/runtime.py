"""Generate from a flash model dir: resident weights in memory, FFN neurons read per token.

`load(path, memory=..., mode=...)` returns an mlx-lm compatible model whose MLPs are `FlashMLP`s
(ffn.py: per decode token and layer the active neurons are found, the missing ones read from
`ffn.bundles` into the layer's `NeuronCache`, the FFN one matmul over it; DESIGN.md "Decode
step"), or, for a mixture of experts, whose `SwitchGLU`s are `FlashExperts` (moe.py).
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import activations, models, platform, quant
from .checkpoint import load_config
from .errors import FlashError
from .ffn import BRIDGE_DENSITY, FlashMLP, FlashRuntime
from .format import Manifest, read_layer_records, read_manifest
from .loader import build_model, load_dense, load_tokenizer, quantize_modules
from .lookahead import Prefetch
from .memory import Budget, lookahead_row_bytes, plan_budget
from .profiles import profile_used, reader_settings
from .state import FlashState, FlashStats
from .units import format_bytes

MODES = ("auto", "dense", "naive", "hybrid", "oracle", "predicted")
DEFAULT_WINDOW = 4
ALLOCATOR_CACHE_BYTES = 32 << 20  # freed MLX buffers kept for reuse in flash modes
# `auto` runs a non-ReLU model's predictors only where they are expected to save at least this
# share of the exact path's reads: below it they cost quality for almost nothing (SmolLM2 at
# 50%model: 0.98 of the FFN read, +19% perplexity on encyclopedia text; issue 30).
MIN_PREDICTED_SAVING = 0.10


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
    predictors: list | None = None,
    bundled: bool = True,
    max_request_bytes: int | None = None,
    compute: str | None = None,
    lookahead: bool | None = None,
    routers: list | None = None,
    mapped: bool = False,
    per_layer: bool = False,
    stage=None,
):
    """Load a flash model dir as (model, tokenizer) within a memory budget.

    `memory`: bytes (`"8GB"`), a fraction of physical RAM (`0.25`) or of the model (`"50%model"`);
    default half the RAM. `mode`: `auto` (dense when the model fits the budget, else flash),
    `dense`, `naive` (whole FFN read per token), `oracle` (exact active set: the reference) or
    `predicted`. `window`: tokens whose neurons stay cached. `max_context`: tokens of KV cache
    the budget reserves (default: the model's limit, at most 2048). `capacity` overrides the
    neuron-cache rows per layer that the budget would give. The model gains `model.flash`, a
    `FlashState`: mode, budget, runtime and the per-token figures (`model.flash.stats()`).

    `hybrid` mode keeps the budget's share of each layer (its first neurons) resident and reads
    the rest every token. `threads` and `max_request_bytes` (the reader's coalescing limit)
    default to the `mlx-flash probe` profile of the volume, else 16 threads and 1 MiB.
    Benchmarks only: `predictors` (per-layer callables x -> bool mask) replace
    predictors.safetensors; `bundled=False` reads each record part separately.
    `compute` (quantized records): `quantized` keeps cached neurons quantized and multiplies
    with `quantized_matmul`, `dequantized` dequantizes them on insert (float cache, counted in
    the budget); default by device (`quant.default_compute`).
    `lookahead`: read what each layer is guessed to need while the layer before it computes:
    an MoE's experts from the next router (moe.py), a dense model's neurons from the next
    predictor (oracle: the next dense input product) applied a layer early (lookahead.py; its
    buffers take at most half of what the budget leaves for the neuron caches, and 64 MiB).
    Default (None): on for an MoE, off for a dense FFN (measured: no gain on this 2-core
    machine, where its reads and predictor pass compete with compute; docs/BENCHMARKS.md). Benchmarks only: `routers` (per-layer callables x -> logits,
    with a `guess` for the lookahead) replace an MoE's routers; `mapped` reads records through
    a memory map (the mmap baseline) instead of direct reads. `per_layer` (predicted mode, an
    experiment): the neuron caches' rows shared out by each layer's predicted-active fraction
    from calibration (`layer_capacities`) instead of the same rows for every layer; on opt-fixture it read
    between 0.6% more and 2.6% fewer bytes (docs/BENCHMARKS.md), so it is off by default.
    `stage` (a `distributed.Stage`): load only its layers (and, on rank 0, the embeddings and
    head); the budget covers only them; the other layers become placeholders.
    """
    if mode not in MODES:
        raise FlashError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    asked, note = mode, None
    if window < 1:
        raise FlashError(f"window must be >= 1 (got {window})")
    path = Path(path)
    config = load_config(path)
    manifest = read_manifest(path)
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
    budget = plan_budget(manifest, text, memory, max_context, compute,
                         *((len(stage.layers), stage.resident_bytes) if stage else ()))
    if mode == "dense" or (mode == "auto" and budget.fits_dense):
        model, tokenizer = stage.load_dense(path) if stage else load_dense(path)
        model.flash = FlashState("dense", budget, max_context=max_context)
        return model, tokenizer
    if manifest.experts:  # MoE: the router picks the experts exactly; nothing to calibrate
        if mode == "hybrid":
            raise FlashError("--mode hybrid keeps a share of a dense FFN resident; an MoE's "
                             "experts stream in `auto` (routed) or `naive` mode")
        mode = "naive" if mode == "naive" else "routed"
        predictors = None
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
    if lookahead and not manifest.experts and mode in ("oracle", "predicted"):
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
    # MLX keeps freed buffers for reuse; uncapped, the prefill's activations and the reader's
    # freed blocks would stay in the process beside the budget (a memory limit then kills it).
    mx.set_cache_limit(ALLOCATOR_CACHE_BYTES)

    model = build_model(config)
    resident = dict(mx.load(str(manifest.resident_path)))
    biases = _pop_biases(manifest, resident)
    weights = model.sanitize(resident)
    if stage is not None:  # the other ranks' layers become placeholders; their weights go
        weights = stage.cut(model, weights)
    quantize_modules(model, config, weights)
    profile = profile_used(manifest.ffn_path) if threads is None else None
    if threads is None or max_request_bytes is None:
        probed_threads, probed_request = reader_settings(manifest.ffn_path, manifest.record_bytes)
        threads, max_request_bytes = threads or probed_threads, max_request_bytes or probed_request
    rt = FlashRuntime(manifest, mode, window, threads, act, max_request_bytes, bundled, compute,
                      mapped)
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
            if routers is not None:
                _set_module(layer, rt.spec.router, routers[i])
            if i - 1 in flash:  # layer i-1 guesses this layer's experts with this router
                router = _module(layer, rt.spec.router)
                flash[i - 1].link(flash[i], getattr(router, "guess", router))
    mx.eval(model.parameters())
    # The resident weights now live in MLX memory; their page-cache copy would only press on a
    # memory limit (Linux charges page cache to it).
    platform.evict_from_page_cache(manifest.resident_path)
    model.eval()
    model.flash = FlashState(mode, budget, rt, capacity, max_context, note=note)
    return model, load_tokenizer(path)


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
    return m.part_values(read_layer_records(m, layer, file=f), part), biases.get(part.name)


__all__ = ["load", "FlashMLP", "FlashRuntime", "FlashState", "FlashStats", "MODES", "Budget"]
