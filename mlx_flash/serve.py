"""An OpenAI-compatible HTTP server over one loaded model: what `mlx-flash serve` runs.

Not mlx-lm's server (`mlx_lm.server`), which breaks a flash model's promises: it batches
concurrent requests through `BatchGenerator` when the KV caches can merge (ours can), so a decode
step carries several sequences where a flash FFN's step follows one (its neuron window, cache and
per-token counters); it keeps past requests' KV caches in an LRU cache beyond the budget's
one-context reservation; its `main` raises the wired limit for the whole process; its errors are
not OpenAI's error objects and its responses have no room for our figures.

Here `ThreadingHTTPServer` reads and checks each request in its own thread; the thread that
loaded the model (MLX ties a lazy array to the stream of the thread that made it) runs them from
a FIFO queue one at a time, in arrival order, through `generation.stream_generate`, so the
budget, `fit_context`, the flash stats and Ctrl-C between tokens hold as for `mlx-flash
generate`. Text goes back to the request's thread over a queue; a client gone mid-stream makes a
write fail and its generation stops at the next token.
"""

from __future__ import annotations

import json
import queue
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import mlx.core as mx

from . import platform
from .batch import OPTIONS
from .chat import PLAIN_STOP, ChatSession
from .errors import FlashError
from .generation import context_limit, encode, fit_context, stream_generate
from .state import state_of
from .units import mib

MAX_BODY = 8 * 2**20
# OpenAI request fields -> `stream_generate` keywords, each checked as a batch line's option is.
FIELDS = {"max_tokens": "max_tokens", "max_completion_tokens": "max_tokens",
          "temperature": "temp", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
          "repetition_penalty": "repetition_penalty", "seed": "seed", "stop": "stop"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
ROUTES = {"/v1/completions": False, "/v1/chat/completions": True}  # path -> chat?


class ApiError(Exception):
    """A request the server refuses: an HTTP `status` and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code=None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param,
                          "code": self.code}}


@dataclass
class Request:
    """A checked request: `prompt` is the messages (chat), a text or token ids (completion)."""

    chat: bool
    prompt: str | list
    options: dict
    stream: bool = False
    usage: bool = False  # stream_options.include_usage: a last chunk with the token counts


@dataclass
class Job:
    """A request in the queue; the worker answers on `events`: ("start", None), ("text", str),
    ("done", stats) or ("error", ApiError). `cancelled`: the client is gone."""

    request: Request
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued: float = field(default_factory=time.perf_counter)


def _messages(value) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"{where} must be an object with a role: {', '.join(ROLES)}", where)
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise ApiError(400, f"{where}: only text content parts are supported", where)
            content = "".join(p["text"] for p in content)
        if content is None and m["role"] == "assistant":
            content = ""
        if not isinstance(content, str):
            raise ApiError(400, f"{where}.content must be a string", where)
        out.append({"role": ROLES[m["role"]], "content": content})
    return out


def _prompt(value) -> str | list[int]:
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if isinstance(value, str) or (isinstance(value, list) and value and all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)):
        return value
    raise ApiError(400, "prompt must be a string or a list of token ids (one prompt a request)",
                   "prompt")


def parse(path: str, body: bytes, names: tuple[str, ...]) -> Request:
    """The request of `body` for the endpoint `path`, every field checked (ApiError if not).

    `names`: the model names this server answers to (the first is the one it reports)."""
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = obj.get("model")
    if model is not None and model not in names:
        raise ApiError(404, f"model {model!r} is not served here; this server serves "
                       f"{names[0]!r}", "model", "model_not_found")
    stream = obj.get("stream") or False
    if not isinstance(stream, bool):
        raise ApiError(400, "stream must be true or false", "stream")
    if obj.get("n") not in (None, 1):
        raise ApiError(400, "only n=1 is supported", "n")
    options = {}
    for key, ours in FIELDS.items():
        if (value := obj.get(key)) is None:
            continue
        check, want = OPTIONS[ours]
        if not check(value):
            raise ApiError(400, f"{key} must be {want}", key)
        options[ours] = value
    if not isinstance(stream_options := obj.get("stream_options") or {}, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    chat = ROUTES[path]
    prompt = _messages(obj.get("messages")) if chat else _prompt(obj.get("prompt"))
    return Request(chat, prompt, options, stream, bool(stream_options.get("include_usage")))


class Service:
    """The model, its names and figures, and the generation loop that takes jobs in arrival
    order and runs each to its end; the handlers share it."""

    def __init__(self, model, tokenizer, name: str, defaults: dict, log: Callable[[str], None]):
        self.model, self.tokenizer, self.name, self.log = model, tokenizer, name, log
        self.names, self.defaults = (name, "default_model"), defaults
        self.chat = ChatSession(model, tokenizer)  # renders messages: template or plain turns
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.running, self.stopping = threading.Event(), threading.Event()
        self.running.set()  # cleared when `run` ends: requests still waiting then get a 503
        self.counts: Counter = Counter(served=0, cancelled=0, rejected=0, failed=0)
        self.created, self.loaded_rss = int(time.time()), platform.current_rss_bytes()

    def run(self) -> None:
        """Answer jobs until `stopping` is set or Ctrl-C (in the thread that loaded the model)."""
        try:
            while not self.stopping.is_set():
                try:
                    job = self.jobs.get(timeout=0.2)
                except queue.Empty:
                    continue
                try:
                    self._run(job)
                except ApiError as e:
                    self.counts["rejected"] += 1
                    job.events.put(("error", e))
                except KeyboardInterrupt:
                    job.events.put(("error", ApiError(503, "the server is shutting down")))
                    raise
                except Exception as e:  # a bug: answer 500 and keep serving
                    self.counts["failed"] += 1
                    job.events.put(("error", ApiError(500, f"generation failed: {e!r}")))
        finally:
            self.running.clear()

    def _tokens(self, req: Request) -> list[int]:
        if req.chat:
            try:
                tokens = self.chat.render(req.prompt)
            except Exception as e:  # the template's own checks (roles, order)
                raise ApiError(400, f"the chat template cannot render these messages: {e}",
                               "messages") from None
        elif isinstance(req.prompt, str):
            tokens = encode(self.tokenizer, req.prompt)
        else:
            tokens = req.prompt
            vocab = getattr(getattr(self.model, "args", None), "vocab_size", None)
            if vocab and max(tokens) >= vocab:
                raise ApiError(400, f"token id {max(tokens)} is past the vocabulary ({vocab})",
                               "prompt")
        if not tokens:
            raise ApiError(400, "the prompt is empty", "prompt")
        return tokens

    def _run(self, job: Job) -> None:
        req, tic = job.request, time.perf_counter()
        tokens = self._tokens(req)
        opts = {**self.defaults, **req.options}
        try:
            max_tokens = fit_context(self.model, len(tokens), opts.pop("max_tokens"))
        except FlashError as e:
            raise ApiError(400, str(e), "messages" if req.chat else "prompt",
                           "context_length_exceeded") from None
        stop = opts.pop("stop", None)
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        if req.chat and not self.chat.template:
            stop += PLAIN_STOP  # a plain-text reply ends where a new turn starts
        job.events.put(("start", None))
        eos = self.tokenizer.eos_token_ids
        n, last, cancelled = 0, None, False
        gen = stream_generate(self.model, self.tokenizer, tokens, max_tokens=max_tokens,
                              stop=stop, **opts)
        try:
            for last in gen:
                n += not (last.finish_reason == "stop" and last.token in eos)
                if last.text:
                    job.events.put(("text", last.text))
                if cancelled := job.cancelled.is_set():
                    break
        finally:
            gen.close()
        self.counts["cancelled" if cancelled else "served"] += 1
        job.events.put(("done", {
            **last.stats, "prompt_tokens": len(tokens), "completion_tokens": n,
            "prompt_tps": round(last.prompt_tps, 2), "tokens_per_s": round(last.generation_tps, 2),
            "finish_reason": "cancelled" if cancelled else last.finish_reason or "length",
            "queue_ms": round(1000 * (tic - job.queued), 1),
            "wall_ms": round(1000 * (time.perf_counter() - tic), 1)}))

    def health(self) -> dict:
        """Liveness, the queue, request counts, the budget and the memory in use."""
        state = state_of(self.model)
        return {"status": "ok" if self.running.is_set() else "stopping", "model": self.name,
                "mode": state.mode, "max_context": context_limit(self.model),
                "memory_budget_bytes": state.budget.total if state.budget else None,
                "rss_bytes": platform.current_rss_bytes(),
                "peak_rss_bytes": platform.peak_rss_bytes(), "loaded_rss_bytes": self.loaded_rss,
                # the RSS before the model (what --memory does not cover)
                "base_rss_bytes": state.base_rss_bytes,
                "mlx_active_bytes": mx.get_active_memory(), "mlx_peak_bytes": mx.get_peak_memory(),
                "queued": self.jobs.qsize(), "requests": dict(self.counts)}

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model",
                                            "created": self.created, "owned_by": "mlx-flash"}]}


class Handler(BaseHTTPRequestHandler):
    """One connection: GET /health and /v1/models; POST the two completion endpoints."""

    server_version = "mlx-flash"
    timeout = 60  # a client that sends nothing for this long is dropped

    @property
    def service(self) -> Service:
        return self.server.service

    def log_message(self, format, *args) -> None:
        self.service.log(f"{self.address_string()} {format % args}")

    def _json(self, status: int, obj: dict, headers: dict | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        routes = {"/health": self.service.health, "/v1/models": self.service.models}
        if self.path not in routes:
            return self._json(404, ApiError(404, f"no such endpoint: GET {self.path}").body())
        self._json(200, routes[self.path]())

    def _body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise ApiError(411, "a Content-Length header is required (no chunked bodies)") from None
        if not 0 <= length <= MAX_BODY:
            raise ApiError(413, f"the body must be at most {MAX_BODY} bytes")
        return self.rfile.read(length)

    def do_POST(self) -> None:
        job = None
        try:
            try:
                if self.path not in ROUTES:
                    raise ApiError(404, f"no such endpoint: POST {self.path}")
                req = parse(self.path, self._body(), self.service.names)
                self.service.jobs.put(job := Job(req))
                if (event := self._next(job))[0] == "error":
                    raise event[1]
            except ApiError as e:
                self.close_connection = True
                return self._json(e.status, e.body())
            self.req, self.created = req, int(time.time())
            self.id = ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex[:24]
            (self._stream if req.stream else self._whole)(job)
        except OSError:  # the client is gone: its generation stops at the next token
            if job is not None:
                job.cancelled.set()
            self.close_connection = True

    def _next(self, job: Job) -> tuple[str, object]:
        while True:
            try:
                return job.events.get(timeout=1.0)
            except queue.Empty:
                if not self.service.running.is_set():
                    return "error", ApiError(503, "the server is shutting down")

    def _obj(self, text: str, finish: str | None, stream: bool = False, role: bool = False):
        """An OpenAI response object of this request: the whole response or a stream chunk."""
        if not self.req.chat:
            obj, choice = "text_completion", {"text": text, "logprobs": None}
        elif stream:
            delta = {"role": "assistant", "content": text} if role else {"content": text}
            obj, choice = "chat.completion.chunk", {"delta": delta if text or role else {}}
        else:
            obj, choice = "chat.completion", {"message": {"role": "assistant", "content": text}}
        return {"id": self.id, "object": obj, "created": self.created,
                "model": self.service.name,
                "choices": [{"index": 0, **choice, "finish_reason": finish}]}

    def _whole(self, job: Job) -> None:
        pieces = []
        while (event := self._next(job))[0] == "text":
            pieces.append(event[1])
        kind, value = event
        if kind == "error":
            return self._json(value.status, value.body())
        body = self._obj("".join(pieces), value["finish_reason"])
        body.update(usage=_usage(value), x_flash=value)
        self._json(200, body, {"X-Flash-Stats": json.dumps(value, separators=(",", ":"))})

    def _stream(self, job: Job) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.close_connection = True
        if self.req.chat:
            self._event(self._obj("", None, stream=True, role=True))
        while (event := self._next(job))[0] == "text":
            self._event(self._obj(event[1], None, stream=True))
        kind, value = event
        if kind == "error":  # after the headers: an error event, as OpenAI sends
            self._event(value.body())
        else:
            self._event({**self._obj("", value["finish_reason"], stream=True), "x_flash": value})
            if self.req.usage:
                self._event({**self._obj("", None, stream=True), "choices": [],
                             "usage": _usage(value)})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _event(self, obj: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.wfile.flush()


def _usage(stats: dict) -> dict:
    p, c = stats["prompt_tokens"], stats["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve(model, tokenizer, name: str, host: str = "127.0.0.1", port: int = 8080,
          defaults: dict | None = None, on_ready: Callable[[str], None] | None = None,
          log: Callable[[str], None] | None = None) -> None:
    """Serve `model` over OpenAI's HTTP API on `host:port` (0: a free port) until Ctrl-C.

    `name`: the model id clients see. `defaults`: generation options of requests that give
    none (`max_tokens`, `temp`, `top_p`, `repetition_penalty`). `on_ready` receives the line
    saying where it listens; `log` one line a request. Generation runs in the calling thread,
    which must be the one that loaded `model`. SIGINT or SIGTERM stop it (the current
    generation at its next token) and `serve` returns.
    """
    defaults = {"max_tokens": 256, **{k: v for k, v in (defaults or {}).items() if v is not None}}
    service = Service(model, tokenizer, name, defaults, log or (lambda line: None))
    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        raise FlashError(f"cannot listen on {host}:{port}: {e.strerror or e} "
                         "(try another --port)") from None
    server.service = service  # what `Handler.service` reads; its threads are daemons already
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="http",
                     daemon=True).start()
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main else None
    if on_ready:
        state = state_of(model)
        budget = f", budget {mib(state.budget.total)}" if state.budget else ""
        on_ready(f"serving {name} (mode {state.mode}{budget}, context {context_limit(model)} "
                 f"tokens) on http://{host}:{server.server_port}/v1; Ctrl-C stops")
    try:
        service.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
        if main:
            signal.signal(signal.SIGTERM, previous)
