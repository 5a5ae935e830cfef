"""What the app knows about the engine: tenants, their histories, status, system, log.

A plain data model with no Textual in it. The engine's snapshot replaces it; each event
is folded in by `apply`, which reports what changed so the UI redraws only that.
Actions the user takes are recorded as `pending` on the tenant until an engine event
confirms them (or the engine refuses and the app clears them).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from engine.protocol import (ACTIVE_STATES, DONE, FAILED, FINAL_STATES, KILLED, PAUSED, QUEUED, QUEUE_S, RUNNING,
                             STALENESS, TIMING_PARTS, TOTAL_S, WARMING)

__all__ = ["ACTIVE_STATES", "FINAL_STATES", "STATE_ORDER", "TIMING_PARTS", "Changes", "FleetModel", "Series",
           "TenantView", "accuracy_series", "compare_series", "ema", "reward_series", "tenant_colour"]

# How views list tenants by state: the busy ones first.
STATE_ORDER = (RUNNING, WARMING, QUEUED, PAUSED, DONE, KILLED, FAILED)

# The state that confirms each pending action.
CONFIRMS = {
    "pause": (PAUSED,) + FINAL_STATES,
    "resume": (RUNNING, QUEUED, WARMING) + FINAL_STATES,
    "kill": (KILLED, DONE, FAILED),
    "start": (QUEUED, WARMING, RUNNING, PAUSED) + FINAL_STATES,
}

# Tenant colours: stable per tenant (chosen by its number), used in every view.
PALETTE = (
    "#4e9fff", "#ff8c42", "#3ddc84", "#ff5c8a", "#b48cff",
    "#f2d03b", "#2ec4c4", "#ff6b3d", "#a0d911", "#e07be0",
)
SMOOTHED_COLOUR = "#c8c8c8"
EVAL_COLOUR = "#f2d03b"


def tenant_number(tenant_id: str) -> int:
    digits = "".join(ch for ch in str(tenant_id) if ch.isdigit())
    return int(digits) if digits else abs(hash(tenant_id)) % 997


def tenant_colour(tenant_id: str) -> str:
    return PALETTE[(tenant_number(tenant_id) - 1) % len(PALETTE)]


def ema(values: list[float | None], weight: float = 0.6) -> list[float | None]:
    """TensorBoard-style smoothing: s_t = w * s_{t-1} + (1 - w) * x_t (None kept as gaps)."""
    out: list[float | None] = []
    last = None
    for value in values:
        if value is None:
            out.append(last)
            continue
        last = value if last is None else weight * last + (1 - weight) * value
        out.append(last)
    return out


@dataclass
class Series:
    """One curve of a plot: points (xs, ys) with a label and a colour."""

    label: str
    xs: list[float]
    ys: list[float]
    colour: str
    marker: str = "braille"
    scatter: bool = False  # points only (evaluations), not a line


@dataclass
class TenantView:
    """One tenant as the app sees it."""

    id: str
    summary: dict[str, Any] = field(default_factory=dict)
    spec: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    pending: str | None = None
    loaded: bool = False  # has the full history (get) been applied

    @property
    def name(self) -> str:
        return self.summary.get("name") or self.id

    @property
    def state(self) -> str:
        return self.summary.get("state", QUEUED)

    def rewards(self) -> list[float | None]:
        return [row.get("reward_mean") for row in self.history]

    def smoothed_reward(self, weight: float = 0.6) -> float | None:
        values = ema(self.rewards(), weight)
        return values[-1] if values else None

    def queue_share(self) -> float | None:
        total = sum(row.get(TOTAL_S) or 0.0 for row in self.history)
        if total <= 0:
            return None
        return sum(row.get(QUEUE_S) or 0.0 for row in self.history) / total

    def last_row(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}

    def off_policy(self) -> bool | None:
        """Whether the spec lets sampling run ahead of the last update (None: spec not loaded)."""
        if not self.spec:
            return None
        return bool((self.spec.get("rollout") or {}).get("off_policy_steps"))

    def staleness(self) -> int | None:
        """The last step's staleness: updates between the weights that sampled it and those it
        trained (None before the first step, or from an engine that does not record it)."""
        return self.last_row().get(STALENESS)

    def add_step(self, row: dict[str, Any]) -> None:
        step = row.get("step", 0)
        # After an engine crash steps past the checkpoint are redone: drop the rolled-back ones.
        while self.history and self.history[-1].get("step", 0) >= step:
            self.history.pop()
        self.history.append(row)


@dataclass
class Changes:
    """What one batch of events touched, so views redraw only that."""

    tenants: set[str] = field(default_factory=set)
    added: set[str] = field(default_factory=set)
    histories: set[str] = field(default_factory=set)
    status: bool = False
    system: bool = False
    log: list[dict] = field(default_factory=list)
    stage: str | None = None

    def merge(self, other: "Changes") -> None:
        self.tenants |= other.tenants
        self.added |= other.added
        self.histories |= other.histories
        self.status |= other.status
        self.system |= other.system
        self.log += other.log
        self.stage = other.stage or self.stage

    def __bool__(self) -> bool:
        return bool(self.tenants or self.added or self.histories or self.status or self.system or self.log or self.stage)


class FleetModel:
    """Tenants by id, engine status and system sample, and the recent log."""

    def __init__(self, clock: Callable[[], float] = time.time, log_limit: int = 2000):
        self.clock = clock
        self.tenants: dict[str, TenantView] = {}
        self.status: dict[str, Any] = {}
        self.system: dict[str, Any] = {}
        self.log: collections.deque = collections.deque(maxlen=log_limit)
        self.seq = 0
        self.placeholders = 0

    # -- loading --------------------------------------------------------------------
    def load_snapshot(self, snapshot: dict[str, Any], seq: int = 0) -> Changes:
        """Replace everything with an engine snapshot (attach or reattach)."""
        pending = {tid: t.pending for tid, t in self.tenants.items() if t.pending}
        self.tenants.clear()
        self.status = dict(snapshot.get("status") or {})
        self.system = dict(self.status.get("system") or {})
        changes = Changes(status=True, system=True)
        for summary in snapshot.get("tenants") or []:
            view = self.upsert(summary)
            changes.added.add(view.id)
        for tid, op in pending.items():
            if tid in self.tenants and self.tenants[tid].state not in CONFIRMS.get(op, ()):
                self.tenants[tid].pending = op
        self.log.clear()
        for entry in snapshot.get("log") or []:
            self.log.append(self._log_entry(entry))
        changes.log = list(self.log)
        self.seq = seq
        return changes

    def upsert(self, detail: dict[str, Any]) -> TenantView:
        """Merge a summary or a full `get` answer into the tenant."""
        tid = detail["id"]
        view = self.tenants.get(tid) or TenantView(id=tid)
        self.tenants[tid] = view
        view.summary.update({k: v for k, v in detail.items() if k not in ("spec", "history", "evals", "checkpoints")})
        if "spec" in detail:
            view.spec = detail["spec"]
        if "history" in detail:
            view.history = list(detail["history"] or [])
            view.loaded = True
        if "evals" in detail:
            view.evals = list(detail["evals"] or [])
        return view

    # -- events ---------------------------------------------------------------------
    def apply(self, event: dict[str, Any]) -> Changes:
        changes = Changes()
        seq = event.get("seq")
        if isinstance(seq, int):
            if seq <= self.seq:
                return changes  # already in the snapshot
            self.seq = seq
        kind, tid, data = event.get("kind"), event.get("tenant"), event.get("data") or {}
        if kind == "engine":
            self.status["stage"] = data.get("stage", self.status.get("stage"))
            self.status["warmup_elapsed_s"] = data.get("elapsed_s")
            changes.stage = self.status["stage"]
            changes.status = True
            entry = self._log_entry(event)
            self.log.append(entry)
            changes.log.append(entry)
        elif kind == "system":
            self.system = dict(data)
            for bid, nbytes in (data.get("adapter_bytes") or {}).items():
                if bid in self.tenants and self.tenants[bid].summary.get("adapter_bytes") != nbytes:
                    self.tenants[bid].summary["adapter_bytes"] = nbytes
                    changes.tenants.add(bid)
            changes.system = True
        elif kind == "log":
            entry = self._log_entry({**data, "tenant": tid, "time": event.get("time")})
            self.log.append(entry)
            changes.log.append(entry)
        elif tid is not None:
            view = self.tenants.get(tid)
            if view is None:
                view = self.upsert({"id": tid, "name": data.get("name", tid), "state": data.get("state", QUEUED)})
                changes.added.add(tid)
            s = view.summary
            if kind == "state":
                s["state"] = data.get("state", s.get("state"))
                s["reason"] = data.get("reason", "")
                if data.get("error"):
                    s["error"] = data["error"]
                if data.get("step") is not None:
                    s["step"] = data["step"]
                if data.get("name"):
                    s["name"] = data["name"]
                if s["state"] in FINAL_STATES:
                    s["phase"], s["phase_since"] = s["state"], event.get("time")
                if view.pending and s["state"] in CONFIRMS.get(view.pending, ()):
                    view.pending = None
                changes.status = True
            elif kind == "phase":
                s["phase"], s["phase_since"] = data.get("phase"), event.get("time")
            elif kind == "step":
                view.add_step(dict(data))
                s["step"] = data.get("step", s.get("step"))
                s["reward"], s["accuracy"] = data.get("reward_mean"), data.get("accuracy")
                s["step_s"], s[QUEUE_S] = data.get(TOTAL_S), data.get(QUEUE_S)
                s["phase"], s["phase_since"] = "ready", event.get("time")
                changes.histories.add(tid)
            elif kind == "eval":
                view.evals.append({"step": data.get("step"), "accuracy": data.get("accuracy")})
                s["eval_accuracy"] = data.get("accuracy")
                changes.histories.add(tid)
            changes.tenants.add(tid)
        return changes

    def fold(self, events: Iterable[dict[str, Any]]) -> Changes:
        """Apply a batch of events; what all of them changed, together."""
        total = Changes()
        for event in events:
            total.merge(self.apply(event))
        return total

    def _log_entry(self, entry: dict[str, Any]) -> dict[str, Any]:
        """A log line from a log event, an engine (stage) event, or a flat dict."""
        data = entry.get("data") if isinstance(entry.get("data"), dict) else entry
        message = data.get("message")
        if message is None and "stage" in data:
            message = f"engine: {data['stage']}" + (f" ({data['elapsed_s']:.1f} s)" if data.get("elapsed_s") is not None else "")
        return {"time": entry.get("time"), "tenant": entry.get("tenant"), "level": data.get("level", "info"),
                "message": message or ""}

    # -- actions --------------------------------------------------------------------
    def set_pending(self, tid: str, op: str | None) -> None:
        if tid in self.tenants:
            self.tenants[tid].pending = op

    def add_placeholder(self, name: str) -> str:
        """A row that shows a start request at once, before the engine has named it."""
        self.placeholders += 1
        pid = f"…{self.placeholders}"
        self.tenants[pid] = TenantView(id=pid, summary={"id": pid, "name": name, "state": QUEUED, "step": 0},
                                       pending="start")
        return pid

    def drop(self, tid: str) -> None:
        self.tenants.pop(tid, None)

    # -- derived --------------------------------------------------------------------
    def state_counts(self) -> dict[str, int]:
        counts: dict[str, int] = collections.Counter(t.state for t in self.tenants.values() if not t.id.startswith("…"))
        return dict(counts)

    def slots(self) -> tuple[int | None, int]:
        total = self.status.get("slots_total")
        used = sum(1 for t in self.tenants.values() if t.state in ACTIVE_STATES)
        return total, used

    def ordered(self) -> list[TenantView]:
        return sorted(self.tenants.values(), key=lambda t: (t.id.startswith("…"), tenant_number(t.id), t.id))


# -- series for the plots (pure: a view in, curves out) --------------------------------------
def steps_of(history: list[dict[str, Any]]) -> list[float]:
    return [float(r.get("step", i + 1)) for i, r in enumerate(history)]


def points(label: str, xs: list[float], ys: list[float | None], colour: str, **style: Any) -> Series:
    """A series of the (x, y) pairs whose y is known."""
    pairs = [(x, y) for x, y in zip(xs, ys) if y is not None]
    return Series(label, [p[0] for p in pairs], [p[1] for p in pairs], colour, **style)


def reward_series(view: TenantView | None) -> list[Series]:
    """A tenant's reward per step and its smoothed curve; nothing before its first reward."""
    if view is None:
        return []
    xs, rewards = steps_of(view.history), view.rewards()
    raw = points("reward", xs, rewards, tenant_colour(view.id))
    if not raw.xs:
        return []
    return [raw, points("smoothed", xs, ema(rewards, 0.6), SMOOTHED_COLOUR)]


def accuracy_series(view: TenantView | None) -> list[Series]:
    """A tenant's training accuracy per step and its evaluations (as dots)."""
    if view is None:
        return []
    train = points("train", steps_of(view.history), [r.get("accuracy") for r in view.history], tenant_colour(view.id))
    evals = [e for e in view.evals if e.get("accuracy") is not None]
    dots = Series("eval", [float(e["step"]) for e in evals], [e["accuracy"] for e in evals], EVAL_COLOUR,
                  marker="dot", scatter=True)
    return [s for s in (train, dots) if s.xs]


def compare_series(model: FleetModel, marked: set[str], weight: float) -> list[Series]:
    """The rewards of the marked tenants (of every tenant with steps, when none is marked),
    smoothed with `weight` (0: raw)."""
    chosen = [model.tenants[t] for t in sorted(marked) if t in model.tenants]
    if not chosen:
        chosen = [v for v in model.ordered() if v.history]
    return [points(view.name, steps_of(view.history), ema(view.rewards(), weight) if weight else view.rewards(),
                   tenant_colour(view.id)) for view in chosen]
