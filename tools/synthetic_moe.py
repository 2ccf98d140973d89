"""Write a synthetic MoE flash model dir directly: Qwen3-30B-A3B shapes, random 4-bit weights,
planted routing for benchmarks; as a flash dir (records packed per expert) or, with
`--layout mlx-lm`, as mlx-lm writes a 4-bit MoE (stacked `switch_mlp` tensors in ~5 GB
safetensors shards: what the zero-copy path streams and the peers load).

Default: Qwen3-30B-A3B's shapes (d 2048, 48 layers, 128 experts of FFN 768, top 8, 32 query
and 4 key/value heads of 128, vocab 151936), every weight 4-bit (MLX affine, group 64) as in
mlx-community's 4-bit conversion except the routers (float). Scales and biases are float32: MLX's
CPU backend multiplies quantized matrices ~35x faster with them than with float16 ones; a
record then takes 3,840 bytes where bfloat16 scales would take 3,456 (+11%). The routing is not in
the random router weights but in `synthetic_routing.json` (mlx_flash/bench/routing.py: reuse
and popularity fitted to streamlx's published miss rates, ~70% lookahead guesses). Results
from this model are synthetic: speed, I/O and memory only, never quality.

    python tools/synthetic_moe.py OUT [--layout flash|mlx-lm] [--layers 48 --experts 128
        --top-k 8 --expert-ffn 768 --d-model 2048 --heads 32 --kv-heads 4 --head-dim 128
        --vocab 151936] [--force]

Both layouts hold the same tensors at the same sizes (float32 scales, an expert 2.95 MB at the
default shapes) and the same planted routing; the random values differ (the flash records hold
the down projection quantized along d, mlx-lm along the FFN axis).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from synthetic_flash import (  # noqa: E402
    EMBEDDED,
    _layer_records,
    _quantized,
    _safetensors_header,
    _Sink,
    _tensor,
    write_resident,
)

from mlx_flash import format as fmt  # noqa: E402
from mlx_flash.bench.routing import ROUTING_FILE, routing_spec  # noqa: E402
from mlx_flash.quant import Quantization  # noqa: E402

DTYPE = "float32"
SHARD_BYTES = 5 << 30  # mlx-lm's default shard size


def _shapes(d_model, layers, experts, top_k, expert_ffn, heads, kv_heads, head_dim, vocab, q
            ) -> tuple[dict, dict, set]:
    """config.json, the resident tensors (name -> (dtype, shape)) and the names among them of
    quantized layers' tensors."""
    config = {
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
        "hidden_size": d_model, "num_hidden_layers": layers, "intermediate_size": 6144,
        "moe_intermediate_size": expert_ffn, "num_experts": experts,
        "num_experts_per_tok": top_k, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "norm_topk_prob": True, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": head_dim, "vocab_size": vocab, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
        "max_position_embeddings": 40960, "tie_word_embeddings": False, "hidden_act": "silu",
        "bos_token_id": 0, "eos_token_id": 2, "synthetic": True,
        "quantization": q.kwargs, "quantization_config": q.kwargs,
    }
    float_tensors = [("model.norm.weight", (d_model,))]
    quantized_layers = [("model.embed_tokens", vocab, d_model), ("lm_head", vocab, d_model)]
    for i in range(layers):
        p = f"model.layers.{i}."
        float_tensors += [(p + "input_layernorm.weight", (d_model,)),
                          (p + "post_attention_layernorm.weight", (d_model,)),
                          (p + "self_attn.q_norm.weight", (head_dim,)),
                          (p + "self_attn.k_norm.weight", (head_dim,)),
                          (p + "mlp.gate.weight", (experts, d_model))]
        quantized_layers += [(p + "self_attn.q_proj", heads * head_dim, d_model),
                             (p + "self_attn.k_proj", kv_heads * head_dim, d_model),
                             (p + "self_attn.v_proj", kv_heads * head_dim, d_model),
                             (p + "self_attn.o_proj", d_model, heads * head_dim)]
    resident = {n: (DTYPE, s) for n, s in float_tensors}
    quantized = set()
    for stem, rows, cols in quantized_layers:
        resident[f"{stem}.weight"] = ("uint32", (rows, cols * q.bits // 32))
        for kind in ("scales", "biases"):
            resident[f"{stem}.{kind}"] = (DTYPE, (rows, cols // q.group_size))
        quantized |= {f"{stem}.{kind}" for kind in ("weight", "scales", "biases")}
    resident = dict(sorted(resident.items()))

    return config, resident, quantized


def write_synthetic_moe_mlx_lm(
    out: str | Path, d_model: int = 2048, layers: int = 48, experts: int = 128, top_k: int = 8,
    expert_ffn: int = 768, heads: int = 32, kv_heads: int = 4, head_dim: int = 128,
    vocab: int = 151936, seed: int = 0, force: bool = False, spec: dict | None = None,
    progress: bool = False,
) -> Path:
    """The same model as mlx-lm writes a 4-bit MoE dir (atomically, via `out.partial`):
    config.json with its `quantization`, `model-0000k-of-0000n.safetensors` shards of whole
    layers with `model.safetensors.index.json`, each layer's experts stacked as
    `mlp.switch_mlp.{gate,up,down}_proj.{weight,scales,biases}` (experts, out, in...)."""
    out = Path(out)
    if out.exists() and not force:
        raise SystemExit(f"{out} exists; pass --force to replace it")
    q = Quantization(4, 64)
    config, resident, quantized = _shapes(d_model, layers, experts, top_k, expert_ffn, heads,
                                          kv_heads, head_dim, vocab, q)
    config.pop("quantization_config")
    stacked = {}  # layer -> [(name, dtype, shape)] of its experts
    for i in range(layers):
        stem = f"model.layers.{i}.mlp.switch_mlp."
        stacked[i] = [
            (stem + f"{proj}.{kind}", dt, (experts, rows, cols * q.bits // 32) if kind == "weight"
             else (experts, rows, cols // q.group_size))
            for proj, rows, cols in (("gate_proj", expert_ffn, d_model),
                                     ("up_proj", expert_ffn, d_model),
                                     ("down_proj", d_model, expert_ffn))
            for kind, dt in (("weight", "uint32"), ("scales", DTYPE), ("biases", DTYPE))]
    # shards: the non-layer tensors first, then whole layers (attention, norms, experts)
    by_layer = {i: [] for i in range(layers)}
    shards = [[]]
    for name, (dt, shape) in resident.items():
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        (by_layer[int(layer)] if layer is not None else shards[0]).append((name, dt, shape))
    size = lambda specs: sum(4 * int(np.prod(sh)) for _, _, sh in specs)  # noqa: E731 (4-byte)
    for i in range(layers):
        layer = sorted(by_layer[i] + stacked[i])
        if shards[-1] and size(shards[-1]) + size(layer) > SHARD_BYTES:
            shards.append([])
        shards[-1] += layer
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        t0, total = time.time(), 0
        experts_of = {}  # layer -> {name: array}: one layer's experts, made when first needed
        for k, (file, specs) in enumerate(zip(names, shards, strict=True)):
            sink = _Sink(partial / file)
            sink.write(_safetensors_header(specs))
            for name, _, shape in specs:
                if ".switch_mlp." in name:
                    layer = int(name.split(".")[2])
                    if layer not in experts_of:
                        experts_of = {layer: _layer_experts(layer, experts, expert_ffn, d_model,
                                                            q, seed)}
                    sink.write(experts_of[layer][name.split("switch_mlp.")[1]])
                else:
                    sink.write(_tensor(name, shape, DTYPE, seed, q if name in quantized else None))
            total += sink.close()
            if progress:
                print(f"\rshard {k + 1}/{len(shards)}  {time.time() - t0:.0f} s", end="",
                      file=sys.stderr)
        if progress:
            print(file=sys.stderr)
        index = {"metadata": {"total_size": total},
                 "weight_map": {n: f for f, specs in zip(names, shards, strict=True)
                                for n, _, _ in specs}}
        (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        config["quantization"] = q.kwargs
        (partial / "config.json").write_text(json.dumps(config, indent=1))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(EMBEDDED / name, partial / name)
        (partial / ROUTING_FILE).write_text(json.dumps(spec or routing_spec(seed=seed), indent=1))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def _layer_experts(layer: int, experts: int, expert_ffn: int, d_model: int, q: Quantization,
                   seed: int) -> dict[str, np.ndarray]:
    """One layer's stacked experts, random: 'gate_proj.weight' -> (experts, out, in...)."""
    rng = np.random.default_rng([seed, 1_000_003, layer])
    out = {}
    for proj, rows, cols in (("gate_proj", expert_ffn, d_model), ("up_proj", expert_ffn, d_model),
                             ("down_proj", d_model, expert_ffn)):
        w, sc, b = _quantized(rng, experts * rows, cols, q, DTYPE)
        for kind, a in (("weight", w), ("scales", sc), ("biases", b)):
            out[f"{proj}.{kind}"] = a.reshape(experts, rows, -1)
    return out


def write_synthetic_moe(
    out: str | Path, d_model: int = 2048, layers: int = 48, experts: int = 128, top_k: int = 8,
    expert_ffn: int = 768, heads: int = 32, kv_heads: int = 4, head_dim: int = 128,
    vocab: int = 151936, align: int = 4096, seed: int = 0, force: bool = False,
    spec: dict | None = None, progress: bool = False,
) -> Path:
    """Write the flash dir `out` (atomically, via `out.partial`); returns `out`. `spec`: the
    planted routing (default `routing_spec()`)."""
    out = Path(out)
    if out.exists() and not force:
        raise SystemExit(f"{out} exists; pass --force to replace it")
    q = Quantization(4, 64)
    config, resident, quantized = _shapes(d_model, layers, experts, top_k, expert_ffn, heads,
                                          kv_heads, head_dim, vocab, q)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        m = fmt.new_manifest(
            partial, "qwen3_moe", DTYPE, d_model, experts * expert_ffn, layers, alignment=align,
            resident_tensors=resident, source="synthetic", created_by="tools/synthetic_moe.py",
            quantization=q, packed=True, experts=experts)
        t0 = time.time()
        ffn = _Sink(m.ffn_path)
        ffn.write(m.ffn_header())
        for i in range(layers):
            ffn.write(_layer_records(m, i, seed))
            tail = m.layer_bytes - m.ffn_dim * m.record_bytes
            if tail:
                ffn.write(bytes(tail))
            if progress:
                print(f"\rlayer {i + 1}/{layers}  {time.time() - t0:.0f} s", end="", file=sys.stderr)
        if progress:
            print(file=sys.stderr)
        if ffn.close() != m.ffn_bytes:
            raise RuntimeError("ffn.bundles has the wrong size (internal error)")
        m = write_resident(m, resident, DTYPE, seed, q, quantized)
        (partial / "config.json").write_text(json.dumps(config, indent=1))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(EMBEDDED / name, partial / name)
        (partial / ROUTING_FILE).write_text(json.dumps(spec or routing_spec(seed=seed), indent=1))
        fmt.write_manifest(m)
        fmt.read_manifest(partial)  # the output must pass its own reader
        shutil.rmtree(out, ignore_errors=True)
        os.replace(partial, out)
        fmt.read_manifest(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--layout", choices=("flash", "mlx-lm"), default="flash",
                    help="a flash dir (default) or an mlx-lm 4-bit MoE dir")
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--expert-ffn", type=int, default=768)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--align", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()
    t = time.time()
    if a.layout == "mlx-lm":
        out = write_synthetic_moe_mlx_lm(a.out, a.d_model, a.layers, a.experts, a.top_k,
                                         a.expert_ffn, a.heads, a.kv_heads, a.head_dim, a.vocab,
                                         a.seed, a.force, progress=True)
    else:
        out = write_synthetic_moe(a.out, a.d_model, a.layers, a.experts, a.top_k, a.expert_ffn,
                                  a.heads, a.kv_heads, a.head_dim, a.vocab, a.align, a.seed,
                                  a.force, progress=True)
    print(f"wrote {out} in {time.time() - t:.0f} s")


if __name__ == "__main__":
    main()
