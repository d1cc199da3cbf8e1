"""An OpenAI-compatible HTTP server for one loaded engine (FastAPI).

``POST /v1/completions`` and ``POST /v1/chat/completions`` (the model's chat template
renders the messages; a 400 where the engine has none), streamed as server-sent events or
not, ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus,
`serving.metrics`).

One decode thread (`serving.worker`) runs up to ``max_batch`` requests per step with
continuous batching (runtime/batching.py): requests queue for it, up to ``max_queue``
waiting or running, and beyond that get a 503. A streamed request whose client goes
away is cancelled, its KV rows freed at the next step. Bad requests get a 400 with
OpenAI's error object, found before any token is generated.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from leapc.ir.errors import InputError
from leapc.runtime.batching import Sequence
from leapc.runtime.engine import Engine
from leapc.runtime.serving import protocol
from leapc.runtime.serving.chat import ChatTemplate
from leapc.runtime.serving.metrics import ServerMetrics
from leapc.runtime.serving.protocol import ChatCompletionRequest, CompletionRequest
from leapc.runtime.serving.worker import DecodeWorker, Job, Outcome

# Prompt KV a server keeps by default: ~40k tokens of the bundled model (6 KB a token)
DEFAULT_PREFIX_CACHE_MB = 256


@dataclass(frozen=True)
class ServeConfig:
    model_name: str  # what ``/v1/models`` lists and requests must name
    policy: str = "auto"  # the decoding policy of requests that name none
    max_queue: int = 64  # requests waiting or running; more get a 503
    max_batch: int | None = None  # requests per step; None: the engine's batch bound
    step_nodes: int | None = None  # nodes a decode step verifies over its rows (None: any)
    # prompt KV kept for later requests (runtime/prefix_cache.py); 0: off (`leapc serve`
    # asks for DEFAULT_PREFIX_CACHE_MB where the engine verifies exactly)
    prefix_cache_mb: int = 0


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

    def leave(self, sequence: Sequence | None) -> None:
        metrics = self.admission.metrics
        if self.generating:
            metrics.running.dec()
            metrics.generation(sequence.stats)
        else:
            metrics.waiting.dec()
        self.admission.leave()


class _CountRequests:
    """Counts answers by endpoint and status. Plain ASGI rather than ``@app.middleware``
    (Starlette's BaseHTTPMiddleware), which relays every streamed event through a second
    stream and wraps ``receive``, the channel a streaming response learns of a client's
    disconnect from."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(scope["path"], str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)


def _error(status: int, message: str, kind: str = "invalid_request_error",
           param: str | None = None) -> JSONResponse:
    return JSONResponse(protocol.error(message, kind, param), status_code=status)


def _sse(body: dict | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


def create_app(engine: Engine, config: ServeConfig) -> FastAPI:
    engine.policy(config.policy)  # a server that cannot serve its default refuses to start
    max_batch = engine.batch_bound if config.max_batch is None else config.max_batch
    prefix_bytes = config.prefix_cache_mb << 20
    engine.scheduler(max_batch, config.step_nodes, prefix_bytes)  # refusals before serving
    metrics = ServerMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        worker = DecodeWorker(engine.scheduler(max_batch, config.step_nodes, prefix_bytes),
                              engine, metrics, asyncio.get_running_loop())
        app.state.worker = worker
        yield
        worker.close()

    app = FastAPI(title="leapc", version=engine.manifest.leapc_version, lifespan=lifespan)
    admission = _Admission(config.max_queue, metrics)

    app.add_middleware(_CountRequests, metrics=metrics)

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
            engine.check_request(prompt, max_tokens, body.leapc.policy or config.policy,
                                 body.temperature, body.top_k, body.top_p, body.seed or 0,
                                 body.leapc.draft_options())
        except InputError as err:  # answered now, not after the queue
            return _error(400, str(err))
        ticket = admission.enter()
        if ticket is None:
            return _error(503, f"the server is busy ({config.max_queue} requests queued or "
                               "running); retry later", "service_unavailable")
        texts: asyncio.Queue[str | None] = asyncio.Queue()
        # the prompt as given: a text prompt is healed, token ids are taken as they are
        job = Job(dict(prompt=prompt, max_new_tokens=max_tokens,
                       policy=body.leapc.policy or config.policy, temperature=body.temperature,
                       top_k=body.top_k, top_p=body.top_p,
                       seed=secrets.randbelow(2**31) if body.seed is None else body.seed,
                       draft=body.leapc.draft_options(),
                       token_healing=body.leapc.token_healing),
                  body.stops, texts.put_nowait,
                  ticket.leave, ticket.start, ticket.first_token)
        app.state.worker.submit(job)
        outcome = asyncio.wrap_future(job.outcome)
        outcome.add_done_callback(lambda _: texts.put_nowait(None))
        if not body.stream:
            try:
                ended = await outcome
            except InputError as err:
                return _error(400, str(err))
            finally:
                job.cancel()  # a client gone before the end: a no-op once it has ended
            return reply.whole("".join(_drain(texts)), ended.finish, ended.usage())
        return StreamingResponse(_events(job, texts, outcome, body, reply),
                                 media_type="text/event-stream")

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


def _drain(texts: asyncio.Queue[str | None]) -> list[str]:
    """The texts queued so far (the end marker excluded)."""
    out = []
    while not texts.empty():
        if (text := texts.get_nowait()) is not None:
            out.append(text)
    return out


async def _deltas(texts: asyncio.Queue[str | None]) -> AsyncIterator[str]:
    """The texts until the end marker, those that queued up while the last event was
    being sent joined into one (a client that reads slower than the batch decodes gets
    fewer, longer events rather than a growing backlog)."""
    while (text := await texts.get()) is not None:
        parts = [text]
        while not texts.empty():
            if (more := texts.get_nowait()) is None:
                yield "".join(parts)
                return
            parts.append(more)
        yield "".join(parts)


async def _events(job: Job, texts: asyncio.Queue[str | None], outcome: asyncio.Future[Outcome],
                  body: CompletionRequest | ChatCompletionRequest,
                  reply: protocol.CompletionReply) -> AsyncIterator[str]:
    """Server-sent events: text deltas as they become final, the finish reason, usage if
    asked for, ``[DONE]``. A client that goes away cancels the generation."""
    try:
        async for text in _deltas(texts):
            yield _sse(reply.delta(text))
        ended = await outcome  # done: its end marker came after its last text
        yield _sse(reply.end(ended.finish))
        if body.stream_options is not None and body.stream_options.include_usage:
            yield _sse(reply.usage(ended.usage()))
        yield _sse("[DONE]")
    finally:
        job.cancel()  # a no-op once the generation has ended
