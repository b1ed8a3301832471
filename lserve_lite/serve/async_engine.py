"""One engine thread steps the LLMEngine for every client; asyncio handlers submit and read per-request queues.

The engine thread owns the engine: it adds the submitted requests, runs `step()` while work exists and
sleeps on a condition otherwise. A constrained request's grammar matcher is built before it is submitted, in a
thread of its own: a new large schema takes up to seconds, which on the engine thread stalled every client. Outputs go back to the event loop in one `call_soon_threadsafe` per step
and land in per-request asyncio queues. An abort (client gone) is applied at the start of the next step,
which frees the request's KV pages.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..engine.llm_engine import LLMEngine, StepOutput
from ..errors import InvalidRequestError, LServeError
from ..sampling_params import SamplingParams
from .metrics import Metrics
from .protocol import ApiError, param_of

log = logging.getLogger("lserve_lite.serve")

_ACCEPTED = object()  # the first item of a request's queue once the engine took it


@dataclass
class _Submission:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float
    guide: tuple[object, np.ndarray] | None  # the response_format's matcher, built off the engine thread
    cache_salt: str | None  # vLLM's: prefix-cache pages shared only within one salt


class RequestHandle:
    """The outputs of one admitted request, in order (async iterator); `close()` aborts it if unfinished."""

    def __init__(self, engine: AsyncEngine, request_id: str, queue: asyncio.Queue):
        self.engine, self.request_id, self.queue = engine, request_id, queue
        self.done = False  # the final output (or an error) has been received
        self.closed = False

    def __aiter__(self) -> RequestHandle:
        return self

    async def __anext__(self) -> StepOutput:
        if self.done:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.done = True
            raise item
        self.done = item.finished
        return item

    def close(self) -> None:
        """Abort the request unless it has finished (idempotent; call on the event loop)."""
        if not self.done and not self.closed:
            self.closed = True
            self.engine.abort(self.request_id)


class AsyncEngine:
    """Continuous batching of all clients' requests on one engine thread."""

    def __init__(self, engine: LLMEngine, max_queue: int = 256, metrics: Metrics | None = None):
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._queues: dict[str, asyncio.Queue] = {}  # event-loop side: requests in flight
        self._cv = threading.Condition()
        self._inbox: list[_Submission] = []  # guarded by _cv
        self._adding: set[str] = set()  # guarded by _cv: taken from the inbox, not yet added to the engine
        self._late_aborts: set[str] = set()  # guarded by _cv: aborts of those, applied once they are added
        self._stopping = False
        self._timing: dict[str, list[float]] = {}  # engine-thread side: [arrival, last token time]
        self._thread: threading.Thread | None = None
        # grammars are built one at a time (Grammars' lock), on a thread of their own: in the event loop's default
        # workers, which decode every request's body, builds waiting their turn held every other client's request
        self._builder = ThreadPoolExecutor(1, thread_name_prefix="lserve-grammar")

    # -- lifecycle (event loop) -----------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._thread = threading.Thread(target=self._run, name="lserve-engine", daemon=True)
        self._thread.start()
        # llguidance's tokenizer: built at the first structured request, it held the GIL and so every stream; now
        # at start, in the grammar thread (startup does not wait), and a structured request meanwhile queues behind it
        self._builder.submit(self._prepare_grammars)

    def shutdown(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._builder.shutdown(wait=False)
        for q in self._queues.values():
            q.put_nowait(ApiError(503, "the server is shutting down"))
        self._queues.clear()

    def _prepare_grammars(self) -> None:
        try:
            self.engine.grammars.prepare()
        except Exception:  # a request that needs it meets the same error, as a 500
            log.exception("building llguidance's tokenizer failed")

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def max_in_flight(self) -> int:
        return self.engine.ecfg.max_num_seqs + self.max_queue

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    @property
    def num_waiting(self) -> int:
        return len(self._inbox) + len(self.engine.scheduler.waiting)

    # -- requests (event loop) ------------------------------------------------------------------
    def check_room(self, count: int, param: str = "n") -> None:
        """A request of `count` sequences: 400 if it can never be admitted (naming `param`, the field that made
        them), 429 if not now (before any starts)."""
        if count > self.max_in_flight:
            raise ApiError(400, f"the request needs {count} sequences (prompts x n); this server holds at most "
                           f"{self.max_in_flight} (max_num_seqs + max_queue)", param)  # fmt: skip
        if len(self._queues) + count > self.max_in_flight:
            raise ApiError(429, f"server overloaded: {len(self._queues)} sequences in flight, and this request's "
                           f"{count} would pass the {self.max_in_flight} it holds (max_num_seqs + max_queue); "
                           "retry later")  # fmt: skip

    async def submit(
        self,
        jobs: list[tuple[list[int], SamplingParams, str]],
        param: str = "n",
        cache_salt: str | None = None,
    ) -> list[RequestHandle | BaseException]:
        """Hand a request's sequences (prompt ids, params, request id) to the engine: room checked (`param` as
        check_room names it) and every one queued in one synchronous step, so that no other request takes the room
        between (a 429 starts none); then each one's RequestHandle once admitted, or the ApiError that refused it.
        Cancelled at any point (the client gone), it aborts every sequence it queued: one admitted has no handle
        left to read or close it. `cache_salt`: the request's (vLLM's), for all its sequences."""
        if not self.alive:
            raise ApiError(503, "the engine is not running")
        self.check_room(len(jobs), param)
        arrival = time.monotonic()
        guides: list = [None] * len(jobs)
        if any(params.constrained for _, params, _ in jobs):
            guides = await asyncio.get_running_loop().run_in_executor(
                self._builder, self._guides, [params for _, params, _ in jobs]
            )
            self.check_room(len(jobs), param)  # again: others may have taken the room meanwhile
        queues: list[tuple[str, asyncio.Queue]] = []
        with self._cv:
            if self._stopping:  # shut down while the grammars were built: nothing would ever take the inbox
                raise ApiError(503, "the server is shutting down")
            for (prompt_ids, params, rid), guide in zip(jobs, guides):
                queues.append((rid, asyncio.Queue()))
                self._queues[rid] = queues[-1][1]
                self._inbox.append(_Submission(rid, prompt_ids, params, arrival, guide, cache_salt))
            self._cv.notify()
        try:
            return await asyncio.gather(
                *(self._admitted(rid, q) for rid, q in queues), return_exceptions=True
            )
        except asyncio.CancelledError:  # at any point: those already admitted too, whose handles are lost
            for rid, _ in queues:
                self.abort(rid)
            raise

    def _guides(self, params: list[SamplingParams]) -> list[tuple[object, np.ndarray] | None]:
        """Each constrained sequence's matcher (in a worker thread; the engine keeps a schema's, so n candidates
        build it once); an invalid schema is a 400."""
        try:
            return [self.engine.guide(p) for p in params]
        except InvalidRequestError as e:
            raise ApiError(400, str(e), param_of(str(e))) from None

    async def _admitted(self, rid: str, queue: asyncio.Queue) -> RequestHandle:
        first = await queue.get()
        if isinstance(first, BaseException):
            raise first
        return RequestHandle(self, rid, queue)

    def abort(self, request_id: str) -> None:
        with self._cv:
            pending = next((s for s in self._inbox if s.request_id == request_id), None)
            if pending is not None:  # never reached the engine: drop it here
                self._inbox.remove(pending)
                self._queues.pop(request_id, None)
                return
            if request_id in self._adding:  # on its way into the engine, which aborts only what it holds
                self._late_aborts.add(request_id)
                return
            self.engine.abort(request_id)
            self._cv.notify()

    def abort_all(self) -> None:
        """The server is stopping (Ctrl-C, SIGTERM): every request in flight ends now, as an abort (a stream gets
        its last chunk and [DONE]); one not yet in the engine gets a 503. Call on the event loop."""
        with self._cv:
            waiting = {s.request_id for s in self._inbox}
        for rid in list(self._queues):
            if rid in waiting:
                self._deliver([(rid, ApiError(503, "the server is shutting down"))])
            self.abort(rid)

    def _deliver(self, posts: list[tuple[str, object]]) -> None:
        for rid, item in posts:
            q = self._queues.get(rid)
            if q is None:
                continue
            q.put_nowait(item)
            if isinstance(item, BaseException) or (isinstance(item, StepOutput) and item.finished):
                del self._queues[rid]

    # -- the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        eng = self.engine
        while True:
            with self._cv:
                while not (self._inbox or self._stopping or eng.has_unfinished()):
                    self._cv.wait()
                if self._stopping:
                    return
                new, self._inbox = self._inbox, []
                self._adding = {s.request_id for s in new}
            posts: list[tuple[str, object]] = [(s.request_id, self._add(s)) for s in new]
            with self._cv:
                for rid in self._late_aborts:
                    eng.abort(rid)
                self._adding, self._late_aborts = set(), set()
            if eng.has_unfinished():
                try:
                    outs = eng.step()
                except Exception as e:
                    if eng.fault():  # no step can run (a tensor-parallel worker is gone): its line says why
                        log.error("engine stopped, failing the requests in flight: %s", e)
                    else:
                        log.exception("engine step failed; failing the requests in flight")
                    outs, posts = [], posts + self._fail_all(_step_error(e))
                for out in outs:
                    self._observe(out)
                    posts.append((out.request_id, out))
            if posts:
                try:
                    self.loop.call_soon_threadsafe(self._deliver, posts)
                except RuntimeError:  # the event loop is closed: the server is going away
                    return

    def _add(self, s: _Submission) -> object:
        try:
            self.engine.add_request(
                s.prompt_ids, s.params, s.request_id, guide=s.guide, cache_salt=s.cache_salt
            )
        except InvalidRequestError as e:
            return ApiError(400, str(e), param_of(str(e)))
        except Exception:
            log.exception("add_request failed")
            return ApiError(500, "internal server error")
        self._timing[s.request_id] = [s.arrival, 0.0]
        return _ACCEPTED

    def _observe(self, out: StepOutput) -> None:
        t = self._timing.get(out.request_id)
        if t is None:
            return
        now = time.monotonic()
        if out.token_ids:
            if t[1]:
                self.metrics.next_token(now - t[1])
            else:
                self.metrics.first_token(now - t[0])
            t[1] = now
        if out.finished:
            self.metrics.finished(out.finish_reason or "abort", out.num_prompt_tokens, out.num_output_tokens,
                                  now - t[0])  # fmt: skip
            del self._timing[out.request_id]

    def _fail_all(self, err: ApiError) -> list[tuple[str, object]]:
        """After a failed step: abort every sequence (frees its pages) and tell its client."""
        rids = list(self._timing)
        for rid in rids:
            self.engine.abort(rid)
        self._timing.clear()
        try:
            self.engine.step()  # applies the aborts; nothing is left to schedule
        except Exception:
            log.exception("engine cleanup step failed")
            time.sleep(0.1)
        return [(rid, err) for rid in rids]


def _step_error(e: Exception) -> ApiError:
    """What clients see of a failed step: an lserve-lite error's own line (503), else nothing internal."""
    if isinstance(e, LServeError):
        return ApiError(503, str(e))
    return ApiError(500, "internal server error")
