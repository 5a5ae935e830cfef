"""The event log (persisted once, pruned), the subscribe snapshot (cut under the lock, histories read
outside it), and the engine's samplers (child-process CPU, adapter bytes under the trainer lock)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from engine.config import EngineConfig, parse_spec
from engine.core import Engine
from engine.events import EventBus
from engine.server import EngineServer
from engine.store import Store
from engine.telemetry import ProcessProbe


def stored_events(path):
    db = sqlite3.connect(str(path))
    try:
        return db.execute("select seq, kind, data from events order by seq").fetchall()
    finally:
        db.close()


def test_step_events_are_stored_once_and_old_events_are_pruned(tmp_path):
    store = Store(tmp_path / "clora.db", keep_log_events=50, keep_other_events=20)
    bus = EventBus(store)
    row = {"step": 1, "reward_mean": 0.5, "loss": 0.1, "total_s": 0.2, "rollout_s": 0.1}
    bus.emit("step", "e1", **row)
    (seq, kind, data), = stored_events(tmp_path / "clora.db")
    assert kind == "step" and json.loads(data) == {"step": 1}  # the figures live in the steps table only
    for i in range(540):
        bus.emit("log", None, level="info", message=f"line {i}")
        if i % 10 == 0:
            bus.emit("state", "e1", state="running", step=i)
    assert len(stored_events(tmp_path / "clora.db")) < 540  # pruned on the way
    store.prune_events()
    rows = stored_events(tmp_path / "clora.db")
    logs = [r for r in rows if r[1] == "log"]
    others = [r for r in rows if r[1] != "log"]
    assert len(logs) == 50 and len(others) == 20
    assert json.loads(logs[-1][2])["message"] == "line 539"
    assert rows[-1][0] == bus.seq  # the newest survives: sequence numbers go on after a restart
    store.close()
    again = Store(tmp_path / "clora.db")
    assert EventBus(again).seq == bus.seq
    assert [e["data"]["message"] for e in again.recent_events(("log",), 3)] == ["line 537", "line 538", "line 539"]
    again.close()


def test_snapshot_does_not_hold_the_event_lock_while_reading_histories(tmp_path):
    """A step recorded (and announced) while the snapshot reads the histories is not held up,
    is not in the snapshot, and reaches the subscriber exactly once, after the snapshot."""
    engine = Engine(EngineConfig(), tmp_path / "home")
    server = EngineServer(engine, engine.home)
    try:
        spec = parse_spec({"name": "t", "steps": 50}).to_dict()
        engine.store.add_experiment("e1", 1, "t", spec, "running")

        def record(step: int) -> dict:
            with engine.events.lock:  # as the scheduler does: recorded, then announced, atomically
                engine.store.record_step({"tenant": "e1", "step": step, "time": time.time()})
                return engine.events.emit("step", "e1", step=step)

        for step in (1, 2, 3):
            record(step)
        engine.log("before the snapshot")
        emitted, waited = [], []
        real_steps = engine.store.steps

        def steps_while_scheduler_runs(*args, **kwargs):
            # The scheduler records step 4 (another thread) while the snapshot loads a full history.
            if not emitted and not waited and kwargs.get("since", 0) == 0 and not args[1:]:
                t0 = time.time()
                worker = threading.Thread(target=lambda: emitted.append(record(4)))
                worker.start()
                worker.join(timeout=3)
                waited.append(time.time() - t0)
            return real_steps(*args, **kwargs)

        engine.store.steps = steps_while_scheduler_runs
        snapshot, seq, sub = server.snapshot_and_follow()
        engine.store.steps = real_steps
        assert emitted and waited[0] < 1.0, "the snapshot held the event lock while reading histories"
        assert emitted[0]["seq"] > seq
        (tenant,) = snapshot["tenants"]
        assert [h["step"] for h in tenant["history"]] == [1, 2, 3]  # exactly what was recorded at S
        assert tenant["spec"]["name"] == "t" and tenant["state"] == "running"
        assert [e["data"]["message"] for e in snapshot["log"]] == ["before the snapshot"]
        assert all(e["seq"] <= seq for e in snapshot["log"])
        follow = sub.get(timeout=1)
        assert follow["seq"] == emitted[0]["seq"] and follow["data"]["step"] == 4
        assert sub.get(timeout=0.1) is None
    finally:
        engine.store.close()


def test_child_process_cpu_is_measured():
    # An idle parent whose only child spins: all the CPU the probe sees must come from the child.
    spin = "import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'while True: pass']).wait()"
    parent = subprocess.Popen([sys.executable, "-c", spin], start_new_session=True)
    try:
        probe = ProcessProbe(parent.pid)
        deadline = time.time() + 10
        while probe.sample()["children"] < 1 and time.time() < deadline:
            time.sleep(0.05)  # the first sample of a new child reads 0
        time.sleep(1.5)
        sample = probe.sample()
        assert sample["children"] == 1 and sample["processes"] == 2
        assert sample["cpu_percent"] > 20, sample  # the child spins on a core (2 cores, shared)
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()


def test_adapter_bytes_are_read_under_the_trainer_lock(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from engine.config import LoraSpec, OptimSpec
    from engine.tenant import Tenant
    from engine.train.trainer import MultiAdapterTrainer
    from tests.daemon_helpers import pick_model

    trainer = MultiAdapterTrainer(AutoModelForCausalLM.from_pretrained(str(pick_model())), torch.device("cpu"))
    trainer.add_adapter("e1", LoraSpec(rank=4), OptimSpec(), seed=0)
    owned = []
    walk = trainer.adapter_bytes

    def adapter_bytes(name):
        owned.append(trainer.lock._is_owned())
        return walk(name)

    trainer.adapter_bytes = adapter_bytes
    engine = Engine(EngineConfig(), tmp_path / "home")
    try:
        engine.loaded = SimpleNamespace(trainer=trainer)
        engine.tenants["e1"] = Tenant(id="e1", spec=parse_spec({"name": "t"}))
        first = engine.system_sample()["adapter_bytes"]["e1"]
        assert first > 0 and owned == [True]
        assert engine.summary(engine.tenants["e1"])["adapter_bytes"] == first and owned == [True, True]
        busy, release = threading.Event(), threading.Event()

        def train():  # a training step holds the lock
            with trainer.lock:
                busy.set()
                release.wait(10)

        worker = threading.Thread(target=train)
        worker.start()
        busy.wait(5)
        t0 = time.time()
        assert engine.system_sample()["adapter_bytes"]["e1"] == first  # the last value, without waiting
        assert time.time() - t0 < 1.0 and len(owned) == 2
        release.set()
        worker.join()
    finally:
        engine.store.close()
