"""The event stream: every event gets the next sequence number, is persisted, then fanned out.

Invariant: `snapshot_then_follow` hands a subscriber a snapshot taken at sequence S and
every event after S, nothing twice and nothing missing, because the cut of the snapshot and
the subscription are taken under the same lock that numbers events.

Only the *cut* must be taken under the lock: the sequence number S, the subscription, the
live state, and per tenant the newest recorded step and eval (a step or eval row is written
under this lock together with the event that announces it). The bulky part (every tenant's
full history, the recent log) is read afterwards, outside the lock, bounded by that cut:
steps and evals up to the marks, log events with seq <= S. Rows are append-only, so what is
read later is exactly what existed at S; emitters are never held up by a snapshot.

Persisted events are the log and a thin index of the rest: a step event is stored as its
step number only (its figures are in the steps table); old events are pruned by the store.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable

from engine.store import Store

PERSISTED = {"step", "eval", "state", "log", "engine"}  # phase/system are high-rate and transient
STORED_FIELDS = {"step": ("step",)}  # kinds whose data lives in a table of its own: keep a reference only


class Subscription:
    """A bounded queue of events for one client; a client that falls too far behind is dropped."""

    def __init__(self, maxsize: int = 10000):
        self.queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.overflowed = False

    def put(self, event: dict) -> None:
        try:
            self.queue.put_nowait(event)
        except queue.Full:
            self.overflowed = True

    def get(self, timeout: float | None = None) -> dict | None:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None


class EventBus:
    def __init__(self, store: Store):
        self.store = store
        self.lock = threading.RLock()
        self.seq = store.last_event_seq()
        self.subscribers: list[Subscription] = []
        self.listeners: list[Callable[[dict], None]] = []

    def emit(self, kind: str, tenant: str | None = None, **data: Any) -> dict:
        with self.lock:
            self.seq += 1
            event = {"seq": self.seq, "time": time.time(), "kind": kind, "tenant": tenant, "data": data}
            if kind in PERSISTED:
                stored = data
                if kind in STORED_FIELDS:
                    stored = {k: data[k] for k in STORED_FIELDS[kind] if k in data}
                try:
                    self.store.add_event(self.seq, kind, tenant, stored)
                except Exception:  # noqa: BLE001 - a full disk must not stop the stream
                    pass
            for sub in list(self.subscribers):
                sub.put(event)
                if sub.overflowed:
                    self.subscribers.remove(sub)
            for listener in list(self.listeners):
                listener(event)
            return event

    def snapshot_then_follow(self, cut: Callable[[], Any]) -> tuple[Any, int, Subscription]:
        """Under the lock: `cut()` (keep it cheap: live state and marks, not histories), the
        current sequence number S and a subscription that will receive every event after S."""
        with self.lock:
            sub = Subscription()
            self.subscribers.append(sub)
            return cut(), self.seq, sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self.lock:
            if sub in self.subscribers:
                self.subscribers.remove(sub)
