"""The app's link to the engine: thread workers that turn socket traffic into Textual messages.

One worker follows the engine's event stream (connecting, starting the engine when none
answers, reconnecting when it goes away); others send one request each. Connection changes,
snapshots and request answers are posted to the app as messages; stream events go into
`inbox`, which the app folds into its model in batches, so a fast engine cannot flood the
UI with one message per event.

Invariant: the app never folds the events of a connection before that connection's
snapshot. `awaiting_snapshot` is set by the follower before it posts `Attached` and cleared
by the app (`snapshot_applied`) once the snapshot is loaded; until then the app leaves the
inbox alone.
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Iterator

from textual.app import App
from textual.message import Message
from textual.worker import get_current_worker

from clora_tui.source import EngineRefused, EngineSource, EngineUnavailable, RecordedSource


class EngineLink:
    """Owns the source and the threads that talk to it; reports to `app` with messages."""

    class ConnectionChanged(Message):
        """Not attached: `state` is connecting, lost or stopped; `detail` says why."""

        def __init__(self, state: str, detail: str = "") -> None:
            super().__init__()
            self.state, self.detail = state, detail

    class Starting(Message):
        """No engine answered and this app is starting one."""

    class StartFailed(Message):
        def __init__(self, reason: str) -> None:
            super().__init__()
            self.reason = reason

    class Attached(Message):
        """Subscribed: `answer` is the engine's {"snapshot", "seq"}; events after it follow."""

        def __init__(self, answer: dict) -> None:
            super().__init__()
            self.answer = answer

    class Lost(Message):
        """The followed connection broke; the link is reconnecting."""

        def __init__(self, reason: str) -> None:
            super().__init__()
            self.reason = reason

    class RequestDone(Message):
        def __init__(self, op: str, tenant: str | None, result: Any) -> None:
            super().__init__()
            self.op, self.tenant, self.result = op, tenant, result

    class RequestRefused(Message):
        def __init__(self, op: str, tenant: str | None, reason: str) -> None:
            super().__init__()
            self.op, self.tenant, self.reason = op, tenant, reason

    class TenantFetched(Message):
        def __init__(self, detail: dict) -> None:
            super().__init__()
            self.detail = detail

    class StatusFetched(Message):
        def __init__(self, status: dict) -> None:
            super().__init__()
            self.status = status

    def __init__(self, app: App, source: EngineSource | RecordedSource):
        self.app = app
        self.source = source
        self.inbox: collections.deque = collections.deque()
        self.stop_event = threading.Event()
        self.ever_connected = False
        self.stopped_by_user = False  # a shutdown this app asked for: "stopped", not "lost"
        self.awaiting_snapshot = False

    @property
    def live(self) -> bool:
        return self.source.live

    def post(self, message: Message) -> None:
        """Hand a message to the app, unless the app is going away."""
        if not self.stop_event.is_set():
            self.app.post_message(message)

    def wait(self, seconds: float) -> bool:
        """Sleep unless the app stops; True when the worker should end."""
        return self.stop_event.wait(seconds) or get_current_worker().is_cancelled

    def take_events(self) -> Iterator[dict]:
        """The inbox's events, oldest first, removed as they are taken."""
        while self.inbox:
            yield self.inbox.popleft()

    def snapshot_applied(self) -> None:
        self.awaiting_snapshot = False

    def close(self) -> None:
        self.stop_event.set()
        self.source.close()

    # -- workers ----------------------------------------------------------------------------
    def follow(self) -> None:
        """Follow the engine until the app closes (one follower at a time)."""
        self.app.run_worker(self._follow, thread=True, exclusive=True, group="follow", exit_on_error=False)

    def send(self, op: str, tenant: str | None = None, **args: Any) -> None:
        """One request; its answer (or refusal) comes back as RequestDone / RequestRefused."""
        self.app.run_worker(lambda: self._send(op, tenant, args), thread=True, group="requests", exit_on_error=False)

    def fetch_tenant(self, tenant_id: str) -> None:
        self.app.run_worker(lambda: self._fetch_tenant(tenant_id), thread=True, group="fetch", exit_on_error=False)

    def fetch_status(self) -> None:
        self.app.run_worker(self._fetch_status, thread=True, group="fetch", exit_on_error=False)

    def _follow(self) -> None:
        source = self.source
        tried_start = False
        while not self.stop_event.is_set():
            try:
                answer = source.open()
            except EngineUnavailable as exc:
                if not self.ever_connected and not tried_start and source.autostart:
                    tried_start = True
                    self.post(self.Starting())
                    try:
                        source.start_engine()
                    except Exception as start_exc:  # noqa: BLE001 - DaemonError and friends
                        self.post(self.StartFailed(str(start_exc)))
                        if self.wait(2.0):
                            return
                    continue
                state = "stopped" if self.stopped_by_user else ("lost" if self.ever_connected else "connecting")
                self.post(self.ConnectionChanged(state, "— reconnecting" if self.ever_connected else str(exc)))
                if self.wait(1.0):
                    return
                continue
            except EngineRefused as exc:
                self.post(self.ConnectionChanged("connecting", f"refused: {exc}"))
                if self.wait(2.0):
                    return
                continue
            self.ever_connected = True
            self.stopped_by_user = False
            self.awaiting_snapshot = True
            self.post(self.Attached(answer))
            try:
                while not self.stop_event.is_set() and not get_current_worker().is_cancelled:
                    event = source.next_event(0.5)
                    if event is not None:
                        self.inbox.append(event)
            except EngineUnavailable as exc:
                source.close_follower()
                self.post(self.Lost(str(exc)))
                if self.wait(1.0):
                    return

    def _send(self, op: str, tenant: str | None, args: dict) -> None:
        try:
            result = self.source.call(op, **args)
        except EngineRefused as exc:
            self.post(self.RequestRefused(op, tenant, str(exc)))
        except EngineUnavailable as exc:
            self.post(self.RequestRefused(op, tenant, f"no engine: {exc}"))
        else:
            self.post(self.RequestDone(op, tenant, result))

    def _fetch_tenant(self, tenant_id: str) -> None:
        try:
            detail = self.source.call("get", id=tenant_id)
        except (EngineRefused, EngineUnavailable):
            return
        self.post(self.TenantFetched(detail))

    def _fetch_status(self) -> None:
        try:
            status = self.source.call("status")
        except (EngineRefused, EngineUnavailable):
            return
        self.post(self.StatusFetched(status))
