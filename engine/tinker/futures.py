"""Tinker's futures: every long request answers at once with a request id, and the client
long-polls `retrieve_future` for the result.

The SDK retries a request (408/429/5xx, lost connections) for minutes with the same seq_id
and X-Idempotency-Key: a retry must not train twice, so a request's idempotency key (model
and seq_id, or the header) maps to the request id it got the first time.

A result is one of: a concurrent Future (engine work) with an `encode` turning its result
into the response, or a `poll` callable answering (done, response) -- e.g. a training run
that becomes ready when its tenant has warmed up.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from engine.client_jobs import ClientJobError
from engine.external_jobs import SampleRefused

POLL_S = 30.0  # a retrieve_future waits at most this long, then answers try_again (the SDK waits 45 s)
KEEP = 4096  # finished results kept for late or repeated retrieves


class TinkerError(Exception):
    """A request refused at once: HTTP `status`, Tinker's error `category`."""

    def __init__(self, message: str, status: int = 400, category: str = "user"):
        super().__init__(message)
        self.status, self.category = status, category


@dataclass
class Entry:
    future: concurrent.futures.Future | None = None
    encode: Callable[[Any], Any] | None = None  # result -> bytes (protobuf) or dict (JSON)
    poll: Callable[[], tuple[bool, Any]] | None = None
    waiting: Callable[[], str] | None = None  # the queue state to report while it waits
    extra: dict = field(default_factory=dict)  # e.g. sample_sequence_ids for the promise
    created: float = field(default_factory=time.time)


def failure(exc: BaseException) -> dict:
    category = getattr(exc, "category", None)
    if category is None:
        category = "user" if isinstance(exc, (ValueError, SampleRefused)) else "server"
    if isinstance(exc, SampleRefused):
        category = "server" if exc.kind == "stopping" else "user"
    message = str(exc) if isinstance(exc, (ClientJobError, TinkerError, SampleRefused)) else f"{type(exc).__name__}: {exc}"
    return {"error": message, "category": category}


class FutureTable:
    def __init__(self):
        self.lock = threading.Lock()
        self.entries: collections.OrderedDict[str, Entry] = collections.OrderedDict()
        self.keys: dict[tuple, str] = {}
        self.numbers = itertools.count(1)

    def add(self, key: tuple | None, make: Callable[[], Entry]) -> tuple[str, Entry]:
        """The request id for `key` (the one it got before, on a retry), making the entry once."""
        with self.lock:
            if key is not None and key in self.keys and self.keys[key] in self.entries:
                rid = self.keys[key]
                return rid, self.entries[rid]
        entry = make()  # may raise TinkerError: nothing is recorded
        with self.lock:
            if key is not None and key in self.keys and self.keys[key] in self.entries:
                if entry.future is not None:
                    entry.future.cancel()  # a racing duplicate: the first one stands
                rid = self.keys[key]
                return rid, self.entries[rid]
            rid = f"req-{next(self.numbers)}"
            self.entries[rid] = entry
            if key is not None:
                self.keys[key] = rid
            self._prune()
        return rid, entry

    def _prune(self) -> None:
        while len(self.entries) > KEEP:
            rid, entry = next(iter(self.entries.items()))
            if entry.future is not None and not entry.future.done():
                break
            self.entries.popitem(last=False)
            for key in [k for k, v in self.keys.items() if v == rid]:
                del self.keys[key]

    async def result(self, request_id: str, timeout: float = POLL_S) -> tuple[str, Any]:
        """("ok", bytes | dict) | ("failed", {"error", "category"}) | ("wait", queue_state)."""
        with self.lock:
            entry = self.entries.get(request_id)
        if entry is None:
            return "failed", {"error": f"no request {request_id!r} (unknown, or too old)", "category": "user"}
        deadline = time.time() + timeout
        while True:
            if entry.poll is not None:
                try:
                    done, value = entry.poll()
                except Exception as exc:  # noqa: BLE001
                    return "failed", failure(exc)
                if done:
                    return "ok", value
            elif entry.future.done():
                if entry.future.cancelled():
                    return "failed", {"error": "the request was cancelled", "category": "user"}
                exc = entry.future.exception()
                if exc is not None:
                    return "failed", failure(exc)
                try:
                    return "ok", entry.encode(entry.future.result())
                except Exception as exc:  # noqa: BLE001
                    return "failed", failure(exc)
            if time.time() >= deadline:
                return "wait", entry.waiting() if entry.waiting else "active"
            if entry.future is not None and entry.poll is None:
                await asyncio.wrap_future(_first_of(entry.future, deadline - time.time()))
            else:
                await asyncio.sleep(0.05)


def _first_of(future: concurrent.futures.Future, timeout: float) -> concurrent.futures.Future:
    """A future done when `future` is, or after `timeout` seconds, whichever comes first."""
    out: concurrent.futures.Future = concurrent.futures.Future()

    def settle(_=None):
        if not out.done():
            try:
                out.set_result(None)
            except concurrent.futures.InvalidStateError:
                pass

    future.add_done_callback(settle)
    timer = threading.Timer(max(0.0, timeout), settle)
    timer.daemon = True
    timer.start()
    out.add_done_callback(lambda _f: timer.cancel())
    return out
