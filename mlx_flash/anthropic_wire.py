"""The Anthropic Messages API (`POST /v1/messages`) on the wire: a request checked into the
server's `Request` (its content blocks as the chat template's messages: tool_use blocks as an
assistant's tool calls, tool_result blocks as tool messages), and the answer as a message or as
its stream of server-sent events; errors in Anthropic's shape.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

from .wire import ApiError, Request, check_model, load_json, options

FIELDS = {"max_tokens": "max_tokens", "temperature": "temp", "top_p": "top_p",
          "top_k": "top_k", "stop_sequences": "stop"}
ERRORS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 411: "invalid_request_error", 413: "request_too_large",
          429: "rate_limit_error", 503: "overloaded_error"}


def error_body(e: ApiError) -> dict:
    return {"type": "error", "error": {"type": ERRORS.get(e.status, "api_error"),
                                       "message": str(e)}}


def _text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(b, dict) and b.get("type") == "text"
                                         and isinstance(b.get("text"), str) for b in content):
        return "".join(b["text"] for b in content)
    raise ApiError(400, f"{where} must be a string or a list of text blocks")


def _blocks(m: dict, where: str) -> list[dict]:
    """One Anthropic message as the template's messages (a user turn's tool results first)."""
    content = m.get("content")
    if isinstance(content, str):
        return [{"role": m["role"], "content": content}]
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or a list of content blocks")
    text, calls, results = [], [], []
    for j, b in enumerate(content):
        kind = b.get("type") if isinstance(b, dict) else None
        at = f"{where}.content[{j}]"
        if kind == "text" and isinstance(b.get("text"), str):
            text.append(b["text"])
        elif kind == "tool_use" and m["role"] == "assistant" and isinstance(b.get("name"), str):
            if not isinstance(b.get("input", {}), dict):
                raise ApiError(400, f"{at}.input must be an object")
            calls.append({"id": b.get("id"), "type": "function",
                          "function": {"name": b["name"], "arguments": b.get("input", {})}})
        elif kind == "tool_result" and m["role"] == "user":
            results.append({"role": "tool", "tool_call_id": b.get("tool_use_id"),
                            "content": _text(b.get("content", ""), f"{at}.content")})
        elif kind in ("thinking", "redacted_thinking") and m["role"] == "assistant":
            continue  # earlier reasoning is not shown to the model again (as templates do)
        else:
            raise ApiError(400, f"{at}: unsupported content block {kind!r} for a "
                           f"{m['role']} message (text, tool_use, tool_result)")
    out = results
    if m["role"] == "assistant":
        msg = {"role": "assistant", "content": "".join(text)}
        if calls:
            msg["tool_calls"] = calls
        out.append(msg)
    elif text or not results:
        out.append({"role": "user", "content": "".join(text)})
    return out


def _tools(value, choice) -> list | None:
    kind = choice.get("type") if isinstance(choice, dict) else choice
    if value is None or kind == "none":
        return None
    if kind not in (None, "auto"):
        raise ApiError(400, "tool_choice: only {\"type\": \"auto\"} and {\"type\": \"none\"} are "
                       "supported (a forced call needs constrained decoding)")
    if not isinstance(value, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                              for t in value):
        raise ApiError(400, "tools must be a list of {\"name\", \"description\", "
                       "\"input_schema\"}")
    return [{"type": "function", "function": {
        "name": t["name"], "description": t.get("description", ""),
        "parameters": t.get("input_schema", {"type": "object", "properties": {}})}}
        for t in value] or None


def parse(body: bytes, names: tuple[str, ...]) -> Request:
    """The Messages request of `body`, every field checked (ApiError if not)."""
    obj = load_json(body)
    check_model(obj, names)
    if obj.get("max_tokens") is None:
        raise ApiError(400, "max_tokens: Field required")
    opts = options(obj, FIELDS)
    stream = obj.get("stream") or False
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false")
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages must be a non-empty list")
    out = []
    if obj.get("system") is not None:
        out.append({"role": "system", "content": _text(obj["system"], "system")})
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise ApiError(400, f"messages.{i}: role must be \"user\" or \"assistant\"")
        out += _blocks(m, f"messages.{i}")
    # a last assistant message is the start of the reply (prefill): it is continued
    prefill = msgs[-1]["role"] == "assistant"
    return Request(True, out, opts, stream, tools=_tools(obj.get("tools"), obj.get("tool_choice")),
                   api="anthropic", extra={"model": obj.get("model"), "prefill": prefill})


# -- answers ---------------------------------------------------------------------------------

def message_id() -> str:
    return "msg_" + uuid.uuid4().hex[:24]


def usage(stats: dict) -> dict:
    cached = stats.get("cached_tokens", 0)
    return {"input_tokens": stats["prompt_tokens"] - cached,
            "output_tokens": stats["completion_tokens"],
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


def stop_reason(stats: dict, calls: int) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of a finished generation."""
    if stats["finish_reason"] == "length":
        return "max_tokens", None
    if stats.get("stop_sequence"):
        return "stop_sequence", stats["stop_sequence"]
    return ("tool_use" if calls else "end_turn"), None


def _tool_id(call: dict) -> str:
    return "toolu_" + call["id"].removeprefix("call_")


def content(events: list) -> list[dict]:
    """The content blocks of a reply's split events (toolcalls.Splitter), in order."""
    blocks = []
    for kind, value in events:
        if kind == "tool_call":
            blocks.append({"type": "tool_use", "id": _tool_id(value), "name": value["name"],
                           "input": value["arguments"] if isinstance(value["arguments"], dict)
                           else {}})
            continue
        kind, key = ("thinking", "thinking") if kind == "reasoning" else ("text", "text")
        if blocks and blocks[-1]["type"] == kind:
            blocks[-1][key] += value
        else:
            blocks.append({"type": kind, key: value, **({"signature": ""} if kind == "thinking"
                                                         else {})})
    return blocks or [{"type": "text", "text": ""}]


def message(msg_id: str, model: str, events: list, stats: dict, calls: int) -> dict:
    reason, sequence = stop_reason(stats, calls)
    return {"id": msg_id, "type": "message", "role": "assistant", "model": model,
            "content": content(events), "stop_reason": reason, "stop_sequence": sequence,
            "usage": usage(stats)}


class Events:
    """The stream of one reply as Anthropic's server-sent events, written by `send(event, obj)`:
    message_start, a content block per run of text, thinking or a tool use, message_delta with
    the stop reason and usage, message_stop."""

    def __init__(self, send: Callable[[str, dict], None]):
        self.send, self.index, self.open = send, -1, None

    def start(self, msg_id: str, model: str, prompt_tokens: int, cached: int) -> None:
        self.send("message_start", {"type": "message_start", "message": {
            "id": msg_id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": prompt_tokens - cached, "output_tokens": 0,
                      "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}}})

    def _close(self) -> None:
        if self.open is not None:
            self.send("content_block_stop", {"type": "content_block_stop", "index": self.index})
            self.open = None

    def _block(self, kind: str, block: dict) -> None:
        if self.open != kind or kind == "tool_use":
            self._close()
            self.index += 1
            self.open = kind
            self.send("content_block_start", {"type": "content_block_start",
                                              "index": self.index, "content_block": block})

    def piece(self, kind: str, value) -> None:
        if kind == "tool_call":
            self._block("tool_use", {"type": "tool_use", "id": _tool_id(value),
                                     "name": value["name"], "input": {}})
            args = value["arguments"]
            self.send("content_block_delta", {
                "type": "content_block_delta", "index": self.index,
                "delta": {"type": "input_json_delta", "partial_json":
                          args if isinstance(args, str) else json.dumps(args)}})
            self._close()
        elif kind == "reasoning":
            self._block("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            self.send("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                              "delta": {"type": "thinking_delta",
                                                        "thinking": value}})
        else:
            self._block("text", {"type": "text", "text": ""})
            self.send("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                              "delta": {"type": "text_delta", "text": value}})

    def end(self, stats: dict, calls: int) -> None:
        if self.index < 0:  # an empty reply still has its one (empty) text block
            self._block("text", {"type": "text", "text": ""})
        self._close()
        reason, sequence = stop_reason(stats, calls)
        self.send("message_delta", {"type": "message_delta",
                                    "delta": {"stop_reason": reason, "stop_sequence": sequence},
                                    "usage": {"output_tokens": stats["completion_tokens"]}})
        self.send("message_stop", {"type": "message_stop"})

    def error(self, e: ApiError) -> None:
        self.send("error", error_body(e))
