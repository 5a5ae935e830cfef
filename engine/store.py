"""Persistence: SQLite through sqlite-utils, in WAL mode, under CLORA_HOME.

Invariant: a step is written here (and committed) before any client hears of it.
Steps undone by a crash recovery are kept but marked `rolled_back`, so the visible
history of a tenant is always contiguous and never holds a step twice.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import sqlite_utils

from engine import protocol

STEP_COLUMNS = {
    "tenant": str, "step": int, "time": float, "rolled_back": int,
    "reward_mean": float, "reward_std": float, "reward_min": float, "reward_max": float,
    "accuracy": float, "loss": float, "kl": float, "grad_norm": float, "entropy": float,
    "clip_fraction": float, "logprob_diff": float, "completion_tokens": int,
    **{name: float for name in (*protocol.TIMING_PARTS, protocol.TOTAL_S)},
    protocol.STALENESS: int,  # updates between the weights that sampled and the weights trained (0: on-policy)
    protocol.TURNS: float,  # multi-turn tasks: mean model turns per episode
}


LOG_KINDS = ("log", "engine")
KEEP_LOG_EVENTS = 10_000  # the `logs` command and the app's log pane read these
KEEP_OTHER_EVENTS = 1_000  # step/eval/state events: their data lives in its own tables
PRUNE_EVERY = 500  # inserts between prunes


class Store:
    """All engine records. Safe to call from several threads (one lock, one connection)."""

    def __init__(self, path: Path, keep_log_events: int = KEEP_LOG_EVENTS,
                 keep_other_events: int = KEEP_OTHER_EVENTS):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30)
        self.db = sqlite_utils.Database(conn)
        self.db.enable_wal()
        # WAL + NORMAL: a commit survives the engine being killed (the OS holds it); only a
        # power cut can lose the newest commits, and recovery then redoes those steps from the
        # last checkpoint (a checkpoint newer than the newest recorded step is dropped).
        # FULL would fsync the WAL on every step and every event, on the scheduler's thread.
        self.db.execute("pragma synchronous = normal")
        self.lock = threading.RLock()
        self.keep_log_events, self.keep_other_events = keep_log_events, keep_other_events
        self.events_added = 0
        self._create()
        self.prune_events()

    def _create(self) -> None:
        db = self.db
        if "experiments" not in db.table_names():
            db["experiments"].create({
                "id": str, "seq": int, "name": str, "spec": str, "state": str, "reason": str, "error": str,
                "step": int, "created": float, "started": float, "first_step": float, "warmup_s": float,
                "finished": float, "restored_from": int,
            }, pk="id")
        if "steps" not in db.table_names():
            db["steps"].create(STEP_COLUMNS, pk=("tenant", "step", "time"))
            db["steps"].create_index(["tenant", "step"])
        else:  # a home written by an older engine: add the columns it lacks
            have = db["steps"].columns_dict
            for name, kind in STEP_COLUMNS.items():
                if name not in have:
                    db["steps"].add_column(name, kind)
        if "evals" not in db.table_names():
            db["evals"].create({"tenant": str, "step": int, "time": float, "accuracy": float, "rolled_back": int},
                               pk=("tenant", "step", "time"))
        if "checkpoints" not in db.table_names():
            db["checkpoints"].create({"tenant": str, "step": int, "path": str, "time": float, "bytes": int},
                                     pk=("tenant", "step"))
        if "events" not in db.table_names():
            db["events"].create({"seq": int, "time": float, "kind": str, "tenant": str, "data": str}, pk="seq")
        if "meta" not in db.table_names():
            db["meta"].create({"key": str, "value": str}, pk="key")

    # -- experiments ----------------------------------------------------------------
    def next_tenant_number(self) -> int:
        with self.lock:
            row = self.db.execute("select coalesce(max(seq), 0) + 1 from experiments").fetchone()
            return int(row[0])

    def add_experiment(self, tenant_id: str, seq: int, name: str, spec: dict, state: str) -> None:
        with self.lock, self.db.conn:
            self.db["experiments"].insert({"id": tenant_id, "seq": seq, "name": name, "spec": json.dumps(spec),
                                           "state": state, "reason": "", "error": "", "step": 0,
                                           "created": time.time(), "restored_from": None})

    def update_experiment(self, tenant_id: str, **fields: Any) -> None:
        with self.lock, self.db.conn:
            self.db["experiments"].update(tenant_id, fields)

    def experiments(self) -> list[dict]:
        with self.lock:
            rows = list(self.db["experiments"].rows_where(order_by="seq"))
        for row in rows:
            row["spec"] = json.loads(row["spec"])
        return rows

    # -- steps, evals, checkpoints ----------------------------------------------------
    # Hot path (every step, every event): plain prepared statements. sqlite-utils' insert and
    # update look the table up (columns, primary keys) on every call.
    _INSERT_STEP = (f"insert into steps ({', '.join(STEP_COLUMNS)}) "
                    f"values ({', '.join(':' + c for c in STEP_COLUMNS)})")

    def record_step(self, row: dict) -> None:
        values = {name: None for name in STEP_COLUMNS} | row | {"rolled_back": 0}
        with self.lock, self.db.conn:
            self.db.execute(self._INSERT_STEP, values)
            self.db.execute("update experiments set step = ? where id = ?", [row["step"], row["tenant"]])

    def record_eval(self, tenant_id: str, step: int, accuracy: float) -> None:
        with self.lock, self.db.conn:
            self.db["evals"].insert({"tenant": tenant_id, "step": step, "time": time.time(),
                                     "accuracy": accuracy, "rolled_back": 0})

    def steps(self, tenant_id: str, since: int = 0, until: int | None = None) -> list[dict]:
        """Visible steps `since < step <= until` (no upper bound if until is None)."""
        where, args = "tenant = ? and step > ? and rolled_back = 0", [tenant_id, since]
        if until is not None:
            where, args = where + " and step <= ?", args + [until]
        with self.lock:
            return list(self.db["steps"].rows_where(where, args, order_by="step"))

    def evals(self, tenant_id: str, until: int | None = None) -> list[dict]:
        where, args = "tenant = ? and rolled_back = 0", [tenant_id]
        if until is not None:
            where, args = where + " and step <= ?", args + [until]
        with self.lock:
            return list(self.db["evals"].rows_where(where, args, order_by="step"))

    def marks(self) -> dict[str, dict[str, int]]:
        """The newest visible step and eval of every tenant: {"steps": {tenant: step}, "evals": {...}}.
        Cheap; taken under the event lock, it pins a snapshot to one sequence number."""
        with self.lock:
            steps = self.db.execute("select tenant, max(step) from steps where rolled_back = 0 group by tenant")
            marks = {"steps": dict(steps.fetchall())}
            evals = self.db.execute("select tenant, max(step) from evals where rolled_back = 0 group by tenant")
            marks["evals"] = dict(evals.fetchall())
        return marks

    def roll_back_after(self, tenant_id: str, step: int) -> int:
        """Mark steps and evals after `step` as undone; returns how many steps were marked."""
        with self.lock, self.db.conn:
            cur = self.db.execute("update steps set rolled_back = 1 where tenant = ? and step > ? and rolled_back = 0",
                                  [tenant_id, step])
            self.db.execute("update evals set rolled_back = 1 where tenant = ? and step > ? and rolled_back = 0",
                            [tenant_id, step])
            self.db["experiments"].update(tenant_id, {"step": step})
            return cur.rowcount

    def add_checkpoint(self, tenant_id: str, step: int, path: str, nbytes: int) -> None:
        with self.lock, self.db.conn:
            self.db["checkpoints"].upsert({"tenant": tenant_id, "step": step, "path": path,
                                           "time": time.time(), "bytes": nbytes}, pk=("tenant", "step"))

    def drop_checkpoint(self, tenant_id: str, step: int) -> None:
        with self.lock, self.db.conn:
            self.db.execute("delete from checkpoints where tenant = ? and step = ?", [tenant_id, step])

    def checkpoints(self, tenant_id: str) -> list[dict]:
        with self.lock:
            return list(self.db["checkpoints"].rows_where("tenant = ?", [tenant_id], order_by="step"))

    # -- events and meta -----------------------------------------------------------
    def add_event(self, seq: int, kind: str, tenant: str | None, data: dict) -> None:
        with self.lock:
            with self.db.conn:
                self.db.execute("insert into events (seq, time, kind, tenant, data) values (?, ?, ?, ?, ?)",
                                [seq, time.time(), kind, tenant, json.dumps(data)])
            self.events_added += 1
            if self.events_added % PRUNE_EVERY == 0:
                self.prune_events()

    def prune_events(self) -> int:
        """Keep the newest `keep_log_events` log/engine events and `keep_other_events` of the other
        kinds (the newest event always survives, so sequence numbers go on after a restart)."""
        marks = ",".join("?" * len(LOG_KINDS))
        removed = 0
        with self.lock, self.db.conn:
            for where, keep in ((f"kind in ({marks})", self.keep_log_events),
                                (f"kind not in ({marks})", self.keep_other_events)):
                cut = self.db.execute(f"select seq from events where {where} order by seq desc limit 1 offset ?",
                                      [*LOG_KINDS, keep]).fetchone()
                if cut is not None:
                    removed += self.db.execute(f"delete from events where {where} and seq <= ?",
                                               [*LOG_KINDS, cut[0]]).rowcount
        return removed

    def last_event_seq(self) -> int:
        with self.lock:
            return int(self.db.execute("select coalesce(max(seq), 0) from events").fetchone()[0])

    def events(self, since: int = 0, kinds: tuple[str, ...] | None = None, limit: int = 1000) -> list[dict]:
        with self.lock:
            where, args = "seq > ?", [since]
            if kinds:
                where += f" and kind in ({','.join('?' * len(kinds))})"
                args += list(kinds)
            rows = list(self.db["events"].rows_where(where, args, order_by="seq", limit=limit))
        for row in rows:
            row["data"] = json.loads(row["data"])
        return rows

    def recent_events(self, kinds: tuple[str, ...] | None = None, limit: int = 200,
                      until: int | None = None) -> list[dict]:
        """The newest `limit` persisted events (of these kinds, with seq <= until), oldest first."""
        with self.lock:
            where, args = "1 = 1", []
            if kinds:
                where = f"kind in ({','.join('?' * len(kinds))})"
                args = list(kinds)
            if until is not None:
                where, args = where + " and seq <= ?", args + [until]
            rows = list(self.db["events"].rows_where(where, args, order_by="seq desc", limit=limit))
        for row in rows:
            row["data"] = json.loads(row["data"])
        return rows[::-1]

    def set_meta(self, key: str, value: Any) -> None:
        with self.lock, self.db.conn:
            self.db["meta"].upsert({"key": key, "value": json.dumps(value)}, pk="key")

    def get_meta(self, key: str, default: Any = None) -> Any:
        with self.lock:
            rows = list(self.db["meta"].rows_where("key = ?", [key]))
        return json.loads(rows[0]["value"]) if rows else default

    def close(self) -> None:
        with self.lock:
            self.db.conn.close()
