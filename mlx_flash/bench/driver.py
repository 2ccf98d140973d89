"""The orchestrator: each strategy in a worker process of its own, under a memory limit."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .. import platform
from ..direct import streamable
from ..errors import FlashError
from ..format import is_flash_dir
from ..sketch import sketch_bytes
from .costmodel import CostModel
from .mmap import _checkpoint_files
from .report import _add_cost_model, _add_ratios, _targets
from .strategies import FLASH, _unavailable, parse_strategies
from .synthetic import SYNTHETIC_FILE

DEFAULT_PROMPT = "The open() function returns"
DEFAULT_TOKENS = 8
DEFAULT_MEMORY = "50%model"
BENCH_CONTEXT = 256  # KV cache tokens the budget reserves: prompt and generated tokens fit
# Each limited strategy runs under budget + its measured base RSS (Python, libraries, tokenizer)
# + this share of the budget: what `--memory` promises (runtime.BUDGET_SLACK).
LIMIT_SLACK = 0.05
PROBE_NOW_SECONDS = 1.0  # the disk reference measured right after each flash strategy
UNPROBED = dict(threads=16, max_request_bytes=1 << 20)  # reader settings of the other strategies
UNLIMITED = ("none", "unlimited")  # a budget of bench's `--memory` list: no memory limit
ALL_RAM = "100%"  # what our strategies are given at an unlimited budget


def set_memory_limit(group: Path, limit: int) -> None:
    """Limit the cgroup v1 memory group `group` to `limit` bytes, page cache (and swap) included."""
    (group / "memory.limit_in_bytes").write_text(str(limit))
    if (group / "memory.memsw.limit_in_bytes").exists():
        (group / "memory.memsw.limit_in_bytes").write_text(str(limit))


@contextlib.contextmanager
def _memory_group(parent: Path | None, name: str):
    """A memory group (the worker that joins it sets its limit once it knows its base RSS),
    removed afterwards."""
    if parent is None:
        yield None
        return
    group = parent / f"mlx-flash-bench-{os.getpid()}-{re.sub(r'[^a-z0-9]+', '-', name)}"
    group.mkdir()
    try:
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


def _source_checkpoint(m, checkpoint: str | Path | None) -> Path | None:
    """The dense HF checkpoint of the same weights: --checkpoint, else the manifest's source."""
    for cand in (checkpoint, m.source):
        if cand and Path(cand).is_dir() and (Path(cand) / "config.json").exists() \
                and _checkpoint_files(Path(cand)):
            return Path(cand)
    if checkpoint:
        raise FlashError(f"--checkpoint {checkpoint}: not an HF checkpoint dir with safetensors")
    return None


def parse_budgets(memory: str | None) -> list[str | None]:
    """`--memory` of bench: one budget or a comma list of them; `none` (or `unlimited`): no
    memory limit, our strategies given all of the RAM."""
    items = [m.strip() for m in str(memory or DEFAULT_MEMORY).split(",") if m.strip()]
    if not items:
        raise FlashError("--memory: no budget given")
    return [None if m.lower() in UNLIMITED else m for m in items]


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
    peers: str | list[str] | None = None,
    gguf: str | Path | None = None,
) -> dict:
    """Run the strategies on the flash dir `model`; returns the JSON-able result (rows, summary).

    `memory`: the budget (as `--memory`), or a comma list of budgets run one after the other
    (`none`: unlimited); `limit`: enforce it with a memory cgroup where possible; `checkpoint`:
    the dense HF checkpoint for the dense and mmap baselines (default: the manifest's `source`
    when it is a local dir); `profile`: a probe.Profile (default: the volume's saved profile,
    probing it first when there is none); `peers`: other systems run on the same weights under
    the same limit (bench/peers.py: mlx-lm, mlx-vlm, llama.cpp; `gguf`: the llama.cpp file of
    the same model).
    """
    from .. import models
    from .. import probe as probe_mod
    from ..checkpoint import load_config
    from ..format import read_manifest
    from ..loader import build_model, load_tokenizer
    from ..memory import plan_budget
    from ..profiles import load_profile, save_profile
    from .peers import parse_peers, planted_routing, run_peer, unready

    say = progress or (lambda _: None)
    path = Path(model)
    memories = parse_budgets(memory)
    peer_names = parse_peers(peers)
    config = load_config(path)
    zero_copy = not is_flash_dir(path) and streamable(path)
    if zero_copy:  # an mlx-lm MoE dir: its experts streamed from its own safetensors
        def shape(mem):
            return _direct_shape(path, mem, max_context)
    else:
        m0, model0 = read_manifest(path), build_model(config)

        def shape(mem):
            return m0, plan_budget(m0, models.flash_spec(m0.architecture).text(config), mem,
                                   max_context, model=model0)
    budgets = [shape(ALL_RAM if mem is None else mem) for mem in memories]
    m, budget = budgets[0]
    names = parse_strategies(strategies, experts=bool(m.experts), zero_copy=zero_copy)
    if tokens < 1:
        raise FlashError("--tokens must be >= 1")
    synthetic = bool(config.get("synthetic")) or (path / SYNTHETIC_FILE).exists()
    if profile is None:
        profile = load_profile(path)
        if profile is None:
            say(f"no probe profile for the volume of {path}: probing it first (mlx-flash probe)")
            profile = probe_mod.probe(path, progress=say)
            save_profile(profile)
    cost = CostModel(profile)
    probed_threads, probed_request = profile.reader_settings(m.record_bytes)
    ckpt = _source_checkpoint(m, checkpoint)
    parent = platform.memory_cgroup() if limit else None
    has_predictors = (path / "predictors.safetensors").exists() or (path / SYNTHETIC_FILE).exists()
    if peer_names:  # the same input for every MLX system, and a synthetic MoE's routing
        prompt_ids = load_tokenizer(path).encode(prompt)
        routing = planted_routing(path, config, len(prompt_ids) + tokens + 1)
        missing = {peer: unready(peer, say) for peer in peer_names}

    load_before = os.getloadavg()
    rows, several = [], len(memories) > 1
    for mem, (_, budget) in zip(memories, budgets):
        label = "none" if mem is None else mem
        if several:
            say(f"-- budget {label}")
        for name in names:
            row = _run_strategy(name, path, m, budget, mem, tokens, prompt, window, max_context,
                                ckpt, parent, limit, has_predictors, zero_copy,
                                (probed_threads, probed_request), say)
            if row.get("status") == "ok" and row.get("read_requests_per_token"):
                row["probe_now_gb_per_s"] = _probe_now(m, row)
            _add_cost_model(row, cost)
            rows.append({"system": "mlx-flash", "memory": label, **row})
        for peer in peer_names:
            row = missing[peer] or run_peer(
                peer, path=path, zero_copy=zero_copy, ckpt=ckpt, budget=budget,
                limited=mem is not None, parent=parent, prompt=prompt, prompt_ids=prompt_ids,
                tokens=tokens, max_context=max_context, routing=routing, gguf=gguf, say=say)
            rows.append({"memory": label, **row})
    _add_ratios(rows)
    _match_gguf_tokens(rows)
    limits = [r["limit_bytes"] for r in rows if r.get("limit_bytes")]
    return {
        "model": str(path),
        # "mlx-lm": the dir's own safetensors streamed (zero-copy); "flash": a converted dir
        "layout": "mlx-lm" if zero_copy else "flash",
        "synthetic": synthetic,
        "machine": probe_mod.machine(),
        # Other work on the machine slows compute and reads alike; say how busy it was.
        "load_average_before": round(load_before[0], 2),
        "load_average_after": round(os.getloadavg()[0], 2),
        "architecture": m.architecture, "dtype": m.dtype, "d_model": m.d_model,
        "ffn_dim": m.ffn_dim, "num_layers": m.num_layers, "record_bytes": m.record_bytes,
        "model_bytes": budget.model, "memory": str(memory),
        "memory_budget_bytes": budgets[0][1].total,
        # each limited row's own limit: budget + its base RSS + LIMIT_SLACK of the budget
        "memory_limit_bytes": max(limits, default=None),
        "memory_limit_slack": LIMIT_SLACK if parent is not None else None,
        # every budget of the run (several with `--memory A,B,...`): its bytes, its top limit
        "budgets": [{"memory": "none" if mem is None else mem, "budget_bytes": b.total,
                     "unlimited": mem is None,
                     "limit_bytes": max((r["limit_bytes"] for r in rows if r.get("limit_bytes")
                                         and r["memory"] == ("none" if mem is None else mem)),
                                        default=None)}
                    for mem, (_, b) in zip(memories, budgets)],
        "peers": peer_names,
        "tokens": tokens, "prompt": prompt, "window": window, "max_context": max_context,
        "checkpoint": str(ckpt) if ckpt else None,
        "probe": {"path": profile.path, "created": profile.created, "direct": profile.direct,
                  "threads": probed_threads, "max_request_bytes": probed_request},
        "rows": rows,
        # the rows whose greedy tokens differ from the first row's (exact strategies and the
        # MLX peers on the same weights: none)
        "tokens_differ": _tokens_differ(rows),
        "summary": [{**c, "memory": r} if several else c
                    for r in dict.fromkeys(row["memory"] for row in rows)
                    for c in _targets([row for row in rows if row["memory"] == r])],
    }


def _run_strategy(name, path, m, budget, mem, tokens, prompt, window, max_context, ckpt, parent,
                  limit, has_predictors, zero_copy, probed, say) -> dict:
    """One of our strategies in a worker process, in a memory group of its own: limited to the
    budget (flash strategies, mmap) or, for the others and at an unlimited budget, only there
    for the group's peak."""
    reason = _unavailable(name, budget, has_predictors, ckpt, parent, limit,
                          experts=bool(m.experts), zero_copy=zero_copy,
                          sketch=0 if zero_copy else sketch_bytes(m))
    if mem is None and name == "mmap" and not reason:
        reason = "the budget is unlimited (none): mmap-nolimit is the mapping without a limit"
    if reason:
        say(f"{name}: skipped ({reason})")
        return {"strategy": name, "status": "skipped", "reason": reason}
    reader = (dict(threads=probed[0], max_request_bytes=probed[1])
              if FLASH.get(name, {}).get("probed") else UNPROBED)
    limited = mem is not None and (name in FLASH or name == "mmap")
    spec = dict(strategy=name, model=str(path), memory=str(mem or ALL_RAM), tokens=tokens,
                prompt=prompt, window=window, max_context=max_context,
                checkpoint=str(ckpt) if ckpt else None,
                # the worker limits its group to its base + this (+ slack): all of the RAM
                # and more where the row is not limited
                budget_bytes=budget.total if limited else platform.physical_memory_bytes(),
                limit_slack=LIMIT_SLACK, zero_copy=zero_copy, **reader)
    with _memory_group(parent, name) as group:
        spec["cgroup"] = str(group) if group else None
        row = _spawn(spec, say)
        _group_figures(row, group)
    return row


def _group_figures(row: dict, group: Path | None) -> None:
    """The memory group's peak and, where it is below the RAM, its limit; a process the limit
    killed says so."""
    if group is None:
        return
    row["cgroup_peak_bytes"] = int((group / "memory.max_usage_in_bytes").read_text())
    # what the group held at the end beside the process's memory (page cache: reclaimable),
    # and how often it reached its limit (the kernel then reclaims before anything is killed)
    stat = dict(line.split() for line in (group / "memory.stat").read_text().splitlines()
                if line.count(" ") == 1)
    row["cgroup_cache_bytes"] = int(stat.get("cache", 0))
    row["cgroup_limit_hits"] = int((group / "memory.failcnt").read_text())
    limit_bytes = int((group / "memory.limit_in_bytes").read_text())
    if limit_bytes < platform.physical_memory_bytes():
        row["limit_bytes"] = limit_bytes
        if row["status"] != "ok" and row.get("returncode") == -9:
            row["reason"] = (f"killed under the {limit_bytes / 2**30:.2f} GiB memory limit "
                             "(out of memory)")


def _match_gguf_tokens(rows: list[dict]) -> None:
    """A GGUF peer's `tokens_match_ours` where it read the prompt as our tokenizer does: how many
    of its greedy tokens lead our first row's (its own kernels and rounding: for information,
    not a check)."""
    ours = next((r["token_ids"] for r in rows if r.get("system") == "mlx-flash"
                 and r.get("status") == "ok" and r.get("token_ids")), None)
    for r in rows:
        if ours and r.get("same_prompt_tokens") and r.get("token_ids"):
            same = next((i for i, (a, b) in enumerate(zip(ours, r["token_ids"])) if a != b),
                        min(len(ours), len(r["token_ids"])))
            r["tokens_match_ours"] = f"first {same} of {len(r['token_ids'])} tokens as ours"


def _tokens_differ(rows: list[dict]) -> list[str]:
    """Rows (`strategy`, or `strategy@budget` with several budgets) whose greedy tokens differ
    from the first's; a peer on other weights (llama.cpp's GGUF) is not compared."""
    ok = [r for r in rows if r.get("status") == "ok" and r.get("token_ids") is not None
          and r.get("tokens_compared", True)]
    several = len({r.get("memory") for r in rows}) > 1
    return [f"{r['strategy']}@{r['memory']}" if several else r["strategy"]
            for r in ok[1:] if r["token_ids"] != ok[0]["token_ids"]]


def _direct_shape(path: Path, memory, max_context: int):
    """An mlx-lm MoE dir's figures as a manifest names a flash dir's (experts as the FFN's
    rows, an expert's bytes as a record's; its largest weights file probed after each row),
    and its budget."""
    from types import SimpleNamespace

    from mlx.utils import tree_flatten

    from ..direct import plan, weight_files

    p = plan(path, memory, max_context)
    files = weight_files(path)
    largest = max(files, key=lambda f: f.stat().st_size)
    text = p.config.get("text_config") or p.config
    dtype = str(tree_flatten(p.model.parameters())[0][1].dtype).removeprefix("mlx.core.")
    m = SimpleNamespace(
        experts=p.n_experts, architecture=text.get("model_type") or p.config["model_type"],
        dtype="quantized" if p.config.get("quantization") else dtype,
        d_model=text.get("hidden_size", 0), ffn_dim=p.n_experts, num_layers=len(p.switches),
        record_bytes=p.expert_bytes, ffn_path=largest, ffn_bytes=largest.stat().st_size,
        resident_path=None, source=None, files=files)
    return m, p.budget


def _probe_now(m, row: dict) -> float:
    """The disk right after a strategy ran: probe-style random reads of the model's own FFN file
    at the strategy's mean request size (rounded to the alignment) and thread count."""
    from ..probe import BATCH_BYTES, BATCH_REQUESTS, measure_cell
    from ..storage import aligned_empty

    threads, align = row["threads"], platform.direct_io_alignment()
    size = row["flash_bytes_per_token"] / row["read_requests_per_token"]
    size = max(align, round(size / align) * align)
    _, out = aligned_empty(1, max(threads, min(BATCH_REQUESTS, BATCH_BYTES // size)) * size)
    gbs, _ = measure_cell(m.ffn_path, size, threads, m.ffn_bytes // size, PROBE_NOW_SECONDS,
                          np.random.default_rng(7), out.reshape(-1))
    return round(gbs, 3)


def _spawn(spec: dict, say: Callable[[str], None], cmd: list[str] | None = None) -> dict:
    """Our worker on `spec`, or `cmd` (a peer's runner) with `spec` on its standard input; its
    last line of output as the row, or a failed row with the last line it logged."""
    stdin = None if cmd is None else subprocess.PIPE
    cmd = cmd or [sys.executable, "-m", "mlx_flash.bench", "--worker", json.dumps(spec)]
    if spec.get("cgroup"):  # in its memory group before Python starts: its imports count too
        procs = str(Path(spec["cgroup"]) / "cgroup.procs")
        cmd = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', procs, *cmd]
    proc = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    tail = []
    try:
        if stdin is not None:
            with contextlib.suppress(BrokenPipeError):  # it failed first: its stderr says why
                proc.stdin.write(json.dumps(spec))
                proc.stdin.close()
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
    return {"strategy": spec.get("strategy") or spec["peer"], "status": "failed",
            "returncode": proc.returncode,
            "reason": reason[-300:]}
