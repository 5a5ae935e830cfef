"""The daemon's socket server: one Unix socket, JSON lines, a thread per connection.

Every connection first proves the token kept in CLORA_HOME/token (`hello`); anything
else is answered `unauthorized` and the connection closed. After that, requests are
answered in order; `subscribe` turns the connection into an event stream as well
(snapshot at sequence S, then every event with seq > S, nothing twice, nothing missing).

A client can do nothing to the engine but send requests: malformed or oversized lines,
unknown ops, wrong types, deep nesting, silence and half-sent messages only cost that client
its connection. Reads are bounded (protocol.MAX_HELLO_LINE before the token is proven,
protocol.MAX_LINE after), the hello has one total deadline (not one per read), and at most
MAX_CONNECTIONS clients are served at once (the next is told so and closed).

`start`/`clone` with an `idempotency_key` already answered get the first answer again: a
client retrying after a timeout never creates a duplicate.
"""

from __future__ import annotations

import collections
import hmac
import json
import os
import secrets
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from engine import protocol
from engine.connection import Connection
from engine.core import Engine, EngineError

HELLO_TIMEOUT_S = float(os.environ.get("CLORA_HELLO_TIMEOUT_S", "10"))
MAX_CONNECTIONS = int(os.environ.get("CLORA_MAX_CONNECTIONS", "64"))
IDEMPOTENCY_KEYS = 1024  # answers remembered (the newest)
IDEMPOTENCY_WAIT_S = 120.0  # a retry waits this long for the first request with its key to finish
READY_WAIT_S = 50.0  # how long a request that needs the model waits for the warm-up
SNAPSHOT_LOG_LINES = 200
NEEDS_MODEL = {"start", "clone", "pause", "resume", "kill", "export"}


def ensure_token(home: Path) -> str:
    """The connection token (created owner-only on first use)."""
    path = protocol.token_path(home)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        os.chmod(path, 0o600)
        token = path.read_text().strip()
        if token:
            return token
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC, 0o600)
    token = secrets.token_hex(32)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token


class EngineServer:
    """Listens on CLORA_HOME/engine.sock and serves one Engine to many clients."""

    def __init__(self, engine: Engine, home: Path, on_shutdown: Callable[[], None] | None = None,
                 hello_timeout: float = HELLO_TIMEOUT_S, max_connections: int = MAX_CONNECTIONS):
        self.engine = engine
        self.home = Path(home)
        self.path = protocol.socket_path(self.home)
        self.token = ensure_token(self.home)
        self.on_shutdown = on_shutdown or (lambda: None)
        self.hello_timeout = hello_timeout
        self.max_connections = max_connections
        self.answers: collections.OrderedDict[str, dict] = collections.OrderedDict()  # idempotency key ->
        self.answers_lock = threading.Lock()
        self.ready = threading.Event()  # set once the model is loaded and the scheduler runs
        self.failed: str | None = None
        self.connections: set[Connection] = set()
        self.conn_lock = threading.Lock()
        self.listener: socket.socket | None = None
        self.thread: threading.Thread | None = None
        self.http = None  # engine.http.server.HttpServer, when the HTTP APIs run
        self.http_error: str | None = None
        self.stopping = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()  # the caller holds the engine lock: this socket is stale
        old_umask = os.umask(0o177)  # no window in which the socket is reachable by others
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        sock.listen(64)
        self.listener = sock
        self.thread = threading.Thread(target=self.accept_loop, name="clora-accept", daemon=True)
        self.thread.start()

    def accept_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                if self.stopping.is_set():
                    return
                time.sleep(0.05)
                continue
            conn = Connection(self, client)
            with self.conn_lock:
                full = len(self.connections) >= self.max_connections
                if not full:
                    self.connections.add(conn)
            if full:
                self.refuse(client)
                continue
            threading.Thread(target=conn.run, name="clora-conn", daemon=True).start()

    def refuse(self, client: socket.socket) -> None:
        """Over the connection cap: say so and close (never blocks the accept loop for long)."""
        try:
            client.settimeout(1.0)
            client.sendall(protocol.encode(protocol.error(
                None, "refused", f"too many connections to the engine ({self.max_connections}); "
                "close idle clients (other clora-tui apps, `logs -f`) and try again")))
        except OSError:
            pass
        finally:
            client.close()

    def forget(self, conn: Connection) -> None:
        with self.conn_lock:
            self.connections.discard(conn)

    def token_ok(self, args: dict) -> bool:
        token = args.get("token")
        return isinstance(token, str) and hmac.compare_digest(token.encode(), self.token.encode())

    def announce_stopped(self, event: dict | None) -> None:
        """Tell each client that asked for the shutdown (and does not follow the stream, which
        carries it anyway) how it went: the engine's last event. Call before close()."""
        if event is None:
            return
        with self.conn_lock:
            conns = [c for c in self.connections if c.asked_to_stop and c.subscription is None]
        for conn in conns:
            conn.send(protocol.event(event))

    def close(self) -> None:
        """Stop accepting, drop every client, remove the socket file."""
        self.stopping.set()
        if self.listener is not None:
            try:
                self.listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.listener.close()
        with self.conn_lock:
            conns = list(self.connections)
        for conn in conns:
            conn.close()
        try:
            self.path.unlink()
        except OSError:
            pass

    # -- requests ----------------------------------------------------------------------
    def wait_ready(self) -> None:
        if self.failed:
            raise EngineError(f"the engine failed to start: {self.failed}")
        if not self.ready.wait(READY_WAIT_S):
            raise EngineError(f"the engine is still warming up ({self.engine.stage}); "
                              "try again when `clora-tui engine status` says ready")

    def handle(self, req_id: Any, op: str, args: dict) -> dict:
        key = args.get("idempotency_key") if op in protocol.IDEMPOTENT_OPS else None
        if key is not None:
            return self.handle_once(req_id, op, args, key)
        return self.answer(req_id, op, args)

    def handle_once(self, req_id: Any, op: str, args: dict, key: str) -> dict:
        """Answer a keyed request once; the same key again gets the first answer (with this id)."""
        fingerprint = json.dumps([op, {k: v for k, v in args.items() if k != "idempotency_key"}],
                                 sort_keys=True, default=str)
        with self.answers_lock:
            entry = self.answers.get(key)
            first = entry is None
            if first:
                entry = self.answers[key] = {"fingerprint": fingerprint, "done": threading.Event(), "reply": None}
                while len(self.answers) > IDEMPOTENCY_KEYS:
                    self.answers.popitem(last=False)
        if not first:
            if entry["fingerprint"] != fingerprint:
                return protocol.error(req_id, "bad_request",
                                      f"{op}: idempotency_key {key!r} was already used for a different request")
            if not entry["done"].wait(IDEMPOTENCY_WAIT_S) or entry["reply"] is None:
                return protocol.error(req_id, "refused", f"{op}: the first request with this idempotency_key "
                                      "is still being processed; try again")
            return {**entry["reply"], "id": req_id}
        reply = None
        try:
            reply = self.answer(req_id, op, args)
            return reply
        finally:
            entry["reply"] = reply
            entry["done"].set()
            if reply is None or not reply.get("ok"):  # a refusal is not remembered: a retry may succeed
                with self.answers_lock:
                    if self.answers.get(key) is entry:
                        del self.answers[key]

    def answer(self, req_id: Any, op: str, args: dict) -> dict:
        try:
            return protocol.ok(req_id, self.dispatch(op, args))
        except EngineError as exc:
            return protocol.error(req_id, "refused", str(exc))
        except protocol.ProtocolError as exc:
            return protocol.error(req_id, exc.code, str(exc))
        except Exception as exc:  # noqa: BLE001 - report, log, and keep serving
            traceback.print_exc(file=sys.stderr)
            return protocol.error(req_id, "internal", f"{op}: {type(exc).__name__}: {exc}")

    def dispatch(self, op: str, args: dict) -> Any:
        engine = self.engine
        if op in NEEDS_MODEL:
            self.wait_ready()
        if op == "hello":
            return {"engine": "clora", "version": protocol.VERSION, "pid": os.getpid(), "stage": engine.stage}
        if op == "status":
            return {**engine.status(), "ready": self.ready.is_set(), "failed": self.failed,
                    "socket": str(self.path), "clients": len(self.connections), **self.http_status()}
        if op == "list":
            return engine.list_tenants()
        if op == "get":
            return engine.get(args["id"])
        if op == "history":
            return engine.history(args["id"], args.get("since", 0))
        if op == "start":
            return engine.submit(args["spec"])
        if op in ("pause", "resume", "kill"):
            return getattr(engine, op)(args["id"])
        if op == "clone":
            return engine.clone(args["id"], args.get("overrides") or {})
        if op == "export":
            if not os.path.isabs(args["path"]):
                raise EngineError(f"export: {args['path']!r} must be an absolute path")
            return engine.export(args["id"], args["path"])
        if op == "logs":
            limit = max(1, min(args.get("limit", SNAPSHOT_LOG_LINES), 10000))
            if "since" in args:
                return engine.store.events(args["since"], ("log", "engine"), limit)
            return engine.store.recent_events(("log", "engine"), limit)
        if op == "shutdown":
            threading.Thread(target=self.on_shutdown, name="clora-shutdown", daemon=True).start()
            return {"stopping": True, "pid": os.getpid()}
        raise protocol.ProtocolError("unknown_op", f"unknown op {op!r}")

    def http_status(self) -> dict:
        """Where the HTTP APIs listen and their key (this socket is owner-only, like the token)."""
        http = self.http
        return {"openai_base_url": http.openai_base_url if http else None, "tinker_url": http.base_url if http else None,
                "api_key": http.api_key if http else None,
                "http_error": self.http_error}

    def snapshot_and_follow(self):
        """Status, every tenant with its history, the recent log, taken at one sequence number S.

        Only the cut is taken under the locks (live state, the newest step and eval of each
        tenant, S and the subscription); histories and the log are read afterwards, bounded by
        the cut (see engine/events.py), so a snapshot never holds up the scheduler."""
        engine = self.engine
        system = engine.system_sample()  # transient figures: sampled before the cut, outside the locks

        def cut() -> dict:
            summaries = engine.list_tenants()
            status = {**engine.status(system=system, tenants=summaries), "ready": self.ready.is_set(),
                      "failed": self.failed}
            return {"status": status, "summaries": summaries, "marks": engine.store.marks()}

        # Lock order engine.lock -> events.lock, the same as Engine.submit's.
        with engine.lock:
            taken, seq, sub = engine.events.snapshot_then_follow(cut)
        try:
            marks = taken["marks"]
            specs = {row["id"]: row["spec"] for row in engine.store.experiments()}
            tenants = []
            for summary in taken["summaries"]:
                tid = summary["id"]
                tenants.append({**summary, "spec": specs.get(tid),
                                "history": engine.store.steps(tid, until=marks["steps"].get(tid, 0)),
                                "evals": engine.store.evals(tid, until=marks["evals"].get(tid, -1)),
                                "checkpoints": engine.store.checkpoints(tid)})
            log = engine.store.recent_events(("log", "engine"), SNAPSHOT_LOG_LINES, until=seq)
        except BaseException:
            engine.events.unsubscribe(sub)
            raise
        return {"status": taken["status"], "tenants": tenants, "log": log}, seq, sub
