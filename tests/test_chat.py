"""Chat: history, KV cache reuse across turns, Ctrl-C, context trimming, and the real terminal."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pexpect
import pytest

from mlx_flash import generate, load
from mlx_flash.chat import PLAIN_STOP, ChatSession, format_stats
from mlx_flash.convert import convert
from mlx_flash.errors import FlashError

from .conftest import EMBEDDED

FLASH = {"memory": "8.5MB", "max_context": 256}
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def flash_dir(tmp_path_factory):
    return convert(str(EMBEDDED), out=tmp_path_factory.mktemp("chat") / "tiny-flash", align=4096,
                   progress=False)


@pytest.fixture(scope="module")
def templated(tmp_path_factory):
    """A copy of the embedded model whose tokenizer has a chat template."""
    path = tmp_path_factory.mktemp("chat") / "tiny-chat"
    shutil.copytree(EMBEDDED, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def dense():
    return load(EMBEDDED)


@pytest.fixture(scope="module")
def flash(flash_dir):
    return load(flash_dir, **FLASH)


def fresh_reply(session, history, max_tokens):
    """The reply computed from scratch (no cache) to the conversation `history`."""
    stop = None if session.template else PLAIN_STOP
    return generate(session.model, session.tokenizer, session.render(history),
                    max_tokens=max_tokens, stop=stop)["tokens"]


def assert_cache_consistent(session):
    assert [c.offset for c in session.cache] == [len(session.cached)] * len(session.cache)


def test_plain_text_fallback(dense):
    s = ChatSession(*dense, system="You answer questions about Unix.", max_tokens=8)
    assert not s.template
    prompt = s.tokenizer.decode(s.render([{"role": "user", "content": "Hi"}]))
    assert prompt.endswith("You answer questions about Unix.\n\nUser: Hi\nAssistant:")
    r = s.reply("What does open() return?")
    assert r["tokens"] and "User:" not in r["text"]
    assert s.history == [{"role": "user", "content": "What does open() return?"},
                         {"role": "assistant", "content": r["text"]}]


def test_chat_template(templated):
    model, tokenizer = load(templated)
    s = ChatSession(model, tokenizer, system="Be brief.", max_tokens=8)
    assert s.template
    history = [{"role": "user", "content": "Hi"}]
    expected = tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}] + history, add_generation_prompt=True)
    assert s.render(history) == list(expected)
    assert "<|user|>\nHi</s>\n<|assistant|>\n" in tokenizer.decode(s.render(history))
    first = s.reply("What does open() return?")
    second = s.reply("And close()?")
    assert second["stats"]["prefilled_tokens"] < second["stats"]["prompt_tokens"]
    assert second["tokens"] == fresh_reply(s, s.history[:-1], 8)
    assert first["tokens"]
    assert_cache_consistent(s)


@pytest.mark.parametrize("which", ["dense", "flash"])
def test_kv_cache_persists_across_turns(which, request):
    s = ChatSession(*request.getfixturevalue(which), max_tokens=16)
    for msg in ["What does open() return?", "And close()?", "What is a pipe?"]:
        held = len(s.cached)
        r = s.reply(msg)
        stats = r["stats"]
        # Only the new turn is prefilled, and the reply is the one computed from scratch.
        assert stats["prefilled_tokens"] == stats["prompt_tokens"] - held
        assert r["tokens"] == fresh_reply(s, s.history[:-1], 16)
        assert_cache_consistent(s)
    if which == "flash":
        assert stats["flash_bytes_per_token"] > 0 and stats["cache_hit_rate"] is not None


def test_ctrl_c_ends_the_reply_and_the_next_turn_works(dense):
    """A real SIGINT during a reply: taken at a token boundary, the partial reply is kept."""
    s = ChatSession(*dense, max_tokens=64)
    seen = []

    def on_text(piece):
        seen.append(piece)
        if len(seen) == 3:
            os.kill(os.getpid(), signal.SIGINT)

    r = s.reply("Tell me about files.", on_text=on_text)
    assert r["interrupted"] and r["stats"]["finish_reason"] == "interrupted"
    assert 3 <= len(r["tokens"]) < 64
    assert s.history[-1] == {"role": "assistant", "content": r["text"]}
    assert_cache_consistent(s)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    nxt = s.reply("And close()?")
    assert not nxt["interrupted"]
    assert nxt["tokens"] == fresh_reply(s, s.history[:-1], 64)


class _Bomb:
    """A decoder layer that raises KeyboardInterrupt on its n-th call: a step cut mid-model."""

    def __init__(self, layer, n):
        self.layer, self.n = layer, n

    def __call__(self, *args, **kwargs):
        self.n -= 1
        if self.n == 0:
            raise KeyboardInterrupt
        return self.layer(*args, **kwargs)


def test_interrupt_inside_a_step_leaves_a_consistent_cache():
    model, tokenizer = load(EMBEDDED)
    s = ChatSession(model, tokenizer, max_tokens=32)
    s.reply("What does open() return?")
    layers = model.model.decoder.layers
    layers[2] = _Bomb(layers[2], 6)  # layers 0-1 take the token, 2-3 do not
    with pytest.raises(KeyboardInterrupt):
        s.reply("And close()?")
    layers[2] = layers[2].layer
    assert_cache_consistent(s)
    r = s.reply("And close()?")
    assert r["tokens"] == fresh_reply(s, s.history[:-1], 32)


def test_history_is_trimmed_when_the_context_would_overflow(dense):
    s = ChatSession(*dense, max_tokens=16, max_context=80)
    notices = []
    for msg in ["What does open() return?", "And close()?", "What is a pipe?", "And fork()?"]:
        r = s.reply(msg, on_notice=notices.append)
        assert len(s.render(s.history[:-1])) + 16 <= 80
        assert r["tokens"] == fresh_reply(s, s.history[:-1], 16)
    assert notices and "dropped" in notices[0]
    assert s.history[-2]["content"] == "And fork()?"
    with pytest.raises(FlashError, match="too long"):
        s.reply("word " * 200)


def test_stats_and_reset(flash):
    s = ChatSession(*flash, max_tokens=12)
    s.reply("What does open() return?")
    st = s.stats()
    assert st["replies"] == 1 and st["generated_tokens"] == 12 and st["tokens_per_s"] > 0
    assert st["flash_bytes_per_token"] > 0 and 0 <= st["cache_hit_rate"] <= 1
    assert 0 < st["model_memory_bytes"] <= st["memory_budget_bytes"]
    text = format_stats(st)
    for needle in ("tok/s", "MiB/token", "cache hit rate", "budget", "context"):
        assert needle in text
    s.reset()
    assert s.history == [] and s.cached == [] and s.stats()["replies"] == 0
    r = s.reply("What does open() return?")
    assert r["stats"]["prefilled_tokens"] == r["stats"]["prompt_tokens"]


def _clean(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("\r", "")


def test_chat_in_a_real_terminal(flash_dir):
    """Through a pseudo-terminal: streamed reply, /stats, Ctrl-C mid-reply, next turn, /quit."""
    child = pexpect.spawn(
        sys.executable,
        ["-m", "mlx_flash.cli", "chat", "--model", str(flash_dir), "--memory", "8.5MB",
         "--max-context", "256", "--max-tokens", "40"],
        encoding="utf-8", timeout=60, dimensions=(40, 200),
    )
    try:
        child.expect("loaded tiny-flash")
        child.expect(">> ")
        child.sendline("What does open() return?")
        child.expect(r"\[(\d+) tokens, [\d.]+ tok/s.*flash [\d.]+ MiB/token.*\]")
        assert _clean(child.before).split("return?\n", 1)[1].strip()  # the reply's text
        child.expect(">> ")

        child.sendline("/stats")
        child.expect(">> ")
        stats = _clean(child.before)
        for needle in ("tok/s", "MiB/token", "cache hit rate", "of a 8.11 MiB budget"):
            assert needle in stats

        child.sendline("Tell me about files.")
        child.expect(r"files\.\r\n(\(context full[^\n]*\n)?")
        child.expect(r"\w")  # reply text is on the screen while the reply is still running
        child.sendintr()
        child.expect(r"\[interrupted\]")
        child.expect(r"\[(\d+) tokens")
        assert int(child.match.group(1)) < 40
        child.expect(">> ")

        child.sendline("And close()?")
        child.expect(r"\[\d+ tokens")
        child.expect(">> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_chat_from_a_pipe_with_a_template(templated):
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_flash.cli", "chat", "--model", str(templated), "-n", "8",
         "--system", "Be brief."],
        input="Hello\n/help\n/reset\nWhat does open() return?\n", capture_output=True, text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr  # EOF (Ctrl-D) leaves
    assert "chat template" in proc.stderr and proc.stderr.count("[8 tokens") == 2
    assert "/quit" in proc.stdout and "conversation cleared" in proc.stdout


def test_chat_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mlx_flash.cli", "chat", "-m", str(tmp_path)],
                          capture_output=True, text=True, input="", timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no config.json" in lines[0]
