"""An OpenAI-compatible HTTP server for one loaded engine (FastAPI).

``POST /v1/completions`` and ``POST /v1/chat/completions`` (the model's chat template
renders the messages; a 400 where the engine has none), streamed as server-sent events or
not, ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus,
`serving.metrics`).

The engine runs one generation at a time, on one worker thread: requests queue for it,
up to ``max_queue`` waiting or running, and beyond that get a 503. A streamed request
whose client goes away stops at its next step and frees its place. Bad requests get a
400 with OpenAI's error object, found before any token is generated.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from leapc.ir.errors import InputError
from leapc.runtime.engine import Engine, Stream
from leapc.runtime.serving import protocol
from leapc.runtime.serving.chat import ChatTemplate
from leapc.runtime.serving.metrics import ServerMetrics
from leapc.runtime.serving.protocol import ChatCompletionRequest, CompletionRequest
from leapc.runtime.serving.stops import StopText


@dataclass(frozen=True)
class ServeConfig:
    model_name: str  # what ``/v1/models`` lists and requests must name
    policy: str = "auto"  # the decoding policy of requests that name none
    max_queue: int = 64  # requests waiting or running; more get a 503


@dataclass(frozen=True)
class _Outcome:
    completion_tokens: int
    finish: str


class _Admission:
    """Requests waiting or running, bounded."""

    def __init__(self, limit: int, metrics: ServerMetrics):
        self.limit, self.count, self.lock, self.metrics = limit, 0, threading.Lock(), metrics

    def enter(self) -> _Ticket | None:
        """A ticket for a new request, or None if the server is full."""
        with self.lock:
            if self.count >= self.limit:
                return None
            self.count += 1
        self.metrics.waiting.inc()
        return _Ticket(self, time.monotonic())

    def leave(self) -> None:
        with self.lock:
            self.count -= 1


@dataclass
class _Ticket:
    """One admitted request's passage: waiting, generating, gone (each counted once)."""

    admission: _Admission
    admitted_at: float
    generating: bool = False

    def start(self) -> None:
        metrics = self.admission.metrics
        metrics.waiting.dec()
        metrics.running.inc()
        metrics.queue_time.observe(time.monotonic() - self.admitted_at)
        self.generating = True

    def first_token(self) -> None:
        self.admission.metrics.first_token.observe(time.monotonic() - self.admitted_at)

    def leave(self, stream: Stream | None) -> None:
        metrics = self.admission.metrics
        if self.generating:
            metrics.running.dec()
            metrics.generation(stream.stats)
        else:
            metrics.waiting.dec()
        self.admission.leave()


def _error(status: int, message: str, kind: str = "invalid_request_error",
           param: str | None = None) -> JSONResponse:
    return JSONResponse(protocol.error(message, kind, param), status_code=status)


def _sse(body: dict | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


def create_app(engine: Engine, config: ServeConfig) -> FastAPI:
    engine.policy(config.policy)  # a server that cannot serve its default refuses to start
    app = FastAPI(title="leapc", version=engine.manifest.leapc_version)
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="leapc-decode")
    metrics = ServerMetrics()
    admission = _Admission(config.max_queue, metrics)

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        metrics.requests.labels(request.url.path, str(response.status_code)).inc()
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _error(400, f"{param}: {first['msg']}" if param else first["msg"], param=param)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def exposition() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model",
                                            "created": 0, "owned_by": "leapc"}]}

    chat_template = ChatTemplate.of(engine.manifest, engine.tokenizer.id_to_token)

    async def respond(body: CompletionRequest | ChatCompletionRequest, prompt: str | list[int],
                      max_tokens: int, reply: protocol.CompletionReply):
        """Admit, set up and run one request; its reply whole, or streamed."""
        if body.model != config.model_name:
            return _error(404, f"model {body.model!r} does not exist (this server serves "
                               f"{config.model_name!r})", "not_found_error", "model")
        try:
            _, ids = engine.check_request(prompt, max_tokens, body.leapc.policy or config.policy,
                                          body.temperature, body.top_k, body.top_p,
                                          body.seed or 0, body.leapc.draft_options())
        except InputError as err:  # answered now, not after the queue
            return _error(400, str(err))
        ticket = admission.enter()
        if ticket is None:
            return _error(503, f"the server is busy ({config.max_queue} requests queued or "
                               "running); retry later", "service_unavailable")
        loop = asyncio.get_running_loop()
        try:
            stream = await loop.run_in_executor(worker, _start, engine, body, ids, max_tokens,
                                                config.policy)
        except InputError as err:
            ticket.leave(None)
            return _error(400, str(err))
        except BaseException:  # an internal error: a 500, and its place is free again
            ticket.leave(None)
            raise
        if not body.stream:
            texts: list[str] = []
            outcome = await loop.run_in_executor(worker, _finish, stream, body.stops,
                                                 texts.append, threading.Event(), ticket)
            return reply.whole("".join(texts), outcome.finish,
                               protocol.usage(stream.stats.prompt_tokens,
                                              outcome.completion_tokens))
        # started here, not when the response first iterates: a client gone before then
        # still frees its place when the generation ends
        run = _Run(loop, stream, body.stops)
        run.done = loop.run_in_executor(worker, run, ticket)
        return StreamingResponse(_events(run, body, reply), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        return await respond(body, body.prompt, body.max_tokens,
                             protocol.CompletionReply(config.model_name))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest):
        if chat_template is None:
            return _error(400, "this engine's tokenizer has no chat template; use "
                               "/v1/completions", param="messages")
        try:
            prompt = chat_template.render([m.model_dump(exclude_none=True)
                                           for m in body.messages])
        except InputError as err:
            return _error(400, str(err), param="messages")
        # no limit given: up to the engine's context (decoding stops at max-seq)
        limit = body.max_completion_tokens or body.max_tokens or engine.manifest.max_seq
        return await respond(body, prompt, limit, protocol.ChatReply(config.model_name))

    return app


def _start(engine: Engine, body: CompletionRequest | ChatCompletionRequest,
           ids: list[int], max_tokens: int, default_policy: str) -> Stream:
    """The request's generation, set up (its drafter too) but not run; ``ids``: the prompt,
    encoded once by `Engine.check_request`."""
    return engine.stream(
        ids, max_tokens, policy=body.leapc.policy or default_policy,
        temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
        seed=secrets.randbelow(2**31) if body.seed is None else body.seed,
        draft=body.leapc.draft_options())


def _finish(stream: Stream, stops: tuple[str, ...], emit: Callable[[str], None],
            cancelled: threading.Event, ticket: _Ticket) -> _Outcome:
    """Run ``stream`` to its end, a stop string or cancellation, emitting final text; the
    ticket leaves however it ends."""
    ticket.start()
    text = StopText(stops)
    try:
        for chunk in stream:
            if cancelled.is_set():
                break
            if chunk.token_ids and len(stream.token_ids) == len(chunk.token_ids):
                ticket.first_token()
            emitted = text.push(chunk.text)
            if emitted:
                emit(emitted)
            if text.stopped:
                break
        tail = text.flush()
        if tail:
            emit(tail)
    finally:
        ticket.leave(stream)
    return _Outcome(len(stream.token_ids), protocol.finish_reason(stream.stats.stop_reason,
                                                                  text.stopped))


class _Run:
    """One streamed generation on the worker: final text goes to ``queue`` as it comes,
    then None; ``cancelled`` stops it at its next step."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stream: Stream, stops: tuple[str, ...]):
        self.loop, self.stream, self.stops = loop, stream, stops
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.done: asyncio.Future[_Outcome] | None = None

    def _put(self, item: str | None) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def __call__(self, ticket: _Ticket) -> _Outcome:
        try:
            return _finish(self.stream, self.stops, self._put, self.cancelled, ticket)
        finally:
            self._put(None)


async def _events(run: _Run, body: CompletionRequest | ChatCompletionRequest,
                  reply: protocol.CompletionReply) -> AsyncIterator[str]:
    """Server-sent events: text deltas as they become final, the finish reason, usage if
    asked for, ``[DONE]``. A client that goes away cancels the generation."""
    try:
        while (text := await run.queue.get()) is not None:
            yield _sse(reply.delta(text))
        outcome = await run.done
        yield _sse(reply.end(outcome.finish))
        if body.stream_options is not None and body.stream_options.include_usage:
            yield _sse(reply.usage(protocol.usage(run.stream.stats.prompt_tokens,
                                                  outcome.completion_tokens)))
        yield _sse("[DONE]")
    finally:
        run.cancelled.set()  # a no-op once the generation has ended
