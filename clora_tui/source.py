"""Where the app's data comes from: a live engine over its socket, or a recording.

Both sources have the same small face, used only from the app's thread workers:
`open()` -> {"snapshot", "seq"}, `next_event(timeout)`, `call(op, **args)`,
`start_engine()`, `clock()`. The recorded source makes the app runnable (and its
screenshots stable) with no engine at all.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from clora_tui.client import EngineClient, EngineRefused, EngineUnavailable, new_idempotency_key
from engine import protocol

__all__ = ["EngineRefused", "EngineSource", "EngineUnavailable", "RecordedSource"]


class EngineSource:
    """A live engine under CLORA_HOME: one connection follows events, another sends requests."""

    live = True

    def __init__(self, home: Path | str | None = None, autostart: bool = True, engine_args: dict | None = None):
        self.home = Path(home).expanduser() if home else protocol.clora_home()
        self.autostart = autostart
        self.engine_args = dict(engine_args or {})
        self.follower: EngineClient | None = None
        self.requester: EngineClient | None = None
        self.request_lock = threading.Lock()

    def clock(self) -> float:
        return time.time()

    def open(self) -> dict:
        self.close_follower()
        client = EngineClient(self.home, timeout=30.0).connect()
        try:
            answer = client.subscribe()
        except Exception:
            client.close()
            raise
        self.follower = client
        return answer

    def next_event(self, timeout: float = 0.5) -> dict | None:
        if self.follower is None:
            raise EngineUnavailable("not connected")
        return self.follower.next_event(timeout)

    def call(self, op: str, **args: Any) -> Any:
        if op in protocol.IDEMPOTENT_OPS:  # one key for both attempts: a retry never starts a duplicate
            args.setdefault("idempotency_key", new_idempotency_key())
        with self.request_lock:
            for attempt in (1, 2):
                if self.requester is None:
                    self.requester = EngineClient(self.home, timeout=60.0).connect()
                try:
                    return self.requester.call(op, **args)
                except EngineUnavailable:
                    self.requester.close()
                    self.requester = None
                    if attempt == 2 or op == "shutdown":
                        raise
        raise EngineUnavailable("unreachable")

    def start_engine(self) -> None:
        """Start the daemon (detached); returns once its socket answers, before warm-up ends,
        so the app can show the warm-up itself."""
        from clora_tui.launcher import start_daemon

        start_daemon(self.home, wait_ready=False, say=lambda _message: None, **self.engine_args)

    def close_follower(self) -> None:
        if self.follower is not None:
            self.follower.close()
            self.follower = None

    def close(self) -> None:
        self.close_follower()
        with self.request_lock:
            if self.requester is not None:
                self.requester.close()
                self.requester = None


class RecordedSource:
    """A recording: {"clock": t, "snapshot": {...}, "events": [...]}; requests are refused."""

    live = False
    autostart = False

    def __init__(self, recording: dict[str, Any], home: Path | str = "(recorded)"):
        self.recording = recording
        self.home = Path(home)
        self.events = list(recording.get("events") or [])
        self.fixed_clock = float(recording.get("clock") or 0.0)

    @classmethod
    def from_file(cls, path: Path | str) -> "RecordedSource":
        return cls(json.loads(Path(path).read_text()))

    def clock(self) -> float:
        return self.fixed_clock

    def open(self) -> dict:
        return {"snapshot": self.recording["snapshot"], "seq": self.recording.get("seq", 0)}

    def next_event(self, timeout: float = 0.5) -> dict | None:
        if self.events:
            return self.events.pop(0)
        time.sleep(timeout)
        return None

    def call(self, op: str, **args: Any) -> Any:
        raise EngineRefused("offline", f"{op}: this is a recording; no engine to send it to")

    def start_engine(self) -> None:
        raise EngineUnavailable("a recording cannot start an engine")

    def close(self) -> None:
        pass
