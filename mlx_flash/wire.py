"""What `mlx-flash serve` reads and writes on the wire for OpenAI's API: a request checked field
by field into a `Request`, and the response objects and stream chunks of one (the Anthropic
Messages API's are in anthropic_wire.py).

Messages become the chat template's: `{"role", "content"}`, an assistant's `tool_calls` with
their arguments as objects (what templates render), and `tool` messages with the results.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .batch import OPTIONS

MAX_BODY = 8 * 2**20
# OpenAI request fields -> `stream_generate` keywords, each checked as a batch line's option is.
FIELDS = {"max_tokens": "max_tokens", "max_completion_tokens": "max_tokens",
          "temperature": "temp", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
          "repetition_penalty": "repetition_penalty", "seed": "seed", "stop": "stop"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
         "tool": "tool"}
ROUTES = {"/v1/completions": False, "/v1/chat/completions": True}  # path -> chat?


class ApiError(Exception):
    """A request the server refuses: an HTTP `status` and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code=None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        kind = ("authentication_error" if self.status == 401 else
                "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": str(self), "type": kind, "param": self.param,
                          "code": self.code}}


@dataclass
class Request:
    """A checked request: `prompt` is the messages (chat), a text or token ids (completion).
    `api`: "openai" or "anthropic" (the shape of its answer); `tools`: the function tools in
    OpenAI's form (what chat templates take), None for none."""

    chat: bool
    prompt: str | list
    options: dict
    stream: bool = False
    usage: bool = False  # stream_options.include_usage: a last chunk with the token counts
    tools: list | None = None
    api: str = "openai"
    extra: dict = field(default_factory=dict)  # what the answer echoes (anthropic: the model)


def text_of(content, where: str) -> str:
    """A message's content as text: a string or text parts."""
    if content is None:
        return ""
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") in ("text", "input_text")
                   and isinstance(p.get("text"), str) for p in content):
            raise ApiError(400, f"{where}: only text content parts are supported", where)
        return "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ApiError(400, f"{where}.content must be a string or text parts", where)
    return content


def arguments(value, where: str) -> dict:
    """A tool call's arguments as an object (OpenAI sends them as a JSON string)."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError:
            raise ApiError(400, f"{where}: arguments are not valid JSON", where) from None
    if not isinstance(value, dict):
        raise ApiError(400, f"{where}: arguments must be a JSON object", where)
    return value


def _tool_calls(value, where: str) -> list[dict]:
    if not isinstance(value, list):
        raise ApiError(400, f"{where}.tool_calls must be a list", where)
    out = []
    for j, call in enumerate(value):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ApiError(400, f"{where}.tool_calls[{j}] must have a function with a name", where)
        out.append({"id": call.get("id"), "type": "function", "function": {
            "name": fn["name"], "arguments": arguments(fn.get("arguments", {}), where)}})
    return out


def messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"{where} must be an object with a role: {', '.join(ROLES)}", where)
        msg = {"role": ROLES[m["role"]], "content": text_of(m.get("content"), where)}
        if m["role"] == "assistant" and m.get("tool_calls"):
            msg["tool_calls"] = _tool_calls(m["tool_calls"], where)
        if m["role"] == "tool":
            msg["tool_call_id"] = m.get("tool_call_id")
            if m.get("name"):
                msg["name"] = m["name"]
        out.append(msg)
    return out


def tools_of(value, choice) -> list | None:
    """The request's function tools (None: none, or `tool_choice` "none"). A choice that would
    force a call is refused: nothing here constrains decoding to a call."""
    if value is None or choice == "none":
        return None
    if choice not in (None, "auto"):
        raise ApiError(400, "tool_choice: only \"auto\" and \"none\" are supported (a forced "
                       "call needs constrained decoding)", "tool_choice")
    if not isinstance(value, list) or not all(
            isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"),
                                                                                 dict)
            and isinstance(t["function"].get("name"), str) for t in value):
        raise ApiError(400, "tools must be a list of {\"type\": \"function\", \"function\": "
                       "{\"name\", \"description\", \"parameters\"}}", "tools")
    return value or None


def _prompt(value) -> str | list[int]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if isinstance(value, str) or (isinstance(value, list) and value and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)):
        return value
    raise ApiError(400, "prompt must be a string or a list of token ids (one prompt a request)",
                   "prompt")


def options(obj: dict, fields: dict) -> dict:
    """Generation options of a request's fields (`fields`: its name -> ours), each checked."""
    out = {}
    for key, ours in fields.items():
        if (value := obj.get(key)) is None:
            continue
        check, want = OPTIONS[ours]
        if not check(value):
            raise ApiError(400, f"{key} must be {want}", key)
        out[ours] = value
    return out


def load_json(body: bytes) -> dict:
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return obj


def check_model(obj: dict, names: tuple[str, ...]) -> None:
    model = obj.get("model")
    if model is not None and model not in names:
        raise ApiError(404, f"model {model!r} is not served here; this server serves "
                       f"{names[0]!r}", "model", "model_not_found")


def parse(path: str, body: bytes, names: tuple[str, ...]) -> Request:
    """The request of `body` for the OpenAI endpoint `path`, every field checked (ApiError if
    not). `names`: the model names this server answers to (the first is the one it reports)."""
    obj = load_json(body)
    check_model(obj, names)
    stream = obj.get("stream") or False
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", "stream")
    if obj.get("n") not in (None, 1):
        raise ApiError(400, "only n=1 is supported", "n")
    opts = options(obj, FIELDS)
    if not isinstance(stream_options := obj.get("stream_options") or {}, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    chat = ROUTES[path]
    prompt = messages(obj.get("messages")) if chat else _prompt(obj.get("prompt"))
    tools = tools_of(obj.get("tools"), obj.get("tool_choice")) if chat else None
    return Request(chat, prompt, opts, stream, bool(stream_options.get("include_usage")), tools)


# -- answers ---------------------------------------------------------------------------------

def usage(stats: dict) -> dict:
    p, c = stats["prompt_tokens"], stats["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": stats.get("cached_tokens", 0)}}


def tool_call(call: dict, index: int | None = None) -> dict:
    out = {"id": call["id"], "type": "function", "function": {
        "name": call["name"], "arguments": call["arguments"] if isinstance(call["arguments"], str)
        else json.dumps(call["arguments"], ensure_ascii=False)}}
    return out if index is None else {"index": index, **out}


def finish_reason(stats: dict, calls: int) -> str:
    return "tool_calls" if calls and stats["finish_reason"] == "stop" else stats["finish_reason"]
