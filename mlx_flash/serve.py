"""An HTTP server over one loaded model for the tools people point at a local model: OpenAI's
API (`/v1/chat/completions`, `/v1/completions`) and Anthropic's (`/v1/messages`), with tool
calls, reasoning kept apart, and prompt caches reused across requests; `mlx-flash serve`.

Not mlx-lm's server (`mlx_lm.server`), which breaks a flash model's promises: it batches
concurrent requests through `BatchGenerator` when the KV caches can merge (ours can), so a decode
step carries several sequences where a flash FFN's step follows one (its neuron window, cache and
per-token counters); its LRU of past requests' KV caches is not counted in any budget; its
`main` raises the wired limit for the whole process; its errors are not OpenAI's error objects
and its responses have no room for our figures.

Here `ThreadingHTTPServer` reads and checks each request in its own thread; the thread that
loaded the model (MLX ties a lazy array to the stream of the thread that made it) runs them from
a FIFO queue one at a time, in arrival order, through `generation.stream_generate`, so the
budget, `fit_context`, the flash stats and Ctrl-C between tokens hold as for `mlx-flash
generate`. Each request takes the kept KV cache that shares the longest prefix with its prompt
(promptcache.py: `--prompt-caches` of them, each a context the budget reserves) and prefills
only the rest. Text goes back to the request's thread over a queue, where toolcalls.py splits it
into text, reasoning and tool calls; a client gone (mid-stream, or while a whole answer is
computed) stops its generation at the next token.
"""

from __future__ import annotations

import ipaddress
import json
import queue
import select
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from . import anthropic_wire, wire
from .errors import FlashError
from .generation import context_limit
from .service import Job, Service
from .state import state_of
from .toolcalls import Splitter
from .units import mib
from .wire import MAX_BODY, ROUTES, ApiError

MESSAGES = "/v1/messages"  # Anthropic's
POLL_S = 0.25  # how often a waiting request thread checks the server and its client


class Handler(BaseHTTPRequestHandler):
    """One connection: GET /health and /v1/models; POST the OpenAI completion endpoints and
    Anthropic's /v1/messages."""

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

    def _error(self, e: ApiError, api: str) -> None:
        self.close_connection = True
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        self._json(e.status, anthropic_wire.error_body(e) if api == "anthropic" else e.body(),
                   headers)

    def _unauthorized(self) -> ApiError | None:
        if self.service.authorized(self.headers):
            return None
        return ApiError(401, "invalid API key (send it as `Authorization: Bearer KEY` or "
                        "`x-api-key: KEY`)", code="invalid_api_key")

    def do_GET(self) -> None:
        routes = {"/health": self.service.health, "/v1/models": self.service.models}
        if self.path not in routes:
            return self._json(404, ApiError(404, f"no such endpoint: GET {self.path}").body())
        if self.path != "/health" and (e := self._unauthorized()):  # /health: liveness probes
            return self._error(e, "openai")
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
        job, api = None, "anthropic" if self.path == MESSAGES else "openai"
        try:
            try:
                if self.path not in ROUTES and self.path != MESSAGES:
                    raise ApiError(404, f"no such endpoint: POST {self.path}")
                body = self._body()
                if e := self._unauthorized():
                    raise e
                names = self.service.names
                req = (anthropic_wire.parse(body, names) if api == "anthropic"
                       else wire.parse(self.path, body, names))
                self.service.jobs.put(job := Job(req))
                kind, info = self._next(job, watch=True)
                if kind == "error":
                    raise info
                if kind == "gone":
                    return
            except ApiError as e:
                return self._error(e, api)
            self.req, self.info, self.created = req, info, int(time.time())
            self.id = (anthropic_wire.message_id() if api == "anthropic" else
                       ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex[:24])
            self.split = Splitter(self.service.tokenizer, req.tools, info["reasoning"]) \
                if req.chat else None
            if api == "anthropic":
                (self._anthropic_stream if req.stream else self._anthropic_whole)(job)
            else:
                (self._stream if req.stream else self._whole)(job)
        except OSError:  # the client is gone: its generation stops at the next token
            if job is not None:
                job.cancelled.set()
            self.close_connection = True

    def _gone(self) -> bool:
        """The client closed its end (a waiting socket that reads as end of file)."""
        try:
            ready, _, _ = select.select([self.connection], [], [], 0)
            return bool(ready) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _next(self, job: Job, watch: bool = False) -> tuple[str, object]:
        """The job's next event; ("gone", None) once its client left (`watch`: checked every
        POLL_S while nothing is written to it), its generation then cancelled."""
        while True:
            if watch and time.perf_counter() - getattr(self, "_watched", 0.0) > POLL_S:
                self._watched = time.perf_counter()
                if self._gone():
                    job.cancelled.set()
                    self.close_connection = True
                    return "gone", None
            try:
                return job.events.get(timeout=POLL_S)
            except queue.Empty:
                if not self.service.running.is_set():
                    return "error", ApiError(503, "the server is shutting down")

    def _feed(self, text: str) -> list:
        """A piece of the reply as split events (a completion's text as it is)."""
        return self.split.feed(text) if self.split else [("text", text)]

    def _finish(self) -> list:
        return self.split.finish() if self.split else []

    def _pieces(self, job: Job, watch: bool):
        """(split events of the reply's text, the last event: ("done", stats), ("error", e) or
        ("gone", None)), reading the whole reply."""
        events = []
        while (event := self._next(job, watch))[0] == "text":
            events += self._feed(event[1])
        if event[0] == "done":
            events += self._finish()
        return events, event

    # -- OpenAI --------------------------------------------------------------------------------

    def _obj(self, finish: str | None, stream: bool = False, **fields):
        """An OpenAI response object of this request: the whole response or a stream chunk;
        `fields`: the message's or the delta's (content, reasoning_content, tool_calls)."""
        if not self.req.chat:
            obj, choice = "text_completion", {"text": fields.get("content", ""), "logprobs": None}
        elif stream:
            obj, choice = "chat.completion.chunk", {"delta": fields}
        else:
            obj, choice = "chat.completion", {"message": {"role": "assistant", **fields}}
        return {"id": self.id, "object": obj, "created": self.created,
                "model": self.service.name,
                "choices": [{"index": 0, **choice, "finish_reason": finish}]}

    def _whole(self, job: Job) -> None:
        events, (kind, value) = self._pieces(job, watch=True)
        if kind == "gone":
            return
        if kind == "error":
            return self._json(value.status, value.body())
        text = "".join(v for k, v in events if k == "text")
        reasoning = "".join(v for k, v in events if k == "reasoning")
        calls = [wire.tool_call(v) for k, v in events if k == "tool_call"]
        fields = {"content": text if text or not calls else None}
        if reasoning:
            fields["reasoning_content"] = reasoning
        if calls:
            fields["tool_calls"] = calls
        body = self._obj(wire.finish_reason(value, len(calls)), **fields)
        body.update(usage=wire.usage(value), x_flash=value)
        self._json(200, body, {"X-Flash-Stats": json.dumps(value, separators=(",", ":"))})

    def _sse(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.close_connection = True

    def _stream(self, job: Job) -> None:
        self._sse()
        if self.req.chat:
            self._event(self._obj(None, stream=True, role="assistant", content=""))
        calls = 0
        while (event := self._next(job))[0] == "text":
            for kind, value in self._feed(event[1]):
                calls += self._delta(kind, value, calls)
        kind, value = event
        if kind == "error":  # after the headers: an error event, as OpenAI sends
            self._event(value.body())
        else:
            for k, v in self._finish():
                calls += self._delta(k, v, calls)
            self._event({**self._obj(wire.finish_reason(value, calls), stream=True),
                         "x_flash": value})
            if self.req.usage:
                self._event({**self._obj(None, stream=True), "choices": [],
                             "usage": wire.usage(value)})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _delta(self, kind: str, value, index: int) -> int:
        """One split event as a chunk; 1 for a tool call (its index), else 0."""
        if kind == "tool_call":
            self._event(self._obj(None, stream=True, tool_calls=[wire.tool_call(value, index)]))
            return 1
        key = "reasoning_content" if kind == "reasoning" else "content"
        self._event(self._obj(None, stream=True, **{key: value}))
        return 0

    def _event(self, obj: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.wfile.flush()

    # -- Anthropic -----------------------------------------------------------------------------

    def _model(self) -> str:
        return self.req.extra.get("model") or self.service.name

    def _anthropic_whole(self, job: Job) -> None:
        events, (kind, value) = self._pieces(job, watch=True)
        if kind == "gone":
            return
        if kind == "error":
            return self._error(value, "anthropic")
        calls = sum(k == "tool_call" for k, _ in events)
        body = anthropic_wire.message(self.id, self._model(), events, value, calls)
        self._json(200, {**body, "x_flash": value},
                   {"X-Flash-Stats": json.dumps(value, separators=(",", ":"))})

    def _anthropic_stream(self, job: Job) -> None:
        self._sse()

        def send(name: str, obj: dict) -> None:
            self.wfile.write(f"event: {name}\ndata: ".encode() + json.dumps(obj).encode()
                             + b"\n\n")
            self.wfile.flush()

        out = anthropic_wire.Events(send)
        out.start(self.id, self._model(), self.info["prompt_tokens"], self.info["cached_tokens"])
        calls = 0
        while (event := self._next(job))[0] == "text":
            for k, v in self._feed(event[1]):
                calls += k == "tool_call"
                out.piece(k, v)
        kind, value = event
        if kind == "error":
            return out.error(value)
        for k, v in self._finish():
            calls += k == "tool_call"
            out.piece(k, v)
        out.end(value, calls)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve(model, tokenizer, name: str, host: str = "127.0.0.1", port: int = 8080,
          defaults: dict | None = None, on_ready: Callable[[str], None] | None = None,
          log: Callable[[str], None] | None = None, api_key: str | None = None,
          prompt_caches: int = 1) -> None:
    """Serve `model` over OpenAI's and Anthropic's HTTP APIs on `host:port` (0: a free port)
    until Ctrl-C.

    `name`: the model id clients see. `api_key`: the key every request but /health must send
    (None: none). `prompt_caches`: KV caches kept between requests; a budgeted model should have
    been loaded with as many (`kv_caches`), so that the budget reserves them. `defaults`: generation options of requests that give
    none (`max_tokens`, `temp`, `top_p`, `repetition_penalty`). `on_ready` receives the line
    saying where it listens; `log` one line a request. Generation runs in the calling thread,
    which must be the one that loaded `model`. SIGINT or SIGTERM stop it (the current
    generation at its next token) and `serve` returns.
    """
    defaults = {"max_tokens": 256, **{k: v for k, v in (defaults or {}).items() if v is not None}}
    budget = state_of(model).budget
    if budget is not None and budget.kv_caches < prompt_caches:
        raise FlashError(f"{prompt_caches} prompt caches, but the budget reserves "
                         f"{budget.kv_caches}: load the model with kv_caches={prompt_caches}")
    service = Service(model, tokenizer, name, defaults, log or (lambda line: None), api_key,
                      prompt_caches)
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
        caches = service.caches.size
        on_ready(f"serving {name} (mode {state.mode}{budget}, context {context_limit(model)} "
                 f"tokens, {caches} prompt cache{'s' if caches > 1 else ''}) on "
                 f"http://{host}:{server.server_port}/v1; Ctrl-C stops")
        if not _loopback(host):
            on_ready(f"warning: listening on {host}, reachable from other machines"
                     + ("" if api_key else "; without --api-key anyone who reaches it can use "
                        "it"))
    try:
        service.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
        if main:
            signal.signal(signal.SIGTERM, previous)
