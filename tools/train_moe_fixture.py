"""Train the small Qwen3-MoE fixture (`models/qwen3-moe-fixture/`) from scratch: a real router,
learned on real text, so the expert cache can be measured on learned routing (issue 25).

PyTorch on the CPU (transformers' `Qwen3MoeForCausalLM`, the load-balancing loss on), trained on
../shared/corpus/fixture-calib.txt with the fixtures' byte-level BPE (vocab 8192) for a fixed wall
budget; perplexity and the experts' use measured on ../shared/corpus/fixture-val.txt (held out).
Written as a Hugging Face dir in the Hub's Qwen3-MoE form (per-expert tensors, `num_experts` and
`rope_theta` in config.json: what mlx-lm's `qwen3_moe` reads), fp16, atomically.

    python tools/train_moe_fixture.py [--minutes 15] [--out models/qwen3-moe-fixture] [--force]
    python tools/train_moe_fixture.py --reevaluate   # the report's figures from the saved dir
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CALIB, VAL = SHARED / "corpus" / "fixture-calib.txt", SHARED / "corpus" / "fixture-val.txt"
TOKENIZER = SHARED / "fixtures" / "opt-fixture"
PROMPT = "The open() function returns"
EOS, PAD = 2, 1  # the fixtures' `</s>` and `<pad>`
SHAPE = dict(vocab_size=8192, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, num_experts=32, moe_intermediate_size=64,
             num_experts_per_tok=4, norm_topk_prob=True, intermediate_size=256,
             tie_word_embeddings=True, max_position_embeddings=512, rope_theta=10000.0,
             rms_norm_eps=1e-6, decoder_sparse_step=1, mlp_only_layers=[])


def _tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))


def _ids(tok, path: Path) -> np.ndarray:
    return np.array(tok.encode(path.read_text(), add_special_tokens=False).ids, dtype=np.int64)


def _model(aux_coef: float, seed: int):
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(**SHAPE, output_router_logits=True, router_aux_loss_coef=aux_coef,
                            bos_token_id=None, eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # the experts sorted by expert and multiplied a group at a time: ~2x eager's speed on a CPU
    model.set_experts_implementation("grouped_mm")
    return model


def _lr(step: int, elapsed: float, budget: float, peak: float, warmup: int) -> float:
    """Linear warm-up, then a cosine to 10% of the peak over the wall budget (not a step count:
    the machine is shared, the steps it allows are not known in advance)."""
    done = min(elapsed / budget, 1.0)
    return peak * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * done)))


@torch.no_grad()
def evaluate(model, val: np.ndarray, seq: int = 256, batch: int = 16) -> dict:
    """Perplexity over non-overlapping `seq`-token windows of `val`, and each layer's expert use:
    share of the (token, slot) picks per expert, its entropy (bits), and the share of a token's
    experts that the previous token also picked."""
    model.eval()
    windows = torch.from_numpy(val[: len(val) // seq * seq].reshape(-1, seq))
    k, experts = model.config.num_experts_per_tok, model.config.num_experts
    nll, count = 0.0, 0
    layers = model.config.num_hidden_layers
    counts = np.zeros((layers, experts))
    reuse = np.zeros(layers)
    pairs = 0
    for i in range(0, len(windows), batch):
        x = windows[i : i + batch]
        out = model(input_ids=x, output_router_logits=True)
        logits = out.logits[:, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"))
        count += x[:, 1:].numel()
        for layer, r in enumerate(out.router_logits):  # (batch * seq, experts)
            top = torch.topk(r.float(), k, dim=-1).indices.reshape(len(x), seq, k)
            counts[layer] += np.bincount(top.reshape(-1).numpy(), minlength=experts)
            picked = torch.zeros(len(x), seq, experts, dtype=torch.bool)
            picked.scatter_(-1, top, True)
            reuse[layer] += float((picked[:, 1:] & picked[:, :-1]).sum()) / k
        pairs += len(x) * (seq - 1)
    model.train()
    share = counts / counts.sum(axis=1, keepdims=True)
    entropy = -(share * np.log2(np.where(share > 0, share, 1))).sum(axis=1)
    return {"val_ppl": round(math.exp(nll / count), 3), "val_tokens": count,
            "expert_share_per_layer": np.round(share, 4).tolist(),
            "expert_entropy_bits_per_layer": np.round(entropy, 3).tolist(),
            "max_entropy_bits": round(math.log2(experts), 3),
            "consecutive_reuse_per_layer": np.round(reuse / pairs, 4).tolist(),
            "consecutive_reuse_if_random": round(k / experts, 4)}


@torch.no_grad()
def greedy(model, tok, prompt: str = PROMPT, new: int = 40) -> str:
    model.eval()
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False).ids])
    out = model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=PAD,
                         eos_token_id=EOS)
    model.train()
    return tok.decode(out[0, ids.shape[1] :].tolist())


def _per_expert(path: Path) -> None:
    """Rewrite fused experts (`mlp.experts.gate_up_proj` (E, 2F, d), `mlp.experts.down_proj`
    (E, d, F): transformers 5's modules) as the Hub's per-expert tensors, which mlx-lm's
    `qwen3_moe.sanitize` stacks; transformers 5.25's save_pretrained already writes those."""
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    weights = load_file(file)
    fused = [k for k in weights if k.endswith("mlp.experts.gate_up_proj")]
    if not fused:
        return
    for key in fused:
        pre = key.removesuffix("gate_up_proj")
        gate_up, down = weights.pop(key), weights.pop(pre + "down_proj")
        f = gate_up.shape[1] // 2
        for e in range(gate_up.shape[0]):
            weights[f"{pre}{e}.gate_proj.weight"] = gate_up[e, :f].contiguous()
            weights[f"{pre}{e}.up_proj.weight"] = gate_up[e, f:].contiguous()
            weights[f"{pre}{e}.down_proj.weight"] = down[e].contiguous()
    save_file(weights, file, metadata={"format": "pt"})


def save(model, out: Path, report: dict) -> None:
    """The HF dir, written into `out.partial` and renamed at the end."""
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model.to(torch.float16).save_pretrained(partial, safe_serialization=True)
        model.float()
        _per_expert(partial)
        (partial / "model.safetensors").chmod(0o644)  # save_pretrained leaves it 0600
        config = json.loads((partial / "config.json").read_text())
        # the Hub's Qwen3-MoE keys, beside transformers 5's (mlx-lm reads these)
        config.update(num_experts=SHAPE["num_experts"], rope_theta=SHAPE["rope_theta"],
                      rope_scaling=None, output_router_logits=False)
        config.pop("num_local_experts", None)
        (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (partial / "generation_config.json").write_text(json.dumps(
            {"eos_token_id": EOS, "pad_token_id": PAD, "do_sample": False}, indent=2) + "\n")
        # Qwen models add no BOS: the fixtures' tokenizer without its post-processor (which
        # prepends OPT's `</s>`), and a tokenizer_config that says so
        spec = json.loads((TOKENIZER / "tokenizer.json").read_text())
        spec["post_processor"] = None
        (partial / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
        tc = json.loads((TOKENIZER / "tokenizer_config.json").read_text())
        tc.update(bos_token=None, add_bos_token=False, eos_token="</s>")
        (partial / "tokenizer_config.json").write_text(json.dumps(tc, indent=1) + "\n")
        (partial / "training_report.json").write_text(json.dumps(report, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def train(out: Path, minutes: float, batch: int, seq: int, lr: float, aux_coef: float,
          seed: int, eval_every: int) -> dict:
    torch.set_num_threads(2)
    tok = _tokenizer()
    calib, val = _ids(tok, CALIB), _ids(tok, VAL)
    print(f"calib {len(calib)} tokens, val {len(val)} tokens")
    model = _model(aux_coef, seed)
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e6:.2f} M parameters")
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    other = [p for n, p in model.named_parameters() if p.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": other, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    rng = np.random.default_rng(seed)
    budget, start, step = minutes * 60, time.perf_counter(), 0
    model.train()
    while (elapsed := time.perf_counter() - start) < budget:
        for g in opt.param_groups:
            g["lr"] = _lr(step, elapsed, budget, lr, warmup=15)
        at = rng.integers(0, len(calib) - seq - 1, batch)
        x = torch.from_numpy(np.stack([calib[a : a + seq] for a in at]))
        out_ = model(input_ids=x, labels=x)  # loss = cross-entropy + coef * aux loss
        opt.zero_grad(set_to_none=True)
        out_.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 20 == 0:
            print(f"step {step} {elapsed / 60:.1f} min loss {out_.loss.item():.3f} "
                  f"aux {out_.aux_loss.item():.3f} lr {opt.param_groups[0]['lr']:.2e}", flush=True)
        if eval_every and step % eval_every == 0:
            print(f"  val ppl {evaluate(model, val[:16 * seq])['val_ppl']}", flush=True)
    wall = (time.perf_counter() - start) / 60
    report = {"arch": "qwen3_moe", "params": params,
              "shape": {k: SHAPE[k] for k in ("hidden_size", "num_hidden_layers",
                                               "num_attention_heads", "num_key_value_heads",
                                               "head_dim", "num_experts", "moe_intermediate_size",
                                               "num_experts_per_tok", "vocab_size")},
              "steps": step, "batch": batch, "seq": seq, "tokens_seen": step * batch * seq,
              "wall_minutes": round(wall, 2), "peak_lr": lr, "router_aux_loss_coef": aux_coef,
              "seed": seed, "corpus": {"train": CALIB.name, "val": VAL.name,
                                       "train_tokens": len(calib)}}
    model.to(torch.float16).float()  # the figures are the shipped (float16) weights'
    report.update(_figures(model, tok, val, seq))
    save(model, out, report)
    return report


def _figures(model, tok, val: np.ndarray, seq: int) -> dict:
    figures = evaluate(model, val, seq)
    figures["greedy"] = {"prompt": PROMPT, "continuation": greedy(model, tok)}
    print(json.dumps({k: figures[k] for k in ("val_ppl", "expert_entropy_bits_per_layer",
                                             "consecutive_reuse_per_layer", "greedy")}, indent=1))
    return figures


def reevaluate(out: Path, seq: int) -> dict:
    """The report's figures again, from the saved dir (float16 weights, in float32)."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    tok = _tokenizer()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    file = out / "training_report.json"
    report = json.loads(file.read_text())
    report.update(_figures(model, tok, _ids(tok, VAL), seq))
    tmp = file.with_name(file.name + ".partial")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.rename(file)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=15.0, help="wall budget of the training")
    ap.add_argument("--out", type=Path, default=ROOT / "models" / "qwen3-moe-fixture")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=200, help="steps (0: only at the end)")
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    ap.add_argument("--reevaluate", action="store_true",
                    help="no training: the report's figures again from the saved --out")
    a = ap.parse_args()
    if a.reevaluate:
        reevaluate(a.out, a.seq)
        return
    if a.out.exists() and not a.force:
        raise SystemExit(f"{a.out} exists; pass --force to replace it")
    train(a.out, a.minutes, a.batch, a.seq, a.lr, a.aux_coef, a.seed, a.eval_every)


if __name__ == "__main__":
    main()
