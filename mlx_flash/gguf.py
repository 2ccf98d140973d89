"""Read a llama.cpp `.gguf` file as an HF checkpoint: HF tensor names, floating weights, and the
`config.json` and tokenizer files that its metadata describes.

MLX reads the file (`mx.load`); Q4_0, Q4_1, Q4_K and Q8_0 tensors come back as MLX affine
(weight, scales, biases) triples, which `load` dequantizes one tensor at a time into the scales'
dtype (float16); F32 and F16 tensors come back as they are. The architecture's model file says,
in its `GGUF` spec, how llama.cpp's names, metadata keys and rope row order map onto the HF
checkpoint; nothing here names an architecture. MLX reads every tensor of the file at once, so
converting one takes memory for the whole (quantized) file.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import models
from .errors import CheckpointError
from .quant import Quantization

MAGIC = b"GGUF"
GROUP_SIZE = 32  # values per scale in every quantized type MLX reads from GGUF
# llama.cpp token types (tokenizer.ggml.token_type)
CONTROL, USER_DEFINED = 3, 4
# tokenizer.ggml.pre -> whether digits are split one by one before byte-level BPE (llama.cpp's
# regexes for these are GPT-2's, after `\p{N}` for "smollm")
_PRE_TOKENIZERS = {"default": False, "gpt2": False, "smollm": True}


def is_gguf(path: str | Path) -> bool:
    """A file that starts with the GGUF magic."""
    path = Path(path).expanduser()
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


class GGUFCheckpoint:
    """A `.gguf` file read like `checkpoint.Checkpoint`: `config`, `keys`, `shape`, `dtype`,
    `load`, plus `side_files()`: config.json and the tokenizer files, built from the metadata."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        if not is_gguf(self.path):
            raise CheckpointError(f"{self.path}: not a GGUF file (no GGUF magic)")
        try:
            arrays, self.metadata = mx.load(str(self.path), return_metadata=True)
        except (RuntimeError, ValueError) as e:
            raise CheckpointError(f"{self.path}: unreadable GGUF file ({e})") from None
        arch = self.metadata.get("general.architecture")
        readable = [t for t in models.supported() if hasattr(models.architecture(t), "GGUF")]
        if arch not in readable:
            raise CheckpointError(f"{self.path}: general.architecture: {arch!r} is not supported "
                                  f"in GGUF files; supported: {', '.join(readable)}")
        spec = models.architecture(arch).GGUF
        self._tensors = _hf_tensors(self.path, arrays, spec)
        self.config = _config(self.path, arch, self.metadata, spec, self._tensors)
        # built now, so that an unsupported tokenizer is refused before convert writes anything
        self._tokenizer = _tokenizer(self.path, self.metadata, self.config)
        layers = range(self.config["num_hidden_layers"])
        self._heads = {f"{module.format(layer=i)}.{kind}": self.config[key]  # HF name -> heads
                       for module, key in spec.rope_permuted.items()
                       for i in layers for kind in ("weight", "bias")}

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        parts = self._tensors[name]
        if len(parts) == 1:
            return tuple(parts[0].shape)
        return (*parts[1].shape[:-1], parts[1].shape[-1] * GROUP_SIZE)

    def dtype(self, name: str) -> str:
        parts = self._tensors[name]
        return str(parts[-1].dtype).removeprefix("mlx.core.")

    def quantization_of(self, name: str) -> Quantization | None:
        """How a tensor is quantized (None: a float tensor)."""
        parts = self._tensors[name]
        if len(parts) == 1:
            return None
        return Quantization(parts[0].shape[-1] // parts[1].shape[-1], GROUP_SIZE)

    def quantized(self, name: str) -> tuple[tuple[mx.array, ...], Quantization] | None:
        """The (packed, scales, biases) MLX read for a quantized tensor, in HF's row order, and
        its quantization; None for a float tensor."""
        if (q := self.quantization_of(name)) is None:
            return None
        parts = self._tensors[name]
        if name in self._heads:
            parts = tuple(unpermute_rope(a, self._heads[name]) for a in parts)
        return parts, q

    def load(self, name: str) -> mx.array:
        """One tensor, dequantized (in float32, rounded once to the scales' dtype), in HF's row
        order."""
        parts = self._tensors[name]
        if len(parts) == 1:
            arr = parts[0]
        else:
            w, scales, biases = parts
            bits = w.shape[-1] // scales.shape[-1]  # a group's 32 values take `bits` uint32 words
            arr = mx.dequantize(w, scales.astype(mx.float32), biases.astype(mx.float32),
                                group_size=GROUP_SIZE, bits=bits).astype(scales.dtype)
        if name in self._heads:
            arr = unpermute_rope(arr, self._heads[name])
        return arr

    def side_files(self) -> dict[str, str]:
        """File name -> text of config.json, tokenizer.json and tokenizer_config.json."""
        tokenizer, tokenizer_config = self._tokenizer
        return {"config.json": json.dumps(self.config, indent=2) + "\n",
                "tokenizer.json": tokenizer,
                "tokenizer_config.json": json.dumps(tokenizer_config, indent=2) + "\n"}


def unpermute_rope(w: mx.array, n_heads: int) -> mx.array:
    """llama.cpp's rope row order back to HF's: per head, llama.cpp keeps each rotated pair
    adjacent (rows 2j, 2j+1); HF keeps the pair's halves apart (rows j, j + head_dim/2)."""
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise CheckpointError(f"{rows} rope rows do not split into {n_heads} heads of pairs")
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_tensors(path: Path, arrays: dict, spec) -> dict[str, tuple[mx.array, ...]]:
    """HF name -> (array,) or the quantized (weight, scales, biases), renamed by the spec."""
    grouped: dict[str, dict[str, mx.array]] = {}
    for name, arr in arrays.items():
        base, _, kind = name.rpartition(".")
        grouped.setdefault(base, {})[kind] = arr
    out, unknown = {}, []
    for base, kinds in sorted(grouped.items()):
        module = _hf_module(base, spec)
        if module is None:
            unknown.append(base)
            continue
        if "scales" in kinds:
            out[f"{module}.weight"] = (kinds["weight"], kinds["scales"], kinds["biases"])
        for kind in ("weight", "bias"):
            if kind in kinds and f"{module}.{kind}" not in out:
                out[f"{module}.{kind}"] = (kinds[kind],)
    if unknown:
        raise CheckpointError(f"{path}: tensors without an HF name: {', '.join(unknown[:5])}"
                              + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
    return out


def _hf_module(base: str, spec) -> str | None:
    """`blk.3.attn_q` -> `model.layers.3.self_attn.q_proj` (None when the spec has no name)."""
    parts = base.split(".")
    if len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit():
        template = spec.tensors.get(".".join(["blk", "{layer}", *parts[2:]]))
        return template.format(layer=int(parts[1])) if template else None
    return spec.tensors.get(base)


def _value(v):
    """A metadata value as plain Python: float32 scalars at their shortest decimal (1e-05)."""
    if isinstance(v, mx.array):
        if v.ndim:
            return v.tolist()
        item = v.item()
        return float(str(np.float32(item))) if isinstance(item, float) else item
    return v


def _config(path: Path, arch: str, meta: dict, spec, tensors: dict) -> dict:
    """config.json from the `<arch>.*` metadata, as transformers' GGUF loader names it."""
    config = {"model_type": arch, **spec.defaults}
    for key, hf_key in spec.config.items():
        if f"{arch}.{key}" in meta:
            config[hf_key] = _value(meta[f"{arch}.{key}"])
    for key in models.flash_spec(arch).dims + ("num_attention_heads",):
        if not isinstance(config.get(key), int):
            raise CheckpointError(f"{path}: metadata has no integer for {key}")
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    # llama.cpp's token_embd and output tensors, under the model file's HF names
    embed = f"{spec.tensors['token_embd']}.weight"
    if "vocab_size" not in config and "tokenizer.ggml.tokens" in meta:
        config["vocab_size"] = len(meta["tokenizer.ggml.tokens"])
    elif "vocab_size" not in config and embed in tensors:
        config["vocab_size"] = tensors[embed][-1].shape[0]
    config["tie_word_embeddings"] = f"{spec.tensors.get('output')}.weight" not in tensors
    for name in ("bos", "eos", "padding"):
        if f"tokenizer.ggml.{name}_token_id" in meta:
            key = "pad_token_id" if name == "padding" else f"{name}_token_id"
            config[key] = _value(meta[f"tokenizer.ggml.{name}_token_id"])
    return config


def _tokenizer(path: Path, meta: dict, config: dict) -> tuple[str, dict]:
    """(tokenizer.json text, tokenizer_config.json) for a byte-level BPE vocabulary ("gpt2")."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers import models as tok_models

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(f"{path}: tokenizer.ggml.model {kind!r} is not supported (only "
                              "byte-level BPE, 'gpt2')")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise CheckpointError(f"{path}: tokenizer.ggml.pre {pre!r} is not supported; supported: "
                              f"{', '.join(sorted(_PRE_TOKENIZERS))}")
    tokens = meta["tokenizer.ggml.tokens"]
    types = _value(meta.get("tokenizer.ggml.token_type", mx.ones(len(tokens), mx.int32)))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(tok_models.BPE({t: i for i, t in enumerate(tokens)}, merges,
                                   fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                  byte_level])
                         if _PRE_TOKENIZERS[pre] else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(t, normalized=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])

    def token(name: str) -> str | None:
        i = _value(meta.get(f"tokenizer.ggml.{name}_token_id"))
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    bos, add_bos = token("bos"), bool(_value(meta.get("tokenizer.ggml.add_bos_token", False)))
    if add_bos and bos is not None:
        bos_id = _value(meta["tokenizer.ggml.bos_token_id"])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": token("eos"),
        "unk_token": token("unknown"), "pad_token": token("padding"), "add_bos_token": add_bos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config.get("max_position_embeddings", 2048),
    }
    if "tokenizer.chat_template" in meta:
        tokenizer_config["chat_template"] = meta["tokenizer.chat_template"]
    return tok.to_str(), {k: v for k, v in tokenizer_config.items() if v is not None}
