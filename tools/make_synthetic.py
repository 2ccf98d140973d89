"""Write a synthetic OPT checkpoint (HF layout, fp16 safetensors) with planted FFN sparsity.

Random weights, streamed tensor by tensor so a full-size model (OPT-6.7B shapes: d 4096, FFN
16384, 32 layers) can be written without holding it in memory. The fc1 biases are set so that
about `active` of the neurons fire for a typical token. Results from it are synthetic: it says
nothing about quality, only about I/O, memory and speed.

    python tools/make_synthetic.py OUT_DIR [--d-model 4096 --ffn-dim 16384 --layers 32]
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
from pathlib import Path
from statistics import NormalDist

import numpy as np

EMBEDDED = Path(__file__).resolve().parents[1] / "models" / "opt-tiny"


def _tensors(d_model: int, ffn_dim: int, layers: int, vocab: int, max_pos: int, active: float):
    """(name, shape, generator) in file order; generators make fp16 arrays on demand."""
    rng = np.random.default_rng(0)
    std = 0.02
    # LayerNorm output has unit-variance entries, so fc1 pre-activations are N(0, d std^2).
    cut = NormalDist().inv_cdf(1 - active) * std * np.sqrt(d_model)

    def normal(*shape, scale=std):
        return lambda: (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float16)

    def const(shape, value):
        return lambda: np.full(shape, value, dtype=np.float16)

    yield "model.decoder.embed_tokens.weight", (vocab, d_model), normal(vocab, d_model)
    yield "model.decoder.embed_positions.weight", (max_pos + 2, d_model), normal(max_pos + 2, d_model)
    for i in range(layers):
        p = f"model.decoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            yield p + f"self_attn.{proj}.weight", (d_model, d_model), normal(d_model, d_model)
            yield p + f"self_attn.{proj}.bias", (d_model,), const((d_model,), 0.0)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            yield p + f"{norm}.weight", (d_model,), const((d_model,), 1.0)
            yield p + f"{norm}.bias", (d_model,), const((d_model,), 0.0)
        yield p + "fc1.weight", (ffn_dim, d_model), normal(ffn_dim, d_model)
        yield p + "fc1.bias", (ffn_dim,), const((ffn_dim,), -cut)
        yield p + "fc2.weight", (d_model, ffn_dim), normal(d_model, ffn_dim)
        yield p + "fc2.bias", (d_model,), const((d_model,), 0.0)
    yield "model.decoder.final_layer_norm.weight", (d_model,), const((d_model,), 1.0)
    yield "model.decoder.final_layer_norm.bias", (d_model,), const((d_model,), 0.0)


def make_synthetic_opt(
    out: str | Path, d_model: int = 4096, ffn_dim: int = 16384, layers: int = 32,
    vocab: int = 8192, max_pos: int = 2048, active: float = 0.03, heads: int | None = None,
) -> Path:
    """Write the checkpoint into `out` (created); returns its path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    specs = list(_tensors(d_model, ffn_dim, layers, vocab, max_pos, active))
    header, offset = {"__metadata__": {"format": "pt", "synthetic": "true"}}, 0
    for name, shape, _ in specs:
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, _, make in specs:
            f.write(make().tobytes())
    config = {
        "model_type": "opt", "architectures": ["OPTForCausalLM"], "hidden_size": d_model,
        "ffn_dim": ffn_dim, "num_hidden_layers": layers, "num_attention_heads": heads or d_model // 128,
        "vocab_size": vocab, "max_position_embeddings": max_pos, "word_embed_proj_dim": d_model,
        "do_layer_norm_before": True, "activation_function": "relu", "enable_bias": True,
        "tie_word_embeddings": True, "torch_dtype": "float16", "bos_token_id": 2,
        "eos_token_id": 2, "pad_token_id": 1, "synthetic": True,
    }
    (out / "config.json").write_text(json.dumps(config, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(EMBEDDED / name, out / name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--d-model", type=int, default=4096)
    ap.add_argument("--ffn-dim", type=int, default=16384)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--active", type=float, default=0.03)
    a = ap.parse_args()
    print(make_synthetic_opt(a.out, a.d_model, a.ffn_dim, a.layers, active=a.active))


if __name__ == "__main__":
    main()
