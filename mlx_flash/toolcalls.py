"""A reply's text split as it streams into its answer, its reasoning and its tool calls.

The markers are the tokenizer's, as mlx-lm found them for the model's family (its
`TokenizerWrapper`: `think_start`/`think_end`, `tool_call_start`/`tool_call_end`), and a tool
call's text is parsed by mlx-lm's parser of that family (`tool_parser`: Qwen's JSON, Qwen3-Coder's
XML, GLM, Mistral, Kimi, MiniMax, gpt-oss...). A model's reply streams through `Splitter.feed`
piece by piece; text that may begin a marker is held until it cannot.
"""

from __future__ import annotations

import json
import uuid

TEXT, REASONING, TOOL = "text", "reasoning", "tool"


def tool_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def opens_in_reasoning(tokenizer, prompt: list[int]) -> bool:
    """The prompt ends inside a think block (a template that opens `<think>` for the reply)."""
    if not getattr(tokenizer, "has_thinking", False):
        return False
    start = tokenizer.rfind_think_start(prompt)
    return start >= 0 and start > tokenizer.rfind_think_end(prompt)


class Splitter:
    """Pieces of a reply -> events ("text", str), ("reasoning", str), ("tool_call", call) where
    a call is {"id", "name", "arguments"} (arguments a dict, or the raw string a parser gave).

    `tools`: the request's tools (None or empty: tool calls stay in the text, as without
    parsing); `reasoning`: the reply starts inside a think block."""

    def __init__(self, tokenizer, tools: list | None = None, reasoning: bool = False):
        self.parser = getattr(tokenizer, "tool_parser", None) if tools else None
        self.tools = tools
        self.opens = {}  # state -> (marker that opens it, marker that closes it)
        if getattr(tokenizer, "has_thinking", False):
            self.opens[REASONING] = (tokenizer.think_start, tokenizer.think_end)
        if self.parser is not None and getattr(tokenizer, "has_tool_calling", False):
            self.opens[TOOL] = (tokenizer.tool_call_start, tokenizer.tool_call_end or "")
        self.state = REASONING if reasoning and REASONING in self.opens else TEXT
        self.buf = ""
        self.calls = 0

    def _emit(self, text: str) -> list:
        return [(self.state, text)] if text and self.state != TOOL else []

    def feed(self, piece: str) -> list:
        self.buf += piece
        out = []
        while True:
            if self.state == TEXT:
                found = [(i, s) for s, (start, _) in self.opens.items()
                         if start and (i := self.buf.find(start)) >= 0]
                if not found:
                    break
                i, state = min(found)
                out += self._emit(self.buf[:i])
                self.buf, self.state = self.buf[i + len(self.opens[state][0]):], state
                continue
            end = self.opens[self.state][1]
            i = self.buf.find(end) if end else -1
            if i < 0:
                break
            if self.state == TOOL:
                out += self._calls(self.buf[:i])
            else:
                out += self._emit(self.buf[:i])
            self.buf, self.state = self.buf[i + len(end):], TEXT
        if self.state == TOOL:
            return out
        markers = ([m for m, _ in self.opens.values() if m] if self.state == TEXT
                   else [self.opens[self.state][1]])
        keep = max((k for m in markers for k in range(1, len(m))
                    if self.buf.endswith(m[:k])), default=0)
        cut = len(self.buf) - keep
        out += self._emit(self.buf[:cut])
        self.buf = self.buf[cut:]
        return out

    def finish(self) -> list:
        """What is held at the end: an unclosed tool call parsed (a model may end with EOS
        where the end marker would be), else the text as it is."""
        text, self.buf = self.buf, ""
        if self.state == TOOL:
            self.state = TEXT
            return self._calls(text, closed=False)
        return self._emit(text)

    def _calls(self, text: str, closed: bool = True) -> list:
        """The tool calls of one marked span; a span the parser cannot read (or an empty one)
        is kept as text, with the markers it had."""
        start, end = self.opens[TOOL]
        as_text = [(TEXT, start + text + (end if closed else ""))]
        if not text.strip():
            return as_text
        try:
            parsed = self.parser(text, self.tools)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return as_text
        out = []
        for call in parsed if isinstance(parsed, list) else [parsed]:
            if not isinstance(call, dict) or "name" not in call:
                continue
            args = call.get("arguments", {})
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    pass
            out.append(("tool_call", {"id": call.get("id") or tool_call_id(),
                                      "name": call["name"], "arguments": args}))
        self.calls += len(out)
        return out
