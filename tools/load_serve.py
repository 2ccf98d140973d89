"""A bounded load run against a running `mlx-flash serve`: N requests from T client threads.

Prints requests/s, generated tokens/s, latency p50/p95/max, and the server's memory from
/health (peak RSS and MLX's peak against the budget). Standard library only.

    mlx-flash serve --model models/opt-tiny-flash --memory 6.5MB --max-context 256 --port 8080 &
    python tools/load_serve.py --url http://127.0.0.1:8080 --requests 50 --threads 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

PROMPTS = [f"The {name}() {kind}" for name in ("open", "close", "read", "write", "fork", "pipe")
           for kind in ("function", "system call")]


def _request(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=30) as r:
        return json.loads(r.read())


def _rank(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def run(url: str, requests: int, threads: int, max_tokens: int, timeout: float) -> dict:
    def one(i: int) -> tuple[float, dict | None, str | None]:
        body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0}
        tic = time.perf_counter()
        try:
            reply = _request(url + "/v1/completions", body, timeout)
        except OSError as e:
            return time.perf_counter() - tic, None, str(e)
        return time.perf_counter() - tic, reply, None

    before = _health(url)
    tic = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - tic
    health = _health(url)
    ok = [(lat, r) for lat, r, err in results if err is None]
    lat = [x for x, _ in ok]
    tokens = sum(r["usage"]["completion_tokens"] for _, r in ok)
    return {
        "requests": requests, "threads": threads, "max_tokens": max_tokens,
        "errors": [err for _, _, err in results if err is not None],
        "wall_s": round(wall, 2), "requests_per_s": round(len(ok) / wall, 2),
        "tokens_per_s": round(tokens / wall, 1), "completion_tokens": tokens,
        "latency_p50_s": round(_rank(lat, 0.5), 3) if lat else None,
        "latency_p95_s": round(_rank(lat, 0.95), 3) if lat else None,
        "latency_max_s": round(max(lat), 3) if lat else None,
        "queue_ms_mean": round(sum(r["x_flash"]["queue_ms"] for _, r in ok) / len(ok), 1)
        if ok else None,
        "served": health["requests"]["served"] - before["requests"]["served"],
        "server": health, "load_average": os.getloadavg(),
    }


def report(r: dict) -> str:
    h, mib = r["server"], (lambda n: f"{n / 2**20:.2f} MiB")
    budget = h["memory_budget_bytes"]
    lines = [
        f"{r['requests']} requests from {r['threads']} threads, max_tokens {r['max_tokens']}: "
        f"{r['served']} served, {len(r['errors'])} errors, in {r['wall_s']} s",
        f"throughput  {r['requests_per_s']} requests/s, {r['tokens_per_s']} generated tokens/s "
        f"({r['completion_tokens']} tokens)",
        f"latency     p50 {r['latency_p50_s']} s, p95 {r['latency_p95_s']} s, max "
        f"{r['latency_max_s']} s (mean wait in the queue {r['queue_ms_mean']} ms)",
        f"memory      budget {mib(budget) if budget else 'none (dense)'}; MLX peak "
        f"{mib(h['mlx_peak_bytes'])}, now {mib(h['mlx_active_bytes'])}; process peak RSS "
        f"{mib(h['peak_rss_bytes'])} (RSS after the load {mib(h['loaded_rss_bytes'])}, "
        f"now {mib(h['rss_bytes'])})",
        "load avg    " + ", ".join(f"{x:.2f}" for x in r["load_average"]),
    ]
    return "\n".join(lines + [f"error: {e}" for e in r["errors"][:5]])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--timeout", type=float, default=300, help="Seconds per request.")
    p.add_argument("--json", action="store_true", help="Print one JSON object.")
    a = p.parse_args()
    r = run(a.url.rstrip("/"), a.requests, a.threads, a.max_tokens, a.timeout)
    print(json.dumps(r) if a.json else report(r))


if __name__ == "__main__":
    main()
