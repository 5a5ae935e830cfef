#!/usr/bin/env python3
"""The proof of issue 8 (hardening): every numbered case of it, against a real engine daemon.

    python scripts/chaos.py            # the full run (50 kill cycles, the issue's own timings)
    python scripts/chaos.py --quick    # a short version (tests/test_chaos.py runs it)
    python scripts/chaos.py --only 2,7 # some cases only (by number or id: 2, 7e, ...)

One engine (embedded model, `--backend peft`) in a fresh temporary CLORA_HOME. Two well-behaved
tenants (bg-a, bg-b) train all along. Each case does something hostile the issue found; for
each, one line: the case, its outcome (the tenant's final state and reason, or the refusal
text), the steps the two others made meanwhile, whether the engine is up, PASS/FAIL/SKIP.

A case fails if its outcome is not the expected, named one; if the engine went down; if
the others stalled during it; or if they made no step in the 30 s after it. "Stalled" is
measured per CPU second of the engine process, not per wall second, so that a machine busy
with other work does not read as a stall: over a case in which the engine used 3 CPU seconds
or more, the others' steps per engine CPU second must stay above a tenth of their baseline
(measured before the first case; the stalls the issue found were 50 to 1000 times). When other
work on the machine took half a core or more during the case (what the rest of the system used,
from /proc/stat, less the engine's and this script's process trees), only a case in which the
others made no step at all counts as a stall: CPU time is then no fair yardstick either. A blocked scheduler makes no steps whatever CPU it gets;
a GIL-hogging thread or an eval of 100000 items burns CPU without the others' steps.
Exit status 0 when no case failed (SKIP: a case this machine cannot stage, e.g. no tmpfs mount).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
# The engine daemon (and its reward workers) must import this tree, whatever is installed.
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                       if p and p != str(REPO))])

import psutil  # noqa: E402

from clora_tui.client import EngineClient, EngineRefused, EngineUnavailable, new_idempotency_key  # noqa: E402
from clora_tui.launcher import start_daemon, stop_engine  # noqa: E402
from engine import protocol  # noqa: E402
from engine.daemon import engine_running, pid_alive, read_pid  # noqa: E402
from engine.models import EMBEDDED_MODEL_DIR  # noqa: E402

SLOTS = 8
STALL_SHARE = 0.1  # the others' steps per engine CPU-s during a case must stay above this share of the baseline
BUSY_CORES = 0.5  # other work on the machine above this: only "no step at all" is a stall
MIN_RATED_CPU_S = 3.0  # cases in which the engine used less CPU than this are not rated (too few steps to tell)
AFTER_S = 30.0  # after each case, every background tenant must step again within this
KEEP_OTHER_EVENTS, KEEP_LOG_EVENTS, PRUNE_EVERY = 1000, 10_000, 500  # engine/store.py
LONG_TOKENS = 4096  # the long batch of case 3: 8 rows x 4096 tokens, inside the work budget


@dataclass
class Settings:
    quick: bool
    cycles: int  # case 4
    hello_timeout: float  # case 7e (the engine's CLORA_HELLO_TIMEOUT_S)
    trickle_s: float  # case 7e: one byte of the hello this often
    max_connections: int  # case 7f (the engine's CLORA_MAX_CONNECTIONS)
    partial_lines: int  # case 7g: connections each sending 1 MB without a newline
    baseline_s: float
    slow_steps: int  # case 2d

    @classmethod
    def make(cls, quick: bool, cycles: int | None) -> "Settings":
        if quick:
            return cls(True, cycles or 6, 3.0, 1.0, 16, 20, 3.0, 1)
        return cls(False, cycles or 50, 10.0, 4.0, 64, 100, 10.0, 3)


@dataclass
class Row:
    case: str
    title: str
    outcome: str
    others: str = ""
    up: bool = True
    result: str = "PASS"  # PASS | FAIL | SKIP

    def line(self) -> str:
        return f"{self.case:<3} {self.title} | {self.outcome} | others {self.others} | engine up {'yes' if self.up else 'NO'} | {self.result}"


class Skip(Exception):
    """A case this machine cannot stage."""


def wait(predicate, timeout: float, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


def short(text: str, limit: int = 240) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def tiny(name: str, steps: int = 10**6, checkpoint_every: int = 1000, **top) -> dict:
    """A well-behaved experiment: a step well under a second on two cores."""
    spec = {"name": name, "steps": steps, "checkpoint_every": checkpoint_every, "eval_every": 0,
            "rollout": {"prompts_per_step": 2, "num_generations": 4, "max_tokens": 6}, "lora": {"rank": 4}}
    for key, value in top.items():
        if isinstance(value, dict):
            spec.setdefault(key, {}).update(value)
        else:
            spec[key] = value
    return spec


def long_batch(name: str) -> dict:
    """One step that samples 8 rows of LONG_TOKENS tokens each (ignore_eos): tens of seconds."""
    return tiny(name, steps=1, rollout={"prompts_per_step": 1, "num_generations": 8, "max_tokens": LONG_TOKENS,
                                        "ignore_eos": True})


REWARDS = {
    "exit_import": "import os\nos._exit(1)\n\ndef score(prompt, completion, answer):\n    return 1.0\n",
    "exit_call": "import os\n\ndef score(prompt, completion, answer):\n    os._exit(1)\n",
    "busy": "def score(prompt, completion, answer):\n    while True:\n        pass\n",
    "slow": "import time\n\ndef score(prompt, completion, answer):\n    time.sleep(0.3)\n"
            "    return float(completion.strip() == answer.strip())\n",
    "string": "def score(prompt, completion, answer):\n    return '0.5'\n",
    # Exits at import once MARKER exists: created while the engine is stopped, so the restored
    # tenant's worker dies at import after the restart (the crash loop of the issue).
    "marker": "import os\nif os.path.exists({marker!r}):\n    os._exit(1)\n\n"
              "def score(prompt, completion, answer):\n    return float(completion.strip() == answer.strip())\n",
}


class Chaos:
    def __init__(self, settings: Settings, keep: bool = False, verbose: bool = False):
        self.s = settings
        self.keep, self.verbose = keep, verbose
        self.home = Path(tempfile.mkdtemp(prefix="chaos-", dir="/tmp"))
        self.work = Path(tempfile.mkdtemp(prefix="chaos-work-", dir="/tmp"))
        self.client: EngineClient | None = None
        self.pid: int | None = None
        self.bg: list[str] = []
        self.baseline = 0.0  # steps/s of the background tenants together (wall clock)
        self.baseline_cpu = 0.0  # their steps per CPU second of the engine process
        self.rows: list[Row] = []
        self.mounts: list[Path] = []
        self.marker = self.work / "crash-at-import"
        self.rewards = {}
        for name, body in REWARDS.items():
            path = self.work / f"reward_{name}.py"
            path.write_text(body.format(marker=str(self.marker)) if name == "marker" else body)
            self.rewards[name] = f"{path}:score"
        os.environ["CLORA_HOME"] = str(self.home)
        os.environ["CLORA_HELLO_TIMEOUT_S"] = f"{settings.hello_timeout:g}"
        os.environ["CLORA_MAX_CONNECTIONS"] = str(settings.max_connections)

    # -- talking to the engine ------------------------------------------------------------
    def call(self, op: str, **args):
        if op in protocol.IDEMPOTENT_OPS:
            args.setdefault("idempotency_key", new_idempotency_key())  # a retry cannot duplicate
        for attempt in range(3):
            try:
                if self.client is None:
                    self.client = EngineClient(self.home, timeout=60).connect()
                return self.client.call(op, **args)
            except EngineUnavailable:
                self.client = None
                if attempt == 2:
                    raise
                time.sleep(0.5)

    def submit(self, spec: dict) -> str:
        return self.call("start", spec=spec)["id"]

    def get(self, tid: str) -> dict:
        return self.call("get", id=tid)

    def kill_quiet(self, tid: str) -> None:
        try:
            self.call("kill", id=tid)
        except (EngineRefused, EngineUnavailable):
            pass

    def wait_final(self, tid: str, timeout: float = 60.0, states=("done", "killed", "failed")) -> dict:
        got = wait(lambda: (lambda t: t if t["state"] in states else None)(self.get(tid)), timeout, 0.1)
        if got is None:
            t = self.get(tid)
            raise AssertionError(f"{tid} still {t['state']} ({t['reason']}) after {timeout:.0f} s")
        return got

    def wait_phase(self, tid: str, phase: str, hold_s: float = 0.0, timeout: float = 60.0) -> dict:
        """Until the tenant has been in `phase` for `hold_s` seconds."""
        def ok():
            t = self.get(tid)
            if t["state"] in ("done", "killed", "failed"):
                raise AssertionError(f"{tid} ended {t['state']}: {t['reason']} {t['error']}")
            return t if t["phase"] == phase and time.time() - (t["phase_since"] or time.time()) >= hold_s else None
        got = wait(ok, timeout, 0.05)
        if got is None:
            raise AssertionError(f"{tid} not in phase {phase!r} within {timeout:.0f} s")
        return got

    def bg_steps(self) -> dict[str, int]:
        try:
            return {t["id"]: t["step"] for t in self.call("list") if t["id"] in self.bg}
        except (EngineRefused, EngineUnavailable, OSError):
            return {}

    def engine_up(self) -> bool:
        pid = read_pid(self.home)
        if not pid_alive(pid):
            return False
        try:
            with EngineClient(self.home, timeout=10).connect() as c:
                return bool(c.call("status").get("ready"))
        except (EngineRefused, EngineUnavailable, OSError, ValueError):
            return False

    def bg_step_again(self) -> bool:
        """Every background tenant is running and makes one more step within AFTER_S."""
        start = self.bg_steps()
        if len(start) != len(self.bg):
            return False

        def moved():
            rows = {t["id"]: t for t in self.call("list") if t["id"] in self.bg}
            if any(r["state"] != "running" for r in rows.values()):
                raise AssertionError("a background tenant left running: "
                                     + ", ".join(f"{i} {r['state']} {r['reason']}" for i, r in rows.items()))
            return all(rows[i]["step"] > start[i] for i in self.bg)
        try:
            return bool(wait(moved, AFTER_S, 0.1))
        except AssertionError:
            return False

    def engine_rss(self) -> int:
        try:
            proc = psutil.Process(read_pid(self.home))
            return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
        except (psutil.Error, TypeError):
            return 0

    def cpu_marks(self) -> tuple[float, float]:
        """(CPU seconds the whole machine has been busy, those of the engine's and this script's
        process trees): their difference is other people's work."""
        t = psutil.cpu_times()
        busy = t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0) + getattr(t, "steal", 0)
        ours = 0.0
        procs = [psutil.Process()]
        try:
            procs.append(psutil.Process(read_pid(self.home)))
        except (psutil.Error, TypeError):
            pass
        for proc in procs:
            try:
                for p in [proc, *proc.children(recursive=True)]:
                    c = p.cpu_times()
                    ours += c.user + c.system + (c.children_user + c.children_system if p is proc else 0)
            except psutil.Error:
                continue
        return busy, ours

    def engine_cpu(self) -> float:
        """CPU seconds the engine process (not its reward workers) has used."""
        try:
            times = psutil.Process(read_pid(self.home)).cpu_times()
            return times.user + times.system
        except (psutil.Error, TypeError):
            return 0.0

    def start_engine(self) -> float:
        t0 = time.monotonic()
        status = start_daemon(self.home, model=str(EMBEDDED_MODEL_DIR), backend="peft", max_loras=SLOTS,
                              max_lora_rank=16, say=lambda m: None, timeout=180)
        self.pid, self.client = status["pid"], None
        return time.monotonic() - t0

    def stop_engine(self) -> dict:
        if self.client is not None:
            self.client.close()
            self.client = None
        return stop_engine(self.home, timeout=180, say=lambda m: None)

    def raw(self, hello: bool = True, timeout: float = 10.0) -> socket.socket:
        """A plain socket to the engine (authenticated with `hello`)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(str(protocol.socket_path(self.home)))
        if hello:
            token = protocol.token_path(self.home).read_text().strip()
            try:
                sock.sendall(protocol.encode(protocol.request("hello", 1, token=token)))
            except OSError:
                pass  # refused and closed at once (the connection cap): the reason is waiting to be read
            reply = read_reply(sock)
            if not (reply and reply.get("ok")):
                sock.close()
                err = (reply or {}).get("error") or {}
                raise EngineRefused(err.get("code", "closed"), err.get("message", f"hello answered {reply}"))
        return sock

    # -- running cases ------------------------------------------------------------------------
    def run(self, case: str, title: str, fn, rated: bool = True) -> list[Row]:
        """Run one case (or a group: `fn` returns rows) while the background tenants train."""
        if self.verbose:
            print(f"... {case} {title}", file=sys.stderr, flush=True)
        before, t0, cpu0, marks0 = self.bg_steps(), time.monotonic(), self.engine_cpu(), self.cpu_marks()
        try:
            out = fn()
            rows = out if isinstance(out, list) else [Row(case, title, out[1], result="PASS" if out[0] else "FAIL")]
        except Skip as exc:
            rows = [Row(case, title, f"skipped: {exc}", result="SKIP")]
        except Exception as exc:  # noqa: BLE001 - a broken case is a failed case
            if self.verbose:
                traceback.print_exc()
            rows = [Row(case, title, f"error: {type(exc).__name__}: {short(exc)}", result="FAIL")]
        dt, cpu, marks = time.monotonic() - t0, self.engine_cpu() - cpu0, self.cpu_marks()
        elsewhere = max(0.0, (marks[0] - marks0[0]) - (marks[1] - marks0[1])) / dt if dt > 0 else 0.0
        after = self.bg_steps()
        delta = sum(max(0, after.get(i, 0) - before.get(i, 0)) for i in self.bg)
        up = self.engine_up()
        again = up and self.bg_step_again()
        others = f"+{delta} steps in {dt:.1f} s"
        stalled = False
        if rated and cpu >= MIN_RATED_CPU_S and self.baseline_cpu > 0:
            share = delta / cpu / self.baseline_cpu
            others += f", {cpu:.1f} engine CPU-s ({100 * share:.0f}% of baseline steps per CPU-s"
            if elsewhere >= BUSY_CORES:
                others += f"; machine busy: other work used {elsewhere:.1f} cores"
                stalled = delta == 0
            else:
                stalled = share < STALL_SHARE
            others += ")"
        if stalled:
            others += " STALLED"
        if not again:
            others += "; NOT stepping after the case"
        for row in rows:
            row.others, row.up = others, up
            if row.result != "SKIP" and (not up or stalled or not again):
                row.result = "FAIL"
            print(row.line(), flush=True)
        self.rows += rows
        return rows

    def setup(self) -> None:
        start_s = self.start_engine()
        self.bg = [self.submit(tiny("bg-a")), self.submit(tiny("bg-b", task="reverse"))]
        if not wait(lambda: all(s >= 2 for s in self.bg_steps().values()) and len(self.bg_steps()) == 2, 120):
            raise SystemExit("the background tenants did not start stepping")
        before, t0, cpu0 = self.bg_steps(), time.monotonic(), self.engine_cpu()
        time.sleep(self.s.baseline_s)
        while self.engine_cpu() - cpu0 < MIN_RATED_CPU_S and time.monotonic() - t0 < 60:
            time.sleep(0.5)  # a busy machine: measure over enough engine CPU time
        after, cpu = self.bg_steps(), self.engine_cpu() - cpu0
        steps = sum(after[i] - before[i] for i in self.bg)
        self.baseline = steps / (time.monotonic() - t0)
        self.baseline_cpu = steps / cpu if cpu > 0 else 0.0
        print(f"engine pid {self.pid} on {self.home} (ready in {start_s:.1f} s); background tenants "
              f"{', '.join(self.bg)}: baseline {self.baseline:.2f} steps/s together, "
              f"{self.baseline_cpu:.2f} per engine CPU-s", flush=True)

    def cleanup(self) -> None:
        if self.client is not None:
            self.client.close()
        try:
            if engine_running(self.home, settle_s=1) is not None:
                self.stop_engine()
        except Exception as exc:  # noqa: BLE001
            print(f"warning: stopping the engine: {exc}", file=sys.stderr)
            pid = read_pid(self.home)
            if pid_alive(pid):
                os.kill(pid, 9)
        for mount in reversed(self.mounts):
            unmount(mount)
        if not self.keep:
            shutil.rmtree(self.home, ignore_errors=True)
            shutil.rmtree(self.work, ignore_errors=True)

    # == 1: task_args ===========================================================================
    def refused(self, spec: dict, *expect: str) -> tuple[bool, str]:
        try:
            tid = self.submit(spec)
        except EngineRefused as exc:
            ok = exc.code == "refused" and all(e in str(exc) for e in expect)
            return ok, f"refused: {short(exc)}"
        self.kill_quiet(tid)
        return False, f"ACCEPTED as {tid}"

    def case_1a(self):
        return self.refused(tiny("bad-digits", task_args={"digits": 2.5}), "task_args.digits", "2.5")

    def case_1b(self):
        return self.refused(tiny("bad-min-len", task="reverse", task_args={"min_len": 1.5}), "task_args.min_len")

    def case_1c(self):
        return self.refused(tiny("big-eval", task_args={"eval_size": 100000}, eval_every=1), "task_args.eval_size")

    # == 2: user code ===========================================================================
    def case_2a(self):
        return self.refused(tiny("exit-import", reward=self.rewards["exit_import"]), "exited with code 1")

    def failing_tenant(self, spec: dict, expect: str, timeout: float = 90) -> tuple[bool, str, dict]:
        tid = self.submit(spec)
        t = self.wait_final(tid, timeout)
        ok = t["state"] == "failed" and expect in t["error"]
        return ok, f"{tid} {t['state']}: {t['reason']}: {short(t['error'], 160)}", t

    def case_2b(self):
        ok, text, _ = self.failing_tenant(tiny("exit-call", reward=self.rewards["exit_call"]),
                                          "exited with code 1 while scoring")
        return ok, text

    def case_2c(self) -> list[Row]:
        """A reward spinning past its 3 s deadline; meanwhile: is the worker's CPU counted (8c)?"""
        tid = self.submit(tiny("busy-loop", reward=self.rewards["busy"], reward_timeout_s=3.0))
        cpu_row = self.child_cpu(tid)
        t = self.wait_final(tid, 60)
        ok = t["state"] == "failed" and "did not return within 3 s" in t["error"]
        # Killed at the deadline, not abandoned: no reward worker of the engine spins on.
        spinning = wait(lambda: not reward_workers(read_pid(self.home)), 5) is None
        time.sleep(2.0 if self.s.quick else 5.0)  # the others' rate after the failure is part of this case
        text = f"{tid} {t['state']}: {t['reason']}: {short(t['error'], 140)}"
        text += "; worker still alive" if spinning else "; its worker process is gone"
        return [Row("2c", "busy-looping reward past its 3 s timeout", text,
                    result="PASS" if ok and not spinning else "FAIL"), cpu_row]

    def child_cpu(self, tid: str) -> Row:
        title = "child-process CPU counted in the engine's samples"
        try:
            self.wait_phase(tid, "reward", 0.3, timeout=60)
            engine = psutil.Process(read_pid(self.home))
            workers = reward_workers(engine.pid)
            if not workers:
                return Row("8c", title, "skipped: no reward worker seen", result="SKIP")
            self.call("status")  # the engine's probe meets the worker (a first sample reads 0)
            for p in [engine, *workers]:
                p.cpu_percent(None)
            time.sleep(0.2)
            self.call("status")
            t0 = time.monotonic()
            engine.cpu_percent(None)
            for w in workers:
                w.cpu_percent(None)
            time.sleep(1.0)
            status = self.call("status")
            mine, theirs = engine.cpu_percent(None), sum(w.cpu_percent(None) for w in workers)
            dt = time.monotonic() - t0
        except (psutil.Error, AssertionError) as exc:
            return Row("8c", title, f"skipped: {exc}", result="SKIP")
        proc = status["system"]["process"]
        text = (f"engine reports {proc['cpu_percent']:.0f}% over {proc['processes']} processes; measured here over "
                f"{dt:.1f} s: engine {mine:.0f}% + spinning worker {theirs:.0f}%")
        if theirs < 30:
            return Row("8c", title, text + " (the worker got too little CPU to tell)", result="SKIP")
        ok = proc["children"] >= 1 and proc["cpu_percent"] >= mine + 0.5 * theirs - 10
        return Row("8c", title, text, result="PASS" if ok else "FAIL")

    def case_2d(self):
        tid = self.submit(tiny("slow-judge", steps=self.s.slow_steps, reward=self.rewards["slow"]))
        t = self.wait_final(tid, 120)
        per_step = [h["reward_s"] for h in t["history"]]
        ok = t["state"] == "done" and len(per_step) == self.s.slow_steps
        return ok, (f"{tid} {t['state']}: {t['reason']} after {t['step']} step(s), its reward "
                    f"{max(per_step, default=0):.1f} s/step (8 items x 0.3 s)")

    # == 3: work budget, preemption =====================================================================
    def case_3a(self):
        return self.refused(tiny("huge-tokens", rollout={"prompts_per_step": 8, "num_generations": 8,
                                                         "max_tokens": 32768, "ignore_eos": True}), "max_step_tokens")

    def case_3b(self):
        return self.refused(tiny("huge-prompts", rollout={"prompts_per_step": 4096, "num_generations": 8}),
                            "max_step_tokens")

    def command_latency(self, tid: str, op: str, state: str) -> float:
        t0 = time.monotonic()
        self.call(op, id=tid)
        got = wait(lambda: self.get(tid)["state"] == state, 30, 0.02)
        if not got:
            raise AssertionError(f"{op}: {tid} not {state} within 30 s")
        return time.monotonic() - t0

    def case_3c(self):
        tid = self.submit(long_batch("long-pause"))
        self.long = tid
        self.wait_phase(tid, "rollout", 1.0)
        took = self.command_latency(tid, "pause", "paused")
        t = self.get(tid)
        ok = took < 3.0 and t["state"] == "paused"
        return ok, f"{tid} paused {took:.2f} s after the request, mid-rollout of 8 x {LONG_TOKENS} tokens: {t['reason']}"

    def case_3d(self):
        tid = getattr(self, "long", None)
        if tid is not None and self.get(tid)["state"] == "paused":
            self.call("resume", id=tid)  # the tenant 3c paused: its long step starts over
        else:
            tid = self.submit(long_batch("long-kill"))
        self.wait_phase(tid, "rollout", 1.0)
        took = self.command_latency(tid, "kill", "killed")
        t = self.get(tid)
        ok = took < 3.0 and t["state"] == "killed"
        return ok, f"{tid} killed {took:.2f} s after the request, mid-rollout: {t['reason']}"

    # == 4: kills are kills ===========================================================================
    def case_4(self):
        delays = [0.0, 0.05, 0.2, 0.5, 1.0, 1.5]
        finals, rss0 = Counter(), self.engine_rss()
        bad = []
        for i in range(self.s.cycles):
            ids = [self.submit(tiny(f"cyc{i}-{k}", steps=1000)) for k in range(2)]
            time.sleep(delays[i % len(delays)])
            for tid in ids:
                self.kill_quiet(tid)
            for tid in ids:
                t = self.wait_final(tid, 60)
                finals[t["state"]] += 1
                if t["state"] != "killed":
                    bad.append(f"{tid} {t['state']}: {short(t['error'], 100)}")
        rss = (self.engine_rss() - rss0) / 2**20
        text = ", ".join(f"{n} {state}" for state, n in finals.most_common())
        text = f"{self.s.cycles} cycles: {text} (engine RSS {rss:+.0f} MB)" + (f"; {'; '.join(bad[:3])}" if bad else "")
        return not bad and finals["killed"] == 2 * self.s.cycles, text

    # == 5: disks =========================================================================================
    def next_id(self) -> str:
        return f"e{max((int(t['id'][1:]) for t in self.call('list')), default=0) + 1}"

    def case_5a(self):
        tid = self.next_id()
        where = self.home / "checkpoints" / tid
        where.mkdir(parents=True, exist_ok=True)
        mount_tmpfs(where, "2m")
        self.mounts.append(where)
        got = self.submit(tiny("disk-full", checkpoint_every=1))
        if got != tid:
            self.kill_quiet(got)
            raise AssertionError(f"expected the tenant id {tid}, got {got}")
        if not wait(lambda: len(self.get(tid)["checkpoints"]) >= 2, 60):
            raise AssertionError("no checkpoints written")
        fill(where / "filler")
        t = wait(lambda: (lambda t: t if t["state"] != "running" else None)(self.get(tid)), 30, 0.1)
        if t is None:
            raise AssertionError("still running on a full disk after 30 s")
        problems = []
        if t["state"] != "paused" or not t["reason"].startswith("disk full"):
            problems.append(f"ended {t['state']}: {t['reason']} {t['error']}")
        elif "(0 MiB free)" not in t["reason"]:
            problems.append("the reason does not give the free space where the checkpoint goes")
        history_step = max((h["step"] for h in t["history"]), default=0)
        if t["step"] != history_step:
            problems.append(f"reports step {t['step']} but recorded {history_step}")
        dirs = sorted(p.name for p in where.glob("step-*"))
        if any(d.endswith(".tmp") for d in dirs):
            problems.append(f"left {dirs}")
        kept = [d for d in dirs if not d.endswith(".tmp") and (where / d / "state.json").is_file()]
        if not kept or int(kept[-1].split("-")[1]) != t["step"] - 1:
            problems.append(f"previous checkpoint not kept (on disk: {dirs}, step {t['step']})")
        paused_at = t["step"]
        reason = t["reason"]
        (where / "filler").unlink()
        back = wait(lambda: (lambda t: t if t["state"] == "running" and t["step"] > paused_at else None)(self.get(tid)),
                    60, 0.2)
        if back is None:
            problems.append("did not resume within 60 s of space returning")
        else:
            # Written before the resume; later steps' checkpoints may have pruned it since (KEEP=2),
            # so the engine's log is the witness, not the checkpoint list.
            written = f"{tid}: checkpoint of step {paused_at} written; resuming"
            logged = [e["data"].get("message", "") for e in self.call("logs", limit=2000) if e["kind"] == "log"]
            if written not in logged and not any(c["step"] == paused_at for c in back["checkpoints"]):
                problems.append(f"the owed checkpoint of step {paused_at} was not written")
        self.kill_quiet(tid)
        self.wait_final(tid, 30)
        text = (f"{tid} paused: {short(reason, 130)}; kept {kept[-1] if kept else 'nothing'}, no .tmp left"
                + (f"; resumed at step {back['step']} once space returned" if back else ""))
        return not problems, text + ("; " + "; ".join(problems) if problems else "")

    def case_5c(self):
        where = self.work / "full-disk"
        where.mkdir()
        mount_tmpfs(where, "1m")
        self.mounts.append(where)
        home = where / "h"
        home.mkdir(mode=0o700)
        fill(where / "filler")
        proc = cli(home, "engine", "start", "--model", str(EMBEDDED_MODEL_DIR), "--backend", "peft", timeout=300)
        text = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        message = next((line for line in text if "error" in line.lower() or "full" in line.lower()), " ".join(text))
        ok = (proc.returncode != 0 and "Traceback" not in proc.stderr + proc.stdout
              and "disk full" in proc.stderr + proc.stdout and engine_running(home, settle_s=0) is None)
        return ok, f"exit {proc.returncode}: {short(message, 200)}"

    # == 6: a shared CLORA_HOME ============================================================================
    def case_6(self):
        shared = self.work / "shared-home"
        shared.mkdir()
        os.chmod(shared, 0o1777)
        proc = cli(shared, "engine", "start", "--model", str(EMBEDDED_MODEL_DIR), "--backend", "peft", timeout=300)
        mode = os.stat(shared).st_mode & 0o7777
        ok = (proc.returncode != 0 and "accessible by other users" in proc.stderr and mode == 0o1777
              and not any(shared.iterdir()))
        message = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.stdout
        return ok, f"exit {proc.returncode}, mode still {mode:04o}, nothing created: {short(message, 170)}"

    # == 7: smaller ===========================================================================================
    def case_7a(self):
        a = self.refused(tiny("inf-timeout", reward_timeout_s=float("inf")), "reward_timeout_s", "finite")
        b = self.refused(tiny("inf-lr", optim={"lr": float("inf")}), "optim.lr", "finite")
        c = self.refused(tiny("nan-lr", optim={"lr": float("nan")}), "optim.lr", "finite")
        return a[0] and b[0] and c[0], f"reward_timeout_s=inf {a[1]}; lr=inf {b[1]}; lr=nan {c[1]}"

    def case_7b(self):
        ok, text, _ = self.failing_tenant(tiny("string-reward", reward=self.rewards["string"]),
                                          "it must return a finite number")
        return ok, text

    def case_7c(self):
        out, ok = [], True
        for op, args in (("history", {"id": self.bg[0], "since": 10**30}), ("logs", {"since": 10**30})):
            try:
                self.call(op, **args)
                ok, text = False, "answered ok"
            except EngineRefused as exc:
                ok &= exc.code == "bad_request"
                text = f"{exc.code}: {short(exc, 90)}"
            out.append(f"{op} since=10**30 -> {text}")
        return ok, "; ".join(out)

    def case_7d(self):
        sock = self.raw()
        try:
            sock.sendall(b"[" * 100_000 + b"]" * 100_000 + b"\n")
            reply = read_reply(sock)
            sock.sendall(protocol.encode(protocol.request("status", 2)))
            after = read_reply(sock)
        finally:
            sock.close()
        err = (reply or {}).get("error") or {}
        ok = reply is not None and reply.get("ok") is False and err.get("code") in ("bad_json", "bad_request") \
            and bool(after and after.get("ok"))
        return ok, (f"{err.get('code')}: {short(err.get('message'), 110)}; the same connection then answers status"
                    if ok else f"reply {short(reply)}; then {short(after)}")

    def case_7e(self):
        sock = self.raw(hello=False, timeout=self.s.trickle_s)
        line = protocol.encode(protocol.request("hello", 1, token="x" * 64))
        t0, sent, got = time.monotonic(), 0, b""
        try:
            while time.monotonic() - t0 < self.s.hello_timeout + 20:
                try:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    got += chunk
                    continue
                except socket.timeout:
                    pass
                try:
                    sock.sendall(line[sent:sent + 1])
                    sent += 1
                except OSError:
                    break
        except OSError:
            pass
        finally:
            sock.close()
        took = time.monotonic() - t0
        reply = json.loads(got.splitlines()[0]) if got.strip() else {}
        message = (reply.get("error") or {}).get("message", "")
        ok = "no hello within" in message and took <= self.s.hello_timeout + self.s.trickle_s + 1.5
        return ok, (f"a byte every {self.s.trickle_s:g} s: cut after {took:.1f} s ({sent} bytes sent; deadline "
                    f"{self.s.hello_timeout:g} s): {message or 'no reply'}")

    def case_7f(self):
        socks, answers = [], Counter()
        refusal = ""
        try:
            for _ in range(self.s.max_connections + 3):
                try:
                    socks.append(self.raw())
                    answers["ok"] += 1
                except EngineRefused as exc:
                    answers["refused"] += 1
                    refusal = refusal or str(exc)
                except OSError as exc:
                    answers[type(exc).__name__] += 1
            t0 = time.monotonic()
            self.call("status")  # an established client is still answered at the cap
            honest_ms = 1000 * (time.monotonic() - t0)
        finally:
            for sock in socks:
                sock.close()
        fresh = wait(lambda: self.try_status(), 10, 0.2)
        ok = answers["refused"] >= 1 and "too many connections" in refusal and bool(fresh)
        more = "".join(f", {n} {k}" for k, n in answers.items() if k not in ("ok", "refused"))
        return ok, (f"{answers['ok']} accepted, {answers['refused']} refused{more} ({short(refusal, 110)}); an open client "
                    f"answered in {honest_ms:.0f} ms; a new one connects once they close")

    def try_status(self) -> bool:
        try:
            with EngineClient(self.home, timeout=5).connect() as c:
                return bool(c.call("status"))
        except (EngineRefused, EngineUnavailable, OSError):
            return False

    def case_7g(self):
        rss0 = self.engine_rss()
        blob = b"x" * (1 << 20)
        socks, answers = [], Counter()
        for _ in range(self.s.partial_lines):
            try:
                sock = self.raw(hello=False, timeout=5)
            except OSError:
                answers["connect failed"] += 1
                continue
            socks.append(sock)
            try:
                sock.sendall(blob)
            except OSError:
                pass  # answered and closed before it all arrived
        peak = self.engine_rss()
        for sock in socks:
            reply = read_reply(sock, timeout=5)
            answers[((reply or {}).get("error") or {}).get("code", "no reply")] += 1
            sock.close()
        # After the token, a line is capped at MAX_LINE: one byte more is refused, not buffered.
        sock = self.raw()
        try:
            sock.sendall(b"x" * (protocol.MAX_LINE + 2))
        except OSError:
            pass
        post = ((read_reply(sock, timeout=10) or {}).get("error") or {}).get("code")
        sock.close()
        grew = (peak - rss0) / 2**20
        ok = grew < 50 and answers.get("no reply", 0) == 0 and post == "too_large"
        text = ", ".join(f"{n} {code}" for code, n in answers.most_common())
        return ok, (f"{self.s.partial_lines} x 1 MB without a newline before hello: {text}; engine RSS {grew:+.0f} MB "
                    f"while held; after hello a {protocol.MAX_LINE + 2}-byte line -> {post}")

    def case_7h(self):
        client = EngineClient(self.home, timeout=10).connect()
        try:
            client.call("hello", token="0" * 64)
            return False, "wrong-token hello answered ok"
        except EngineRefused as exc:
            code, message = exc.code, str(exc)
        try:
            client.call("status")
            closed = False
        except (EngineUnavailable, EngineRefused):
            closed = True
        finally:
            client.close()
        return code == "unauthorized" and closed, f"{code}: {message}; connection closed: {'yes' if closed else 'no'}"

    # == 8: as far as observable ============================================================================
    def case_8a(self):
        key = new_idempotency_key()
        spec = tiny("idem", steps=1000)
        first = self.call("start", spec=spec, idempotency_key=key)
        again = self.call("start", spec=spec, idempotency_key=key)
        try:
            self.call("start", spec=tiny("idem-other"), idempotency_key=key)
            other = "accepted"
        except EngineRefused as exc:
            other = exc.code
        named = [t for t in self.call("list") if t["name"] == "idem"]
        self.kill_quiet(first["id"])
        ok = first["id"] == again["id"] and len(named) == 1 and other == "bad_request"
        return ok, (f"start twice with one key -> {first['id']} and {again['id']} ({len(named)} tenant); "
                    f"the key with another spec -> {other}")

    def case_8b(self):
        db = sqlite3.connect(f"file:{self.home / 'clora.db'}?mode=ro", uri=True, timeout=30)
        try:
            kinds = dict(db.execute("select kind in ('log', 'engine'), count(*) from events group by 1").fetchall())
            top = db.execute("select coalesce(max(seq), 0) from events").fetchone()[0]
            steps = db.execute("select count(*) from steps").fetchone()[0]
        finally:
            db.close()
        logs, other = kinds.get(1, 0), kinds.get(0, 0)
        ok = other <= KEEP_OTHER_EVENTS + PRUNE_EVERY and logs <= KEEP_LOG_EVENTS + PRUNE_EVERY
        return ok, (f"events table: {other} step/state/phase/system + {logs} log rows kept of {top} events emitted "
                    f"(bound {KEEP_OTHER_EVENTS}+{PRUNE_EVERY}); {steps} step rows in their own table")

    def case_8d(self):
        lat, stop = [], threading.Event()

        def probe():
            with EngineClient(self.home, timeout=30).connect() as c:
                while not stop.is_set():
                    t0 = time.monotonic()
                    c.call("status")
                    lat.append(time.monotonic() - t0)
                    time.sleep(0.02)

        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        with EngineClient(self.home, timeout=60).connect() as c:
            snap = c.subscribe()
        took = time.monotonic() - t0
        time.sleep(0.3)
        stop.set()
        thread.join(10)
        rows = sum(len(t["history"]) for t in snap["snapshot"]["tenants"])
        worst = max(lat, default=0)
        ok = took < 10 and worst < 2.0 and bool(lat)
        return ok, (f"snapshot of {len(snap['snapshot']['tenants'])} tenants / {rows} history rows in {took:.2f} s; "
                    f"status on another connection meanwhile: worst {1000 * worst:.0f} ms over {len(lat)} calls")

    # == the restart: 1d, 2e, 3e, 5b =================================================================
    def group_restart(self) -> list[Row]:
        rows = []
        ck = self.submit(tiny("ckpt", checkpoint_every=1))
        crash = self.submit(tiny("crash-loop", checkpoint_every=1, reward=self.rewards["marker"]))
        if not wait(lambda: self.get(ck)["step"] >= 3 and self.get(crash)["step"] >= 2, 120):
            raise AssertionError("the checkpointing tenants did not step")
        long = self.submit(long_batch("long-stop"))
        self.wait_phase(long, "rollout", 1.0)
        t0 = time.monotonic()
        stopped = self.stop_engine()
        stop_s = time.monotonic() - t0
        # -- while the engine is down
        db = sqlite3.connect(str(self.home / "clora.db"), timeout=30)
        try:
            recorded = {tid: db.execute("select coalesce(max(step), 0) from steps where tenant = ?", [tid]).fetchone()[0]
                        for tid in [*self.bg, ck]}
            seq = db.execute("select coalesce(max(seq), 0) + 1 from experiments").fetchone()[0]
            bad = f"e{seq}"
            db.execute("insert into experiments (id, seq, name, spec, state, reason, error, step, created) "
                       "values (?, ?, ?, ?, 'running', '', '', 0, ?)",
                       [bad, seq, "bad-stored", json.dumps(stored_bad_spec()), time.time()])
            db.commit()
        finally:
            db.close()
        found = sorted(p for p in (self.home / "checkpoints" / ck).glob("step-*") if not p.name.endswith(".tmp"))
        newest, previous = found[-1], found[-2]
        weights = newest / "adapter" / "adapter_model.safetensors"
        os.truncate(weights, weights.stat().st_size // 2)
        self.marker.touch()
        restart_s = self.start_engine()
        log: list[str] = []

        def logged(*parts):
            log[:] = [e["data"].get("message", "") for e in self.call("logs", limit=2000) if e["kind"] == "log"]
            return [m for m in log if all(p in m for p in parts)]

        def step_in(message: str) -> int | None:
            return int(message.split("restored at step ")[1].split(";")[0]) if message else None

        def check_3e():
            restored = {tid: wait(lambda tid=tid: logged(f"{tid} restored at step"), 20) for tid in self.bg}
            restored_at = {tid: step_in(m[-1]) if m else None for tid, m in restored.items()}
            count = stopped.get("checkpointed")
            lost = {tid: (recorded[tid], at) for tid, at in restored_at.items() if at != recorded[tid]}
            ok = stop_s < 30 and isinstance(count, int) and count >= len(self.bg) and not lost
            return ok, (f"stopped in {stop_s:.1f} s mid-rollout of {long} (8 x {LONG_TOKENS} tokens), {count} tenant "
                        f"checkpoint(s) written; back in {restart_s:.1f} s, "
                        + (f"steps lost {lost}" if lost else
                           f"background restored at their stopped steps {sorted(restored_at.values())}"))

        def check_1d():
            t = self.wait_final(bad, 30)
            ok = t["state"] == "failed" and "task_args.digits" in t["error"]
            return ok, f"{bad} {t['state']}: {t['reason']}: {short(t['error'], 120)}"

        def check_2e():
            t = self.wait_final(crash, 60)
            ok = t["state"] == "failed" and "exited with code 1" in t["error"]
            return ok, f"{crash} {t['state']}: {t['reason']}: {short(t['error'], 120)}"

        def check_5b():
            warned = wait(lambda: logged(f"{ck}: checkpoint at step {int(newest.name.split('-')[1])} is unreadable"), 20)
            at = logged(f"{ck} restored at step")
            at = step_in(at[-1]) if at else None
            prev_step = int(previous.name.split("-")[1])
            moving = wait(lambda: (lambda t: t if t["state"] == "running" and t["step"] > prev_step else None)(
                self.get(ck)), 60)
            ok = bool(warned) and at == prev_step and bool(moving)
            return ok, (f"{ck}: {short(warned[-1], 150) if warned else 'no warning'}; restored at step {at} "
                        f"(previous checkpoint {prev_step}), stepping again: {'yes' if moving else 'no'}")

        try:
            for case, title, check in (("3e", "engine stop during a long batch", check_3e),
                                       ("1d", "stored digits=2.5 at engine restart", check_1d),
                                       ("2e", "restored tenant whose reward os._exit(1)s at import", check_2e),
                                       ("5b", "newest checkpoint truncated, engine restarted", check_5b)):
                try:
                    ok, text = check()
                except Exception as exc:  # noqa: BLE001
                    ok, text = False, f"error: {type(exc).__name__}: {short(exc)}"
                rows.append(Row(case, title, text, result="PASS" if ok else "FAIL"))
        finally:
            for tid in (ck, long):
                self.kill_quiet(tid)
        return rows

    # == the run ==========================================================================================
    def plan(self):
        return [
            ("1a", "task_args digits=2.5", self.case_1a, True),
            ("1b", "task_args min_len=1.5 (reverse)", self.case_1b, True),
            ("1c", "task_args eval_size=100000", self.case_1c, True),
            ("2a", "reward os._exit(1)s at import", self.case_2a, True),
            ("2b", "reward os._exit(1)s in the function", self.case_2b, True),
            ("2c", "busy-looping reward past its timeout", self.case_2c, True),
            ("2d", "reward taking 0.3 s per item", self.case_2d, True),
            ("3a", "max_tokens=32768 with ignore_eos", self.case_3a, True),
            ("3b", "prompts_per_step=4096", self.case_3b, True),
            ("3c", "pause during a long batch", self.case_3c, True),
            ("3d", "kill during a long batch", self.case_3d, True),
            ("4", "submit-2-then-kill-both cycles", self.case_4, True),
            ("5a", "disk full during a checkpoint", self.case_5a, True),
            ("5c", "engine start on a full disk", self.case_5c, True),
            ("6", "engine start with a 1777 CLORA_HOME", self.case_6, True),
            ("7a", "inf / nan values", self.case_7a, True),
            ("7b", "reward returning the string '0.5'", self.case_7b, True),
            ("7c", "history / logs since=10**30", self.case_7c, True),
            ("7d", "JSON nested 100k deep", self.case_7d, True),
            ("7e", "hello trickled a byte at a time", self.case_7e, True),
            ("7f", "connection cap", self.case_7f, True),
            ("7g", "1 MB partial lines", self.case_7g, True),
            ("7h", "wrong-token hello on an authenticated connection", self.case_7h, True),
            ("8a", "start retried with one idempotency key", self.case_8a, True),
            ("8d", "subscribe snapshot while requests go on", self.case_8d, True),
            ("1d 2e 3e 5b", "engine restart", self.group_restart, False),
            ("8b", "events table bounded", self.case_8b, True),
        ]


NOT_OBSERVABLE = [
    ("8e", "fused-training fallback double update; adapter_bytes without the trainer lock",
     "not observable from outside the engine (tests/test_backends.py, tests/test_pipeline.py)"),
]


def stored_bad_spec() -> dict:
    """What an engine that did not validate task_args stored for `digits = 2.5` (issue case 1)."""
    from engine.config import ExperimentSpec, LoraSpec, RolloutSpec

    return ExperimentSpec(name="bad-stored", task_args={"digits": 2.5}, steps=1000, eval_every=0,
                          lora=LoraSpec(rank=4), rollout=RolloutSpec(prompts_per_step=2, num_generations=4,
                                                                     max_tokens=6)).to_dict()


def read_reply(sock: socket.socket, timeout: float = 10.0) -> dict | None:
    """The next JSON line on a raw socket (None on a close or a timeout)."""
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in data and time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except (socket.timeout, OSError):
            break
        if not chunk:
            break
        data += chunk
    line = data.split(b"\n")[0]
    try:
        return json.loads(line) if line.strip() else None
    except ValueError:
        return None


def reward_workers(engine_pid: int | None) -> list[psutil.Process]:
    try:
        children = psutil.Process(engine_pid).children(recursive=True)
    except (psutil.Error, TypeError, ValueError):
        return []
    found = []
    for child in children:
        try:
            if "engine.tasks.reward_worker" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.Error:
            continue
    return found


def cli(home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, CLORA_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "clora_tui.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO))


def mount_tmpfs(where: Path, size: str) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        raise Skip("a small tmpfs needs root and mount(8); run as root to stage a full disk")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise Skip(f"cannot mount a tmpfs here ({short(proc.stderr or proc.stdout, 100)})")


def unmount(where: Path) -> None:
    if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(path: Path) -> None:
    """Write zeros until the filesystem is full."""
    block = b"\0" * 4096
    with open(path, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(block)
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short version (fewer cycles, shorter waits)")
    parser.add_argument("--cycles", type=int, default=None, help="submit/kill cycles of case 4 (50; --quick 6)")
    parser.add_argument("--only", default="", help="comma-separated cases to run (e.g. 2,7e)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary CLORA_HOME")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    chaos = Chaos(Settings.make(args.quick, args.cycles), keep=args.keep, verbose=args.verbose)
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]

    def selected(case: str) -> bool:
        return not wanted or any(c == w or c.rstrip("abcdefgh") == w for c in case.split() for w in wanted)

    t0 = time.monotonic()
    try:
        chaos.setup()
        for case, title, fn, rated in chaos.plan():
            if selected(case):
                if case == "4":
                    title = f"{chaos.s.cycles} submit-2-then-kill-both cycles"
                chaos.run(case, title, fn, rated)
        for case, title, why in NOT_OBSERVABLE:
            if selected(case):
                row = Row(case, title, why, others="-", result="SKIP")
                print(row.line(), flush=True)
                chaos.rows.append(row)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        chaos.cleanup()

    def order(row: Row):
        return (int(row.case[0]), row.case)

    print(f"\n== chaos ({'quick' if args.quick else 'full'}) in {time.monotonic() - t0:.0f} s: "
          f"baseline {chaos.baseline:.2f} steps/s of the two background tenants, "
          f"{chaos.baseline_cpu:.2f} per engine CPU-s ==")
    for row in sorted(chaos.rows, key=order):
        print(row.line())
    counts = Counter(r.result for r in chaos.rows)
    print(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
    return 1 if counts["FAIL"] or not chaos.rows else 0


if __name__ == "__main__":
    sys.exit(main())
