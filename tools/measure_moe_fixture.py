"""Expert-cache figures on learned routing (the trained fixture `models/qwen3-moe-fixture/`)
beside the planted routing of the synthetic MoE benchmarks (mlx_flash/bench/routing.py) at the
same shape (32 experts, top 4), for caches of 20-90% of a layer's experts (issue 25).

The fixture is made mlx-lm's 4-bit dir (`mlx_lm.convert`, group 64) and a flash dir of it
(`mlx-flash convert`). A prompt of fixture-val text is prefilled, then the next `--tokens` tokens
of the same text are decoded one at a time through the KV cache, teacher-forced (each step is fed
the text's token, not the model's guess; `--greedy`: the model's own argmax), so both routings
see real text. Per cache size and routing:

- hit rate, experts read and flash bytes per token: `mlx_flash.direct.load` streaming the mlx-lm
  dir (an LRU of `slots` experts per layer);
- lookahead accuracy: the flash dir through `mlx_flash.runtime` (moe.py), where layer l applies
  layer l+1's router to its own input: the share of the true top-k it guessed (planted: the
  router's `guess`, right with probability `guess_accuracy`); flash bytes with the lookahead
  (wrong guesses read experts that are not used).

Beside them, each routing's reuse (the share of a token's experts the previous token also chose,
4/32 = 0.125 for uniform random choice) and popularity skew (the top 20% of experts' share of
the picks), the LRU's hit rate simulated on the routing with its decode tokens shuffled in time
(what popularity alone gives), and a `routing_spec` re-fitted to the learned routing's miss rates
(`--no-fit`: skip).

    python tools/measure_moe_fixture.py [--fixture models/qwen3-moe-fixture] [--work DIR]
        [--tokens 200] [--prompt 32] [--greedy] [--json] [--save FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

from mlx_flash import direct, runtime  # noqa: E402
from mlx_flash.bench.options import BenchOptions  # noqa: E402
from mlx_flash.bench.routing import PlantedRouter, routing_spec  # noqa: E402

VAL = ROOT.parent / "shared" / "corpus" / "fixture-val.txt"
FRACTIONS = (0.2, 0.35, 0.5, 0.7, 0.9)


class Recorder:
    """A router (x -> logits) that keeps each row's top-k experts (the prompt's and the
    decode's, in order)."""

    def __init__(self, inner, k: int):
        self.inner, self.k, self.rows = inner, k, []
        if hasattr(inner, "guess"):
            self.guess = inner.guess

    def __call__(self, x):
        logits = self.inner(x)
        flat = np.array(logits.astype(mx.float32)).reshape(-1, logits.shape[-1])
        self.rows.extend(np.sort(np.argpartition(-flat, self.k - 1, axis=-1)[:, : self.k]))
        return logits


def _dirs(fixture: Path, work: Path) -> tuple[Path, Path]:
    """(mlx-lm 4-bit dir, flash dir of it), made once in `work`."""
    from mlx_lm import convert as mlx_convert

    from mlx_flash.convert import convert

    mlx_dir, flash = work / "mlx-4bit", work / "flash"
    if not mlx_dir.exists():
        mlx_convert(str(fixture), str(mlx_dir), quantize=True, q_bits=4, q_group_size=64)
    if not flash.exists():
        convert(str(mlx_dir), out=flash, align=4096, progress=False)
    return mlx_dir, flash


def _text(tokenizer, prompt: int, tokens: int, offset: int) -> list[int]:
    text = VAL.read_text()[offset : offset + 16 * (prompt + tokens + 1)]  # enough characters
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[: prompt + tokens + 1]


def _planted(layers: int, experts: int, k: int, spec: dict) -> list[PlantedRouter]:
    return [PlantedRouter(experts, k, i, spec) for i in range(layers)]


def _decode(model, ids: list[int], prompt: int, greedy: bool) -> tuple[dict, float]:
    """Prefill `ids[:prompt]`, decode the rest one token at a time; the flash figures of the
    decode alone and the mean negative log-likelihood of the text's tokens."""
    cache = make_prompt_cache(model)
    out = model(mx.array([ids[:prompt]]), cache=cache)[0, -1]
    mx.eval(out)
    before = model.flash.counters()
    nll, token = 0.0, ids[prompt]
    for target in ids[prompt + 1 :]:  # the decode step fed `token` predicts `target`
        out = model(mx.array([[token]]), cache=cache)[0, -1]
        logp = out.astype(mx.float32) - mx.logsumexp(out.astype(mx.float32))
        nll -= float(logp[target])
        token = int(mx.argmax(out)) if greedy else target
    return model.flash.stats(since=before), nll / max(len(ids) - prompt - 1, 1)


def _run_direct(mlx_dir: Path, ids, prompt, greedy, slots, routers=None, record=False):
    model, _ = direct.load(mlx_dir, memory="1GB", capacity=slots, routers=routers)
    recorders = []
    if record:
        for layer in model.model.layers:
            layer.mlp.gate = Recorder(layer.mlp.gate, model.flash.runtime.top_k)
            recorders.append(layer.mlp.gate)
    stats, nll = _decode(model, ids, prompt, greedy)
    stats["expert_bytes"] = model.flash.runtime.layers[0].expert_bytes
    model.flash.runtime.close()
    return stats, nll, [np.array(r.rows) for r in recorders]


def _run_flash(flash: Path, ids, prompt, greedy, slots, expert_ffn, routers=None):
    # mode oracle: an MoE streams in `routed` mode (the router is the exact predictor); auto
    # would load it densely under a budget it fits
    model, _ = runtime.load(flash, memory="1GB", mode="oracle", capacity=slots * expert_ffn,
                            lookahead=True, bench=BenchOptions(routers=routers))
    stats, _ = _decode(model, ids, prompt, greedy)
    model.flash.runtime.close()
    return stats


def lru_hits(trace: np.ndarray, slots: int, skip: int = 0) -> float:
    """Hit rate of an LRU of `slots` experts over `trace` (tokens, k), direct.py's policy,
    counted from row `skip` on (the rows before it, a prompt, only fill the cache)."""
    cache, hits = OrderedDict(), 0
    for i, row in enumerate(trace):
        for e in row.tolist():
            if e in cache:
                hits += i >= skip
                cache.move_to_end(e)
        for e in row.tolist():
            if e not in cache:
                if len(cache) >= slots:
                    cache.popitem(last=False)
                cache[e] = True
            cache.move_to_end(e)
    return hits / trace[skip:].size


def shuffled_hits(trace: np.ndarray, slots: int, skip: int, times: int = 5) -> float:
    """`lru_hits` with the rows after `skip` shuffled in time: what popularity alone gives
    (the cache's hits without any locality between consecutive tokens)."""
    rng = np.random.default_rng(0)
    return float(np.mean([lru_hits(np.concatenate([trace[:skip], rng.permutation(trace[skip:])]),
                                   slots, skip) for _ in range(times)]))


def shape_of(traces: list[np.ndarray], experts: int) -> dict:
    """Reuse between consecutive tokens and popularity skew of per-layer traces."""
    reuse, top = [], []
    for t in traces:
        k = t.shape[1]
        reuse.append(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(t[1:], t[:-1],
                                                                            strict=True)]))
        share = np.sort(np.bincount(t.reshape(-1), minlength=experts))[::-1] / t.size
        top.append(share[: max(1, round(0.2 * experts))].sum())
    return {"reuse_per_layer": [round(float(r), 3) for r in reuse],
            "reuse": round(float(np.mean(reuse)), 3),
            "top20pct_share_per_layer": [round(float(s), 3) for s in top],
            "top20pct_share": round(float(np.mean(top)), 3)}


def planted_trace(experts: int, k: int, spec: dict, tokens: int, layers: int) -> list:
    """The planted routing's sets per layer, (tokens, k) each, drawn as PlantedRouter draws
    them (no model)."""
    out = []
    for layer in range(layers):
        r = PlantedRouter(experts, k, layer, spec)
        rows = [r._next]
        for _ in range(tokens - 1):
            rows.append(r._draw(rows[-1]))
        out.append(np.array(rows))
    return out


def fit(target: dict, experts: int, k: int, layers: int, prompt: int, tokens: int,
        seeds: int = 4) -> dict:
    """`popularity` and `reuse` whose simulated LRU miss rates, under the measurement's protocol
    (`prompt` rows fill the cache, the next `tokens` rows count; `seeds` x `layers` runs), come
    closest to `target` (slots -> the learned routing's miss rate) in log terms, so the large
    caches' few misses weigh as much as the small caches' many; a coarse grid, then a finer
    one."""
    def misses(pop, reuse):
        traces = [t for seed in range(seeds) for t in planted_trace(
            experts, k, routing_spec(popularity=pop, reuse=reuse, seed=seed),
            prompt + tokens, layers)]
        return {s: 1 - float(np.mean([lru_hits(t, s, prompt) for t in traces])) for s in target}

    def error(pr):
        got = misses(*pr)
        return sum((np.log(max(got[s], 1e-3)) - np.log(max(m, 1e-3))) ** 2
                   for s, m in target.items())

    grid = [(p, r) for p in np.arange(0.4, 2.41, 0.25) for r in np.arange(0.0, 0.81, 0.1)]
    best = min(grid, key=error)
    fine = [(p, r) for p in best[0] + np.arange(-0.1, 0.11, 0.05)
            for r in best[1] + np.arange(-0.05, 0.051, 0.025) if p >= 0 and 0 <= r < 1]
    best = min(fine, key=error)
    return {"popularity": round(float(best[0]), 2), "reuse": round(float(best[1]), 3),
            "log_error": round(float(error(best)), 4),
            "miss_rates": {s: round(m, 4) for s, m in misses(*best).items()}}


def measure(fixture: Path, work: Path, tokens: int, prompt: int, greedy: bool, offset: int,
            do_fit: bool) -> dict:
    mlx_dir, flash = _dirs(fixture, work)
    config = json.loads((mlx_dir / "config.json").read_text())
    experts, k, layers = config["num_experts"], config["num_experts_per_tok"], \
        config["num_hidden_layers"]
    expert_ffn = config["moe_intermediate_size"]
    from mlx_flash.loader import load_tokenizer

    ids = _text(load_tokenizer(mlx_dir), prompt, tokens, offset)
    spec = routing_spec()
    # the routing itself, every expert cached (no evictions): (prompt + tokens, k) per layer
    every, nll, learned = _run_direct(mlx_dir, ids, prompt, greedy, experts, record=True)
    _, _, planted = _run_direct(mlx_dir, ids, prompt, greedy, experts,
                                routers=_planted(layers, experts, k, spec), record=True)
    result = {"fixture": str(fixture), "experts": experts, "top_k": k, "layers": layers,
              "decode": "greedy" if greedy else "teacher-forced", "prompt_tokens": prompt,
              "decode_tokens": len(ids) - prompt - 1, "val_offset_chars": offset,
              "expert_bytes": every["expert_bytes"],
              "text_ppl": None if greedy else round(float(np.exp(nll)), 2),
              "routing": {"learned": shape_of([t[prompt:] for t in learned], experts),
                          "planted": dict(shape_of([t[prompt:] for t in planted], experts),
                                          spec=spec)},
              "rows": []}
    for fraction in FRACTIONS:
        slots = max(k, round(fraction * experts))
        row = {"fraction": fraction, "slots": slots}
        for name, routers in (("learned", None), ("planted", "planted")):
            plant = (lambda: _planted(layers, experts, k, spec)) if routers else (lambda: None)
            d, _, _ = _run_direct(mlx_dir, ids, prompt, greedy, slots, plant())
            f = _run_flash(flash, ids, prompt, greedy, slots, expert_ffn, plant())
            n = max(d["decode_tokens"], 1)
            trace = learned if routers is None else planted
            row[name] = {
                "hit_rate": d["cache_hit_rate"],
                "lru_hit_rate_simulated": round(float(np.mean([lru_hits(t, slots, prompt)
                                                                for t in trace])), 4),
                "lru_hit_rate_shuffled": round(float(np.mean([
                    shuffled_hits(t, slots, prompt) for t in trace])), 4),
                "experts_read_per_token": round((1 - d["cache_hit_rate"]) * k * layers, 2),
                "flash_bytes_per_token": d["flash_bytes_per_token"],
                "lookahead_accuracy": f["lookahead_hit_rate"],
                "flash_bytes_per_token_lookahead": f["flash_bytes_per_token"],
                "flash_hit_rate": f["cache_hit_rate"],
                "decode_tokens": n}
        result["rows"].append(row)
    if do_fit:
        target = {r["slots"]: 1 - r["learned"]["lru_hit_rate_simulated"]
                  for r in result["rows"]}
        result["refit"] = fit(target, experts, k, layers, prompt, tokens)
        la = [r["learned"]["lookahead_accuracy"] for r in result["rows"]]
        result["refit"]["guess_accuracy"] = round(float(np.mean(la)), 2)
    return result


def table(r: dict) -> str:
    kib = lambda b: f"{b / 1024:.1f}"  # noqa: E731
    head = (f"{r['decode_tokens']} decode tokens ({r['decode']}) after a {r['prompt_tokens']}"
            f"-token prompt of fixture-val; {r['experts']} experts, top {r['top_k']}, "
            f"{r['layers']} layers")
    if r["text_ppl"]:
        head += f"; perplexity of the text {r['text_ppl']}"
    head += (f". One expert is {r['expert_bytes'] / 1024:.1f} KiB; the mlx-lm dir (direct.py) "
             "reads each of its 9 stacked slices widened to whole 4 KiB blocks, the flash dir "
             "(moe.py, with the lookahead) reads it as one run of records")
    lines = [
        head,
        "",
        "| cached experts | learned: hit rate | experts read/token | mlx-lm dir KiB/token | "
        "lookahead accuracy | flash dir KiB/token | planted: hit rate | experts read/token "
        "| mlx-lm dir KiB/token | lookahead accuracy | flash dir KiB/token |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        cells = [f"{row['fraction']:.0%} ({row['slots']})"]
        for name in ("learned", "planted"):
            c = row[name]
            cells += [f"{c['hit_rate']:.1%}", f"{c['experts_read_per_token']:.2f}",
                      kib(c["flash_bytes_per_token"]), f"{c['lookahead_accuracy']:.1%}",
                      kib(c["flash_bytes_per_token_lookahead"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for name in ("learned", "planted"):
        s = r["routing"][name]
        lines.append(f"- {name}: reuse {s['reuse']} (per layer {s['reuse_per_layer']}; random "
                     f"{r['top_k'] / r['experts']:.3f}), top 20% of experts take "
                     f"{s['top20pct_share']:.1%} of picks (per layer "
                     f"{s['top20pct_share_per_layer']}; uniform 20%)")
    for name in ("learned", "planted"):
        cells = ", ".join(f"{row[name]['lru_hit_rate_simulated']:.1%} -> "
                          f"{row[name]['lru_hit_rate_shuffled']:.1%}" for row in r["rows"])
        lines.append(f"- {name}: LRU hit rate (simulated) -> with the decode tokens shuffled in "
                     f"time (popularity alone), per cache size: {cells}")
    if "refit" in r:
        f = r["refit"]
        target = ", ".join(f"{1 - row['learned']['lru_hit_rate_simulated']:.1%}"
                           for row in r["rows"])
        got = ", ".join(f"{m:.1%}" for m in f["miss_rates"].values())
        lines.append(f"- routing_spec re-fitted to the learned routing's LRU miss rates ({target}, "
                     f"simulated): popularity={f['popularity']}, reuse={f['reuse']}, "
                     f"guess_accuracy={f['guess_accuracy']}, which miss {got}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixture", type=Path, default=ROOT / "models" / "qwen3-moe-fixture")
    ap.add_argument("--work", type=Path, help="where the mlx-lm and flash dirs go (kept); "
                                              "default a temporary dir")
    ap.add_argument("--tokens", type=int, default=200, help="decode tokens")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--offset", type=int, default=0, help="where in fixture-val (characters)")
    ap.add_argument("--greedy", action="store_true", help="decode the model's own argmax")
    ap.add_argument("--no-fit", action="store_true", help="skip the routing_spec re-fit")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--save", type=Path, help="also write the JSON object to this file")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        r = measure(a.fixture, work, a.tokens, a.prompt, a.greedy, a.offset, not a.no_fit)
    if a.save:
        a.save.write_text(json.dumps(r, indent=1) + "\n")
    print(json.dumps(r, indent=1) if a.json else table(r))


if __name__ == "__main__":
    main()
