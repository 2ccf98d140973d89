"""`BenchOptions`: what only a benchmark (or a measuring tool) changes in `runtime.load`, kept
out of its signature. It imports nothing, so the runtime can name it without importing the rest
of the bench."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BenchOptions:
    # per-layer callables x -> bool mask in place of predictors.safetensors (planted predictors)
    predictors: list | None = None
    # False: each record part is its own read (the paper's row before bundling)
    bundled: bool = True
    # per MoE layer callables x -> logits, with a `guess` for the lookahead (planted routing)
    routers: list | None = None
    # records through a memory map (the mmap baseline) instead of direct reads
    mapped: bool = False
    # predicted mode: the caches' rows shared out by each layer's calibrated active fraction
    # (`runtime.layer_capacities`; measured: no gain, docs/BENCHMARKS.md)
    per_layer: bool = False
    # sketch mode: the share of each layer's neurons a token computes, instead of the manifest's
    keep: float | None = None


DEFAULT = BenchOptions()
