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

`start` and `clone` take an optional `idempotency_key` (see IDEMPOTENT_OPS). After `shutdown`
the connection stays open until the engine has stopped; its last message is the event
`{"kind": "log", "data": {"stopped": true, "checkpointed": N, ...}}` (N: checkpoints written,
null if unknown). Connection-level errors (too many connections, a message too large) are
sent with `"id": null`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

VERSION = 1
MAX_LINE = 1 << 20  # bytes; longer messages are refused
MAX_HELLO_LINE = 4096  # bytes; before the token is proven, nothing longer is buffered
MAX_DEPTH = 32  # nesting of objects and arrays in one message
MAX_INT = (1 << 63) - 1  # integer arguments must fit SQLite's INTEGER
MAX_KEY_LEN = 128  # idempotency keys

OPS = {
    "hello": {"token": str},
    "status": {},
    "list": {},
    "get": {"id": str},
    "history": {"id": str, "since": int},
    "start": {"spec": dict, "idempotency_key": str},
    "pause": {"id": str},
    "resume": {"id": str},
    "kill": {"id": str},
    "clone": {"id": str, "overrides": dict, "idempotency_key": str},
    "export": {"id": str, "path": str},
    "subscribe": {},
    "logs": {"since": int, "limit": int},
    "shutdown": {},
}
OPTIONAL_ARGS = {("history", "since"), ("clone", "overrides"), ("logs", "since"), ("logs", "limit"),
                 ("start", "idempotency_key"), ("clone", "idempotency_key")}
# Requests that create something: a client sends a fresh `idempotency_key` with each and reuses
# it when it retries (after a timeout or a lost connection); the engine answers a key it has
# seen with the first answer instead of creating a duplicate.
IDEMPOTENT_OPS = {"start", "clone"}

EVENT_KINDS = ("engine", "state", "phase", "step", "eval", "system", "log")

# -- tenant states: the `state` of a tenant summary and of a `state` event ------------------
QUEUED, WARMING, RUNNING, PAUSED = "queued", "warming", "running", "paused"
DONE, KILLED, FAILED = "done", "killed", "failed"
STATES = (QUEUED, WARMING, RUNNING, PAUSED, DONE, KILLED, FAILED)  # in lifecycle order
FINAL_STATES = (DONE, KILLED, FAILED)  # a tenant in one of these never steps again
ACTIVE_STATES = (WARMING, RUNNING)  # being prepared or stepping

# A tenant whose `task` is this is driven by a Tinker training client through the HTTP API
# (one step = one optim_step); it has no step budget of its own.
TINKER_TASK = "tinker"

# -- the timing of one step: fields of a `step` event and of each `history` row -----------
QUEUE_S, ROLLOUT_S, REWARD_S, TRAIN_S = "queue_s", "rollout_s", "reward_s", "train_s"
SYNC_S, CHECKPOINT_S, TOTAL_S = "sync_s", "checkpoint_s", "total_s"
TIMING_PARTS = (QUEUE_S, ROLLOUT_S, REWARD_S, TRAIN_S, SYNC_S, CHECKPOINT_S)  # in order; they add up to TOTAL_S
# Optimizer updates between the weights that sampled a step and the weights it trained:
# 0 on-policy, 1 when `rollout.off_policy_steps = 1` let sampling run ahead of the last update.
STALENESS = "staleness"
# Multi-turn tasks: the mean number of model turns per training episode of the step.
TURNS = "turns"


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


def too_deep(obj: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether objects/arrays nest deeper than `limit` (checked without recursion)."""
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return False


def parse_request(line: bytes, max_line: int = MAX_LINE) -> tuple[Any, str, dict]:
    """Validate one request line; returns (id, op, args) or raises ProtocolError."""
    if len(line.rstrip(b"\r\n")) > max_line:
        raise ProtocolError("too_large", f"message over {max_line} bytes")
    try:
        msg = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError("bad_json", f"not JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError("bad_json", f"not JSON this engine reads: nested deeper than {MAX_DEPTH} levels") from None
    if too_deep(msg):
        raise ProtocolError("bad_request", f"message nested deeper than {MAX_DEPTH} levels")
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
        if kind is int and not -MAX_INT <= args[name] <= MAX_INT:
            raise ProtocolError("bad_request", f"{op}: argument {name!r} out of range (|{name}| <= 2**63-1)")
        if name == "idempotency_key" and not 0 < len(args[name]) <= MAX_KEY_LEN:
            raise ProtocolError("bad_request", f"{op}: idempotency_key must be 1..{MAX_KEY_LEN} characters")
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
