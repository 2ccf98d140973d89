"""What a bench result says: the cost model's figures per row, the claims, table and plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .strategies import PREDICTED


def _add_cost_model(row: dict, cost) -> None:
    """Predicted I/O time (same threads) and the floor (best threads) for the reads measured."""
    if (row.get("status") != "ok" or not row.get("read_requests_per_token")
            or row["strategy"].startswith("mmap")):  # an MoE's map: copies, not direct reads
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


def _add_ratios(rows: list[dict]) -> None:
    """Each ok peer row's `ours_over_peer`: our fastest streamed row's tokens/s at the same
    budget (not `dense`, mlx-lm's own load, nor the mmap baselines) over the peer's."""
    for r in rows:
        if r.get("system", "mlx-flash") == "mlx-flash" or r.get("status") != "ok":
            continue
        ours = [o for o in rows if o.get("system") == "mlx-flash" and o.get("status") == "ok"
                and o.get("memory") == r.get("memory") and o["strategy"] != "dense"
                and not o["strategy"].startswith("mmap")]
        if ours:
            best = max(ours, key=lambda o: o["tokens_per_s"])
            r["ours"] = best["strategy"]
            r["ours_over_peer"] = round(best["tokens_per_s"] / r["tokens_per_s"], 2)


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
    if a and a.get("compute_ms"):  # what the method adds on the critical path, over compute
        waited = a["io_ms"] if a.get("io_wait_ms") is None else a["io_wait_ms"]
        v = round((waited + a["cache_ms"] + a["predict_ms"]) / a["compute_ms"], 3)
        claim("all: (I/O waited for + cache + predictor) / compute", v, "<= 0.25", v <= 0.25)
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
    budgets = result.get("budgets") or [{"memory": result["memory"],
                                         "budget_bytes": result["memory_budget_bytes"]}]
    lines.append(f"{result['model']}: {result['architecture']} d {result['d_model']}, FFN "
                 f"{result['ffn_dim']}, {result['num_layers']} layers, {result['dtype']}, "
                 f"{result['model_bytes'] / gb:.2f} GB; "
                 + ("budgets " if len(budgets) > 1 else "budget ")
                 + ", ".join(("none (no limit; ours given all of the RAM)" if b.get("unlimited")
                              else f"{b['memory']} = {b['budget_bytes'] / gb:.2f} GB")
                             for b in budgets)
                 + "; memory limit "
                 + (f"budget + each process's base RSS + 5% (at most "
                    f"{result['memory_limit_bytes'] / gb:.2f} GB; cgroup, page cache included)"
                    if result["memory_limit_bytes"] else "none")
                 + f"; {result['tokens']} tokens after a {len(result['prompt'])}-character prompt")
    lines.append(f"{result['machine']} (load average {result['load_average_before']} before, "
                 f"{result['load_average_after']} after); reads probed at {result['probe']['path']} "
                 f"({result['probe']['created']})")
    several = len(budgets) > 1
    for b in budgets:
        ours = [r for r in result["rows"] if r.get("system", "mlx-flash") == "mlx-flash"
                and r.get("memory", b["memory"]) == b["memory"]]
        lines.append("")
        if several:
            lines.append(f"budget {b['memory']}:")
        lines += _strategy_table(ours)
    if result.get("peers"):
        lines.append("")
        lines += _peer_table(result["rows"], several)
    if result.get("tokens_differ"):
        lines.append("")
        lines.append("- greedy tokens differ from the first row's: "
                     + ", ".join(result["tokens_differ"]))
    if result["summary"]:
        lines.append("")
        for c in result["summary"]:
            lines.append(f"- {c['claim']}"
                         + (f" (budget {c['memory']})" if c.get("memory") else "")
                         + f": {c['value']} (target {c['target']}): "
                         f"{'met' if c['met'] else 'NOT met'}")
    return "\n".join(lines)


def _strategy_table(rows: list[dict]) -> list[str]:
    lines = []
    lines.append("| strategy | flash MB/token | reads/token | GB/s | I/O ms | predicted I/O ms | "
                 "floor ms | cache ms | compute ms | total ms | tokens/s | peak RSS MiB | notes |")
    lines.append("|---|" + "---:|" * 11 + "---|")
    for r in rows:
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
        if r.get("cache_hit_rate") is not None:
            notes.append(f"cache hits {r['cache_hit_rate']:.1%}")
        if r.get("lookahead_hit_rate") is not None:
            notes.append(f"lookahead right {r['lookahead_hit_rate']:.1%}, I/O waited "
                         f"{r['io_wait_ms']} ms")
        if r.get("lookahead_recall") is not None:
            notes.append(f"lookahead read {r['lookahead_recall']:.1%} of the loads")
        if r.get("copied_bytes_per_token") is not None:
            notes.append(f"{r['copied_bytes_per_token'] / 1e6:.1f} MB/token copied from the map")
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
    return lines


def _peer_table(rows: list[dict], several: bool) -> list[str]:
    """Ours and the peers side by side: decode speed (prefill apart), disk bytes per token,
    the memory group's peak (peak RSS where there was no group), ours / peer in tokens/s."""
    lines = ["| budget | system | strategy | tokens/s | ms/token | prefill ms | disk MB/token | "
             "peak MiB | limit MiB | ours / peer | notes |",
             "|---|---|---|" + "---:|" * 7 + "---|"]
    for r in rows:
        system, budget = r.get("system", "mlx-flash"), r.get("memory", "")
        if r["status"] != "ok":
            lines.append(f"| {budget} | {system} | {r['strategy'] if system == 'mlx-flash' else ''}"
                         " | | | | | | | | " + f"{r['status']}: {r.get('reason', '')} |")
            continue
        disk = r.get("disk_bytes_per_token", r.get("flash_bytes_per_token"))
        peak = r.get("cgroup_peak_bytes")
        notes = [] if peak else ["peak RSS (no memory group)"]
        peak = peak or r["peak_rss_bytes"]
        if r.get("cache_hit_rate") is not None:
            notes.append(f"cache hits {r['cache_hit_rate']:.1%}")
        if r.get("ours"):
            notes.append(f"ours = {r['ours']}")
        if r.get("tokens_compared") is False:
            notes.append("GGUF, own kernels: tokens not compared"
                         + (f" ({r['tokens_match_ours']})" if r.get("tokens_match_ours") else ""))
        ratio = r.get("ours_over_peer")
        lines.append(
            f"| {budget} | {system} | {r['strategy'] if system == 'mlx-flash' else ''} | "
            f"{r['tokens_per_s']:.3f} | {_num(r['token_ms'])} | {_num(r.get('prefill_ms'))} | "
            f"{_mb(disk)} | {peak / 2**20:,.0f} | "
            f"{_num(r.get('limit_bytes') and r['limit_bytes'] / 2**20, '{:,.0f}')} | "
            f"{'' if ratio is None else f'{ratio:.2f}x'} | {', '.join(notes)} |")
    return lines


def plot(result: dict, file: str | Path) -> Path:
    """Stacked ms per token (I/O, cache + predictor, compute) per strategy, floor marked."""
    from ..probe import _pyplot

    plt = _pyplot()
    first = (result.get("budgets") or [{}])[0].get("memory")  # ours at the first budget
    rows = [r for r in result["rows"] if r["status"] == "ok"
            and r.get("system", "mlx-flash") == "mlx-flash" and r.get("memory", first) == first]
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
