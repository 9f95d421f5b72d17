"""The engine thread of `rdnac serve`, and the asyncio side of one HTTP request.

LLMEngine is not thread-safe, so one dedicated thread owns it: it admits
submitted requests, applies aborts, and loops `step()` while there is work,
sleeping on a condition when idle. HTTP handlers talk to it only through
`submit`/`abort` (thread-safe queues) and receive events through a callback
that the engine thread calls; `RequestGroup` turns those callbacks into an
asyncio queue on the server's event loop.

Events a sink receives, in order, for one request id:
    ("accepted", num_prompt_tokens)  then ("output", RequestOutput)... until one is finished
    ("error", RdnacError)            add_request refused it (nothing else follows)
    ("aborted", None)                after `abort`, if the request was still live
    ("failed", message)              this request failed in the engine (it alone: the engine keeps
                                     serving), or the engine failed for good (its thread died, or a
                                     failed step's probe failed: LLMEngine.failure); nothing else follows

Once the engine has failed for good, `error` says why: /health answers 503 with it, every request in
flight and every later one fails with it (503), and the log has one line saying so.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from rdnac.errors import EngineError, RdnacError
from rdnac.serve.metrics import ServeMetrics

log = logging.getLogger("rdnac.serve")

Sink = Callable[[tuple[str, Any]], None]


@dataclass
class _Submission:
    request_id: str
    prompt: Any
    params: Any
    chat: bool
    sink: Sink
    arrival: float
    prefill_after: str | None = None


@dataclass
class _Live:
    sink: Sink
    arrival: float
    has_output: bool = False
    is_scheduled: bool = False  # out of the scheduler's waiting queue (its queue time observed)
    first_token: float = 0.0  # when the first token came out
    last_token: float = 0.0  # when the latest token came out
    num_tokens: int = 0


class EngineWorker:
    def __init__(self, llm, metrics: ServeMetrics | None = None):
        self.llm = llm
        self.metrics = metrics or ServeMetrics()
        self.error: str | None = None  # set once the engine failed for good (its thread died, or LLMEngine.failure)
        self._cond = threading.Condition()
        self._new: list[_Submission] = []
        self._aborts: list[str] = []
        self._stopping = False
        self._live: dict[str, _Live] = {}  # engine thread only
        self._thread = threading.Thread(target=self._run, name="rdnac-engine", daemon=True)

    # ------------------------------------------------------------ any thread

    def start(self) -> None:
        self._snapshot()
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def submit(self, request_id: str, prompt, params, chat: bool, sink: Sink, prefill_after: str | None = None) -> None:
        """`prefill_after`: an earlier submission with the same prompt whose prefill this one shares
        (LLMEngine.add_request)."""
        with self._cond:
            if self.error is not None or self._stopping:
                sink(("failed", self.error or "the server is shutting down"))
                return
            self._new.append(_Submission(request_id, prompt, params, chat, sink, time.perf_counter(), prefill_after))
            self._cond.notify()

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._aborts.append(request_id)
            self._cond.notify()

    # ------------------------------------------------------------ engine thread

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._new or self._aborts or self._stopping or self.llm.has_unfinished()):
                        self._cond.wait()
                    if self._stopping:
                        break
                    new, self._new = self._new, []
                    aborts, self._aborts = set(self._aborts), []
                self._admit([s for s in new if s.request_id not in aborts])
                self._abort(aborts)
                if self.llm.has_unfinished():
                    outputs = self.llm.step()
                    if self.llm.failure is not None:  # said before any request hears of it: they answer 503
                        with self._cond:
                            self.error = self.llm.failure
                    self._dispatch(outputs)
                self._snapshot()
                if self.error is not None:  # the model no longer runs: stop taking requests
                    self._fail_everything(self.error)
                    log.error("rdnac: the engine failed; /health answers 503 and every request fails until the "
                              "server is restarted: %s", self.error)
                    break
        except Exception as e:  # the engine state is unknown now: fail every request; /health turns 503
            log.exception("rdnac engine thread died")
            self._fail_everything(f"the engine failed: {type(e).__name__}: {e}")

    def _fail_everything(self, error: str) -> None:
        with self._cond:
            self.error = error
            pending, self._new = self._new, []
        for s in pending:
            s.sink(("failed", self.error))
        for live in self._live.values():
            live.sink(("failed", self.error))
        self._live.clear()

    def _admit(self, submissions: list[_Submission]) -> None:
        for s in submissions:
            try:
                num_prompt_tokens = self.llm.add_request(s.request_id, s.prompt, s.params, chat=s.chat,
                                                         prefill_after=s.prefill_after)
            except EngineError as e:  # the engine failed for good (the loop stops after this step)
                s.sink(("failed", str(e)))
                continue
            except RdnacError as e:  # a bad request: tell its client, keep serving
                self.metrics.on_rejected()
                s.sink(("error", e))
                continue
            except Exception as e:  # noqa: BLE001 -- nothing was queued: fail this request, keep serving
                log.exception("rdnac: admitting request %r failed", s.request_id)
                self.metrics.on_finished("error", time.perf_counter() - s.arrival)
                s.sink(("failed", _failure(e)))
                continue
            self.metrics.on_admitted(num_prompt_tokens)
            self._live[s.request_id] = _Live(s.sink, s.arrival)
            s.sink(("accepted", num_prompt_tokens))

    def _abort(self, request_ids: set[str]) -> None:
        for rid in request_ids:
            live = self._live.pop(rid, None)
            if live is None:
                continue  # finished already, or never admitted
            self.llm.abort_request(rid)
            self.metrics.on_finished("abort", time.perf_counter() - live.arrival)
            live.sink(("aborted", None))

    def _dispatch(self, outputs) -> None:
        now = time.perf_counter()
        for out in outputs:
            live = self._live.get(out.request_id)
            if live is None:
                continue  # aborted while its step ran
            if out.new_token_ids:
                self.metrics.on_tokens(len(out.new_token_ids))
                if not live.has_output:
                    live.has_output = True
                    live.first_token = now
                    self.metrics.on_first_token(now - live.arrival)
                else:
                    self.metrics.on_inter_token(now - live.last_token)
                live.last_token = now
                live.num_tokens += len(out.new_token_ids)
            if out.finished:
                del self._live[out.request_id]
                ttft = live.first_token - live.arrival if live.has_output else None
                self.metrics.on_finished(out.finish_reason or "stop", now - live.arrival, live.num_tokens, ttft)
            if out.error is not None:  # the engine's own failure is said as is: it does not keep serving
                live.sink(("failed", str(out.error) if isinstance(out.error, EngineError) else _failure(out.error)))
            else:
                live.sink(("output", out))

    def _snapshot(self) -> None:
        stats = self.llm.stats()
        self._observe_queued()
        is_caching = self.llm.block_manager.enable_prefix_caching
        self.metrics.set_gauges(
            running=stats["running"], waiting=stats["waiting"], preemptions=stats["preemptions"],
            kv_blocks_free=stats["free_blocks"], kv_blocks_total=stats["total_blocks"],
            # every admitted prompt token is looked up in the prefix cache when it is on (vLLM counts tokens)
            prefix_cache_queries=stats["prompt_tokens"] if is_caching else 0,
            prefix_cache_hits=stats["prefix_cache_hit_tokens"])

    def _observe_queued(self) -> None:
        """Queue time of each live request the last step took out of the scheduler's waiting queue."""
        waiting = {seq.seq_id for seq in self.llm.scheduler.waiting}
        now = time.perf_counter()
        for request_id, live in self._live.items():
            if not live.is_scheduled and request_id not in waiting:
                live.is_scheduled = True
                self.metrics.on_queued(now - live.arrival)


def _failure(error: Exception) -> str:
    return f"the request failed in the engine ({type(error).__name__}: {error}); the server keeps serving"


class RequestGroup:
    """The engine requests behind one HTTP request (one per prompt), as seen from the event loop."""

    def __init__(self, worker: EngineWorker, request_id: str, num_requests: int):
        self.worker = worker
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.ids = [request_id] if num_requests == 1 else [f"{request_id}-{i}" for i in range(num_requests)]
        self.num_prompt_tokens = [0] * num_requests
        self._unfinished = set(range(num_requests))
        self._early: list[tuple[int, Any]] = []  # outputs that arrived while others still awaited admission

    def submit(self, prompts: list, params, chat: bool, num_choices: int = 1) -> None:
        """`params`: one SamplingParams for all, or one per prompt. `num_choices`: prompts come in runs of this
        many copies (a request's `n`); each run's later copies share the first's prefill."""
        for i, prompt in enumerate(prompts):
            leader = i - i % num_choices
            self.worker.submit(self.ids[i], prompt, params[i] if isinstance(params, list) else params, chat,
                               self._sink(i), prefill_after=self.ids[leader] if i != leader else None)

    def _sink(self, index: int) -> Sink:
        def deliver(event):  # called on the engine thread
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
            except RuntimeError:  # the event loop is closed: the server stopped and nobody awaits this
                pass
        return deliver

    async def admitted(self) -> None:
        """Wait until every request is admitted; raises the first refusal (aborting the rest)."""
        waiting = set(range(len(self.ids)))
        while waiting:
            index, (kind, payload) = await self.queue.get()
            if kind == "accepted":
                waiting.discard(index)
                self.num_prompt_tokens[index] = payload
            elif kind == "output":
                self._early.append((index, payload))
            else:
                self._unfinished.discard(index)
                self.abort()
                if kind == "error":
                    raise payload
                raise EngineFailed(str(payload))

    async def outputs(self):
        """Yield (index, RequestOutput) until every request has finished."""
        for index, out in self._early:
            if out.finished:
                self._unfinished.discard(index)
            yield index, out
        self._early = []
        while self._unfinished:
            index, (kind, payload) = await self.queue.get()
            if kind == "output":
                if payload.finished:
                    self._unfinished.discard(index)
                yield index, payload
            elif kind == "disconnected":
                raise ClientDisconnected()
            elif kind == "aborted":
                self._unfinished.discard(index)
            elif kind == "failed":
                self._unfinished.discard(index)
                raise EngineFailed(str(payload))

    def client_disconnected(self) -> None:
        self.queue.put_nowait((-1, ("disconnected", None)))

    def abort(self) -> None:
        """Abort every request not finished yet (the client is gone, or one prompt was refused)."""
        for index in sorted(self._unfinished):
            self.worker.abort(self.ids[index])
        self._unfinished.clear()

    @property
    def is_finished(self) -> bool:
        return not self._unfinished


class EngineFailed(Exception):
    """The request failed in the engine, or the engine thread died: it cannot complete."""


class ClientDisconnected(Exception):
    """The HTTP client went away before its response was complete."""
