"""One client connection of the engine's Unix socket: bounded reads, the hello with one
total deadline, requests answered in order, and the event stream after `subscribe`.

A client can do nothing to the engine but send requests: malformed or oversized lines,
silence and half-sent messages only cost that client its connection.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

from engine import protocol

if TYPE_CHECKING:
    from engine.server import EngineServer


class Connection:
    """One client: a reader loop in its own thread, plus an event pusher once subscribed."""

    def __init__(self, server: "EngineServer", sock: socket.socket):
        self.server = server
        self.sock = sock
        self.buffer = bytearray()  # a partial line; never more than the line limit + 1 bytes
        self.scanned = 0  # bytes of the buffer known to hold no newline
        self.write_lock = threading.Lock()
        self.closed = threading.Event()
        self.subscription = None
        self.asked_to_stop = False  # sent `shutdown`: gets the final "engine stopped" event

    # -- plumbing --------------------------------------------------------------------
    def send(self, message: dict) -> bool:
        data = protocol.encode(message)
        with self.write_lock:
            if self.closed.is_set():
                return False
            try:
                self.sock.sendall(data)
                return True
            except OSError:
                self.close()
                return False

    def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        if self.subscription is not None:
            self.server.engine.events.unsubscribe(self.subscription)
        for action in (lambda: self.sock.shutdown(socket.SHUT_RDWR), self.sock.close):
            try:
                action()
            except OSError:
                pass

    def read_line(self, limit: int = protocol.MAX_LINE, deadline: float | None = None) -> bytes | None:
        """One line of at most `limit` bytes; None at end of stream (or a half-sent message).
        Raises ProtocolError(too_large) as soon as more than `limit` bytes arrive without a newline
        (nothing more is buffered), socket.timeout when the monotonic `deadline` passes."""
        while True:
            newline = self.buffer.find(b"\n", self.scanned)
            if newline >= 0:
                line = bytes(self.buffer[: newline + 1])
                del self.buffer[: newline + 1]
                self.scanned = 0
                if newline > limit:
                    raise protocol.ProtocolError("too_large", f"message over {limit} bytes")
                return line
            self.scanned = len(self.buffer)
            if len(self.buffer) > limit:
                raise protocol.ProtocolError("too_large", f"message over {limit} bytes")
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise socket.timeout("deadline passed")
                self.sock.settimeout(remaining)
            chunk = self.sock.recv(min(1 << 16, limit + 1 - len(self.buffer)))
            if not chunk:
                return None  # end of stream; a partial line means the client went away mid-message
            self.buffer += chunk

    # -- the loop ----------------------------------------------------------------------
    def run(self) -> None:
        try:
            if self.handshake():
                self.sock.settimeout(None)
                self.serve_requests()
        except (OSError, ValueError):
            pass  # the client went away (reset, timeout, closed file)
        except Exception:  # noqa: BLE001 - a connection must never take the server down
            traceback.print_exc(file=sys.stderr)
        finally:
            self.close()
            self.server.forget(self)

    def handshake(self) -> bool:
        # One deadline for the whole hello: a client trickling a byte now and then gains nothing.
        deadline = time.monotonic() + self.server.hello_timeout
        try:
            line = self.read_line(protocol.MAX_HELLO_LINE, deadline)
        except socket.timeout:
            self.send(protocol.error(None, "unauthorized", f"no hello within {self.server.hello_timeout:g} s"))
            return False
        except protocol.ProtocolError as exc:
            self.send(protocol.error(None, exc.code, str(exc)))
            return False
        if line is None:
            return False
        try:
            req_id, op, args = protocol.parse_request(line, protocol.MAX_HELLO_LINE)
        except protocol.ProtocolError:
            req_id, op, args = None, None, {}
        if op != "hello" or not self.server.token_ok(args):
            self.send(protocol.error(req_id, "unauthorized",
                                     "unauthorized: the first message must be hello with the token in CLORA_HOME/token"))
            return False
        engine = self.server.engine
        return self.send(protocol.ok(req_id, {"engine": "clora", "version": protocol.VERSION, "pid": os.getpid(),
                                              "stage": engine.stage, "home": str(engine.home)}))

    def serve_requests(self) -> None:
        while not self.closed.is_set():
            try:
                line = self.read_line()
            except protocol.ProtocolError as exc:  # too large: we cannot find the next message
                self.send(protocol.error(None, exc.code, str(exc)))
                return
            if line is None:
                return
            if not line.strip():
                continue
            try:
                req_id, op, args = protocol.parse_request(line)
            except protocol.ProtocolError as exc:
                self.send(protocol.error(None, exc.code, str(exc)))
                continue
            if op == "subscribe":
                self.subscribe(req_id)
                continue
            if op == "hello" and not self.server.token_ok(args):
                self.send(protocol.error(req_id, "unauthorized", "unauthorized: wrong token in hello"))
                return
            if op == "shutdown":
                self.asked_to_stop = True
            self.send(self.server.handle(req_id, op, args))

    # -- the event stream --------------------------------------------------------------
    def subscribe(self, req_id: Any) -> None:
        if self.subscription is not None:
            self.send(protocol.error(req_id, "refused", "this connection is already subscribed"))
            return
        try:
            snapshot, seq, sub = self.server.snapshot_and_follow()
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc(file=sys.stderr)
            self.send(protocol.error(req_id, "internal", f"subscribe: {type(exc).__name__}: {exc}"))
            return
        self.subscription = sub
        # The snapshot is sent before the pusher starts: no event can overtake it.
        if not self.send(protocol.ok(req_id, {"snapshot": snapshot, "seq": seq})):
            return
        seen = {}
        for tenant in snapshot["tenants"]:
            seen[("step", tenant["id"])] = max((h["step"] for h in tenant["history"]), default=0)
            seen[("eval", tenant["id"])] = max((e["step"] for e in tenant["evals"]), default=-1)
        threading.Thread(target=self.push, args=(sub, seq, seen), name="clora-push", daemon=True).start()

    def push(self, sub, seq: int, seen: dict) -> None:
        """Forward events after `seq`. A step (or eval) the snapshot already holds is not sent
        again: the scheduler records a step before the event that announces it is numbered."""
        last = seq
        while not self.closed.is_set():
            event = sub.get(timeout=0.5)
            if event is None:
                if sub.overflowed and sub.queue.empty():
                    self.send(protocol.error(None, "internal",
                                             "event stream dropped: this client fell too far behind; subscribe again"))
                    self.close()
                    return
                continue
            if event["seq"] <= last:
                continue
            last = event["seq"]
            key = (event["kind"], event["tenant"])
            if key in seen and isinstance(event["data"].get("step"), int) and event["data"]["step"] <= seen[key]:
                continue
            if not self.send(protocol.event(event)):
                return
