"""Metrics out: step and eval events of the engine's real event bus become TensorBoard scalars
under CLORA_HOME/tb/<id> (read back from the event files) and, with CLORA_WANDB=offline, an
offline W&B run per tenant (no network)."""

import struct
import threading
import time
import types

import pytest

from engine.events import EventBus
from engine.metrics_sinks import MetricsSinks
from engine.store import Store


def read_scalars(directory):
    """(tag, step, value) of every scalar in a directory's TensorBoard event files (TFRecords)."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
            i += 12 + length + 4
            for value in event.summary.value:
                out.append((value.tag, event.step, value.simple_value))
    return out


def fake_engine(tmp_path):
    store = Store(tmp_path / "clora.db")
    logs = []
    engine = types.SimpleNamespace(home=tmp_path, events=EventBus(store), stopping=threading.Event(), tenants={},
                                   log=lambda message, *a, **k: logs.append(message))
    return engine, store, logs


def test_steps_and_evals_become_tensorboard_scalars(tmp_path, monkeypatch):
    monkeypatch.delenv("CLORA_WANDB", raising=False)
    engine, store, logs = fake_engine(tmp_path)
    sinks = MetricsSinks(engine)
    sinks.start()
    for step in (1, 2, 3):
        engine.events.emit("step", "e1", step=step, reward_mean=0.1 * step, loss=-0.5, total_s=1.5, staleness=0)
    engine.events.emit("eval", "e1", step=3, accuracy=0.75)
    engine.events.emit("state", "e1", state="done")  # closes (flushes) its writer
    time.sleep(1.0)
    engine.stopping.set()
    sinks.close()
    scalars = read_scalars(tmp_path / "tb" / "e1")
    assert [(s, v) for t, s, v in scalars if t == "reward/mean"] == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2)),
                                                                      (3, pytest.approx(0.3))]
    assert ("eval/accuracy", 3, 0.75) in scalars
    assert any(t == "time/total_s" for t, _, _ in scalars)
    assert not logs
    store.close()


def test_wandb_offline_run_per_tenant(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("CLORA_WANDB", "offline")
    monkeypatch.setenv("CLORA_TENSORBOARD", "0")
    monkeypatch.setenv("WANDB_SILENT", "true")
    engine, store, logs = fake_engine(tmp_path)
    sinks = MetricsSinks(engine)
    sinks.start()
    engine.events.emit("step", "e7", step=1, reward_mean=0.5)
    engine.events.emit("step", "e7", step=2, reward_mean=0.6)
    engine.events.emit("state", "e7", state="done")
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob("wandb/offline-run-*/run-*.wandb")):
        time.sleep(0.5)
    engine.stopping.set()
    sinks.close()
    assert not logs, logs
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert not (tmp_path / "tb").exists()
    store.close()
