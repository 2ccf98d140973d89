"""The model side of `mlx-flash serve`: requests queued as jobs and run one at a time, in
arrival order, in the thread that loaded the model, each in the kept prompt cache that shares
the longest prefix with its prompt; the server's figures and its API key. serve.py is the HTTP
side (the handlers, the answers' shapes).
"""

from __future__ import annotations

import hmac
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx

from . import platform
from .chat import PLAIN_STOP, ChatSession
from .errors import FlashError
from .generation import context_limit, encode, fit_context, stream_generate
from .promptcache import PromptCaches
from .state import state_of
from .toolcalls import opens_in_reasoning
from .wire import ApiError, Request


@dataclass
class Job:
    """A request in the queue; the worker answers on `events`: ("start", info), ("text", str),
    ("done", stats) or ("error", ApiError). `cancelled`: the client is gone."""

    request: Request
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued: float = field(default_factory=time.perf_counter)


class Service:
    """The model, its names and figures, its kept prompt caches, and the generation loop that
    takes jobs in arrival order and runs each to its end; the handlers share it."""

    def __init__(self, model, tokenizer, name: str, defaults: dict, log: Callable[[str], None],
                 api_key: str | None = None, prompt_caches: int = 1):
        self.model, self.tokenizer, self.name, self.log = model, tokenizer, name, log
        self.names, self.defaults, self.api_key = (name, "default_model"), defaults, api_key
        self.chat = ChatSession(model, tokenizer)  # renders messages: template or plain turns
        self.caches = PromptCaches(model, prompt_caches)
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
                if job.cancelled.is_set():  # its client left while it waited
                    self.counts["cancelled"] += 1
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

    def _render(self, req: Request) -> list[int]:
        prefill = bool(req.extra.get("prefill"))
        if not self.chat.template:
            if req.tools or prefill or any(m["role"] == "tool" for m in req.prompt):
                raise ApiError(400, "tools, tool results and a last assistant message need a "
                               "chat template; this model's tokenizer has none", "messages")
            return self.chat.render(req.prompt)
        kwargs = {"tools": req.tools} if req.tools else {}
        if prefill:  # the reply continues the last assistant message
            kwargs.update(add_generation_prompt=False, continue_final_message=True)
        else:
            kwargs["add_generation_prompt"] = True
        try:
            return list(self.tokenizer.apply_chat_template(req.prompt, **kwargs))
        except Exception as e:  # the template's own checks (roles, order)
            raise ApiError(400, f"the chat template cannot render these messages: {e}",
                           "messages") from None

    def _tokens(self, req: Request) -> list[int]:
        if req.chat:
            tokens = self._render(req)
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
        entry, keep = self.caches.take(tokens)
        known = list(tokens)  # what the cache holds once every yielded token is in
        job.events.put(("start", {"prompt_tokens": len(tokens), "cached_tokens": keep,
                                  "reasoning": req.chat and opens_in_reasoning(self.tokenizer,
                                                                               tokens)}))
        eos = self.tokenizer.eos_token_ids
        n, last, cancelled, first = 0, None, False, None
        try:
            gen = stream_generate(self.model, self.tokenizer, tokens[keep:], max_tokens=max_tokens,
                                  stop=stop, prompt_cache=entry.cache, **opts)
            try:
                for last in gen:
                    first = first or time.perf_counter()
                    known.append(last.token)
                    n += not (last.finish_reason == "stop" and last.token in eos)
                    if last.text:
                        job.events.put(("text", last.text))
                    if cancelled := job.cancelled.is_set():
                        break
            finally:
                gen.close()
        finally:
            self.caches.give(entry, known)
        self.counts["cancelled" if cancelled else "served"] += 1
        wall = time.perf_counter() - tic
        stats = {**last.stats, "prompt_tokens": len(tokens), "cached_tokens": keep,
                 "prefilled_tokens": len(tokens) - keep, "completion_tokens": n,
                 "prompt_tps": round(last.prompt_tps, 2),
                 "tokens_per_s": round(last.generation_tps, 2),
                 "finish_reason": "cancelled" if cancelled else last.finish_reason or "length",
                 "queue_ms": round(1000 * (tic - job.queued), 1),
                 "first_token_ms": round(1000 * ((first or tic) - tic), 1),
                 "wall_ms": round(1000 * wall, 1)}
        self.log(f"{req.api} {'chat' if req.chat else 'completion'}: {len(tokens)} prompt tokens "
                 f"({keep} cached), {n} generated; first token {stats['first_token_ms']:.0f} ms, "
                 f"{stats['tokens_per_s']:.1f} tok/s, {stats['finish_reason']}, "
                 f"{1000 * wall:.0f} ms (queued {stats['queue_ms']:.0f} ms)")
        job.events.put(("done", stats))

    def health(self) -> dict:
        """Liveness, the queue, request counts, the budget, the kept prompt caches and the
        memory in use."""
        state = state_of(self.model)
        budget = state.budget
        return {"status": "ok" if self.running.is_set() else "stopping", "model": self.name,
                "mode": state.mode, "max_context": context_limit(self.model),
                "memory_budget_bytes": budget.total if budget else None,
                # each kept cache is one context of KV cache that the budget reserves
                "kv_cache_reserved_bytes": budget.kv_cache if budget else None,
                **self.caches.stats(),
                "rss_bytes": platform.current_rss_bytes(),
                "peak_rss_bytes": platform.peak_rss_bytes(), "loaded_rss_bytes": self.loaded_rss,
                # the RSS before the model (what --memory does not cover)
                "base_rss_bytes": state.base_rss_bytes,
                "mlx_active_bytes": mx.get_active_memory(), "mlx_peak_bytes": mx.get_peak_memory(),
                "queued": self.jobs.qsize(), "requests": dict(self.counts)}

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model",
                                            "created": self.created, "owned_by": "mlx-flash"}]}

    def authorized(self, headers) -> bool:
        """No key set, or the request's (`Authorization: Bearer KEY` or `x-api-key: KEY`)
        equal to it, compared in constant time."""
        if self.api_key is None:
            return True
        bearer = headers.get("Authorization", "")
        given = bearer[7:] if bearer[:7].lower() == "bearer " else headers.get("x-api-key", "")
        return hmac.compare_digest(given.strip().encode(), self.api_key.encode())
