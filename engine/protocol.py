"""Messages between the engine daemon and its clients: JSON, one object per line.

This is the only module the app and the engine share.

    client -> engine   {"v": 1, "id": 7, "op": "pause", "args": {"id": "e3"}}
    engine -> client   {"v": 1, "id": 7, "ok": true, "result": {...}}
                       {"v": 1, "id": 7, "ok": false, "error": {"code": "refused", "message": "..."}}
    engine -> client   {"v": 1, "event": {"seq": 42, "time": ..., "kind": "step", "tenant": "e3", "data": {...}}}

The first request of every connection must be `hello` with the token kept in
CLORA_HOME/token; anything else is refused and the connection closed. After
`subscribe` the engine answers with a snapshot taken at sequence S and then pushes
every event with seq > S on the same connection, in order.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

VERSION = 1
MAX_LINE = 1 << 20  # bytes; longer messages are refused

OPS = {
    "hello": {"token": str},
    "status": {},
    "list": {},
    "get": {"id": str},
    "history": {"id": str, "since": int},
    "start": {"spec": dict},
    "pause": {"id": str},
    "resume": {"id": str},
    "kill": {"id": str},
    "clone": {"id": str, "overrides": dict},
    "export": {"id": str, "path": str},
    "subscribe": {},
    "logs": {"since": int, "limit": int},
    "shutdown": {},
}
OPTIONAL_ARGS = {("history", "since"), ("clone", "overrides"), ("logs", "since"), ("logs", "limit")}

EVENT_KINDS = ("engine", "state", "phase", "step", "eval", "system", "log")


class ProtocolError(ValueError):
    """A message that breaks the protocol; `code` is one of bad_json, bad_request, unknown_op,
    too_large, unauthorized, refused, internal."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def encode(message: dict) -> bytes:
    return (json.dumps(message, separators=(",", ":"), default=str) + "\n").encode()


def request(op: str, req_id: int, **args: Any) -> dict:
    return {"v": VERSION, "id": req_id, "op": op, "args": args}


def ok(req_id: Any, result: Any) -> dict:
    return {"v": VERSION, "id": req_id, "ok": True, "result": result}


def error(req_id: Any, code: str, message: str) -> dict:
    return {"v": VERSION, "id": req_id, "ok": False, "error": {"code": code, "message": message}}


def event(ev: dict) -> dict:
    return {"v": VERSION, "event": ev}


def parse_request(line: bytes) -> tuple[Any, str, dict]:
    """Validate one request line; returns (id, op, args) or raises ProtocolError."""
    if len(line) > MAX_LINE:
        raise ProtocolError("too_large", f"message over {MAX_LINE} bytes")
    try:
        msg = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError("bad_json", f"not JSON: {exc}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("bad_request", "a message must be a JSON object")
    if msg.get("v") != VERSION:
        raise ProtocolError("bad_request", f"protocol version {msg.get('v')!r} not supported (engine speaks {VERSION})")
    op, args = msg.get("op"), msg.get("args", {})
    if not isinstance(op, str) or op not in OPS:
        raise ProtocolError("unknown_op", f"unknown op {op!r}; known: {', '.join(sorted(OPS))}")
    if not isinstance(args, dict):
        raise ProtocolError("bad_request", "args must be an object")
    for name, kind in OPS[op].items():
        if name not in args:
            if (op, name) in OPTIONAL_ARGS:
                continue
            raise ProtocolError("bad_request", f"{op}: missing argument {name!r}")
        if not isinstance(args[name], kind) or (kind is int and isinstance(args[name], bool)):
            raise ProtocolError("bad_request", f"{op}: argument {name!r} must be {kind.__name__}")
    extra = set(args) - set(OPS[op])
    if extra:
        raise ProtocolError("bad_request", f"{op}: unknown argument {sorted(extra)[0]!r}")
    return msg.get("id"), op, args


# -- where things live under CLORA_HOME -------------------------------------------------
def clora_home() -> Path:
    return Path(os.environ.get("CLORA_HOME", "~/.clora")).expanduser()


def socket_path(home: Path) -> Path:
    return Path(home) / "engine.sock"


def token_path(home: Path) -> Path:
    return Path(home) / "token"


def pid_path(home: Path) -> Path:
    return Path(home) / "engine.pid"


def log_path(home: Path) -> Path:
    return Path(home) / "logs" / "engine.log"
