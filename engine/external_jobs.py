"""Sampling for clients outside the tenants' steps (the HTTP APIs): jobs in the shared batch.

A client thread calls `Engine.sample(model, requests)` and gets a concurrent Future. The
job waits in `pending` (under the engine lock; the scheduler is woken) until the scheduler
thread submits it to the rollout backend in its next turn, beside every tenant's rows, under
a tag of its own (`ext#N`, never a tenant's `e1#N`). When `advance()` returns that tag the
future gets the completions. Only the scheduler thread touches the backend.

Invariant: every job's future is resolved exactly once -- with its completions, with an
error (its tenant was killed, failed or finished; the engine stopped; the backend refused
it), or cancelled by the client -- and a job whose future is resolved holds no rows in the
backend.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
from dataclasses import dataclass

from engine.rollout.base import SampleRequest

TAG_PREFIX = "ext#"
BASE_ADAPTER = "__base__"  # no adapter: engine.batched_lora routes these rows to the base model


class SampleRefused(RuntimeError):
    """An external sampling job could not be served; the message says why. `kind`: "gone" (its
    adapter left the engine), "stopping" (the engine stops) or "failed" (the sampler refused it)."""

    def __init__(self, message: str, kind: str = "failed"):
        super().__init__(message)
        self.kind = kind


@dataclass
class ExternalJob:
    tag: str
    adapter: str
    requests: list[SampleRequest]
    future: concurrent.futures.Future


def resolve(future: concurrent.futures.Future, result=None, error: BaseException | None = None) -> None:
    """Settle a future unless its client cancelled it meanwhile (that race is harmless)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


def is_external(tag) -> bool:
    return isinstance(tag, str) and tag.startswith(TAG_PREFIX)


class ExternalJobs:
    """The queue of external jobs (filled by any thread) and those in flight (scheduler only)."""

    def __init__(self, lock):
        self.lock = lock  # the engine's lock: `pending` is only touched under it
        self.pending: collections.deque[ExternalJob] = collections.deque()
        self.in_flight: dict[str, ExternalJob] = {}
        self.numbers = itertools.count(1)
        self.closed = False  # set (under the lock) once the scheduler has stopped

    # -- any thread -------------------------------------------------------------------
    def add(self, adapter: str, requests: list[SampleRequest]) -> concurrent.futures.Future:
        """Queue a job (the caller holds the engine lock and wakes the scheduler)."""
        if self.closed:
            raise SampleRefused("the engine is stopping", "stopping")
        for req in requests:
            req.adapter = adapter
        job = ExternalJob(f"{TAG_PREFIX}{next(self.numbers)}", adapter, requests, concurrent.futures.Future())
        self.pending.append(job)
        return job.future

    # -- the scheduler thread -----------------------------------------------------------
    def submit_pending(self, backend, adapter_live) -> None:
        """Put every waiting job into the backend's batch; drop jobs their client gave up on."""
        with self.lock:
            jobs, self.pending = list(self.pending), collections.deque()
        for job in jobs:
            if job.future.cancelled():
                continue
            if job.adapter != BASE_ADAPTER and not adapter_live(job.adapter):
                resolve(job.future, error=SampleRefused(f"{job.adapter}'s adapter is no longer loaded", "gone"))
                continue
            try:
                backend.submit(job.tag, job.requests)
            except Exception as exc:  # noqa: BLE001 - a bad request fails its own job only
                resolve(job.future, error=SampleRefused(f"sampling failed: {type(exc).__name__}: {exc}"))
                continue
            self.in_flight[job.tag] = job
        for tag, job in list(self.in_flight.items()):
            if job.future.cancelled():  # the HTTP client went away: its rows leave the batch
                backend.cancel(tag)
                del self.in_flight[tag]

    def done(self, tag, result) -> bool:
        """A job came back from `advance()`; False if the tag is not an external job's."""
        if not is_external(tag):
            return False
        job = self.in_flight.pop(tag, None)
        if job is not None:
            if isinstance(result, BaseException):
                resolve(job.future, error=SampleRefused(f"sampling failed: {type(result).__name__}: {result}"))
            else:
                resolve(job.future, result)
        return True

    def drop_adapter(self, adapter: str, backend, why: str) -> None:
        """The adapter leaves the engine: its jobs leave the batch and fail with `why`."""
        with self.lock:
            gone = [j for j in self.pending if j.adapter == adapter]
            self.pending = collections.deque(j for j in self.pending if j.adapter != adapter)
        for tag, job in list(self.in_flight.items()):
            if job.adapter == adapter:
                backend.cancel(tag)
                del self.in_flight[tag]
                gone.append(job)
        for job in gone:
            resolve(job.future, error=SampleRefused(why, "gone"))

    def fail_all(self, why: str) -> None:
        """The engine stops: every job still waiting or sampling fails."""
        with self.lock:
            self.closed = True
            jobs, self.pending = list(self.pending), collections.deque()
        jobs += list(self.in_flight.values())
        self.in_flight.clear()
        for job in jobs:
            resolve(job.future, error=SampleRefused(why, "stopping"))

    @property
    def waiting(self) -> bool:
        """Jobs wait to be submitted (read under the engine lock by the idle wait)."""
        return bool(self.pending)
