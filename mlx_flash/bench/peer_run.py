"""One peer of `mlx-flash bench --peers` in one process, started cold: `PYTHON peer_run.py`
with a JSON spec on stdin, one JSON row on stdout (progress on stderr).

It runs with the peer venv's python, so it imports the peer's own package and the standard
library only (never mlx_flash). As our workers (worker.py) do: once the libraries are imported
(and MLX's kernels ran once) it joins its memory group, measures its base RSS and limits the
group to base + the budget + `limit_slack` of it; then it drops the model's files from the page
cache, loads, prefills the prompt's token ids and decodes greedily.

Spec: peer, model (the dir it loads), prompt_ids (our tokenizer's: the same input), prompt
(llama.cpp tokenizes it itself), tokens, max_context, cgroup, budget_bytes (None: no limit),
limit_slack, evict (files), routing (a synthetic MoE's planted experts per layer and row, or
None), threads; mlx-vlm: offload (its repacked dir), expert_cache_bytes; llama.cpp: gguf.
`{"peer": "mlx-vlm", "repack": true, "model": DIR, "offload": OUT}` repacks DIR once instead.
"""

import sys
from pathlib import Path

# Not this file's folder on the path: its mmap.py (our mmap baseline) would shadow the standard
# library's for every package that imports mmap.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

CHOSEN, OTHER = 4.0, -4.0  # a planted router's logits (mlx_flash/bench/routing.py)


def _log(msg):
    print(msg, file=sys.stderr, flush=True)


def _proc(file, key):
    try:
        with open(f"/proc/self/{file}") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _rss():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss():
    kb = _proc("status", "VmHWM:")
    if kb is not None:
        return kb * 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _read_bytes():
    return _proc("io", "read_bytes:")


def _base(spec):
    """The RSS with the libraries loaded; the group joined and its limit set from it. As our
    worker (`python -m mlx_flash.bench` imports its libraries before it joins), what the
    libraries already hold is not charged to the group."""
    if spec.get("cgroup"):
        Path(spec["cgroup"], "cgroup.procs").write_text(str(os.getpid()))
    base = _rss()
    if spec.get("cgroup") and spec.get("budget_bytes"):
        limit = str(base + int(spec["budget_bytes"] * (1 + spec["limit_slack"])))
        group = Path(spec["cgroup"])
        (group / "memory.limit_in_bytes").write_text(limit)
        if (group / "memory.memsw.limit_in_bytes").exists():
            (group / "memory.memsw.limit_in_bytes").write_text(limit)
    return base


def _evict(files):
    """Cold start: the files' pages dropped from the page cache (Linux; best effort)."""
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def _warm_mlx():
    """MLX's first kernels (its CPU backend's own memory) before the base RSS: the same kinds
    runtime.warm_up_mlx runs for our workers, so the two bases mean the same."""
    import mlx.core as mx
    import mlx.nn as nn

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


class _Replay:
    """A synthetic MoE's planted routing replayed (the driver drew it with bench/routing.py's
    PlantedRouter): each row of x takes the next row's experts, as our strategies saw them."""

    def __init__(self, rows, experts):
        self.rows, self.experts, self.at = rows, experts, 0

    def __call__(self, x):
        import mlx.core as mx

        n = 1
        for d in x.shape[:-1]:
            n *= d
        if self.at + n > len(self.rows):
            raise RuntimeError(f"planted routing replay ran out after {self.at} rows")
        out = [[OTHER] * self.experts for _ in range(n)]
        for row, chosen in zip(out, self.rows[self.at:self.at + n]):
            for e in chosen:
                row[e] = CHOSEN
        self.at += n
        return mx.array(out, dtype=mx.float32).reshape(*x.shape[:-1], self.experts)


def _plant(model, routing):
    """Each MoE block's router (`gate` or `router` beside its switch layer) replaced by the
    replay of its layer, blocks in layer order."""
    import re

    blocks = [(name, m) for name, m in model.named_modules()
              if ("switch_mlp" in m or "experts" in m)
              and any(hasattr(m, a) for a in ("gate", "router"))]
    blocks.sort(key=lambda nm: [int(t) if t.isdigit() else -1
                                for t in re.findall(r"\d+|\D+", nm[0])])
    if len(blocks) != len(routing["layers"]):
        raise RuntimeError(f"{len(routing['layers'])} planted routers for {len(blocks)} MoE "
                           "blocks")
    replays = []
    for (_, block), rows in zip(blocks, routing["layers"]):
        attr = "gate" if hasattr(block, "gate") else "router"
        replays.append(_Replay(rows, routing["experts"]))
        setattr(block, attr, replays[-1])
    return replays


def _timed(tokens, n, label):
    """(ids, prefill s, per-token seconds, bytes read during decode) of the first `n` ids a
    generator yields: the first after the prompt (prefill), the rest one decode step each."""
    ids, times, read0 = [], [], None
    t = t0 = time.perf_counter()
    prefill = 0.0
    for tok in tokens:
        now = time.perf_counter()
        ids.append(int(tok))
        if len(ids) == 1:
            prefill = now - t0
            read0 = _read_bytes()
            _log(f"{label}: prefill {prefill:.1f} s")
        else:
            times.append(now - t)
            _log(f"{label}: token {len(ids) - 1}/{n - 1} {times[-1] * 1000:.0f} ms")
        t = now
        if len(ids) == n:
            break
    read1 = _read_bytes()
    read = None if read0 is None or read1 is None else read1 - read0
    return ids, prefill, times, read


def _row(spec, base, load_s, ids, prefill, times, read):
    n = len(times)
    token_ms = 1000 * sum(times) / max(n, 1)
    peak = _peak_rss()
    return {"strategy": spec["peer"], "system": spec["peer"], "status": "ok",
            "load_s": round(load_s, 2), "tokens": n, "prefill_ms": round(1000 * prefill, 1),
            "token_ms": round(token_ms, 1), "tokens_per_s": round(1000 / token_ms, 3),
            "token_ms_each": [round(1000 * t, 1) for t in times],
            "disk_bytes_per_token": None if read is None else round(read / max(n, 1)),
            "peak_rss_bytes": peak, "base_rss_bytes": base, "model_rss_bytes": peak - base,
            "token_ids": ids}


def _import_model_file(package, config):
    """The model file's code imported before the base (the library's memory, not the model's)."""
    try:
        importlib.import_module(f"{package}.models.{config['model_type']}")
    except (ImportError, KeyError):
        pass


def _mlx_lm(spec):
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model

    path = Path(spec["model"])
    _import_model_file("mlx_lm", json.loads((path / "config.json").read_text()))
    _warm_mlx()
    base = _base(spec)
    _evict(spec["evict"])
    t0 = time.perf_counter()
    model, _ = load_model(path)
    replays = _plant(model, spec["routing"]) if spec.get("routing") else []
    load_s = time.perf_counter() - t0
    gen = generate_step(mx.array(spec["prompt_ids"]), model, max_tokens=spec["tokens"] + 1,
                        sampler=lambda logprobs: mx.argmax(logprobs, axis=-1))
    row = _row(spec, base, load_s, *_timed((t for t, _ in gen), spec["tokens"] + 1, "mlx-lm"))
    if replays:  # the planted rows each MoE layer took (the prompt's, the tokens', one ahead)
        row["routing_rows"] = [r.at for r in replays]
    row["mlx_peak_bytes"] = mx.get_peak_memory()
    return row


def _mlx_vlm_repack(spec):
    import shutil

    from mlx_vlm.moe_offload import repack

    out = Path(spec["offload"])
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        repack(spec["model"], str(partial))
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return {"offload": str(out)}


def _mlx_vlm(spec):
    import mlx.core as mx
    from mlx_vlm.generate import generate_step
    from mlx_vlm.utils import load_model

    path = Path(spec["offload"])
    _import_model_file("mlx_vlm", json.loads((path / "config.json").read_text()))
    _warm_mlx()
    base = _base(spec)
    _evict(spec["evict"])
    t0 = time.perf_counter()
    # the store's LRU of experts holds at most expert_cache_gb (mlx_vlm.moe_offload.patch_model)
    model = load_model(path, expert_cache_gb=spec["expert_cache_bytes"] / 1e9)
    replays = _plant(model, spec["routing"]) if spec.get("routing") else []
    load_s = time.perf_counter() - t0
    gen = generate_step(mx.array([spec["prompt_ids"]]), model, None, None,
                        max_tokens=spec["tokens"] + 1, temperature=0.0,
                        sampler=lambda logprobs: mx.argmax(logprobs, axis=-1))
    row = _row(spec, base, load_s, *_timed((t for t, _ in gen), spec["tokens"] + 1, "mlx-vlm"))
    if replays:
        row["routing_rows"] = [r.at for r in replays]
    store = getattr(model, "moe_offload_store", None)
    if store is not None:
        st = store.stats()
        row.update(cache_hit_rate=st["hit_rate"], expert_cache_bytes=st["budget_bytes"],
                   resident_expert_bytes=st["resident_bytes"], evictions=st["evictions"])
    row["mlx_peak_bytes"] = mx.get_peak_memory()
    return row


def _llama_cpp(spec):
    import llama_cpp

    base = _base(spec)
    _evict(spec["evict"])
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=spec["gguf"], n_ctx=spec["max_context"],
                          n_threads=spec.get("threads") or os.cpu_count(), use_mmap=True,
                          verbose=False)
    load_s = time.perf_counter() - t0
    prompt = llm.tokenize(spec["prompt"].encode())
    gen = llm.generate(prompt, top_k=1, temp=0.0)
    row = _row(spec, base, load_s, *_timed(gen, spec["tokens"] + 1, "llama.cpp"))
    # a GGUF of the same vocabulary reads the prompt as our tokenizer does
    row.update(prompt_tokens=len(prompt), same_prompt_tokens=prompt == spec["prompt_ids"])
    return row


RUNNERS = {"mlx-lm": _mlx_lm, "mlx-vlm": _mlx_vlm, "llama.cpp": _llama_cpp}


def main():
    spec = json.loads(sys.stdin.read())
    if spec.get("repack"):
        print(json.dumps(_mlx_vlm_repack(spec)), flush=True)
        return
    print(json.dumps(RUNNERS[spec["peer"]](spec)), flush=True)


if __name__ == "__main__":
    main()
