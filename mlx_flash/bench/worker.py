"""One strategy in one process, started cold: load, decode, measure (the `--worker` of bench)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .. import platform
from .mmap import _checkpoint_files, _mapped_model
from .options import BenchOptions
from .routing import load_routing
from .strategies import FLASH
from .synthetic import SyntheticPredictor, load_synthetic


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _decode(model, tokenizer, prompt: str, tokens: int, label: str,
            after_prefill: Callable[[], None] = lambda: None,
            out: list[int] | None = None) -> tuple[float, list[float]]:
    """Greedy prefill + `tokens` decode steps through a KV cache; (prefill s, seconds per token).
    `out` gains the greedy tokens."""
    out = [] if out is None else out
    import mlx.core as mx

    from ..generation import new_cache, prefill_tokens

    ids = tokenizer.encode(prompt)
    cache = new_cache(model)  # mlx-lm's qwen2, qwen3, olmo2 have no make_cache
    t0 = time.perf_counter()
    # as mlx-lm's generate does: the prompt but its last token in steps of what the budget
    # planned for (only the KV cache evaluated), then the last token's logits
    step = prefill_tokens(model) or 2048
    for a in range(0, len(ids) - 1, step):
        model(mx.array([ids[a : min(a + step, len(ids) - 1)]]), cache=cache)
        mx.eval([c.state for c in cache])
    y = int(mx.argmax(model(mx.array([ids[-1:]]), cache=cache)[0, -1]))
    prefill = time.perf_counter() - t0
    out.append(y)
    _log(f"{label}: prefill of {len(ids)} tokens {prefill:.1f} s")
    after_prefill()
    times = []
    for i in range(tokens):
        t = time.perf_counter()
        y = int(mx.argmax(model(mx.array([[y]]), cache=cache)[0, -1]))
        times.append(time.perf_counter() - t)
        out.append(y)
        _log(f"{label}: token {i + 1}/{tokens} {times[-1] * 1000:.0f} ms")
    return prefill, times


def _base(spec: dict) -> int:
    """The RSS before the model (after the libraries, tokenizer and model code: the caller's),
    once MLX's first kernels ran; the memory group's limit set from it."""
    from .. import runtime

    runtime.warm_up_mlx()  # as runtime.load does before measuring its base
    platform.limit_allocator_retention()
    base_rss = platform.current_rss_bytes()
    if spec.get("cgroup"):
        from .driver import set_memory_limit

        set_memory_limit(Path(spec["cgroup"]),
                         base_rss + int(spec["budget_bytes"] * (1 + spec["limit_slack"])))
    return base_rss


def _zero_copy_worker(spec: dict) -> dict:
    """One strategy on an mlx-lm MoE dir: mlx-lm's dense load, or its experts streamed from the
    dir's safetensors (every routed expert per token, through the expert cache, and with the
    lookahead: `all`)."""
    import mlx.core as mx

    from .. import direct, mlxlm
    from ..checkpoint import load_config
    from ..loader import load_tokenizer

    name, path = spec["strategy"], Path(spec["model"])
    config = load_config(path)
    tokenizer = load_tokenizer(path)
    mlxlm.classes(config)
    base_rss = _base(spec)
    files = direct.weight_files(path)
    for f in files:
        platform.evict_from_page_cache(f)
    text = config.get("text_config") or config
    routers = load_routing(path, direct.expert_count(config), direct._top_k(config),
                           text["num_hidden_layers"])
    t0 = time.perf_counter()
    row = {"strategy": name, "status": "ok", "layout": "mlx-lm"}
    model, tok = direct.load(path, memory=None if name == "dense" else spec["memory"],
                             mode="dense" if name == "dense" else "auto",
                             max_context=spec["max_context"], threads=spec["threads"],
                             tokenizer=tokenizer, routers=routers, naive=name == "naive",
                             stream=True, lookahead=name == "all")
    rt, budget = model.flash.runtime, model.flash.budget
    if rt is not None:
        row.update(mode=rt.mode, threads=rt.reader.threads,
                   max_request_bytes=rt.reader.max_request_bytes, direct_io=rt.reader.direct,
                   capacity_fraction=round(model.flash.capacity / budget.ffn_dim, 4),
                   budget_bytes=budget.total)
    row["load_s"] = round(time.perf_counter() - t0, 2)
    row["mlx_peak_load_bytes"] = mx.get_peak_memory()
    mx.reset_peak_memory()
    read, ids = {}, []
    prefill, times = _decode(model, tok, spec["prompt"], spec["tokens"], name,
                             lambda: read.setdefault("start", platform.process_read_bytes()), ids)
    n = len(times)
    token_ms = 1000 * sum(times) / n
    row.update(tokens=n, prefill_ms=round(1000 * prefill, 1), token_ms=round(token_ms, 1),
               tokens_per_s=round(1000 / token_ms, 3),
               token_ms_each=[round(1000 * t, 1) for t in times])
    io_ms = cache_ms = predict_ms = 0.0
    wait_ms = None
    if rt is not None:
        st = rt.stats.per_token()
        io_ms, cache_ms, wait_ms = (st["io_ms_per_token"], st["cache_ms_per_token"],
                                    st["io_wait_ms_per_token"])
        predict_ms = st["predict_ms_per_token"]
        row.update(flash_bytes_per_token=st["flash_bytes_per_token"],
                   read_requests_per_token=st["read_requests_per_token"],
                   read_gb_per_s=st["read_gb_per_s"], cache_hit_rate=st["cache_hit_rate"],
                   io_wait_ms=round(wait_ms, 1), lookahead_hit_rate=st["lookahead_hit_rate"],
                   lookahead_recall=None, fresh_fraction=round(st["flash_bytes_per_token"] / (
                       sum(layer.expert_bytes for layer in rt.layers) * budget.ffn_dim), 4))
    waited = io_ms if wait_ms is None else wait_ms
    row.update(io_ms=round(io_ms, 1), cache_ms=round(cache_ms, 1),
               predict_ms=round(predict_ms, 1),
               compute_ms=round(max(token_ms - waited - cache_ms - predict_ms, 0.0), 1))
    read1 = platform.process_read_bytes()
    if read.get("start") is not None and read1 is not None:
        row["disk_bytes_per_token"] = round((read1 - read["start"]) / n)
    peak = platform.peak_rss_bytes()
    row.update(peak_rss_bytes=peak, base_rss_bytes=base_rss, model_rss_bytes=peak - base_rss,
               mlx_peak_decode_bytes=mx.get_peak_memory(), mlx_cache_bytes=mx.get_cache_memory(),
               token_ids=ids)
    return row


def _worker(spec: dict) -> dict:
    # The whole process in the memory group, as a user's under a limit: its imports, tokenizer
    # and model. The limit is set once the base is known: budget + base RSS + the slack.
    if spec.get("cgroup"):
        Path(spec["cgroup"], "cgroup.procs").write_text(str(os.getpid()))
    import mlx.core as mx

    from .. import format as fmt
    from .. import models, runtime
    from ..checkpoint import load_config
    from ..loader import load_dense, load_tokenizer

    name, path = spec["strategy"], Path(spec["model"])
    if spec.get("zero_copy"):
        return _zero_copy_worker(spec)
    m = fmt.read_manifest(path)
    ckpt = Path(spec["checkpoint"]) if spec.get("checkpoint") else None
    tokenizer = load_tokenizer(path)  # the libraries' own memory: before the baseline
    models.architecture(load_config(path).get("model_type"))
    base_rss = _base(spec)
    for f in [m.ffn_path, m.resident_path, *path.glob("predictors*.safetensors"),
              *(_checkpoint_files(ckpt) if ckpt else [])]:
        platform.evict_from_page_cache(f)
    t0 = time.perf_counter()
    mapped = None
    row = {"strategy": name, "status": "ok"}
    routers = None
    if m.experts:  # a synthetic MoE's planted routing (bench/routing.py)
        config = load_config(path)
        routers = load_routing(path, m.experts, config.get("num_experts_per_tok", 1),
                               m.num_layers)
    if name == "dense":
        model, tok = load_dense(ckpt or path)
    elif name.startswith("mmap") and not m.experts:
        model, tok, mapped = _mapped_model(ckpt)
    else:
        # an MoE's mmap baseline: every routed expert copied out of a map of its records
        kw = dict(mode="naive", mapped=True) if name.startswith("mmap") else dict(FLASH[name])
        kw.pop("probed", None)
        kw.setdefault("window", spec["window"])
        predictors = None
        if kw["mode"] == "predicted" and not (path / "predictors.safetensors").exists():
            predictors = load_synthetic(path, m.ffn_dim, m.num_layers)
        options = BenchOptions(predictors=predictors, bundled=kw.pop("bundled", True),
                               routers=routers, mapped=kw.pop("mapped", False))
        model, tok = runtime.load(path, memory=spec["memory"], max_context=spec["max_context"],
                                  threads=spec["threads"], max_request_bytes=spec["max_request_bytes"],
                                  tokenizer=tokenizer, bench=options, **kw)
        rt, budget = model.flash.runtime, model.flash.budget
        row.update(mode=kw["mode"], window=kw["window"], bundled=options.bundled,
                   threads=rt.reader.threads, max_request_bytes=rt.reader.max_request_rows
                   * m.record_bytes, direct_io=rt.reader.direct,
                   capacity_fraction=round(budget.capacity / m.ffn_dim, 4),
                   budget_bytes=budget.total)
    row["load_s"] = round(time.perf_counter() - t0, 2)
    row["mlx_peak_load_bytes"] = mx.get_peak_memory()
    mx.reset_peak_memory()
    read = {}

    def after_prefill():  # decode figures only: the mapped baseline's counters start here
        read["start"] = platform.process_read_bytes()
        if mapped is not None:
            mapped.seconds = 0.0

    ids = []
    prefill, times = _decode(model, tok, spec["prompt"], spec["tokens"], name, after_prefill, ids)
    row["token_ids"] = ids
    read0, read1 = read["start"], platform.process_read_bytes()
    n = len(times)
    token_ms = 1000 * sum(times) / n
    row.update(tokens=n, prefill_ms=round(1000 * prefill, 1), token_ms=round(token_ms, 1),
               tokens_per_s=round(1000 / token_ms, 3), token_ms_each=[round(1000 * t, 1) for t in times])
    io_ms = cache_ms = predict_ms = 0.0
    wait_ms = None  # I/O on the critical path, when some of it overlapped compute
    if name in FLASH or (m.experts and name.startswith("mmap")):
        s = model.flash.runtime.stats
        st = s.per_token()
        io_ms, cache_ms, predict_ms = st["io_ms_per_token"], st["cache_ms_per_token"], st["predict_ms_per_token"]
        wait_ms = st["io_wait_ms_per_token"]
        neurons = m.num_layers * m.ffn_dim
        row.update(flash_bytes_per_token=st["flash_bytes_per_token"],
                   read_requests_per_token=st["read_requests_per_token"],
                   read_gb_per_s=st["read_gb_per_s"], cache_hit_rate=st["cache_hit_rate"],
                   io_wait_ms=round(wait_ms, 1), lookahead_hit_rate=st["lookahead_hit_rate"],
                   lookahead_recall=st["lookahead_recall"])
        if name.startswith("mmap"):  # copied out of the map; the disk read the page-cache misses
            row["copied_bytes_per_token"] = row.pop("flash_bytes_per_token")
            if read0 is not None:
                row["flash_bytes_per_token"] = round((read1 - read0) / n)
        elif FLASH[name]["mode"] in ("predicted", "sketch"):
            row["fresh_fraction"] = round((s.misses + s.overflow) / max(s.tokens, 1) / neurons, 4)
            row["held_fraction"] = round(sum(mlp.cache.num_used for mlp in model.flash.runtime.layers)
                                         / neurons, 4)
            preds = [mlp.predictor for mlp in model.flash.runtime.layers]
            if all(isinstance(p, SyntheticPredictor) for p in preds):
                row["predicted_fraction"] = round(sum(p.predicted for p in preds) / max(
                    sum(p.steps for p in preds), 1) / m.ffn_dim, 4)
        else:
            row["fresh_fraction"] = round(st["flash_bytes_per_token"] / m.record_bytes / neurons, 4)
    elif mapped is not None:
        io_ms = 1000 * mapped.seconds / n  # page faults + the copy out of the mapping
        if read0 is not None:  # page-cache misses: what the mapping really read from the disk
            row["flash_bytes_per_token"] = round((read1 - read0) / n)
    waited = io_ms if wait_ms is None else wait_ms
    row.update(io_ms=round(io_ms, 1), cache_ms=round(cache_ms, 1), predict_ms=round(predict_ms, 1),
               compute_ms=round(max(token_ms - waited - cache_ms - predict_ms, 0.0), 1))
    peak = platform.peak_rss_bytes()
    row.update(peak_rss_bytes=peak, base_rss_bytes=base_rss, model_rss_bytes=peak - base_rss,
               mlx_peak_decode_bytes=mx.get_peak_memory(), mlx_cache_bytes=mx.get_cache_memory())
    return row
