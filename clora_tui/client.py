"""A synchronous client of the engine daemon (used by the CLI, the app's workers and tests)."""

from __future__ import annotations

import json
import secrets
import socket
import time
from pathlib import Path
from typing import Any, Iterator

from engine import protocol


class EngineUnavailable(ConnectionError):
    """No engine answers under this CLORA_HOME."""


class EngineRefused(RuntimeError):
    """The engine answered with an error; `code` and the message say why."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class EngineClient:
    """One authenticated connection. Use one for requests and another for a subscription."""

    def __init__(self, home: Path | str | None = None, timeout: float | None = 60.0):
        self.home = Path(home) if home else protocol.clora_home()
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buffer = bytearray()
        self.next_id = 0
        self.pending_events: list[dict] = []
        self.hello: dict = {}

    def connect(self) -> "EngineClient":
        path = protocol.socket_path(self.home)
        try:
            token = protocol.token_path(self.home).read_text().strip()
        except OSError:
            raise EngineUnavailable(f"no engine under {self.home} (start one with `clora-tui engine start`)") from None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            sock.close()
            raise EngineUnavailable(f"no engine listening on {path} ({exc.strerror or exc}); "
                                    "start one with `clora-tui engine start`") from None
        self.sock = sock
        self.buffer = bytearray()
        self.hello = self.call("hello", token=token)
        return self

    def __enter__(self) -> "EngineClient":
        return self.connect() if self.sock is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for closer in (self.sock,):
            try:
                if closer is not None:
                    closer.close()
            except OSError:
                pass
        self.sock = None

    def _send(self, message: dict) -> None:
        if self.sock is None:
            raise EngineUnavailable("not connected")
        try:
            self.sock.sendall(protocol.encode(message))
        except OSError as exc:
            raise EngineUnavailable(f"engine connection lost: {exc}") from None

    def _read(self, timeout: float | None = None) -> dict | None:
        """The next message, or None if none arrives within the timeout. Reads through its own
        buffer: a timed-out `socket.makefile` reader is unusable afterwards."""
        if self.sock is None:
            raise EngineUnavailable("not connected")
        timeout = timeout if timeout is not None else self.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buffer:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(1 << 16)
            except socket.timeout:
                return None
            except OSError as exc:
                raise EngineUnavailable(f"engine connection lost: {exc}") from None
            if not chunk:
                raise EngineUnavailable("the engine closed the connection")
            self.buffer += chunk
            if len(self.buffer) > protocol.MAX_LINE * 64:
                raise EngineUnavailable("the engine sent an oversized message")
        line, _, rest = bytes(self.buffer).partition(b"\n")
        self.buffer = bytearray(rest)
        return json.loads(line)

    def call(self, op: str, **args: Any) -> Any:
        """Send a request and wait for its response; events that arrive meanwhile are kept.

        `start` and `clone` carry an idempotency key (a fresh one unless given): to retry one
        safely after a timeout or a lost connection, call again with the same key."""
        if op in protocol.IDEMPOTENT_OPS and "idempotency_key" not in args:
            args["idempotency_key"] = new_idempotency_key()
        self.next_id += 1
        req_id = self.next_id
        try:
            self._send(protocol.request(op, req_id, **args))
        except EngineUnavailable:
            # The engine may have said why before closing (e.g. too many connections).
            pending = self._read_pending()
            if pending is not None and pending.get("ok") is False:
                err = pending.get("error") or {}
                raise EngineRefused(err.get("code", "error"), err.get("message", "refused")) from None
            raise
        while True:
            msg = self._read()
            if msg is None:
                raise EngineUnavailable(f"no answer to {op!r} within {self.timeout} s")
            if "event" in msg:
                self.pending_events.append(msg["event"])
                continue
            if msg.get("id") is None and msg.get("ok") is False:  # about the connection, not a request
                err = msg.get("error") or {}
                raise EngineRefused(err.get("code", "error"), err.get("message", "refused"))
            if msg.get("id") != req_id:
                continue
            if msg.get("ok"):
                return msg.get("result")
            err = msg.get("error") or {}
            raise EngineRefused(err.get("code", "error"), err.get("message", "refused"))

    def _read_pending(self) -> dict | None:
        try:
            return self._read(timeout=1.0)
        except (EngineUnavailable, ValueError):
            return None

    def subscribe(self) -> dict:
        """A snapshot (status, tenants with their history, recent log) and its sequence number."""
        return self.call("subscribe")

    def next_event(self, timeout: float | None = None) -> dict | None:
        if self.pending_events:
            return self.pending_events.pop(0)
        msg = self._read(timeout)
        if msg is None:
            return None
        return msg.get("event")

    def events(self, timeout: float | None = None) -> Iterator[dict]:
        while True:
            ev = self.next_event(timeout)
            if ev is None:
                return
            yield ev


def new_idempotency_key() -> str:
    return secrets.token_hex(16)


def connect(home: Path | str | None = None, timeout: float | None = 60.0) -> EngineClient:
    return EngineClient(home, timeout).connect()
