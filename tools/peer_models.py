"""The forms of one model's weights that `mlx-flash bench --peers` hands each system (issue 26):
the same numbers in every form, so that the MLX systems' greedy tokens can be compared.

    python tools/peer_models.py smollm2 GGUF OUT       # HF float16 dir of a SmolLM2 GGUF
    python tools/peer_models.py mlx-lm HF_DIR OUT [DTYPE]  # mlx-lm's own dir of an HF MoE
    PEER_PY tools/peer_models.py gguf HF_DIR OUT.gguf  # F16 GGUF of an HF Qwen3-MoE

- `smollm2`: the GGUF dequantized as `mlx-flash convert --quantize none` does (the float16 flash
  dir's very values), written as an HF checkpoint: what mlx-lm loads beside our flash dir.
- `mlx-lm`: mlx-lm's load (its sanitize stacks the experts) and save, in DTYPE (default: the
  checkpoint's): the dir that mlx-vlm repacks and our zero-copy path streams. On MLX's CPU
  backend `gather_mm` (SwitchGLU's float experts) takes float32 only: a float16 MoE must be
  float32 there for mlx-lm and mlx-vlm to run it (exact: every float16 value is a float32 one).
- `gguf`: a `qwen3moe` GGUF of an HF Qwen3-MoE checkpoint in F16, tensors as llama.cpp's
  convert_hf_to_gguf.py names them, the byte-level BPE tokenizer as `gpt2`. It needs the `gguf`
  package (PyPI) and numpy only: run it with a venv's python that has them (the llama.cpp
  peer's, after `pip install gguf`).
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path


def _partial(out: Path) -> Path:
    part = out.with_name(out.name + ".partial")
    shutil.rmtree(part, ignore_errors=True)
    part.unlink(missing_ok=True) if part.is_file() else None
    return part


def smollm2(gguf: Path, out: Path) -> None:
    import mlx.core as mx

    from mlx_flash.gguf import GGUFCheckpoint

    ckpt = GGUFCheckpoint(gguf)
    part = _partial(out)
    part.mkdir(parents=True)
    weights = {name: ckpt.load(name).astype(mx.float16) for name in ckpt.keys()}
    mx.save_safetensors(str(part / "model.safetensors"), weights, metadata={"format": "pt"})
    for name, text in ckpt.side_files().items():
        if name == "config.json":
            config = json.loads(text)
            config.update(torch_dtype="float16", architectures=["LlamaForCausalLM"])
            text = json.dumps(config, indent=2) + "\n"
        (part / name).write_text(text)
    shutil.rmtree(out, ignore_errors=True)
    part.rename(out)


def mlx_lm(hf: Path, out: Path, dtype: str | None = None) -> None:
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_lm.utils import load, save

    model, tokenizer = load(str(hf))
    config = json.loads((hf / "config.json").read_text())
    if dtype:
        cast = getattr(mx, dtype)
        model.update(tree_map(lambda a: a.astype(cast) if mx.issubdtype(a.dtype, mx.floating)
                              else a, model.parameters()))
        config["torch_dtype"] = config["dtype"] = dtype
    part = _partial(out)
    save(part, str(hf), model, tokenizer, config)
    shutil.rmtree(out, ignore_errors=True)
    part.rename(out)


def _safetensors(path: Path):
    """name -> float16 numpy array of an HF safetensors file (numpy only)."""
    import numpy as np

    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    kinds = {"F16": np.float16, "F32": np.float32}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        arr = np.frombuffer(raw[8 + n + a:8 + n + b], dtype=kinds[info["dtype"]])
        out[name] = arr.reshape(info["shape"]).astype(np.float16)
    return out


def gguf(hf: Path, out: Path) -> None:
    import gguf as gg
    import numpy as np

    config = json.loads((hf / "config.json").read_text())
    if config.get("model_type") != "qwen3_moe":
        sys.exit(f"error: {hf}: model_type {config.get('model_type')!r}; only qwen3_moe")
    tensors = {}
    for f in sorted(hf.glob("*.safetensors")):
        tensors.update(_safetensors(f))
    layers, experts = config["num_hidden_layers"], config["num_experts"]
    part = out.with_name(out.name + ".partial")
    w = gg.GGUFWriter(str(part), "qwen3moe")
    w.add_name(hf.name)
    w.add_block_count(layers)
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_key_length(config["head_dim"])
    w.add_value_length(config["head_dim"])
    w.add_rope_freq_base(float(config.get("rope_theta")
                               or config["rope_parameters"]["rope_theta"]))
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_expert_count(experts)
    w.add_expert_used_count(config["num_experts_per_tok"])
    w.add_expert_feed_forward_length(config["moe_intermediate_size"])
    w.add_file_type(gg.LlamaFileType.MOSTLY_F16)

    tok = json.loads((hf / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    added = {t["id"]: t for t in tok.get("added_tokens", [])}
    size = max(config["vocab_size"], len(vocab))
    names, types = [f"[PAD{i}]" for i in range(size)], [gg.TokenType.UNUSED] * size
    for text, i in vocab.items():
        names[i], types[i] = text, gg.TokenType.NORMAL
    for i, t in added.items():
        names[i] = t["content"]
        types[i] = gg.TokenType.CONTROL if t.get("special") else gg.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(names)
    w.add_token_types(types)
    w.add_token_merges(merges)
    tok_config = json.loads((hf / "tokenizer_config.json").read_text())
    ids = {t["content"]: i for i, t in added.items()}
    for key, setter in (("eos_token", w.add_eos_token_id), ("pad_token", w.add_pad_token_id),
                        ("unk_token", w.add_unk_token_id), ("bos_token", w.add_bos_token_id)):
        if tok_config.get(key) in ids:
            setter(ids[tok_config[key]])
    w.add_add_bos_token(bool(tok_config.get("add_bos_token")))

    def put(name: str, arr) -> None:
        w.add_tensor(name, np.ascontiguousarray(arr))

    norms = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    attn = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
            "q_norm": "attn_q_norm", "k_norm": "attn_k_norm"}
    put("token_embd.weight", tensors["model.embed_tokens.weight"])
    put("output_norm.weight", tensors["model.norm.weight"].astype(np.float32))
    if "lm_head.weight" in tensors and not config.get("tie_word_embeddings"):
        put("output.weight", tensors["lm_head.weight"])
    for i in range(layers):
        p = f"model.layers.{i}."
        for hf_name, name in norms.items():
            put(f"blk.{i}.{name}.weight", tensors[f"{p}{hf_name}.weight"].astype(np.float32))
        for hf_name, name in attn.items():
            arr = tensors[f"{p}self_attn.{hf_name}.weight"]
            put(f"blk.{i}.{name}.weight", arr.astype(np.float32) if arr.ndim == 1 else arr)
        put(f"blk.{i}.ffn_gate_inp.weight", tensors[f"{p}mlp.gate.weight"].astype(np.float32))
        for proj, name in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"),
                           ("down_proj", "ffn_down_exps")):
            put(f"blk.{i}.{name}.weight", np.stack(
                [tensors[f"{p}mlp.experts.{e}.{proj}.weight"] for e in range(experts)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    part.replace(out)


def main() -> None:
    args = sys.argv[1:]
    if not (len(args) == 3 or (len(args) == 4 and args[0] == "mlx-lm")) or args[0] not in (
            "smollm2", "mlx-lm", "gguf"):
        sys.exit(__doc__.split("\n\n")[1])
    kind, src, out = args[0], Path(args[1]), Path(args[2])
    if kind != "gguf":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    {"smollm2": smollm2, "mlx-lm": mlx_lm, "gguf": gguf}[kind](src, out, *args[3:])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
