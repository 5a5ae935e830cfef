"""Checkpoints on a real trainer (embedded model): failures of any kind raise CheckpointError and
leave no `.tmp`; an unreadable newest checkpoint is passed over for the one before, at restore
(Engine._restore_tenants) and at export; a stored tenant with a spec now refused fails cleanly."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from engine.checkpoint import (CheckpointError, checkpoint_problem, latest_checkpoint, latest_readable_checkpoint,
                               load_checkpoint, save_checkpoint)
from engine.config import EngineConfig, LoraSpec, OptimSpec, parse_spec
from engine.core import Engine, EngineError
from engine.tenant import State
from tests.daemon_helpers import REPO, pick_model


@pytest.fixture(scope="module")
def trainer():
    import torch
    from transformers import AutoModelForCausalLM

    from engine.train.trainer import MultiAdapterTrainer

    model = AutoModelForCausalLM.from_pretrained(str(pick_model()), dtype=torch.float32)
    trainer = MultiAdapterTrainer(model, torch.device("cpu"))
    trainer.add_adapter("e1", LoraSpec(rank=4), OptimSpec(), seed=0)
    return trainer


def truncate(path, keep: int = 100) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: min(keep, len(data) // 2)])


def test_unreadable_newest_checkpoint_is_passed_over(trainer, tmp_path):
    root = tmp_path / "checkpoints"
    two = save_checkpoint(trainer, "e1", 2, root, {"tenant": "e1"})
    four = save_checkpoint(trainer, "e1", 4, root, {"tenant": "e1"})
    assert checkpoint_problem(two) is None and checkpoint_problem(four) is None
    assert latest_readable_checkpoint(root, "e1") == four
    truncate(four / "adapter" / "adapter_model.safetensors")
    assert "truncated" in checkpoint_problem(four)
    skipped = []
    assert latest_checkpoint(root, "e1") == four  # the plain lookup does not look inside
    assert latest_readable_checkpoint(root, "e1", skipped=skipped) == two
    assert [p for p, _ in skipped] == [four]
    assert load_checkpoint(trainer, "e1", two)["step"] == 2  # the fallback really loads
    truncate(two / "optimizer.pt")
    assert "optimizer.pt" in checkpoint_problem(two)
    assert latest_readable_checkpoint(root, "e1") is None


def test_restore_falls_back_to_the_previous_checkpoint(trainer, tmp_path):
    home = tmp_path / "home"
    engine = Engine(EngineConfig(), home)
    try:
        spec = parse_spec({"name": "t", "steps": 10})
        engine.store.add_experiment("e1", 1, "t", spec.to_dict(), "running")
        for step in range(1, 5):
            engine.store.record_step({"tenant": "e1", "step": step, "time": time.time()})
        for step in (2, 4):
            path = save_checkpoint(trainer, "e1", step, engine.checkpoint_root, {"tenant": "e1"})
            engine.store.add_checkpoint("e1", step, str(path), 1)
        truncate(engine.checkpoint_root / "e1" / "step-000004" / "adapter" / "adapter_model.safetensors")
        engine._restore_tenants()
        tenant = engine.tenants["e1"]
        assert tenant.state == State.QUEUED and tenant.step == 2
        assert tenant.restore_from == engine.checkpoint_root / "e1" / "step-000002"
        assert [s["step"] for s in engine.store.steps("e1")] == [1, 2]  # 3 and 4 rolled back, to be redone
        assert [c["step"] for c in engine.store.checkpoints("e1")] == [2]
        assert not (engine.checkpoint_root / "e1" / "step-000004").exists()
        log = [e["data"]["message"] for e in engine.store.recent_events(("log",), 20)]
        assert any("checkpoint at step 4 is unreadable" in m for m in log), log
        assert any("e1 restored at step 2; 2 later step(s) rolled back" in m for m in log), log
    finally:
        engine.store.close()


def test_stored_tenant_with_a_refused_spec_fails_cleanly(tmp_path):
    engine = Engine(EngineConfig(), tmp_path / "home")
    try:
        good = parse_spec({"name": "good"}).to_dict()
        bad = {**good, "name": "bad", "task_args": {"digits": 2.5}}  # accepted by an older version
        engine.store.add_experiment("e1", 1, "bad", bad, "running")
        engine.store.add_experiment("e2", 2, "weird", {**good, "name": "weird", "optim": {"lr": "x"}}, "queued")
        engine.store.add_experiment("e3", 3, "good", good, "queued")
        engine._restore_tenants()
        rows = {r["id"]: r for r in engine.store.experiments()}
        assert rows["e1"]["state"] == "failed"
        assert rows["e1"]["error"] == "cannot restore: task_args.digits: must be an integer 1..4, got 2.5"
        assert rows["e2"]["state"] == "failed" and "optim.lr" in rows["e2"]["error"]
        assert set(engine.tenants) == {"e3"} and engine.tenants["e3"].state == State.QUEUED
        # Still shown (`show`, `history`) with its stored spec and the reason; a clone is refused.
        shown = engine.get("e1")
        assert shown["state"] == "failed" and shown["spec"]["task_args"] == {"digits": 2.5}
        assert "task_args.digits" in shown["error"] and engine.history("e1") == []
        with pytest.raises(EngineError, match="e1: its stored spec is not valid for this engine"):
            engine.clone("e1")
    finally:
        engine.store.close()


FULL_DISK = r"""
import json, resource, signal, sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM
from engine.checkpoint import CheckpointError, save_checkpoint, latest_readable_checkpoint
from engine.config import LoraSpec, OptimSpec
from engine.train.trainer import MultiAdapterTrainer

model_dir, root, which = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
trainer = MultiAdapterTrainer(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), torch.device("cpu"))
trainer.add_adapter("e1", LoraSpec(rank=4), OptimSpec(), seed=0)
first = save_checkpoint(trainer, "e1", 1, root, {})
size = (first / "adapter" / "adapter_model.safetensors").stat().st_size
# The disk fills up: writes beyond this many bytes in a file fail (EFBIG, like ENOSPC).
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = size // 2 if which == "adapter" else size + 4096
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
if which == "optimizer":  # the adapter fits; torch.save of a bigger optimizer state does not
    for p in trainer.parameters("e1"):
        p.grad = torch.ones_like(p)
    trainer.optimizers["e1"].step()
try:
    save_checkpoint(trainer, "e1", 2, root, {})
    print(json.dumps({"raised": None}))
except CheckpointError as exc:
    cause = exc.__cause__
    print(json.dumps({"raised": str(exc), "cause": type(cause).__name__,
                      "left": sorted(p.name for p in (root / "e1").iterdir()),
                      "latest": latest_readable_checkpoint(root, "e1").name}))
"""


@pytest.mark.parametrize("which", ["adapter", "optimizer"])
def test_a_full_disk_raises_checkpoint_error_and_leaves_no_tmp(which, tmp_path):
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, str(pick_model()), str(tmp_path / "ck"), which],
                          capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["raised"] and "checkpoint of e1 at step 2 failed" in result["raised"], result
    assert result["left"] == ["step-000001"] and result["latest"] == "step-000001", result
    print(which, result["cause"], result["raised"])
