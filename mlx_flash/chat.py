"""Chat: a conversation over one model, and the terminal loop of `mlx-flash chat`.

The KV cache (mlx-lm's prompt cache) lives across turns and always holds a known token list:
each turn renders the whole history (the tokenizer's chat template, or a plain-text fallback),
keeps the cached prefix it shares with it and prefills only the rest.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.tokenizer_utils import TokenizerWrapper

from . import platform
from .errors import FlashError
from .generation import Interrupted, context_limit, defer_sigint, stream_generate
from .promptcache import PromptCache
from .state import state_of, stats_line
from .units import mib

# Without a chat template: "User: ...\nAssistant: ..." turns; a reply ends where a new turn starts.
PLAIN_STOP = ["\nUser:", "\nAssistant:"]
HELP = """commands:
  /reset   forget the conversation (and the KV cache)
  /stats   tokens/s, flash MiB per token, cache hit rate, memory in use vs budget
  /help    this list
  /quit    leave (Ctrl-D too)
Ctrl-C stops a reply and returns to the prompt."""


class ChatSession:
    """A conversation with `model`: history, a KV cache reused across turns, and stats.

    `reply(text)` returns `{"text", "tokens", "stats", "interrupted", "dropped"}`. When the
    history would overflow the context (`max_context`, default `context_limit(model)`), the
    oldest turns are dropped (`dropped` says how many messages). A Ctrl-C during a reply
    (`Interrupted`) ends it early; the partial reply stays in the history and the cache.
    `gen_kwargs` (`temp`, `top_p`, `repetition_penalty`, ...) go to `stream_generate` for every
    reply; `seed` seeds the random state once.
    """

    def __init__(self, model, tokenizer, system: str | None = None, max_tokens: int = 256,
                 max_context: int | None = None, **gen_kwargs):
        self.model = model
        self.tokenizer = (tokenizer if isinstance(tokenizer, TokenizerWrapper)
                          else TokenizerWrapper(tokenizer))
        self.system = system
        self.max_tokens = max_tokens
        self.max_context = max_context or context_limit(model)
        self.template = bool(getattr(self.tokenizer, "has_chat_template", False))
        if (seed := gen_kwargs.pop("seed", None)) is not None:
            mx.random.seed(seed)  # once: every reply seeded alike would sample alike
        self.gen_kwargs = gen_kwargs
        self.reset()

    def reset(self) -> None:
        """Forget the history, empty the KV cache and restart the session stats."""
        self.history: list[dict] = []
        self.kv = PromptCache(self.model)  # the KV cache and the tokens it holds
        self.replies = self.tokens = self.prefilled = 0
        self.decode_s = 0.0
        self.last: dict | None = None
        self._since = state_of(self.model).counters()

    # -- prompt --------------------------------------------------------------------------------

    def messages(self, history: list[dict]) -> list[dict]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + history

    def render(self, history: list[dict]) -> list[int]:
        """Token ids of the conversation `history`, ending where the assistant speaks next."""
        messages = self.messages(history)
        if self.template:
            return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        parts = []
        for m in messages:
            if m["role"] == "system":
                parts.append(m["content"].strip() + "\n\n")
            elif m["role"] == "user":
                parts.append(f"User: {m['content']}\n")
            else:  # the reply as generated after "Assistant:", so its tokens stay cached
                parts.append(f"Assistant:{m['content']}\n")
        parts.append("Assistant:")
        return list(self.tokenizer.encode("".join(parts)))

    def _fit(self, text: str) -> tuple[list[dict], list[int], int]:
        """(history with the new message, its tokens, messages dropped) within the context."""
        reserve = min(self.max_tokens, self.max_context // 2)  # room kept for the reply
        dropped = 0
        while True:
            history = self.history[dropped:] + [{"role": "user", "content": text}]
            tokens = self.render(history)
            if len(tokens) + reserve <= self.max_context:
                return history, tokens, dropped
            if dropped >= len(self.history):
                if len(tokens) < self.max_context:
                    return history, tokens, dropped
                raise FlashError(f"message too long: the conversation would take {len(tokens)} "
                                 f"tokens and the context holds {self.max_context}")
            dropped += 2  # one user message and its reply

    @property
    def cache(self) -> list:
        return self.kv.cache

    @property
    def cached(self) -> list[int]:
        return self.kv.tokens

    # -- a turn --------------------------------------------------------------------------------

    def reply(self, text: str, on_text: Callable[[str], None] | None = None,
              on_notice: Callable[[str], None] | None = None) -> dict:
        """Answer the user message `text`, streaming pieces of the reply to `on_text`.

        In the main thread, Ctrl-C is held for the whole turn and ends the reply at the next
        token (`"interrupted"` in the result); a second Ctrl-C raises KeyboardInterrupt at once.
        """
        with defer_sigint():
            return self._reply(text, on_text, on_notice)

    def _reply(self, text, on_text, on_notice) -> dict:
        history, tokens, dropped = self._fit(text)
        if dropped and on_notice:
            on_notice(f"context full: dropped the {dropped} oldest messages to fit "
                      f"{self.max_context} tokens")
        keep = self.kv.reuse(tokens)
        known = list(tokens)  # what the cache holds once every yielded token is in
        pieces, out, last, interrupted = [], [], None, False
        max_tokens = min(self.max_tokens, self.max_context - len(tokens))
        try:
            for last in stream_generate(
                self.model, self.tokenizer, tokens[keep:], max_tokens=max_tokens,
                prompt_cache=self.cache, stop=None if self.template else PLAIN_STOP,
                **self.gen_kwargs,
            ):
                known.append(last.token)
                if not (last.finish_reason == "stop"
                        and last.token in self.tokenizer.eos_token_ids):
                    out.append(last.token)
                if last.text:
                    pieces.append(last.text)
                    if on_text:
                        on_text(last.text)
        except Interrupted:
            interrupted = True
        finally:
            self.kv.sync(known)
        reply = "".join(pieces)
        # mlx-lm's streaming detokenizer drops the first token's leading space; put it back so
        # the next turn renders this reply to the very tokens the cache holds.
        full = self.tokenizer.decode(out) if out else ""
        if full[:1] == " " and not full.startswith(reply) and full[1:].startswith(reply):
            reply = " " + reply
        self.history = history + [{"role": "assistant", "content": reply}]
        stats = dict(last.stats) if last else {}
        if last:
            stats.update(prompt_tokens=len(tokens), prefilled_tokens=len(tokens) - keep,
                         generation_tokens=len(out), tokens_per_s=round(last.generation_tps, 2),
                         finish_reason="interrupted" if interrupted else last.finish_reason)
            self.replies += 1
            self.tokens += len(out)
            self.prefilled += len(tokens) - keep
            if last.generation_tps > 0:
                self.decode_s += last.generation_tokens / last.generation_tps
        self.last = stats
        return {"text": reply, "tokens": out, "stats": stats, "interrupted": interrupted,
                "dropped": dropped}

    # -- stats ---------------------------------------------------------------------------------

    def stats(self) -> dict:
        """Session figures: tokens/s, flash per token, cache hit rate, memory vs the budget."""
        state = state_of(self.model)
        s = {"mode": state.mode, "replies": self.replies,
             "generated_tokens": self.tokens, "prefilled_tokens": self.prefilled,
             "tokens_per_s": round(self.tokens / self.decode_s, 2) if self.decode_s else None,
             "context_tokens": len(self.cached), "max_context": self.max_context}
        s.update(state.stats(since=self._since))
        kv = sum(c.nbytes for c in self.cache)
        budget = state.budget
        if budget is not None and state.streaming:
            # What the budget pays for, with the KV cache as allocated now rather than reserved.
            parts = {"resident_bytes": budget.resident, "neuron_cache_bytes": budget.neuron_cache,
                     "buffer_bytes": budget.buffers + budget.other,
                     "computing_bytes": budget.working}
        else:
            parts = {"resident_bytes": sum(v.nbytes for _, v in tree_flatten(self.model.parameters()))}
        s.update(parts, kv_cache_bytes=kv, model_memory_bytes=sum(parts.values()) + kv,
                 rss_bytes=platform.current_rss_bytes())
        if budget is not None:
            s["kv_cache_reserved_bytes"] = budget.kv_cache
        return s


# -- terminal ------------------------------------------------------------------------------------

def format_stats(s: dict) -> str:
    """The `/stats` report."""
    tps = f"{s['tokens_per_s']:.1f} tok/s" if s["tokens_per_s"] else "no tokens yet"
    lines = [f"session   {s['replies']} replies, {s['generated_tokens']} tokens generated, {tps}; "
             f"{s['prefilled_tokens']} prompt tokens prefilled; mode {s['mode']}"]
    if s.get("flash_bytes_per_token") is not None:
        hit = s.get("cache_hit_rate")
        lines.append(
            f"flash     {mib(s['flash_bytes_per_token'])}/token in "
            f"{s['read_requests_per_token']:.0f} reads, cache hit rate "
            f"{'n/a' if hit is None else f'{hit:.0%}'}; I/O {s['io_ms_per_token']:.1f} ms + cache "
            f"{s['cache_ms_per_token']:.1f} ms per token")
    else:
        lines.append("flash     none: the whole model is in memory")
    budget = s.get("memory_budget_bytes")
    of = f" of a {mib(budget)} budget" if budget else ""
    parts = [f"{name} {mib(s[key])}" for name, key in (
        ("resident", "resident_bytes"), ("neuron caches", "neuron_cache_bytes"),
        ("buffers", "buffer_bytes"), ("computing", "computing_bytes"),
        ("KV cache", "kv_cache_bytes")) if key in s]
    lines.append(f"memory    {mib(s['model_memory_bytes'])} in use{of}: {', '.join(parts)}")
    lines.append(f"process   RSS {mib(s['rss_bytes'])}, peak {mib(s['peak_rss_bytes'])} "
                 "(with the Python and MLX runtime)")
    lines.append(f"context   {s['context_tokens']} of {s['max_context']} tokens")
    for r in s.get("distributed_ranks", []):  # under mlx.launch; the lines above are rank 0's
        flash = r.get("flash_bytes_per_token")
        lines.append(f"rank {r['rank']:<4} layers {r['layers'][0]}-{r['layers'][1] - 1}, mode "
                     f"{r['mode']}, resident {mib(r['resident_bytes'])}, "
                     + ("no flash" if flash is None else f"flash {mib(flash)}/token"))
    return "\n".join(lines)


@contextmanager
def loading(path: str | Path, stream=None):
    """On a terminal, a live `loading PATH` status (rich) while the block runs; then the time
    taken. Anything written to stderr meanwhile (notes, an error) prints above the status."""
    from rich.console import Console

    stream = stream or sys.stderr
    tic = time.perf_counter()
    if stream.isatty():
        with Console(file=stream).status(f"loading {path}"):
            yield
    else:
        yield
    stream.write(f"loaded {Path(path).name} in {time.perf_counter() - tic:.1f} s\n")
    stream.flush()


def banner(session: ChatSession) -> str:
    state = state_of(session.model)
    extra = f", budget {mib(state.budget.total)}" if state.streaming else ""
    fmt = "chat template" if session.template else "plain-text turns (no chat template)"
    return (f"mode {state.mode}{extra}, context {session.max_context} tokens, {fmt}.\n"
            "Type a message; /help lists commands, /quit or Ctrl-D leaves.")


def _streamer(out) -> Callable[[str], None]:
    """Write reply pieces as they come, without the reply's leading whitespace."""
    started = False

    def write(piece: str) -> None:
        nonlocal started
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        out.write(piece)
        out.flush()

    return write


def repl(session: ChatSession, quiet: bool = False, read: Callable[[str], str] = input,
         out=None, err=None) -> None:
    """The interactive loop: read a line, stream the reply, repeat until /quit or Ctrl-D."""
    out, err = out or sys.stdout, err or sys.stderr
    if read is input and sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass

    def say(text: str, stream=None) -> None:
        stream = stream or out
        stream.write(text + "\n")
        stream.flush()

    say(banner(session), err)
    while True:
        try:
            line = read(">> ").strip()
        except EOFError:
            say("")
            return
        except KeyboardInterrupt:
            say("\n(/quit or Ctrl-D leaves)")
            continue
        if not line:
            continue
        if line.startswith("/"):
            cmd = line.split()[0].lower()
            if cmd in ("/quit", "/exit", "/q"):
                return
            if cmd == "/reset":
                session.reset()
                say("(conversation cleared)")
            elif cmd == "/stats":
                say(format_stats(session.stats()))
            elif cmd == "/help":
                say(HELP)
            else:
                say(f"unknown command {cmd}; /help lists the commands")
            continue
        try:
            result = session.reply(line, on_text=_streamer(out),
                                   on_notice=lambda msg: say(f"({msg})", err))
        except FlashError as e:
            say(f"error: {str(e).splitlines()[0]}", err)
            continue
        say("")
        if result["interrupted"]:
            say("[interrupted]", err)
        if not quiet:
            say(stats_line(result["stats"]), err)
