"""`mlx-flash bench`: the paper's strategies (Tables 2 and 3) on one model, prompt and budget.

Every strategy runs in a process of its own (`python -m mlx_flash.bench --worker SPEC`), started
cold: the model's files are dropped from the page cache first, and flash reads bypass it. Where
the platform allows (Linux, root, cgroup v1 memory controller) the process runs under a real
memory limit, page cache included: the memory budget plus LIMIT_OVERHEAD for what the
interpreter allocates besides the model. The worker joins its memory group after its imports,
so the libraries' own memory (charged before joining) is not counted against the model.

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
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import platform
from .errors import FlashError

STRATEGIES = ("dense", "naive", "hybrid", "predicted", "+window", "+bundling", "all", "mmap",
              "mmap-nolimit")
FLASH = {  # runtime.load keywords per flash strategy; "probed": reader settings from the profile
    "naive": dict(mode="naive"),
    "hybrid": dict(mode="hybrid"),
    "predicted": dict(mode="predicted", window=1, bundled=False),
    "+window": dict(mode="predicted", bundled=False),
    "+bundling": dict(mode="predicted", bundled=True),
    "all": dict(mode="predicted", bundled=True, probed=True),
}
PREDICTED = ("predicted", "+window", "+bundling", "all")
DEFAULT_PROMPT = "The open() function returns"
DEFAULT_TOKENS = 8
DEFAULT_MEMORY = "50%model"
BENCH_CONTEXT = 256  # KV cache tokens the budget reserves: prompt and generated tokens fit
LIMIT_OVERHEAD = 128 << 20
PROBE_NOW_SECONDS = 1.0  # the disk reference measured right after each flash strategy
UNPROBED = dict(threads=16, max_request_bytes=1 << 20)  # reader settings of the other strategies
SYNTHETIC_FILE = "synthetic_predictors.json"
SYNTHETIC_VERSION = 1


# ---------------------------------------------------------------------------------------------
# Synthetic predictors: planted activity for synthetic models (tools/synthetic_flash.py)


def synthetic_spec(active: float = 0.033, false_positive_rate: float = 0.07, held: float = 0.25,
                   window: int = 4, drift: float = 0.01, seed: int = 0) -> dict:
    """Parameters of SyntheticPredictor for the paper's OPT-6.7B statistics.

    Per token `active` of the neurons are truly active and `false_positive_rate` of the others
    are predicted too, so p = active + fpr (1 - active) are predicted. A pool of q of the
    neurons flickers: each pool neuron is predicted on a token with probability r, so p = q r and
    a window of k tokens holds q (1 - (1 - r)^k) = `held`; fresh loads are then about
    p (1 - r)^k per token. `drift`: fraction of the pool swapped for other neurons per token.
    """
    p = active + false_positive_rate * (1 - active)
    target = held / p  # (1 - (1 - r)^k) / r, falling from k (r -> 0) to 1 (r = 1)
    if not 1 < target < window:
        raise ValueError(f"held={held} is unreachable with {p:.3f} predicted and window {window}")
    lo, hi = 1e-9, 1.0
    for _ in range(100):
        r = (lo + hi) / 2
        lo, hi = (r, hi) if (1 - (1 - r) ** window) / r > target else (lo, r)
    return {
        "kind": "mlx-flash synthetic predictors", "version": SYNTHETIC_VERSION, "seed": seed,
        "active": active, "false_positive_rate": false_positive_rate, "window": window,
        "held": held, "predicted_fraction": p, "pool_fraction": p / r, "flicker": r,
        "drift": drift, "expected_fresh_fraction": p * (1 - r) ** window,
    }


class SyntheticPredictor:
    """One layer's planted active sets (see `synthetic_spec`); x is ignored.

    Each call advances a seeded process by one step per row of x and returns the predicted
    (n, ffn) bool mask, so every strategy that makes the same calls sees the same sets.
    """

    nbytes = 0  # nothing in memory but the pool's ids

    def __init__(self, ffn_dim: int, layer: int, spec: dict):
        self.rng = np.random.default_rng([int(spec["seed"]), layer])
        self.order = self.rng.permutation(ffn_dim)  # the first n_pool ids are the pool
        self.n_pool = max(1, round(spec["pool_fraction"] * ffn_dim))
        self.flicker, self.drift = float(spec["flicker"]), float(spec["drift"])
        self.steps = self.predicted = 0

    def step(self) -> np.ndarray:
        n, pool = self.n_pool, self.order
        swaps = min(self.rng.binomial(n, self.drift), len(pool) - n)
        if swaps:
            a = self.rng.choice(n, swaps, replace=False)
            b = n + self.rng.choice(len(pool) - n, swaps, replace=False)
            pool[a], pool[b] = pool[b], pool[a]
        mask = np.zeros(len(pool), dtype=bool)
        mask[pool[:n][self.rng.random(n) < self.flicker]] = True
        self.steps += 1
        self.predicted += int(mask.sum())
        return mask

    def __call__(self, x):
        import mlx.core as mx

        return mx.array(np.stack([self.step() for _ in range(x.shape[0])]))


def load_synthetic(path: str | Path, ffn_dim: int, num_layers: int) -> list | None:
    """The SyntheticPredictors of a synthetic model dir, None when it has no spec."""
    file = Path(path) / SYNTHETIC_FILE
    if not file.is_file():
        return None
    spec = json.loads(file.read_text())
    if spec.get("version") != SYNTHETIC_VERSION:
        raise FlashError(f"{file}: version {spec.get('version')} is not {SYNTHETIC_VERSION}; "
                         "re-run tools/synthetic_flash.py")
    return [SyntheticPredictor(ffn_dim, i, spec) for i in range(num_layers)]


def planted_stats(spec: dict, ffn_dim: int, steps: int = 200, window: int = 4, layer: int = 0):
    """Measured (predicted, fresh, held) fractions of one layer's planted sets over `steps`."""
    pred = SyntheticPredictor(ffn_dim, layer, spec)
    masks = np.stack([pred.step() for _ in range(steps)])  # (steps, ffn)
    held = np.stack([masks[t - window + 1 : t + 1].any(0) for t in range(window, steps)])
    before = np.stack([masks[t - window : t].any(0) for t in range(window, steps)])
    fresh = masks[window:] & ~before
    return float(masks.mean()), float(fresh.mean()), float(held.mean())


# ---------------------------------------------------------------------------------------------
# Real memory limits: a cgroup v1 memory group per worker


@contextlib.contextmanager
def _memory_group(parent: Path | None, name: str, limit: int):
    """A memory group limited to `limit` bytes (page cache included), removed afterwards."""
    if parent is None:
        yield None
        return
    group = parent / f"mlx-flash-bench-{os.getpid()}-{re.sub(r'[^a-z0-9]+', '-', name)}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        if (group / "memory.memsw.limit_in_bytes").exists():
            (group / "memory.memsw.limit_in_bytes").write_text(str(limit))
        yield group
    finally:
        with contextlib.suppress(OSError):
            (group / "memory.force_empty").write_text("0")
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# The worker: one strategy in one process


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _checkpoint_files(ckpt: Path) -> list[Path]:
    return sorted(ckpt.glob("*.safetensors"))


class _Mapped:
    """Copies of mapped tensors in one set of reusable MLX buffers (every layer has the same
    shapes). The page cache holds the model, as with llama.cpp's default mmap; the copy into MLX
    memory (MLX cannot compute on foreign memory) is this baseline's only extra work, timed with
    the page faults it triggers."""

    def __init__(self):
        self.seconds = 0.0
        self.buffers = {}  # parameter path inside a layer -> (MLX array, writable numpy view)

    def fill(self, key: str, view: np.ndarray, bf16: bool):
        import mlx.core as mx

        if key not in self.buffers:
            dtype = {np.float16: mx.float16, np.uint16: mx.uint16, np.float32: mx.float32}
            arr = mx.zeros(view.shape, dtype=dtype[view.dtype.type])
            mx.eval(arr)
            self.buffers[key] = (arr, np.array(arr, copy=False))
        arr, dst = self.buffers[key]
        np.copyto(dst, view)  # page faults (disk reads under the limit) + memcpy
        return arr.view(mx.bfloat16) if bf16 else arr


class _Source:
    """What a mapped layer reads: (parameter path, view of the mapping, is bf16) per tensor."""

    def __init__(self, tensors: list, empty: dict, mapped: _Mapped):
        self.tensors, self.empty, self.mapped = tensors, empty, mapped


def _mapped_layer_class():
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_unflatten

    class MappedLayer(nn.Module):
        """A decoder layer whose weights are copied in from the mapping at each call, then
        dropped: the page cache (under the limit) is all that holds the model."""

        def __init__(self, inner, source: _Source):
            super().__init__()
            self.inner, self._src = inner, source
            inner.update(source.empty)

        def __call__(self, x, mask=None, cache=None):
            # The previous layer's output was evaluated: nothing pending reads the buffers.
            src = self._src
            t0 = time.perf_counter()
            params = tree_unflatten([(k, src.mapped.fill(k, v, bf16)) for k, v, bf16 in src.tensors])
            src.mapped.seconds += time.perf_counter() - t0
            self.inner.update(params)
            y = self.inner(x, mask, cache)
            mx.eval(y)
            self.inner.update(src.empty)
            return y

    return MappedLayer


def _to_mx(view: tuple[np.ndarray, bool]):
    import mlx.core as mx

    arr, bf16 = view
    a = mx.array(arr)
    return a.view(mx.bfloat16) if bf16 else a


def _mapped_model(ckpt: Path):
    """The model with every weight memory-mapped from the checkpoint's safetensors files."""
    import mlx.core as mx
    from mlx.utils import tree_map

    from . import format as fmt
    from .checkpoint import load_config
    from .loader import build_model, load_tokenizer

    model = build_model(load_config(ckpt))
    views = {}
    np_types = {"F16": np.float16, "BF16": np.uint16, "F32": np.float32}
    for f in _checkpoint_files(ckpt):
        header, start = fmt.read_safetensors_header(f, f.name)
        mapping = np.memmap(f, dtype=np.uint8, mode="r")
        for name, e in header.items():
            lo, hi = e["data_offsets"]
            if e["dtype"] not in np_types:
                raise FlashError(f"{f}: {name} is {e['dtype']}; the mmap baseline maps floats only")
            view = mapping[start + lo : start + hi].view(np_types[e["dtype"]]).reshape(e["shape"])
            views[name] = (view, e["dtype"] == "BF16")
    by_layer, rest = defaultdict(list), {}
    for name, (view, bf16) in views.items():
        m = re.search(r"\.layers\.(\d+)\.", name)
        if m is None:
            rest[name] = (view, bf16)
            continue
        path = next(iter(model.sanitize({name: None})))  # HF name -> parameter path
        by_layer[int(m.group(1))].append((re.sub(r"^.*\.layers\.\d+\.", "", path), view, bf16))
    mapped, layer_class = _Mapped(), _mapped_layer_class()
    layers = model.layers
    for i, layer in enumerate(layers):
        empty = tree_map(lambda _: mx.zeros((0,)), layer.parameters())
        layers[i] = layer_class(layer, _Source(by_layer[i], empty, mapped))
    # Embeddings, final norm: small, loaded once (the dense baselines count them too).
    model.load_weights(list(model.sanitize({k: _to_mx(v) for k, v in rest.items()}).items()),
                       strict=False)
    mx.eval(model.parameters())
    return model, load_tokenizer(ckpt), mapped


def _decode(model, tokenizer, prompt: str, tokens: int, label: str,
            after_prefill: Callable[[], None] = lambda: None) -> tuple[float, list[float]]:
    """Greedy prefill + `tokens` decode steps through a KV cache; (prefill s, seconds per token)."""
    import mlx.core as mx

    ids = tokenizer.encode(prompt)
    cache = model.make_cache()
    t0 = time.perf_counter()
    y = int(mx.argmax(model(mx.array([ids]), cache=cache)[0, -1]))
    prefill = time.perf_counter() - t0
    _log(f"{label}: prefill of {len(ids)} tokens {prefill:.1f} s")
    after_prefill()
    times = []
    for i in range(tokens):
        t = time.perf_counter()
        y = int(mx.argmax(model(mx.array([[y]]), cache=cache)[0, -1]))
        times.append(time.perf_counter() - t)
        _log(f"{label}: token {i + 1}/{tokens} {times[-1] * 1000:.0f} ms")
    return prefill, times


def _worker(spec: dict) -> dict:
    import mlx.core as mx  # imported before joining the memory group, like the rest

    from . import format as fmt
    from . import runtime
    from .loader import load_dense, load_tokenizer

    name, path = spec["strategy"], Path(spec["model"])
    m = fmt.read_manifest(path)
    ckpt = Path(spec["checkpoint"]) if spec.get("checkpoint") else None
    load_tokenizer(path)  # the libraries' own memory: before the baseline and the group
    mx.eval(mx.ones((4, 4)) @ mx.ones((4,)))
    base_rss = platform.current_rss_bytes()
    if spec.get("cgroup"):
        Path(spec["cgroup"], "cgroup.procs").write_text(str(os.getpid()))
    for f in [m.ffn_path, m.resident_path, *path.glob("predictors*.safetensors"),
              *(_checkpoint_files(ckpt) if ckpt else [])]:
        platform.evict_from_page_cache(f)
    t0 = time.perf_counter()
    mapped = None
    row = {"strategy": name, "status": "ok"}
    if name == "dense":
        model, tok = load_dense(ckpt or path)
    elif name.startswith("mmap"):
        model, tok, mapped = _mapped_model(ckpt)
    else:
        kw = dict(FLASH[name])
        kw.pop("probed", None)
        kw.setdefault("window", spec["window"])
        predictors = None
        if kw["mode"] == "predicted" and not (path / "predictors.safetensors").exists():
            predictors = load_synthetic(path, m.ffn_dim, m.num_layers)
        model, tok = runtime.load(path, memory=spec["memory"], max_context=spec["max_context"],
                                  threads=spec["threads"], max_request_bytes=spec["max_request_bytes"],
                                  predictors=predictors, **kw)
        rt = model.flash_runtime
        row.update(mode=kw["mode"], window=kw["window"], bundled=kw.get("bundled", True),
                   threads=rt.reader.threads, max_request_bytes=rt.reader.max_request_rows
                   * m.record_bytes, direct_io=rt.reader.direct,
                   capacity_fraction=model.flash_budget["capacity_fraction"],
                   budget_bytes=model.flash_budget["total"])
    row["load_s"] = round(time.perf_counter() - t0, 2)
    row["mlx_peak_load_bytes"] = mx.get_peak_memory()
    mx.reset_peak_memory()
    read = {}

    def after_prefill():  # decode figures only: the mapped baseline's counters start here
        read["start"] = platform.process_read_bytes()
        if mapped is not None:
            mapped.seconds = 0.0

    prefill, times = _decode(model, tok, spec["prompt"], spec["tokens"], name, after_prefill)
    read0, read1 = read["start"], platform.process_read_bytes()
    n = len(times)
    token_ms = 1000 * sum(times) / n
    row.update(tokens=n, prefill_ms=round(1000 * prefill, 1), token_ms=round(token_ms, 1),
               tokens_per_s=round(1000 / token_ms, 3), token_ms_each=[round(1000 * t, 1) for t in times])
    io_ms = cache_ms = predict_ms = 0.0
    if name in FLASH:
        s = model.flash_runtime.stats
        st = s.per_token()
        io_ms, cache_ms, predict_ms = st["io_ms_per_token"], st["cache_ms_per_token"], st["predict_ms_per_token"]
        neurons = m.num_layers * m.ffn_dim
        row.update(flash_bytes_per_token=st["flash_bytes_per_token"],
                   read_requests_per_token=st["read_requests_per_token"],
                   read_gb_per_s=st["read_gb_per_s"], cache_hit_rate=st["cache_hit_rate"])
        if FLASH[name]["mode"] == "predicted":
            row["fresh_fraction"] = round((s.misses + s.overflow) / max(s.tokens, 1) / neurons, 4)
            row["held_fraction"] = round(sum(lay.mlp._cache.num_used for lay in model.layers)
                                         / neurons, 4)
            preds = [lay.mlp._predictor for lay in model.layers]
            if all(isinstance(p, SyntheticPredictor) for p in preds):
                row["predicted_fraction"] = round(sum(p.predicted for p in preds) / max(
                    sum(p.steps for p in preds), 1) / m.ffn_dim, 4)
        else:
            row["fresh_fraction"] = round(st["flash_bytes_per_token"] / m.record_bytes / neurons, 4)
    elif mapped is not None:
        io_ms = 1000 * mapped.seconds / n  # page faults + the copy out of the mapping
        if read0 is not None:  # page-cache misses: what the mapping really read from the disk
            row["flash_bytes_per_token"] = round((read1 - read0) / n)
    row.update(io_ms=round(io_ms, 1), cache_ms=round(cache_ms, 1), predict_ms=round(predict_ms, 1),
               compute_ms=round(max(token_ms - io_ms - cache_ms - predict_ms, 0.0), 1))
    peak = platform.peak_rss_bytes()
    row.update(peak_rss_bytes=peak, base_rss_bytes=base_rss, model_rss_bytes=peak - base_rss,
               mlx_peak_decode_bytes=mx.get_peak_memory(), mlx_cache_bytes=mx.get_cache_memory())
    return row


# ---------------------------------------------------------------------------------------------
# The orchestrator


def parse_strategies(spec: str | list[str] | None) -> list[str]:
    """Strategy names from a comma list (`window` and `bundling` may drop the `+`)."""
    if spec is None:
        return list(STRATEGIES)
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in (s.strip() for s in items if s.strip()):
        name = f"+{item}" if f"+{item}" in STRATEGIES else item
        if name not in STRATEGIES:
            raise FlashError(f"unknown strategy {item!r}; choose from {', '.join(STRATEGIES)}")
        out.append(name)
    return out


def _source_checkpoint(m, checkpoint: str | Path | None) -> Path | None:
    """The dense HF checkpoint of the same weights: --checkpoint, else the manifest's source."""
    for cand in (checkpoint, m.source):
        if cand and Path(cand).is_dir() and (Path(cand) / "config.json").exists() \
                and _checkpoint_files(Path(cand)):
            return Path(cand)
    if checkpoint:
        raise FlashError(f"--checkpoint {checkpoint}: not an HF checkpoint dir with safetensors")
    return None


def bench(
    model: str | Path,
    memory: str = DEFAULT_MEMORY,
    tokens: int = DEFAULT_TOKENS,
    strategies: str | list[str] | None = None,
    prompt: str = DEFAULT_PROMPT,
    window: int = 4,
    max_context: int = BENCH_CONTEXT,
    limit: bool = True,
    checkpoint: str | Path | None = None,
    profile=None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Run the strategies on the flash dir `model`; returns the JSON-able result (rows, summary).

    `memory`: the budget (as `--memory`); `limit`: enforce it with a memory cgroup where
    possible; `checkpoint`: the dense HF checkpoint for the dense and mmap baselines (default:
    the manifest's `source` when it is a local dir); `profile`: a probe.Profile (default: the
    volume's saved profile, probing it first when there is none).
    """
    from . import probe as probe_mod
    from .checkpoint import load_config
    from .costmodel import CostModel
    from .format import read_manifest
    from .memory import plan_budget

    say = progress or (lambda _: None)
    path = Path(model)
    m = read_manifest(path)
    config = load_config(path)
    names = parse_strategies(strategies)
    if tokens < 1:
        raise FlashError("--tokens must be >= 1")
    budget = plan_budget(m, config, memory, max_context)
    synthetic = bool(config.get("synthetic")) or (path / SYNTHETIC_FILE).exists()
    if profile is None:
        profile = probe_mod.load_profile(path)
        if profile is None:
            say(f"no probe profile for the volume of {path}: probing it first (mlx-flash probe)")
            profile = probe_mod.probe(path, progress=say)
            probe_mod.save_profile(profile)
    cost = CostModel(profile)
    probed_threads, probed_request = profile.reader_settings(m.record_bytes)
    ckpt = _source_checkpoint(m, checkpoint)
    parent = platform.memory_cgroup() if limit else None
    limit_bytes = budget.total + LIMIT_OVERHEAD
    has_predictors = (path / "predictors.safetensors").exists() or (path / SYNTHETIC_FILE).exists()

    load_before = os.getloadavg()
    rows = []
    for name in names:
        reason = _unavailable(name, budget, has_predictors, ckpt, parent, limit)
        if reason:
            rows.append({"strategy": name, "status": "skipped", "reason": reason})
            say(f"{name}: skipped ({reason})")
            continue
        reader = (dict(threads=probed_threads, max_request_bytes=probed_request)
                  if FLASH.get(name, {}).get("probed") else UNPROBED)
        spec = dict(strategy=name, model=str(path), memory=str(memory), tokens=tokens,
                    prompt=prompt, window=window, max_context=max_context,
                    checkpoint=str(ckpt) if ckpt else None, **reader)
        limited = name in FLASH or name == "mmap"
        with _memory_group(parent if limited else None, name, limit_bytes) as group:
            spec["cgroup"] = str(group) if group else None
            row = _spawn(spec, say)
            if group is not None:
                row["limit_bytes"] = limit_bytes
                row["cgroup_peak_bytes"] = int((group / "memory.max_usage_in_bytes").read_text())
                if row["status"] != "ok" and row.get("returncode") == -9:
                    row["reason"] = (f"killed under the {limit_bytes / 2**30:.2f} GiB memory "
                                     "limit (out of memory)")
        if row["status"] == "ok" and row.get("read_requests_per_token"):
            row["probe_now_gb_per_s"] = _probe_now(m, row)
        _add_cost_model(row, cost)
        rows.append(row)
    return {
        "model": str(path),
        "synthetic": synthetic,
        "machine": probe_mod.machine(),
        # Other work on the machine slows compute and reads alike; say how busy it was.
        "load_average_before": round(load_before[0], 2),
        "load_average_after": round(os.getloadavg()[0], 2),
        "architecture": m.architecture, "dtype": m.dtype, "d_model": m.d_model,
        "ffn_dim": m.ffn_dim, "num_layers": m.num_layers, "record_bytes": m.record_bytes,
        "model_bytes": budget.model, "memory": str(memory), "memory_budget_bytes": budget.total,
        "memory_limit_bytes": limit_bytes if parent is not None else None,
        "tokens": tokens, "prompt": prompt, "window": window, "max_context": max_context,
        "checkpoint": str(ckpt) if ckpt else None,
        "probe": {"path": profile.path, "created": profile.created, "direct": profile.direct,
                  "threads": probed_threads, "max_request_bytes": probed_request},
        "rows": rows,
        "summary": _targets(rows),
    }


def _unavailable(name, budget, has_predictors, ckpt, parent, limit) -> str | None:
    if name == "dense" and budget.model > 0.75 * platform.physical_memory_bytes():
        return f"the model ({budget.model / 1e9:.1f} GB) does not fit in this machine's memory"
    if name in FLASH and budget.capacity < 1:
        return "the budget does not hold the resident weights (raise --memory)"
    if name in PREDICTED and not has_predictors:
        return "no predictors in the model dir (run `mlx-flash calibrate`)"
    if name.startswith("mmap") and ckpt is None:
        return "no dense safetensors checkpoint of the same weights (pass --checkpoint)"
    if name == "mmap" and parent is None:
        return ("memory limit disabled (--no-limit)" if not limit else
                "needs a real memory limit: root and the cgroup v1 memory controller (Linux)")
    return None


def _probe_now(m, row: dict) -> float:
    """The disk right after a strategy ran: probe-style random reads of the model's own FFN file
    at the strategy's mean request size (rounded to the alignment) and thread count."""
    from .probe import BATCH_BYTES, BATCH_REQUESTS, measure_cell
    from .storage import aligned_empty

    threads, align = row["threads"], platform.direct_io_alignment()
    size = row["flash_bytes_per_token"] / row["read_requests_per_token"]
    size = max(align, round(size / align) * align)
    _, out = aligned_empty(1, max(threads, min(BATCH_REQUESTS, BATCH_BYTES // size)) * size)
    gbs, _ = measure_cell(m.ffn_path, size, threads, m.ffn_bytes // size, PROBE_NOW_SECONDS,
                          np.random.default_rng(7), out.reshape(-1))
    return round(gbs, 3)


def _spawn(spec: dict, say: Callable[[str], None]) -> dict:
    cmd = [sys.executable, "-m", "mlx_flash.bench", "--worker", json.dumps(spec)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tail = []
    try:
        for line in proc.stderr:
            line = line.rstrip()
            tail = (tail + [line])[-20:]
            say(line)
        out = proc.stdout.read()
        proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode == 0:
        return json.loads(out.strip().splitlines()[-1])
    reason = next((t for t in reversed(tail) if t.strip()), f"exit code {proc.returncode}")
    return {"strategy": spec["strategy"], "status": "failed", "returncode": proc.returncode,
            "reason": reason[-300:]}


def _add_cost_model(row: dict, cost) -> None:
    """Predicted I/O time (same threads) and the floor (best threads) for the reads measured."""
    if row.get("status") != "ok" or not row.get("read_requests_per_token"):
        return
    nbytes, reqs, threads = row["flash_bytes_per_token"], row["read_requests_per_token"], row["threads"]
    size = nbytes / reqs
    row["mean_request_bytes"] = round(size)
    row["predicted_io_ms"] = round(1000 * cost.seconds(nbytes, reqs, threads), 1)
    row["floor_ms"] = round(1000 * cost.floor_seconds(nbytes, reqs), 1)
    row["probe_gb_per_s"] = round(cost.throughput(size, threads), 3)
    if row["read_gb_per_s"]:
        row["throughput_vs_probe"] = round(row["read_gb_per_s"] / row["probe_gb_per_s"], 3)
        if row.get("probe_now_gb_per_s"):
            row["throughput_vs_probe_now"] = round(row["read_gb_per_s"] / row["probe_now_gb_per_s"], 3)
    if row["floor_ms"]:
        row["io_vs_floor"] = round(row["io_ms"] / row["floor_ms"], 3)


def _targets(rows: list[dict]) -> list[dict]:
    """The issue's claims, each with its measured value and whether it holds."""
    ok = {r["strategy"]: r for r in rows if r.get("status") == "ok"}
    out = []

    def claim(what, value, target, met):
        out.append({"claim": what, "value": value, "target": target, "met": bool(met)})

    a, naive, mmap = ok.get("all"), ok.get("naive"), ok.get("mmap")
    if a and naive and a.get("flash_bytes_per_token"):
        ratio = naive["flash_bytes_per_token"] / a["flash_bytes_per_token"]
        claim("flash bytes per token: naive / all", round(ratio, 1), ">= 20", ratio >= 20)
    if a and a.get("throughput_vs_probe") is not None:
        v = a["throughput_vs_probe"]
        claim("all: read throughput / saved probe profile (same request size and threads)", v,
              ">= 0.8", v >= 0.8)
    if a and a.get("throughput_vs_probe_now") is not None:
        v = a["throughput_vs_probe_now"]
        claim("all: read throughput / probe of the same file right after (same size, threads)", v,
              ">= 0.8", v >= 0.8)
    if a and a.get("io_vs_floor") is not None:
        v = a["io_vs_floor"]
        claim("all: I/O ms per token / floor", v, "<= 1.5", v <= 1.5)
    if a and naive:
        v = round(naive["token_ms"] / a["token_ms"], 2)
        claim("end to end: naive ms per token / all", v, ">= 5", v >= 5)
    if a and mmap:
        v = round(mmap["token_ms"] / a["token_ms"], 2)
        claim("end to end: mmap (same memory limit) ms per token / all", v, "> 1", v > 1)
        free = ok.get("mmap-nolimit")
        if free and free.get("flash_bytes_per_token") == 0:
            # Without a limit nothing is read from disk: its I/O ms is the copy into MLX memory
            # alone, which llama.cpp (computing on the mapped pages) does not pay.
            v = round((mmap["token_ms"] - free["io_ms"]) / a["token_ms"], 2)
            claim("end to end: mmap without its copy into MLX memory (estimate) / all", v, "> 1",
                  v > 1)
    return out


# ---------------------------------------------------------------------------------------------
# Output


def _mb(n) -> str:
    return "" if n is None else f"{n / 1e6:,.1f}"


def _num(v, fmt: str = "{:,.1f}") -> str:
    return "" if v is None else fmt.format(v)


def format_table(result: dict) -> str:
    """The markdown table of a `bench` result, with its header lines and the claims."""
    gb = 1e9
    lines = []
    if result["synthetic"]:
        lines.append("**SYNTHETIC model** (random weights, planted sparsity): speed, I/O and "
                     "memory only, no quality.")
    lines.append(f"{result['model']}: {result['architecture']} d {result['d_model']}, FFN "
                 f"{result['ffn_dim']}, {result['num_layers']} layers, {result['dtype']}, "
                 f"{result['model_bytes'] / gb:.2f} GB; budget {result['memory']} = "
                 f"{result['memory_budget_bytes'] / gb:.2f} GB; memory limit "
                 + (f"{result['memory_limit_bytes'] / gb:.2f} GB (cgroup, page cache included)"
                    if result["memory_limit_bytes"] else "none")
                 + f"; {result['tokens']} tokens after a {len(result['prompt'])}-character prompt")
    lines.append(f"{result['machine']} (load average {result['load_average_before']} before, "
                 f"{result['load_average_after']} after); reads probed at {result['probe']['path']} "
                 f"({result['probe']['created']})")
    lines.append("")
    lines.append("| strategy | flash MB/token | reads/token | GB/s | I/O ms | predicted I/O ms | "
                 "floor ms | cache ms | compute ms | total ms | tokens/s | peak RSS MiB | notes |")
    lines.append("|---|" + "---:|" * 11 + "---|")
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['strategy']} | " + " | " * 11 + f"{r['status']}: {r['reason']} |")
            continue
        notes = []
        if r.get("threads"):
            notes.append(f"{r['threads']} threads")
        if r.get("fresh_fraction") is not None:
            notes.append(f"fresh {r['fresh_fraction']:.1%}")
        if r.get("held_fraction") is not None:
            notes.append(f"held {r['held_fraction']:.1%}")
        if r.get("predicted_fraction") is not None:
            notes.append(f"predicted {r['predicted_fraction']:.1%}")
        if r["strategy"] == "hybrid":
            notes.append(f"{r['capacity_fraction']:.0%} resident")
        if r.get("cache_ms") is not None and r["strategy"] in PREDICTED and r.get("predict_ms"):
            notes.append(f"predictor {r['predict_ms']} ms")
        if r.get("probe_now_gb_per_s"):
            notes.append(f"disk now {r['probe_now_gb_per_s']:.2f} GB/s")
        if r.get("cgroup_peak_bytes"):
            notes.append(f"cgroup peak {r['cgroup_peak_bytes'] / 2**20:,.0f} MiB")
        lines.append(
            f"| {r['strategy']} | {_mb(r.get('flash_bytes_per_token'))} | "
            f"{_num(r.get('read_requests_per_token'), '{:,.0f}')} | {_num(r.get('read_gb_per_s'), '{:.2f}')} | "
            f"{_num(r['io_ms'])} | {_num(r.get('predicted_io_ms'))} | {_num(r.get('floor_ms'))} | "
            f"{_num(r['cache_ms'])} | {_num(r['compute_ms'])} | {_num(r['token_ms'])} | "
            f"{r['tokens_per_s']:.3f} | {r['peak_rss_bytes'] / 2**20:,.0f} | {', '.join(notes)} |")
    if result["summary"]:
        lines.append("")
        for c in result["summary"]:
            lines.append(f"- {c['claim']}: {c['value']} (target {c['target']}): "
                         f"{'met' if c['met'] else 'NOT met'}")
    return "\n".join(lines)


def plot(result: dict, file: str | Path) -> Path:
    """Stacked ms per token (I/O, cache + predictor, compute) per strategy, floor marked."""
    from .probe import _pyplot

    plt = _pyplot()
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    names = [r["strategy"] for r in rows]
    io = np.array([r["io_ms"] for r in rows])
    cache = np.array([r["cache_ms"] + r["predict_ms"] for r in rows])
    comp = np.array([r["compute_ms"] for r in rows])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.bar(names, io, label="I/O")
    ax.bar(names, cache, bottom=io, label="cache + predictor")
    ax.bar(names, comp, bottom=io + cache, label="compute")
    for i, r in enumerate(rows):
        if r.get("floor_ms"):
            ax.plot([i - 0.4, i + 0.4], [r["floor_ms"]] * 2, "k--", lw=1)
    ax.set_ylabel("ms per token")
    title = "mlx-flash bench" + (" (SYNTHETIC model)" if result["synthetic"] else "")
    ax.set_title(f"{title}: {Path(result['model']).name}, budget {result['memory']}")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    plt.setp(ax.get_xticklabels(), rotation=20)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)
    return Path(file)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(_worker(json.loads(sys.argv[2]))), flush=True)
    else:
        sys.exit("usage: python -m mlx_flash.bench --worker SPEC_JSON (internal; use `mlx-flash bench`)")
