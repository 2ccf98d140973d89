"""Write a synthetic flash model dir directly (no HF checkpoint + convert): OPT shapes, random
weights, planted FFN activity for benchmarks.

Default: OPT-6.7B shapes (d 4096, FFN 16384, 32 layers, vocab 50272, 2048 positions) in bfloat16
(13.3 GB, the size of the fp16 original; bfloat16 because MLX's CPU matvec is 2x faster in it
than in float16). Weights are random values of magnitude 0.002-0.03 with random signs; the FFN
activity is not in the weights but in `synthetic_predictors.json` (see mlx_flash/bench/synthetic.py,
SyntheticPredictor): per layer and token about 3.3% of the neurons truly active, 7% of the others
predicted on top (false positives), and consecutive tokens overlapping so that a window of 4
holds about a quarter of the FFN and about 2.5% of it is loaded fresh per token. Results from
this model are synthetic: speed, I/O and memory only, never quality.

    python tools/synthetic_flash.py OUT [--checkpoint HF_DIR] [--d-model 4096 --ffn-dim 16384
        --layers 32 --vocab 50272 --dtype bfloat16 --align 4096] [--quantize 4 [--group-size 64]
        [--float-resident]] [--force]

`--checkpoint HF_DIR` also writes the same weights as a Hugging Face checkpoint (one
model.safetensors, dense layout) for the dense and mmap baselines of `mlx-flash bench`; the
flash dir's manifest names it as its `source`.

`--quantize BITS` writes the dir as `mlx-flash convert --quantize BITS` would lay it out (MLX
affine, docs/FORMAT.md "Quantized records"): records packed back to back, each part random
packed values with scales and biases chosen so values stay within about +-0.016; the attention
projections and the token embedding quantized the same way (`--float-resident` keeps them in
`--dtype`: on MLX's CPU backend a quantized 4096x4096 matvec is ~7x slower than a bfloat16 one,
BENCHMARKS.md). No `--checkpoint` with it: the mmap baseline reads float checkpoints only.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from mlx_flash import format as fmt
from mlx_flash import platform
from mlx_flash.bench import SYNTHETIC_FILE, gated_spec, synthetic_spec
from mlx_flash.convert import choose_packed
from mlx_flash.dtypes import FLOATS
from mlx_flash.quant import Quantization
from mlx_flash.safetensors import encode_header

EMBEDDED = Path(__file__).resolve().parents[1] / "models" / "opt-tiny"
ARCHS = ("opt", "llama")
FLUSH_BYTES = 256 << 20
ONE = {"float16": 0x3C00, "bfloat16": 0x3F80}  # 1.0 as 16-bit patterns


def _random_values(rng: np.random.Generator, n: int, dtype: str) -> np.ndarray:
    """`n` random values in storage form (uint16 bits for 16-bit floats): random sign and
    mantissa, exponent giving magnitudes in [2^-9, 2^-5), i.e. 0.002 to 0.03."""
    if dtype == "float32":
        return (rng.standard_normal(n, dtype=np.float32) * 0.02).astype("<f4")
    r = np.frombuffer(rng.bytes(2 * n), dtype="<u2")
    if dtype == "bfloat16":  # sign 1 | exponent 8 | mantissa 7; exponent 118..121
        return (r & 0x807F) | ((118 + ((r >> 7) & 3)) << 7)
    return (r & 0x83FF) | ((6 + ((r >> 10) & 3)) << 10)  # float16: exponent 6..9 of 5 bits


def _scales(rng: np.random.Generator, n: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """`n` (scale, bias) pairs of MLX affine groups in storage form: scales a sixteenth of
    `_random_values`' magnitudes (positive), biases -8 x scale, so that a group's values
    scale * q + bias (q in 0..15 at 4 bits) lie within about +-0.016."""
    if dtype == "float32":
        s = np.abs(_random_values(rng, n, dtype)) / 16
        return s, -8 * s
    r = _random_values(rng, n, dtype) & 0x7FFF  # positive
    shift = 7 if dtype == "bfloat16" else 10  # where the exponent field starts
    return r - (4 << shift), (r - (1 << shift)) | 0x8000  # x/16; -x/2 = -8 * (x/16)


def _quantized(rng: np.random.Generator, rows: int, cols: int, q: Quantization, dtype: str
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packed uint32 (rows, cols*bits/32), scales, biases (rows, cols/group)) of random rows."""
    packed = np.frombuffer(rng.bytes(rows * cols * q.bits // 8), dtype="<u4")
    scales, biases = _scales(rng, rows * cols // q.group_size, dtype)
    return (packed.reshape(rows, -1), scales.reshape(rows, -1), biases.reshape(rows, -1))


@functools.lru_cache(maxsize=1)  # its three tensors are written one after another (sorted)
def _quantized_layer(stem: str, rows: int, cols: int, q: Quantization, dtype: str, seed: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_quantized` of the resident layer `stem`, seeded by its name."""
    return _quantized(np.random.default_rng([seed, zlib.crc32(stem.encode())]), rows, cols, q,
                      dtype)


def _tensor(name: str, shape: tuple[int, ...], dtype: str, seed: int,
            q: Quantization | None = None) -> np.ndarray:
    """The value of a non-FFN tensor: norms weight 1, biases 0, matrices random (seeded by name).
    With `q`, `name` is one of a quantized layer's weight (packed), scales or biases: that part
    of `_quantized` (seeded by the layer's name, so the three agree)."""
    if q is not None:
        stem, _, kind = name.rpartition(".")
        cols = shape[1] * 32 // q.bits if kind == "weight" else shape[1] * q.group_size
        return _quantized_layer(stem, shape[0], cols, q, dtype, seed)[
            ("weight", "scales", "biases").index(kind)]
    n = int(np.prod(shape))
    if name.endswith("norm.weight"):
        fill = 1.0 if dtype == "float32" else ONE[dtype]
        return np.full(shape, fill, dtype=FLOATS[dtype].storage)
    if name.endswith(".bias"):
        return np.zeros(shape, dtype=FLOATS[dtype].storage)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return _random_values(rng, n, dtype).reshape(shape)


def _layer_records(m: fmt.Manifest, layer: int, seed: int) -> np.ndarray:
    """(ffn, record_bytes / itemsize) records of one layer (uint8 (ffn, record_bytes) when
    quantized): random payload, zero padding."""
    rng = np.random.default_rng([seed, 1_000_003, layer])
    if m.quantization is not None:
        records = np.zeros((m.ffn_dim, m.record_bytes), dtype=np.uint8)
        for part in m.parts:
            lo, hi = part.span
            triple = _quantized(rng, m.ffn_dim, m.d_model, m.part_quantization(part), m.dtype)
            records[:, lo:hi] = np.concatenate([a.view(np.uint8) for a in triple], axis=1)
        return records
    payload = m.payload_bytes // m.itemsize
    records = np.zeros((m.ffn_dim, m.record_bytes // m.itemsize), dtype=m.np_dtype)
    records[:, :payload] = _random_values(rng, m.ffn_dim * payload, m.dtype).reshape(m.ffn_dim, -1)
    return records


class _Sink:
    """A file written in order, flushed and evicted from the page cache as it goes."""

    def __init__(self, path: Path):
        self.path, self.f, self.pending = path, open(path, "wb"), 0

    def write(self, data: np.ndarray | bytes) -> None:
        buf = memoryview(np.ascontiguousarray(data)).cast("B") if isinstance(data, np.ndarray) else data
        self.pending += self.f.write(buf)
        if self.pending >= FLUSH_BYTES:
            self.f.flush()
            platform.evict_from_page_cache(self.path)
            self.pending = 0

    def close(self) -> int:
        self.f.flush()
        platform.evict_from_page_cache(self.path)
        size = self.f.tell()
        self.f.close()
        return size


def write_resident(m: fmt.Manifest, resident: dict, dtype: str, seed: int,
                   q: Quantization | None, quantized: set) -> fmt.Manifest:
    """Write resident.safetensors (`resident`: name -> (dtype, shape); the names in `quantized`
    are quantized layers' tensors) and return the manifest with its size."""
    sink = _Sink(m.resident_path)
    sink.write(_safetensors_header([(n, d, s) for n, (d, s) in resident.items()]))
    for n, (_, s) in resident.items():
        sink.write(_tensor(n, s, dtype, seed, q if n in quantized else None))
    return dataclasses.replace(m, resident_bytes=sink.close())


def _safetensors_header(specs: list[tuple[str, str, tuple[int, ...]]]) -> bytes:
    return encode_header(specs, {"format": "pt", "synthetic": "true"})


def _config(arch, d_model, ffn_dim, layers, vocab, max_pos, dtype, kv_heads) -> dict:
    heads = max(1, d_model // 128)
    if arch == "llama":  # Llama-3's: SwiGLU, grouped-query attention, untied head, no biases
        return {
            "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": d_model,
            "intermediate_size": ffn_dim, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads or heads,
            "head_dim": d_model // heads, "vocab_size": vocab, "max_position_embeddings": max_pos,
            "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
            "torch_dtype": dtype, "bos_token_id": 2, "eos_token_id": 2, "synthetic": True,
        }
    return {
        "model_type": "opt", "architectures": ["OPTForCausalLM"], "hidden_size": d_model,
        "ffn_dim": ffn_dim, "num_hidden_layers": layers, "num_attention_heads": heads,
        "vocab_size": vocab, "max_position_embeddings": max_pos, "word_embed_proj_dim": d_model,
        "do_layer_norm_before": True, "activation_function": "relu", "enable_bias": True,
        "tie_word_embeddings": True, "torch_dtype": dtype, "bos_token_id": 2, "eos_token_id": 2,
        "pad_token_id": 1, "synthetic": True,
    }


def _tensor_names(config: dict) -> tuple[list, list[list]]:
    """(model-wide tensors, each layer's non-FFN tensors, plus FFN biases): (name, shape) lists
    under the HF names of the config's model type."""
    d, ffn, vocab = config["hidden_size"], config.get("ffn_dim") or config["intermediate_size"], \
        config["vocab_size"]
    per_layer = []
    if config["model_type"] == "llama":
        kv = config["num_key_value_heads"] * config["head_dim"]
        names = [("model.embed_tokens.weight", (vocab, d)), ("model.norm.weight", (d,)),
                 ("lm_head.weight", (vocab, d))]
        for i in range(config["num_hidden_layers"]):
            p = f"model.layers.{i}."
            per_layer.append(
                [(p + f"self_attn.{proj}.weight", (rows, d)) for proj, rows in
                 (("q_proj", d), ("k_proj", kv), ("v_proj", kv), ("o_proj", d))]
                + [(p + f"{norm}.weight", (d,))
                   for norm in ("input_layernorm", "post_attention_layernorm")])
        return names, per_layer
    names = [("model.decoder.embed_tokens.weight", (vocab, d)),
             ("model.decoder.embed_positions.weight", (config["max_position_embeddings"] + 2, d)),
             ("model.decoder.final_layer_norm.weight", (d,)),
             ("model.decoder.final_layer_norm.bias", (d,))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.decoder.layers.{i}."
        block = []
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            block += [(p + f"self_attn.{proj}.weight", (d, d)), (p + f"self_attn.{proj}.bias", (d,))]
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            block += [(p + f"{norm}.weight", (d,)), (p + f"{norm}.bias", (d,))]
        block += [(p + "fc1.bias", (ffn,)), (p + "fc2.bias", (d,))]
        per_layer.append(block)
    return names, per_layer


def write_synthetic_flash(
    out: str | Path, d_model: int = 4096, ffn_dim: int = 16384, layers: int = 32,
    vocab: int = 50272, max_pos: int = 2048, dtype: str = "bfloat16", align: int = 4096,
    checkpoint: str | Path | None = None, seed: int = 0, force: bool = False,
    spec: dict | None = None, progress: bool = False, quantize: int | None = None,
    group_size: int = 64, float_resident: bool = False, arch: str = "opt",
    kv_heads: int | None = None,
) -> Path:
    """Write the flash dir `out` (atomically, via `out.partial`) and optionally an HF checkpoint
    with the same weights; returns `out`. `spec`: synthetic predictor parameters (default
    `synthetic_spec()`). `quantize`: bits of quantized records (and, unless `float_resident`,
    of the attention projections and token embedding). `arch`: "opt" (ReLU, biases) or
    "llama" (SwiGLU, grouped-query attention with `kv_heads` key/value heads)."""
    out = Path(out)
    q = None if quantize is None else Quantization(quantize, group_size)
    if q is not None and checkpoint:
        raise SystemExit("--checkpoint writes float weights: not with --quantize")
    tokens = len(json.loads((EMBEDDED / "tokenizer.json").read_text())["model"]["vocab"])
    if vocab < tokens:
        raise SystemExit(f"--vocab {vocab} is below the tokenizer's {tokens} tokens")
    targets = [out] + ([Path(checkpoint)] if checkpoint else [])
    for t in targets:
        if t.exists() and not force:
            raise SystemExit(f"{t} exists; pass --force to replace it")
    if arch not in ARCHS:
        raise SystemExit(f"--arch {arch}: choose one of {', '.join(ARCHS)}")
    config = _config(arch, d_model, ffn_dim, layers, vocab, max_pos, dtype, kv_heads)
    names, per_layer = _tensor_names(config)
    resident = {n: (dtype, s) for n, s in sorted(names + [x for b in per_layer for x in b])}
    quantized = set()  # the resident tensors of quantized layers, as mlx-lm names them
    if q is not None and not float_resident:
        for n in [n for n, (_, s) in resident.items() if _quantizable(n)]:
            rows, cols = resident.pop(n)[1]
            stem = n.removesuffix(".weight")
            resident[f"{stem}.weight"] = ("uint32", (rows, cols * q.bits // 32))
            for kind in ("scales", "biases"):
                resident[f"{stem}.{kind}"] = (dtype, (rows, cols // q.group_size))
            quantized |= {f"{stem}.{kind}" for kind in ("weight", "scales", "biases")}
        resident = dict(sorted(resident.items()))
        config["quantization"] = config["quantization_config"] = q.kwargs

    biases = {"fc1", "fc2"} if arch == "opt" else set()
    payload = sum(p.nbytes for p in fmt.make_parts(arch, d_model, dtype, q))
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    hf_partial = None
    try:
        m = fmt.new_manifest(
            partial, arch, dtype, d_model, ffn_dim, layers, alignment=align,
            biases=biases, resident_tensors=resident,
            source=str(Path(checkpoint).resolve()) if checkpoint else "synthetic",
            created_by="tools/synthetic_flash.py", quantization=q,
            packed=q is not None and choose_packed(payload, align),
        )
        hf = None
        if checkpoint:
            hf_partial = Path(checkpoint).with_name(Path(checkpoint).name + ".partial")
            shutil.rmtree(hf_partial, ignore_errors=True)
            hf_partial.mkdir(parents=True)
            hf_specs = [(n, dtype, s) for n, s in names]
            for i, block in enumerate(per_layer):
                hf_specs += [(n, dtype, s) for n, s in block]
                hf_specs += [(p.tensor_name(i), dtype, (ffn_dim, d_model) if p.axis == "row"
                              else (d_model, ffn_dim)) for p in m.parts]
            hf = _Sink(hf_partial / "model.safetensors")
            hf.write(_safetensors_header(hf_specs))
            for n, s in names:
                hf.write(_tensor(n, s, dtype, seed))
        t0 = time.time()
        ffn = _Sink(m.ffn_path)
        ffn.write(m.ffn_header())
        for i in range(layers):
            records = _layer_records(m, i, seed)
            ffn.write(records)
            tail = m.layer_bytes - m.ffn_dim * m.record_bytes
            if tail:
                ffn.write(bytes(tail))
            if hf is not None:
                for n, s in per_layer[i]:
                    hf.write(_tensor(n, s, dtype, seed))
                for k, p in enumerate(m.parts):  # rows (ffn, d), the column part (d, ffn)
                    values = records[:, k * d_model : (k + 1) * d_model]
                    hf.write(values if p.axis == "row" else values.T)
            del records
            if progress:
                print(f"\rlayer {i + 1}/{layers}  {time.time() - t0:.0f} s", end="", file=sys.stderr)
        if progress:
            print(file=sys.stderr)
        if ffn.close() != m.ffn_bytes:
            raise RuntimeError("ffn.bundles has the wrong size (internal error)")
        if hf is not None:
            hf.close()
        m = write_resident(m, resident, dtype, seed, q, quantized)
        for target in [partial] + ([hf_partial] if hf_partial else []):
            (target / "config.json").write_text(json.dumps(config, indent=1))
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(EMBEDDED / name, target / name)
        spec = spec or (gated_spec(seed=seed) if arch == "llama" else synthetic_spec(seed=seed))
        (partial / SYNTHETIC_FILE).write_text(json.dumps(spec, indent=1))
        fmt.write_manifest(m)
        fmt.read_manifest(partial)  # the output must pass its own reader
        for target, final in ((partial, out), (hf_partial, checkpoint)):
            if target is None:
                continue
            shutil.rmtree(final, ignore_errors=True)
            os.replace(target, final)
        # The manifest's path moved with the rename; re-validate where it now lives.
        fmt.read_manifest(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        if hf_partial is not None:
            shutil.rmtree(hf_partial, ignore_errors=True)
        raise
    return out


def _quantizable(name: str) -> bool:
    """Whether mlx-lm would quantize the layer of resident weight `name` (linear layers and
    the token embedding; not the learned positions, whose table is not a lookup of tokens)."""
    return name.endswith(("_proj.weight", "embed_tokens.weight"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--checkpoint", help="also write the same weights as an HF checkpoint here")
    ap.add_argument("--d-model", type=int, default=4096)
    ap.add_argument("--ffn-dim", type=int, default=16384)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=50272)
    ap.add_argument("--max-pos", type=int, default=2048)
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(FLOATS))
    ap.add_argument("--align", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quantize", type=int, choices=(4, 8), help="quantized records of BITS")
    ap.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128))
    ap.add_argument("--float-resident", action="store_true",
                    help="with --quantize: keep attention and embeddings in --dtype")
    ap.add_argument("--arch", default="opt", choices=ARCHS,
                    help="opt (ReLU FFN, the paper's) or llama (SwiGLU, grouped-query attention)")
    ap.add_argument("--kv-heads", type=int, help="llama: key/value heads (default: all heads)")
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()
    t = time.time()
    out = write_synthetic_flash(a.out, a.d_model, a.ffn_dim, a.layers, a.vocab, a.max_pos, a.dtype,
                                a.align, a.checkpoint, a.seed, a.force, progress=True,
                                quantize=a.quantize, group_size=a.group_size,
                                float_resident=a.float_resident, arch=a.arch,
                                kv_heads=a.kv_heads)
    print(f"wrote {out} in {time.time() - t:.0f} s" + (f" (and {a.checkpoint})" if a.checkpoint else ""))


if __name__ == "__main__":
    main()
