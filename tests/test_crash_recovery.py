"""kill -9 the engine while tenants are mid-step; `engine start` again; every tenant resumes from
its checkpoint with its recorded steps intact and contiguous, and runs to done."""

from __future__ import annotations

import os
import signal
import sqlite3

from engine import protocol
from engine.daemon import engine_running, pid_alive, read_pid
from tests.daemon_helpers import Daemon, run_cli, start_engine, wait_for, write_spec
from tests.modelpaths import tiny_spec

MID_STEP = {"rollout", "reward", "train", "sync", "checkpoint", "record"}


def step_rows(home, tenant):
    db = sqlite3.connect(str(home / "clora.db"))
    try:
        return db.execute("select step, time, rolled_back from steps where tenant = ? order by time",
                          [tenant]).fetchall()
    finally:
        db.close()


def test_kill_9_mid_step_then_resume_from_checkpoints(home, model_path, tmp_path):
    d = Daemon(home, model_path, start_engine(home, model_path, max_loras=2))
    plan = {"e1": (10, 3), "e2": (8, 2)}  # steps, checkpoint_every
    d.cli("submit", write_spec(tmp_path, "crash-a", steps=10, checkpoint_every=3), check=True)
    d.cli("submit", write_spec(tmp_path, "crash-b", steps=8, checkpoint_every=2, task="reverse"), check=True)
    with d.client() as client:
        client.call("start", spec=tiny_spec("held", steps=3))  # e3: queued (2 slots), then paused
        client.call("pause", id="e3")
        client.call("start", spec=tiny_spec("waiting", steps=2))  # e4: stays queued

        def mid_step():
            rows = {r["id"]: r for r in client.call("list")}
            enough = rows["e1"]["step"] >= 4 and rows["e2"]["step"] >= 3
            return enough and rows["e1"]["phase"] in MID_STEP and rows["e2"]["phase"] in MID_STEP and rows

        rows = wait_for(mid_step, interval=0.05, timeout=300, what="both tenants mid-step with checkpoints")
        before = {t: client.call("get", id=t) for t in ("e1", "e2", "e3", "e4")}
    assert rows["e3"]["state"] == "paused" and rows["e4"]["state"] == "queued"

    pid = d.pid
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid), timeout=30, what="the engine to die")
    # What the dead engine left: a pid file and a socket nobody answers on, but no lock holder.
    assert read_pid(home) == pid and protocol.socket_path(home).exists()
    assert engine_running(home) is None
    recorded = {t: [r[:2] for r in step_rows(home, t) if not r[2]] for t in plan}
    ckpt = {}
    for tenant in plan:
        found = [int(p.name.split("-")[1]) for p in (home / "checkpoints" / tenant).glob("step-*")
                 if not p.name.endswith(".tmp") and (p / "state.json").is_file()]
        # the newest checkpoint whose step was recorded (one written just before its record is void)
        ckpt[tenant] = max(s for s in found if s <= len(recorded[tenant]))
        assert ckpt[tenant] >= 2, (tenant, found, recorded[tenant])
        assert [s for s, _ in recorded[tenant]] == list(range(1, len(recorded[tenant]) + 1)), recorded[tenant]

    started = run_cli(home, "engine", "start", "--model", model_path, "--backend", "peft", "--max-loras", "2",
                      "--max-lora-rank", "16", timeout=600)
    assert started.returncode == 0, started.stderr
    assert f"removed stale pid file (pid {pid}" in started.stdout and "removed stale socket" in started.stdout
    new_pid = read_pid(home)
    assert new_pid != pid and pid_alive(new_pid)

    with d.client() as client:
        after_restart = {r["id"]: r for r in client.call("list")}
        assert after_restart["e3"]["state"] == "paused"  # paused stays paused
        assert after_restart["e4"]["state"] == "queued"  # queued stays queued
        log = "\n".join(e["data"].get("message", "") for e in client.call("logs", limit=500) if e["kind"] == "log")
        for tenant in plan:
            assert f"{tenant} restored at step {ckpt[tenant]}" in log, log
            assert f"{tenant} resumed from checkpoint at step {ckpt[tenant]}" in log or \
                after_restart[tenant]["step"] == ckpt[tenant]
        wait_for(lambda: all(r["state"] == "done" for r in client.call("list") if r["id"] in plan), timeout=600,
                 what="e1 and e2 to finish")
        log = "\n".join(e["data"].get("message", "") for e in client.call("logs", limit=500) if e["kind"] == "log")
        for tenant in plan:
            assert f"{tenant} resumed from checkpoint at step {ckpt[tenant]}" in log
        client.call("resume", id="e3")
        wait_for(lambda: all(r["state"] == "done" for r in client.call("list")), timeout=600, what="all done")
        final = {t: client.call("get", id=t) for t in ("e1", "e2", "e3", "e4")}

    for tenant, (steps, _) in plan.items():
        rows = step_rows(home, tenant)
        live = [(s, t) for s, t, rb in rows if not rb]
        undone = [(s, t) for s, t, rb in rows if rb]
        # Visible history: 1..steps, each once, contiguous.
        assert [s for s, _ in live] == list(range(1, steps + 1)), tenant
        assert [h["step"] for h in final[tenant]["history"]] == list(range(1, steps + 1))
        # Steps up to the checkpoint are the very rows recorded before the crash (intact).
        assert [r for r in live if r[0] <= ckpt[tenant]] == [r for r in recorded[tenant] if r[0] <= ckpt[tenant]]
        # Steps after the checkpoint were rolled back (kept, marked) and re-done once, later.
        assert undone == [r for r in recorded[tenant] if r[0] > ckpt[tenant]]
        crash_time = max(t for _, t in recorded[tenant])
        assert all(t > crash_time for s, t in live if s > ckpt[tenant])
        assert len(before[tenant]["history"]) <= len(recorded[tenant])
        print(f"{tenant}: {len(recorded[tenant])} steps recorded at the crash, checkpoint at {ckpt[tenant]}, "
              f"{len(undone)} rolled back and re-done, {len(live)} steps in the final history")
    assert [h["step"] for h in final["e3"]["history"]] == [1, 2, 3]
    assert [h["step"] for h in final["e4"]["history"]] == [1, 2]
