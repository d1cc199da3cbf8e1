"""The server's decode thread: one `Scheduler` (runtime/batching.py) stepping every
admitted request, and the text each request's tokens become.

Only this thread touches the engine. The event loop hands it `Job`s through a queue and
cancels them by flag; the thread sets up each job's generation (its drafter may load a
program), submits it to the scheduler, steps while anything is running, and turns each
row's new tokens into final text (detokenized, stop strings held back) for the job's
``emit``. A job whose stop string appears, or whose client left, is cancelled: its KV
rows are freed at the next step.

What a step produced for all its rows (texts, then outcomes) reaches the event loop as
one callback, in that order: a call per row and token woke the loop through its
self-pipe each time, which was 8% of the decode thread's samples at B = 8.
"""

from __future__ import annotations

import asyncio
import functools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from leapc.runtime.batching import Scheduler, Sequence
from leapc.runtime.engine import Engine
from leapc.runtime.healing import CompletionText
from leapc.runtime.serving import protocol
from leapc.runtime.serving.metrics import ServerMetrics
from leapc.runtime.serving.stops import StopText


@dataclass(frozen=True)
class Outcome:
    completion_tokens: int
    prompt_tokens: int
    finish: str
    cached_tokens: int = 0  # prompt tokens a prefix cache supplied

    def usage(self) -> dict:
        return protocol.usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens)


@dataclass(eq=False)
class Job:
    """One admitted request: how to start its generation (`Engine.sequence` keywords),
    where its final text goes, and its outcome (an `InputError` if it cannot start)."""

    request: dict
    stops: tuple[str, ...]
    emit: Callable[[str], None]  # called on the event loop's thread
    leave: Callable[[Sequence | None], None]  # the admission ticket's, called once
    start: Callable[[], None] = lambda: None  # when its prefill begins
    first_token: Callable[[], None] = lambda: None
    outcome: Future[Outcome] = field(default_factory=Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    sequence: Sequence | None = None
    started: bool = False

    def cancel(self) -> None:
        """From any thread: stop at the next step (a no-op once it has ended)."""
        self.cancelled.set()


class DecodeWorker:
    def __init__(self, scheduler: Scheduler, engine: Engine, metrics: ServerMetrics,
                 loop: asyncio.AbstractEventLoop):
        self.scheduler, self.engine, self.metrics, self.loop = scheduler, engine, metrics, loop
        self.inbox: queue.Queue[Job | None] = queue.Queue()
        self.jobs: dict[Sequence, _Running] = {}
        self.outbox: list[Callable[[], None]] = []  # for the event loop, in order
        self.thread = threading.Thread(target=self._run, name="leapc-decode", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.inbox.put(job)

    def _post(self, call: Callable[[], None]) -> None:
        self.outbox.append(call)

    def close(self) -> None:
        self.inbox.put(None)
        self.thread.join(timeout=60)

    def _run(self) -> None:
        while True:
            for job in self._arrivals():
                if job is None:
                    return
                self._start(job)
            if not self.scheduler.idle:
                for sequence, tokens in self.scheduler.step():
                    self.jobs[sequence].push(tokens)
            self._settle()
            if self.outbox:
                self.loop.call_soon_threadsafe(_deliver, self.outbox)
                self.outbox = []

    def _arrivals(self) -> list[Job | None]:
        """New jobs: waits for one when nothing runs, else takes what has come."""
        arrived = [] if self.jobs else [self.inbox.get()]
        while True:
            try:
                arrived.append(self.inbox.get_nowait())
            except queue.Empty:
                return arrived

    def _start(self, job: Job) -> None:
        try:
            sequence = self.engine.sequence(**job.request)
        except Exception as err:  # a 400 (InputError) or a 500 for this request alone
            job.leave(None)
            job.outcome.set_exception(err)
            return
        job.sequence = sequence
        self.jobs[sequence] = _Running(job, CompletionText(self.engine.tokenizer, sequence.healing),
                                       StopText(job.stops), self._post)
        self.scheduler.submit(sequence)

    def _settle(self) -> None:
        """Start the metrics of jobs that began, cancel and end jobs that are over."""
        for sequence, running in list(self.jobs.items()):
            job = running.job
            if job.cancelled.is_set() or running.text.stopped:
                sequence.cancelled = True
            if not job.started and (sequence.stats.prefill_calls or sequence.finished):
                job.started = True
                job.start()
            if sequence.finished:
                running.end()
                del self.jobs[sequence]
        self.metrics.batch_rows.set(self.scheduler.occupancy)


def _deliver(calls: list[Callable[[], None]]) -> None:
    for call in calls:
        call()


@dataclass
class _Running:
    job: Job
    completion: CompletionText
    text: StopText
    post: Callable[[Callable[[], None]], None]  # to the event loop, after this step
    pushed: int = 0

    def push(self, tokens: list[int]) -> None:
        job = self.job
        if tokens and not self.pushed:
            job.first_token()
        self.pushed += len(tokens)
        final = self.text.push(self.completion.push(tokens))
        if final:
            self.post(functools.partial(job.emit, final))

    def end(self) -> None:
        job, text = self.job, self.text
        if not text.stopped and not job.cancelled.is_set():
            tail = text.push(self.completion.flush()) + text.flush()
            if tail:
                self.post(functools.partial(job.emit, tail))
        stats = job.sequence.stats
        job.leave(job.sequence)
        self.post(functools.partial(job.outcome.set_result, Outcome(
            len(job.sequence.token_ids), stats.prompt_tokens,
            protocol.finish_reason(stats.stop_reason, text.stopped), stats.cached_prompt_tokens)))
