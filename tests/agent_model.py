"""A tiny Llama checkpoint that calls a tool: what the server's tool-call tests run.

No trained model small enough for the suite calls tools, so this one's weights are set so that
greedy decoding follows fixed chains. Attention and MLP outputs are zero, so the last hidden
state is the current token's embedding, and the untied head maps each token of a chain to the
next (a bigram table).
- After `<|assistant|>` the model thinks ("<think>Checking</think>"), then calls
  `get_weather` as Qwen's JSON tool call, then ends.
- After `<|answer|>`, which the template puts after a tool result, it says " Sunny in Paris".

The tokenizer is the MoE fixture's byte-level BPE with the markers as added tokens. The
template renders tools and tool calls the way Qwen2.5's does, so mlx-lm infers its `json_tools`
parser and its `<think>` markers. Everything else about the model is real: transformers writes
the checkpoint, and mlx-flash converts, loads and serves it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_TOKENIZER = ROOT / "models" / "qwen3-moe-fixture"
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
ANSWER = " Sunny in Paris"
MARKERS = ["<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|answer|>", "<think>",
           "</think>", "<tool_call>", "</tool_call>", CALL]
TEMPLATE = (
    "{%- if tools %}<|system|>Tools:{% for tool in tools %} {{ tool.function.name }}"
    "{% endfor %}\n{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|assistant|>{{ m.content }}"
    "{%- for tool_call in m.tool_calls %}{%- if tool_call.function is defined %}"
    "{%- set tool_call = tool_call.function %}{%- endif %}"
    "<tool_call>{\"name\": \"{{ tool_call.name }}\", \"arguments\": "
    "{{ tool_call.arguments | tojson }}}</tool_call>{%- endfor %}</s>"
    "{%- elif m.role == 'tool' %}<|tool|>{{ m.content }}"
    "{%- elif m.role == 'assistant' %}<|assistant|>{{ m.content }}</s>"
    "{%- else %}<|{{ m.role }}|>{{ m.content }}{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{% if messages[-1].role == 'tool' %}<|answer|>"
    "{% else %}<|assistant|>{% endif %}{% endif %}")


def write_agent_model(out: Path) -> Path:
    """The checkpoint (HF safetensors, float32) in `out`."""
    import torch
    from tokenizers import AddedToken, Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_file(str(FIXTURE_TOKENIZER / "tokenizer.json"))
    tok.add_tokens([AddedToken(m, normalized=False) for m in MARKERS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(out)
    ids = {m: tok.token_to_id(m) for m in MARKERS}
    eos = tok.token_to_id("</s>")
    answer = tok.encode(ANSWER).ids
    chains = [[ids["<|assistant|>"], ids["<think>"], *tok.encode("Checking").ids,
               ids["</think>"], ids["<tool_call>"], ids[CALL], ids["</tool_call>"], eos],
              [ids["<|answer|>"], *answer, eos]]
    following = {}
    for chain in chains:
        for a, b in zip(chain, chain[1:]):
            assert following.setdefault(a, b) == b, "a token with two successors"
    config = LlamaConfig(vocab_size=len(tok.get_vocab()), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False,
                         bos_token_id=None, eos_token_id=eos, pad_token_id=1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        emb.normal_()
        head = model.lm_head.weight
        head.normal_(std=0.01)
        for a, b in following.items():
            head[b] += 50 * emb[a] / emb[a].norm()
    model.save_pretrained(out, safe_serialization=True)
    config_file = out / "config.json"
    config_json = json.loads(config_file.read_text())
    config_json["torch_dtype"] = "float32"
    config_file.write_text(json.dumps(config_json, indent=1))
    return out


if __name__ == "__main__":
    import sys

    target = Path(sys.argv[1])
    shutil.rmtree(target, ignore_errors=True)
    print(write_agent_model(target))
