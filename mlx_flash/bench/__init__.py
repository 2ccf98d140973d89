"""`mlx-flash bench`: the paper's strategies (Tables 2 and 3) on one model, prompt and budget.

Every strategy runs in a process of its own (`python -m mlx_flash.bench --worker SPEC`), started
cold: the model's files are dropped from the page cache first, and flash reads bypass it. Where
the platform allows (Linux, root, cgroup v1 memory controller) the process runs under a real
memory limit, page cache included: the whole worker process joins its memory group first, and
once its imports and tokenizer are loaded sets the limit to the memory budget plus that base RSS
plus 5% of the budget (LIMIT_SLACK, driver.py): what `--memory` promises a user.

Strategies, cumulative like the paper's Table 2 rows:
  dense         every weight in memory (mlx-lm's way; no limit: the speed ceiling)
  naive         the whole FFN read from flash every token
  hybrid        the budget's share of each layer's neurons resident, the rest read every token
  predicted     predictors pick the neurons; no window (window 1); each neuron two reads
  +window       ... neurons of the last `window` tokens stay cached
  +bundling     ... each neuron one read of its bundled record
  all           ... reader threads and coalescing from the `mlx-flash probe` profile
  mmap          every weight mapped from the dense checkpoint, under the same memory limit
                (what llama.cpp does by default on a machine that is too small)
  mmap-nolimit  the same without the limit (the mapping stays in the page cache)

Peers (`--peers mlx-lm,mlx-vlm,llama.cpp`) run beside them on the same weights, prompt tokens
and memory limit, each in a venv of its own (peers.py, made on first use or by `--install-peers`)
through peer_run.py; the table gains ours / peer in tokens/s per budget.

Modules: strategies (names, what each needs), driver (`bench`: one worker process per strategy,
its memory group), worker (one strategy in one process), mmap (the mmap baseline), synthetic
(planted predictors), report (cost model figures, claims, table, plot), costmodel, peers (the
other systems, their venvs), peer_run (one peer in one process, inside the peer's venv).
"""

# The names below load their modules on first use: the runtime imports `bench.options` (which
# imports nothing) without importing the orchestrator, its workers and peers.
_EXPORTS = {
    "DEFAULT_PROMPT": "driver", "bench": "driver", "parse_budgets": "driver",
    "PEERS": "peers", "install_peers": "peers", "parse_peers": "peers",
    "format_table": "report", "plot": "report",
    "STRATEGIES": "strategies", "parse_strategies": "strategies",
    "SYNTHETIC_FILE": "synthetic", "SyntheticPredictor": "synthetic", "gated_spec": "synthetic",
    "load_synthetic": "synthetic", "planted_stats": "synthetic", "synthetic_spec": "synthetic",
    "BenchOptions": "options",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


__all__ = [
    "DEFAULT_PROMPT", "PEERS", "STRATEGIES", "SYNTHETIC_FILE", "SyntheticPredictor", "bench",
    "format_table", "gated_spec", "install_peers", "load_synthetic", "parse_budgets",
    "parse_peers", "parse_strategies", "planted_stats", "plot", "synthetic_spec", "BenchOptions",
]
