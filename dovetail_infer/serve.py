"""An OpenAI-compatible HTTP server over one Dovetail engine (what serve.py runs).

FastAPI + uvicorn: a small, well-kept ASGI stack whose streaming responses notice a client that goes away, and whose
server drains in-flight requests on SIGTERM. The engine decodes one request at a time on one worker thread; the rest
wait in a bounded FIFO queue (a full queue answers 429 with Retry-After). A client that disconnects, or a request past
its time limit, ends its decoding at the next decoding step. Bad requests get OpenAI-style JSON errors: 400 naming the
field, 413 for an oversized body; nothing a client sends is meant to produce a 500.

Imported only by serve.py (and tests): `import dovetail_infer` does not need fastapi.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException

from dovetail_infer.engine import Dovetail, InferConfig
from dovetail_infer.text import ROLES, ChatResult, TextStream, check_messages

log = logging.getLogger(__name__)

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role
# temperatures below this decode greedily (as vLLM does): logits / 1e-40 overflow float32 and sampling would fail
GREEDY_BELOW = 1e-5
DISCONNECT_POLL_S = 0.25  # how often a non-streaming handler checks that its client is still there
DEADLINE_GRACE_S = 1.0  # how long past a request's time limit its handler waits for the worker to report it


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    queue_size: int = 16  # requests waiting behind the one being decoded; one more gets 429
    request_timeout_s: float = 300.0  # queue wait + decoding
    max_body_bytes: int = 1 << 20
    api_key: str | None = None  # Bearer token for /v1/*; None = open
    max_tokens: int | None = None  # when a request sets none; None = the InferConfig's max_new_tokens
    model_name: str = "dovetail"
    shutdown_timeout_s: float = 10.0  # SIGTERM: in-flight requests get this long to finish, then are cancelled
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        if self.queue_size < 1:
            raise ValueError(f"server.queue_size must be >= 1, got {self.queue_size}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"server.request_timeout_s must be > 0, got {self.request_timeout_s}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"server.max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        # ASCII-escaped: a message may quote client text with lone surrogates, which UTF-8 cannot encode
        return Response(json.dumps(self.body()), self.status, self.headers, media_type="application/json")


def _bad(param: str | None, message: str, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


# ---- request parsing ---------------------------------------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _type_name(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "integer" if _is_int(v) else "number"
    )


@dataclass
class Parsed:
    """A validated request: messages (chat) or prompt (completions), sampling and streaming options."""

    cfg: InferConfig
    stop: list[str]
    stream: bool = False
    include_usage: bool = False
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None


def _max_tokens(body: dict[str, Any], default: int | None) -> int | None:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise _bad(name, f"{name} must be an integer, got {_type_name(value)}", "invalid_type")
    if value <= 0:
        raise _bad(name, f"{name} must be >= 1, got {value}")
    return value


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    """temperature, top_p and seed as the request gives them (None when it does not)."""
    temperature = body.get("temperature")
    if temperature is not None:
        if not _is_number(temperature):
            raise _bad("temperature", f"temperature must be a number, got {_type_name(temperature)}", "invalid_type")
        if not math.isfinite(temperature) or temperature < 0:
            raise _bad("temperature", f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
        if temperature < GREEDY_BELOW:
            temperature = 0.0
    top_p = body.get("top_p")
    if top_p is not None:
        if not _is_number(top_p):
            raise _bad("top_p", f"top_p must be a number, got {_type_name(top_p)}", "invalid_type")
        if not 0 < top_p <= 1:
            raise _bad("top_p", f"top_p must be in (0, 1], got {top_p}")
    seed = body.get("seed")
    if seed is not None:
        if not _is_int(seed):
            raise _bad("seed", f"seed must be an integer, got {_type_name(seed)}", "invalid_type")
        if not 0 <= seed < 2**63:
            raise _bad("seed", f"seed must be in [0, 2**63), got {seed}")
    return {"temperature": temperature, "top_p": top_p, "seed": seed}


def _stop(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (
        isinstance(stop, list) and all(isinstance(s, str) and s for s in stop) and len(stop) <= 16
    ):
        raise _bad("stop", f"stop must be a non-empty string or a list of up to 16 of them, got {stop!r:.200}")
    return stop or []


def _streaming(body: dict[str, Any]) -> tuple[bool, bool]:
    """`stream` and `stream_options.include_usage`."""
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream", f"stream must be true or false, got {_type_name(stream)}", "invalid_type")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("stream_options", f"stream_options must be an object, got {_type_name(options)}", "invalid_type")
    include_usage = (options or {}).get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise _bad("stream_options.include_usage", "stream_options.include_usage must be true or false", "invalid_type")
    return bool(stream), include_usage


def parse_options(body: dict[str, Any], base: InferConfig, default_max_tokens: int | None = None) -> Parsed:
    """The fields both endpoints share; errors name the field. What a request leaves out keeps `base`'s value; the
    reply length is `default_max_tokens`, or base.max_new_tokens when that is None."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", f"model must be a string, got {_type_name(model)}", "invalid_type")
    changes = {"max_new_tokens": _max_tokens(body, default_max_tokens), **_sampling(body)}
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise _bad("n", f"n must be 1 (one choice per request), got {n!r}", "unsupported_value")
    stop = _stop(body)
    stream, include_usage = _streaming(body)
    try:
        cfg = replace(base, **{k: v for k, v in changes.items() if v is not None})
    except ValueError as e:  # e.g. lookup_graft (server config) with a sampling temperature from the request
        raise _bad("temperature", str(e)) from e
    return Parsed(cfg=cfg, stop=stop, stream=stream, include_usage=include_usage)


def _required(raw: Any, name: str, kind: type, expected: str) -> Any:
    """`raw` given, of type `kind` and not empty; errors name the field `name`."""
    if raw is None:
        raise _bad(name, f"{name} is required", "missing_required_parameter")
    if not isinstance(raw, kind):
        raise _bad(name, f"{name} must be {expected}, got {_type_name(raw)}", "invalid_type")
    if not raw:
        raise _bad(name, f"{name} must not be empty")
    return raw


def _content(i: int, content: Any) -> str:
    """A message's content: a string, or a list of text parts joined."""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise _bad(
                    f"messages[{i}].content[{j}]",
                    f"messages[{i}].content[{j}] must be a text part {{'type': 'text', 'text': ...}}",
                    "unsupported_value",
                )
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise _bad(
            f"messages[{i}].content",
            f"messages[{i}].content must be a string, got {_type_name(content)}",
            "invalid_type",
        )
    return content


def parse_messages(raw: Any) -> list[dict[str, str]]:
    """OpenAI chat messages (string content, or a list of text parts) as {"role", "content"} dicts."""
    _required(raw, "messages", list, "an array")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", f"messages[{i}] must be an object, got {_type_name(m)}", "invalid_type")
        role = m.get("role")
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            raise _bad(f"messages[{i}].role", f"messages[{i}].role must be one of {list(ROLES)}, got {role!r:.100}")
        out.append({"role": role, "content": _content(i, m.get("content"))})
    try:
        return check_messages(out)
    except ValueError as e:  # the last message is the assistant's, or all are empty
        raise _bad("messages", f"messages: {e}") from e


def parse_prompt(raw: Any) -> str:
    """A completion prompt: a string, or a list of one."""
    if isinstance(raw, list) and len(raw) == 1:
        raw = raw[0]
    return _required(raw, "prompt", str, "a string (or a list of one)")


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object: 413 past `limit` bytes, 400 for non-UTF-8 or malformed JSON."""
    too_big = APIError(413, f"the request body exceeds {limit} bytes", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise too_big
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _bad(None, f"the request body is not valid UTF-8 (byte {e.start})", "invalid_encoding") from e
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        raise _bad(None, f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}", "invalid_json") from e
    except RecursionError as e:
        raise _bad(None, "malformed JSON: nested too deeply", "invalid_json") from e
    if not isinstance(body, dict):
        raise _bad(None, f"the request body must be a JSON object, got {_type_name(body)}", "invalid_json")
    return body


# ---- the worker ----------------------------------------------------------------------------------------------------


class _Stopped(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason  # "cancelled" | "timeout"


class Job:
    """One request's decoding: created by its handler, decoded by the worker, events passed back to the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        self.id = uuid.uuid4().hex[:24]
        self.loop, self.deadline = loop, deadline
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()
        self.stream: TextStream | None = None
        self.arrived = self.checked = time.monotonic()  # checked: when the handler last saw its client there
        self.started: float | None = None
        self.ended: float | None = None
        self.steps, self.tokens, self.step_sizes = 0, 0, []
        self.steps_at_cancel: int | None = None
        self.outcome = "queued"  # then running, and done | cancelled | timeout | error
        self.http_code = 200  # what a streamed response ended with (its headers said 200)
        self.streamed = False  # a streamed response was sent to its end
        self.deltas = True  # push every text delta (streaming); False: the first only (time to first token)
        self.torch_threads: int | None = None  # what the worker decoded it with
        self.thread: str | None = None  # the name of the thread that decoded it

    def request_cancel(self) -> None:
        """Stop this job: dropped from the queue when its turn comes, or stopped after the current step."""
        if self.outcome in ("queued", "running") and not self.cancel.is_set():
            self.steps_at_cancel = self.steps
            self.cancel.set()

    def on_step(self, new: list[int]) -> None:
        """Called by the worker after each decoding step: the place where cancellation and the time limit act."""
        self.steps += 1
        if time.monotonic() > self.deadline:  # first: a handler cancels its job when the deadline passes
            raise _Stopped("timeout")
        if self.cancel.is_set():
            raise _Stopped("cancelled")
        self.step_sizes.append(len(new))
        self.tokens += len(new)

    def push(self, kind: str, value: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: the server is gone
            pass

    def record(self) -> dict[str, Any]:
        steps_after = None if self.steps_at_cancel is None else self.steps - self.steps_at_cancel
        return {
            "id": self.id,
            "outcome": self.outcome,
            "tokens": self.tokens,
            "queue_s": (self.started or time.monotonic()) - self.arrived,
            "decode_s": (self.ended or time.monotonic()) - (self.started or time.monotonic()),
            "steps_after_cancel": steps_after,
            "torch_threads": self.torch_threads,
            "thread": self.thread,
        }


class Metrics:
    """Prometheus metrics in a registry of their own (several apps in one process do not clash)."""

    def __init__(self, depth: int) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "dovetail_requests", "HTTP requests by endpoint and status", ["endpoint", "code"], registry=r
        )
        self.prompt_tokens = Counter("dovetail_prompt_tokens", "prompt tokens of decoded requests", registry=r)
        self.completion_tokens = Counter("dovetail_completion_tokens", "tokens decoded", registry=r)
        self.forwards = Counter("dovetail_target_forwards", "target verify forwards (after prefill)", registry=r)
        self.accepted = Counter(
            "dovetail_accepted_draft_tokens",
            "target forwards that accepted a draft token at this depth (÷ forwards = acceptance at that depth)",
            ["depth"],
            registry=r,
        )
        self.depth = depth
        for d in range(1, depth + 1):
            self.accepted.labels(depth=str(d))
        self.tau = Histogram(
            "dovetail_tau",
            "tokens per target forward, per request",
            buckets=(1, 1.5, 2, 2.5, 3, 4, 5, 6, 8),
            registry=r,
        )
        self.tokens_per_s = Histogram(
            "dovetail_tokens_per_second",
            "decoding speed per request",
            buckets=(5, 10, 20, 50, 100, 200, 500, 1000, 2000),
            registry=r,
        )
        self.latency = Histogram(
            "dovetail_request_latency_seconds",
            "request latency (arrival to last byte), queue wait included",
            ["endpoint"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.ttft = Histogram(
            "dovetail_time_to_first_token_seconds",
            "arrival to the first text delta, queue wait included",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.queue_wait = Histogram(
            "dovetail_queue_wait_seconds",
            "arrival to the start of decoding",
            buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60),
            registry=r,
        )
        self.queue_length = Gauge("dovetail_queue_length", "requests waiting to be decoded", registry=r)
        self.busy = Gauge("dovetail_decoding", "1 while a request is being decoded", registry=r)

    def request(self, endpoint: str, code: int | str, t0: float | None = None) -> None:
        self.requests.labels(endpoint=endpoint, code=str(code)).inc()
        if t0 is not None:
            self.latency.labels(endpoint=endpoint).observe(time.monotonic() - t0)

    def decoded(self, job: Job, result: ChatResult | None) -> None:
        self.completion_tokens.inc(job.tokens)
        for size in job.step_sizes[1:]:  # the first step is the prefill's token; later ones: accepted + bonus
            self.forwards.inc()
            for d in range(1, min(size - 1, self.depth) + 1):
                self.accepted.labels(depth=str(d)).inc()
        if result is not None:
            if result.forwards:
                self.tau.observe(result.tau)
            self.tokens_per_s.observe(result.tokens_per_s)


class Scheduler:
    """One worker thread decodes jobs one at a time, in arrival order, from a bounded queue.

    `executor`: a one-thread executor that the worker loop runs on instead of a thread of its own. `run_server`
    loads the engine on that same thread: with OpenMP (libgomp), two threads that both run parallel torch ops keep
    two thread pools alive, more threads than cores here, and libgomp then stops spinning between parallel regions:
    every op of the decoding thread pays a wake-up (docs/serving.md#why-served-decoding-was-slower-than-in-process).
    """

    def __init__(self, queue_size: int, metrics: Metrics, retry_after_s: int, executor: Executor | None = None) -> None:
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self.metrics, self.retry_after_s = metrics, retry_after_s
        self.current: Job | None = None
        self.finished: deque[dict[str, Any]] = deque(maxlen=256)  # recent jobs' records (tests, debugging)
        self.executor = executor
        self.thread: threading.Thread | None = None
        self.future: Future | None = None
        metrics.queue_length.set_function(self.queue.qsize)

    @property
    def alive(self) -> bool:
        if self.executor is not None:
            return self.future is not None and not self.future.done()
        return self.thread is not None and self.thread.is_alive()

    def start(self) -> None:
        if self.alive:
            return
        if self.executor is not None:
            self.future = self.executor.submit(self._loop)
        else:
            self.thread = threading.Thread(target=self._loop, name="dovetail-decode", daemon=True)
            self.thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel waiting and running jobs (the running one stops at its next step), then end the worker."""
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.request_cancel()
                job.outcome = "cancelled"
                job.push("end", "shutdown")
        if self.current is not None:
            self.current.request_cancel()
        if self.alive:
            self.queue.put(None)
            if self.future is not None:
                futures_wait([self.future], timeout)
            else:
                self.thread.join(timeout)

    def submit(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise APIError(
                429,
                f"the server is busy: {self.queue.maxsize} requests are already waiting; retry later",
                code="queue_full",
                type="rate_limit_error",
                headers={"Retry-After": str(self.retry_after_s)},
            ) from None

    def _loop(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            self.current = job
            self.metrics.busy.set(1)
            try:
                event = self._decode(job)
            finally:
                job.ended = time.monotonic()
                self.current = None
                self.metrics.busy.set(0)
                self.finished.append(job.record())
            job.push(*event)  # last: whoever sees the reply end finds the engine free and the job recorded

    def _decode(self, job: Job) -> tuple[str, Any]:
        """Decode one job, pushing its text deltas; returns its last event."""
        job.started = time.monotonic()
        job.torch_threads = torch.get_num_threads()  # this thread's own: ATen sets it up per thread
        job.thread = threading.current_thread().name
        self.metrics.queue_wait.observe(job.started - job.arrived)
        if job.cancel.is_set() or job.started > job.deadline:
            job.outcome = "cancelled" if job.cancel.is_set() else "timeout"
            return "end", job.outcome
        self.metrics.prompt_tokens.inc(len(job.stream.prompt_ids))
        job.outcome = "running"
        result = None
        try:
            pushed = False
            for delta in job.stream:
                if job.deltas or not pushed:  # a whole reply: no event-loop wake-up per step
                    job.push("delta", delta)
                    pushed = True
            result = job.stream.result
            job.outcome = "done"
            return "done", result
        except _Stopped as e:
            job.outcome = e.reason
            return "end", e.reason
        except Exception as e:  # an engine failure: reported to this request; the worker goes on
            log.exception("decoding failed")
            job.outcome = "error"
            return "error", f"{type(e).__name__}: {e}"
        finally:
            self.metrics.decoded(job, result)


# ---- the app -------------------------------------------------------------------------------------------------------


def _usage(r: ChatResult) -> dict[str, int]:
    return {
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "total_tokens": r.prompt_tokens + r.completion_tokens,
    }


def _stats(r: ChatResult, job: Job, draft: bool) -> dict[str, Any]:
    queue_s = (job.started or job.arrived) - job.arrived
    return {
        "tau": round(r.tau, 4),
        "tokens_per_s": round(r.tokens_per_s, 2),
        "forwards": r.forwards,
        "decode_s": round(r.seconds, 4),
        "queue_s": round(queue_s, 4),
        "draft": draft,
    }


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _timeout() -> APIError:
    return APIError(504, "the request ran past the server's time limit", code="timeout", type="timeout_error")


def _ended(kind: str, value: Any, streaming: bool) -> APIError:
    """The error of a job that ended without its reply. A cancelled stream means the server is stopping (a stream
    whose client left has nobody to tell)."""
    if kind != "end":
        return APIError(500, f"decoding failed: {value}", code="engine_error", type="server_error")
    if value == "timeout":
        return _timeout()
    if value == "shutdown" or streaming:
        return APIError(503, "the server is shutting down", code="shutdown", type="server_error")
    return APIError(499, "the request was cancelled", code="cancelled", type="cancelled")


class _JobStream(StreamingResponse):
    """A streamed reply that cancels its job however the response ends (done, client gone, server stopping) and
    counts the request: starlette cancels the body task on a disconnect without closing the body iterator."""

    def __init__(self, content: AsyncIterator[str], job: Job, done: Any, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.job, self.done = job, done

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.request_cancel()
            self.done(self.job.http_code if self.job.streamed else 499)


class _Server:
    """The handlers' shared state: engine, settings, scheduler, metrics."""

    def __init__(
        self, engine: Dovetail, infer: InferConfig, settings: ServerSettings, executor: Executor | None = None
    ) -> None:
        self.engine, self.infer, self.settings = engine, infer, settings
        self.metrics = Metrics(max(infer.depth, infer.lookup))
        self.scheduler = Scheduler(settings.queue_size, self.metrics, settings.retry_after_s, executor)
        self.created = int(time.time())
        self.draft = engine.draft is not None

    def check_auth(self, request: Request) -> None:
        key = self.settings.api_key
        if not key:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise APIError(401, "a valid API key is required: Authorization: Bearer <key>", code="invalid_api_key")

    def prompt_ids(self, p: Parsed) -> list[int]:
        """Token ids of the request's prompt; 400 when it does not fit the context with its max_tokens."""
        param = "messages" if p.messages is not None else "prompt"
        target = self.engine.target
        try:
            if p.messages is not None:
                ids = target.apply_chat_template(p.messages)
            else:
                ids = list(target.tokenizer.encode(p.prompt))
        except Exception as e:  # a chat template may refuse a conversation (e.g. roles that do not alternate)
            raise _bad(param, f"{param}: the prompt could not be tokenized: {e}") from e
        try:
            self.engine.check_prompt(ids, p.cfg)
        except ValueError as e:
            try:
                self.engine.check_prompt(ids, replace(p.cfg, max_new_tokens=1))
            except ValueError:
                raise _bad(param, f"{param} too long: {e}", "context_length_exceeded") from e
            raise _bad("max_tokens", f"max_tokens too large: {e}", "context_length_exceeded") from e
        return ids

    def submit(self, p: Parsed, t0: float) -> Job:
        job = Job(asyncio.get_running_loop(), t0 + self.settings.request_timeout_s)
        job.arrived = t0
        ids = self.prompt_ids(p)
        job.stream = TextStream(self.engine, None, p.cfg, p.stop, prompt_ids=ids, on_step=job.on_step)
        job.deltas = p.stream
        self.scheduler.submit(job)
        return job

    async def next_event(self, job: Job, request: Request | None) -> tuple[str, Any]:
        """The job's next event; ("end", "timeout") past its deadline (a backstop: the worker reports a timeout
        itself after a step, this covers a job still queued or a step that does not end). With `request`, a client
        that went away cancels the job (streaming responses learn it from the ASGI server instead)."""
        while True:
            now = time.monotonic()
            left = job.deadline + DEADLINE_GRACE_S - now
            if left <= 0:
                job.request_cancel()
                return "end", "timeout"
            if request is not None and now - job.checked >= DISCONNECT_POLL_S:  # deltas may come without pause
                job.checked = now
                if await request.is_disconnected():
                    job.request_cancel()
                    return "end", "cancelled"
            try:
                wait = min(left, DISCONNECT_POLL_S) if request is not None else left
                return await asyncio.wait_for(job.events.get(), wait)
            except asyncio.TimeoutError:
                pass

    async def complete(self, job: Job, request: Request, t0: float) -> ChatResult:
        """Wait for the whole reply (non-streaming): the worker pushes only its first delta, then the result."""
        try:
            while True:
                kind, value = await self.next_event(job, request)
                if kind == "delta":
                    self.metrics.ttft.observe(time.monotonic() - t0)
                elif kind == "done":
                    return value
                else:
                    raise _ended(kind, value, streaming=False)
        finally:
            job.request_cancel()  # no-op once done; stops the worker when this handler is cancelled

    async def stream(self, job: Job, endpoint: str, t0: float, head: dict[str, Any], p: Parsed) -> AsyncIterator[str]:
        """SSE chunks of one reply (OpenAI's shapes); errors after the 200 headers come as an error event."""
        chat = endpoint == CHAT
        first = True

        def chunk(delta: str | None, finish: str | None = None) -> dict[str, Any]:
            if chat:
                choice = {"index": 0, "delta": {} if delta is None else {"content": delta}, "finish_reason": finish}
                choice["logprobs"] = None
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            return {**head, "choices": [choice]}

        if chat:
            yield _sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        while True:
            kind, value = await self.next_event(job, None)
            if kind == "delta":
                if first:
                    self.metrics.ttft.observe(time.monotonic() - t0)
                    first = False
                yield _sse(chunk(value))
            elif kind == "done":
                last = chunk(None, value.finish_reason)
                last["dovetail"] = _stats(value, job, self.draft)
                yield _sse(last)
                if p.include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage(value)})
                break
            else:
                err = _ended(kind, value, streaming=True)
                job.http_code = err.status
                yield _sse(err.body())
                break
        job.streamed = True
        yield "data: [DONE]\n\n"

    async def generate(self, request: Request, endpoint: str) -> Response:
        """POST /v1/chat/completions or /v1/completions: checked, queued, then streamed or answered whole."""
        t0 = request.state.t0 = time.monotonic()
        self.check_auth(request)
        body = await read_json(request, self.settings.max_body_bytes)
        p = parse_options(body, self.infer, self.settings.max_tokens)
        if endpoint == CHAT:
            p.messages = parse_messages(body.get("messages"))
        else:
            p.prompt = parse_prompt(body.get("prompt"))
        job = self.submit(p, t0)
        kind = "chat.completion" if endpoint == CHAT else "text_completion"
        prefix = "chatcmpl-" if endpoint == CHAT else "cmpl-"
        head = {"id": prefix + job.id, "object": kind, "created": int(time.time()), "model": self.settings.model_name}
        if p.stream:
            head["object"] = kind + ".chunk" if endpoint == CHAT else kind
            return _JobStream(
                self.stream(job, endpoint, t0, head, p),
                job,
                lambda code: self.metrics.request(endpoint, code, t0),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        r = await self.complete(job, request, t0)
        if endpoint == CHAT:
            choice = {"index": 0, "message": {"role": "assistant", "content": r.text}, "logprobs": None}
        else:
            choice = {"index": 0, "text": r.text, "logprobs": None}
        choice["finish_reason"] = r.finish_reason
        out = {**head, "choices": [choice], "usage": _usage(r), "dovetail": _stats(r, job, self.draft)}
        self.metrics.request(endpoint, 200, t0)
        return JSONResponse(out)

    def health(self) -> JSONResponse:
        ok = self.scheduler.alive
        body = {
            "status": "ok" if ok else "unavailable",
            "queue": self.scheduler.queue.qsize(),
            "decoding": self.scheduler.current is not None,
            "draft": self.draft,
            "model": self.settings.model_name,
        }
        return JSONResponse(body, status_code=200 if ok else 503)


def _lifespan(server: _Server) -> Any:
    """Start the worker with the app; on shutdown, cancel what is left and stop it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(server.scheduler.stop, server.settings.shutdown_timeout_s)

    return lifespan


def _add_error_handlers(app: FastAPI, server: _Server) -> None:
    """Every error as OpenAI's JSON; those on /v1/* are counted in the request metrics."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> Response:
        if request.url.path.startswith("/v1/"):
            server.metrics.request(request.url.path, e.status, getattr(request.state, "t0", None))
        return e.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> Response:
        kind = "not_found" if e.status_code == 404 else "invalid_request"
        return APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=kind).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        err = APIError(500, f"internal error: {type(e).__name__}", code="internal_error", type="server_error")
        if request.url.path.startswith("/v1/"):
            server.metrics.request(request.url.path, 500, getattr(request.state, "t0", None))
        return err.response()


def _add_routes(app: FastAPI, server: _Server) -> None:
    @app.post(CHAT)
    async def chat_completions(request: Request) -> Response:
        return await server.generate(request, CHAT)

    @app.post(COMPLETIONS)
    async def completions(request: Request) -> Response:
        return await server.generate(request, COMPLETIONS)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        server.check_auth(request)
        name = server.settings.model_name
        model = {"id": name, "object": "model", "created": server.created, "owned_by": "dovetail"}
        return {"object": "list", "data": [model]}

    @app.get("/health")
    async def health() -> JSONResponse:
        return server.health()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def create_app(
    engine: Dovetail,
    infer: InferConfig | None = None,
    settings: ServerSettings | None = None,
    executor: Executor | None = None,
) -> FastAPI:
    """A FastAPI app serving `engine` (already built: target plus optional draft) with `infer`'s tree shape and
    sampling defaults (by default InferConfig's, as `Dovetail.chat`); requests may override max_tokens, temperature,
    top_p, seed and stop. `executor`: a one-thread executor to decode on, best the one that built the engine
    (see `Scheduler`)."""
    server = _Server(engine, infer or InferConfig(), settings or ServerSettings(), executor)
    app = FastAPI(title="Dovetail", lifespan=_lifespan(server), docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    _add_error_handlers(app, server)
    _add_routes(app, server)
    return app


# ---- running it ----------------------------------------------------------------------------------------------------


def settings_from_config(cfg: dict[str, Any]) -> ServerSettings:
    """ServerSettings of a serve config (`server.*`, `max_tokens`); the API key may come from DOVETAIL_API_KEY."""
    s = dict(cfg.get("server") or {})
    known = {f.name for f in ServerSettings.__dataclass_fields__.values()}
    unknown = sorted(set(s) - known)
    if unknown:
        raise ValueError(f"unknown server keys {unknown}; known: {sorted(known)}")
    if not s.get("api_key"):
        s["api_key"] = os.environ.get("DOVETAIL_API_KEY") or None
    if cfg.get("max_tokens") is not None:
        s["max_tokens"] = int(cfg["max_tokens"])
    if not s.get("model_name"):
        ckpt = cfg.get("ckpt")
        target = (cfg.get("target") or {}).get("name", "target")
        s["model_name"] = os.path.basename(str(ckpt).rstrip("/")) if ckpt else target
    return ServerSettings(**{k: v for k, v in s.items() if v is not None or k == "api_key"})


@dataclass
class ServerThread:
    """A uvicorn server on a background thread (tests, benchmarks): `with ServerThread(app) as s: s.url`."""

    app: Any
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port, chosen by the OS
    shutdown_timeout_s: float = 5.0
    url: str = ""
    _server: Any = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def __enter__(self) -> ServerThread:
        import uvicorn

        config = uvicorn.Config(
            self.app,
            host=self.host,
            port=self.port,
            log_level="warning",
            timeout_graceful_shutdown=self.shutdown_timeout_s,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}"
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.should_exit = True
        self._thread.join(self.shutdown_timeout_s + 15)


def build_engine_on_thread(cfg: dict[str, Any]) -> tuple[Dovetail, InferConfig, ThreadPoolExecutor]:
    """Build the engine of a serve config on a new one-thread executor, the thread that must then run all of its
    torch work (decoding: `create_app(..., executor)`); see `Scheduler` for why one thread."""
    from dovetail_infer.chat import build_engine

    torch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dovetail-torch")
    engine, icfg = torch_thread.submit(build_engine, cfg).result()
    return engine, icfg, torch_thread


def run_server(cfg: dict[str, Any]) -> None:
    """What serve.py runs: build the engine of a serve config, then serve it until SIGTERM / Ctrl-C."""
    import uvicorn

    settings = settings_from_config(cfg)
    engine, icfg, torch_thread = build_engine_on_thread(cfg)
    app = create_app(engine, icfg, settings, torch_thread)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", settings.host)
    log.info("serving %s (draft: %s)", settings.model_name, engine.draft is not None)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )
