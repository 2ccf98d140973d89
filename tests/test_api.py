"""The Python API (`load`, `generate`, `stream_generate`) and the `generate` command's options."""

import inspect
import json
import os
import signal
import subprocess
import sys

import mlx_lm
import pytest
from mlx_lm.generate import GenerationResponse
from mlx_lm.models.cache import make_prompt_cache

import mlx_flash
from mlx_flash import generate, load, stream_generate
from mlx_flash.convert import convert
from mlx_flash.generation import FlashResponse, Interrupted, encode

from .conftest import EMBEDDED

PROMPT = "The open() function"


@pytest.fixture(scope="module")
def dense():
    return load(EMBEDDED)


@pytest.fixture(scope="module")
def flash_dir(tmp_path_factory):
    return convert(str(EMBEDDED), out=tmp_path_factory.mktemp("api") / "tiny-flash", align=4096,
                   progress=False)


def cli(*args, input=None):
    return subprocess.run([sys.executable, "-m", "mlx_flash.cli", *args], capture_output=True,
                          text=True, input=input, timeout=120)


def test_public_api_is_mlx_lm_like():
    assert set(mlx_flash.__all__) >= {"load", "generate", "stream_generate"}
    for fn in (load, generate, stream_generate):
        assert fn.__doc__ and len(fn.__doc__.splitlines()) > 2
    ours = list(inspect.signature(stream_generate).parameters)
    theirs = list(inspect.signature(mlx_lm.stream_generate).parameters)
    assert ours[:4] == theirs[:4] == ["model", "tokenizer", "prompt", "max_tokens"]
    assert list(inspect.signature(generate).parameters)[:4] == ["model", "tokenizer", "prompt",
                                                                "verbose"]


def test_generate_is_mlx_lm_underneath(dense):
    model, tokenizer = dense
    ours = generate(model, tokenizer, PROMPT, max_tokens=20)
    assert ours["text"] == mlx_lm.generate(model, tokenizer, PROMPT, max_tokens=20)
    assert len(ours["tokens"]) == ours["stats"]["generation_tokens"] == 20
    assert ours["stats"]["finish_reason"] == "length"


def test_stream_generate_carries_flash_stats(flash_dir, dense):
    model, tokenizer = load(flash_dir, memory="8.5MB", max_context=256)
    responses = list(stream_generate(model, tokenizer, PROMPT, max_tokens=12))
    assert len(responses) == 12
    assert all(isinstance(r, FlashResponse) and isinstance(r, GenerationResponse)
               for r in responses)
    last = responses[-1]
    assert last.finish_reason == "length" and last.stats["mode"] == "oracle"
    assert last.stats["flash_bytes_per_token"] > 0 and last.stats["cache_hit_rate"] is not None
    assert last.stats["memory_budget_bytes"] == 8_500_000
    # Exact active set: the same tokens as the dense model.
    assert [r.token for r in responses] == generate(*dense, PROMPT, max_tokens=12)["tokens"]
    # Figures cover one call: a second call counts its own one-token steps only (the prompt's
    # last token, then one per generated token).
    assert last.stats["decode_tokens"] == 1 + 12
    again = generate(model, tokenizer, PROMPT, max_tokens=5)
    assert again["stats"]["decode_tokens"] == 1 + 5


def test_stop_strings(dense):
    model, tokenizer = dense
    full = generate(model, tokenizer, PROMPT, max_tokens=30)["text"]
    stop = "called"
    assert stop in full
    pieces = []
    out = generate(model, tokenizer, PROMPT, max_tokens=30, stop=[stop], on_text=pieces.append)
    assert out["text"] == full[: full.index(stop)] == "".join(pieces)
    assert out["stats"]["finish_reason"] == "stop" and len(out["tokens"]) < 30
    # A stop string that never comes changes nothing.
    assert generate(model, tokenizer, PROMPT, max_tokens=30, stop="zzz")["text"] == full


def test_sampling_options(dense):
    model, tokenizer = dense
    greedy = generate(model, tokenizer, PROMPT, max_tokens=40)["tokens"]
    penalized = generate(model, tokenizer, PROMPT, max_tokens=40, repetition_penalty=1.5)["tokens"]
    assert penalized != greedy
    a = generate(model, tokenizer, PROMPT, max_tokens=20, temp=0.8, top_p=0.9, seed=7)
    b = generate(model, tokenizer, PROMPT, max_tokens=20, temp=0.8, top_p=0.9, seed=7)
    assert a["tokens"] == b["tokens"]


class _SigintLayer:
    """A decoder layer that sends this process SIGINT during its n-th call (mid-step)."""

    def __init__(self, layer, n):
        self.layer, self.n = layer, n

    def __call__(self, *args, **kwargs):
        self.n -= 1
        if self.n == 0:
            os.kill(os.getpid(), signal.SIGINT)
        return self.layer(*args, **kwargs)


def test_ctrl_c_is_taken_between_tokens():
    model, tokenizer = load(EMBEDDED)
    layers = model.model.decoder.layers
    layers[1] = _SigintLayer(layers[1], 5)  # prefill is call 1; decode steps follow
    cache = make_prompt_cache(model)
    prompt = encode(tokenizer, PROMPT)
    got = []
    with pytest.raises(Interrupted):
        for r in stream_generate(model, tokenizer, prompt, max_tokens=50, prompt_cache=cache):
            got.append(r.token)
    layers[1] = layers[1].layer
    assert 0 < len(got) < 10
    # Every layer holds the prompt and exactly the tokens that were yielded.
    assert [c.offset for c in cache] == [len(prompt) + len(got)] * len(cache)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    expected = generate(model, tokenizer, prompt, max_tokens=len(got))["tokens"]
    assert got == expected


def test_cli_generate_options_and_stdin(dense):
    piped = cli("generate", "-p", "-", "-n", "30", "--stop", "called", "--stop", "zzz", "--json",
                input=PROMPT)
    assert piped.returncode == 0, piped.stderr
    expected = generate(*dense, PROMPT, max_tokens=30, stop=["called", "zzz"])
    got = json.loads(piped.stdout)
    assert got["tokens"] == expected["tokens"] and got["text"] == expected["text"]
    assert got["stats"]["finish_reason"] == "stop"
    sampled = cli("generate", "-p", PROMPT, "-n", "10", "--temp", "0.7", "--top-p", "0.9",
                  "--repetition-penalty", "1.2", "--seed", "1", "--json")
    assert sampled.returncode == 0, sampled.stderr
    expected = generate(*dense, PROMPT, max_tokens=10, temp=0.7, top_p=0.9,
                        repetition_penalty=1.2, seed=1)
    assert json.loads(sampled.stdout)["tokens"] == expected["tokens"]


def test_cli_generate_empty_stdin_is_one_line_error():
    proc = cli("generate", "-p", "-", input="")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: the prompt is empty"
