"""Tenant checkpoints: adapter (a PEFT directory), optimizer state, step (= data cursor and RNG).

A checkpoint is written to `step-K.tmp` and renamed into place, so a crash or a full
disk mid-write leaves the previous checkpoint intact and never a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from engine.train.trainer import MultiAdapterTrainer

KEEP = 2  # checkpoints kept per tenant


class CheckpointError(RuntimeError):
    """Writing a checkpoint failed (e.g. disk full); the previous one is kept."""


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def save_checkpoint(trainer: MultiAdapterTrainer, tenant_id: str, step: int, root: Path, extra: dict) -> Path:
    root = Path(root) / tenant_id
    final, tmp = root / f"step-{step:06d}", root / f"step-{step:06d}.tmp"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        trainer.save_adapter(tenant_id, tmp / "adapter")
        torch.save(trainer.optimizer_state(tenant_id), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "time": time.time(), **extra}))
        with open(tmp / "state.json", "rb") as fh:
            os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"checkpoint of {tenant_id} at step {step} failed: {exc}") from exc
    return final


def prune_checkpoints(root: Path, tenant_id: str, keep: int = KEEP) -> list[int]:
    """Delete all but the newest `keep` checkpoints; returns the steps removed."""
    found = sorted(p for p in (Path(root) / tenant_id).glob("step-*") if not p.name.endswith(".tmp"))
    removed = []
    for old in found[:-keep] if keep else found:
        shutil.rmtree(old, ignore_errors=True)
        removed.append(int(old.name.split("-")[1]))
    return removed


def load_checkpoint(trainer: MultiAdapterTrainer, tenant_id: str, path: Path) -> dict:
    """Put a checkpoint's weights and optimizer state into the tenant's (existing) adapter."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    weights = load_file(str(path / "adapter" / "adapter_model.safetensors"))
    # PEFT directory keys carry no adapter name; set_peft_model_state_dict adds it back.
    trainer.load_adapter_weights(tenant_id, weights)
    trainer.load_optimizer_state(tenant_id, torch.load(path / "optimizer.pt", weights_only=False))
    return state


def latest_checkpoint(root: Path, tenant_id: str) -> Path | None:
    found = sorted(p for p in (Path(root) / tenant_id).glob("step-*") if not p.name.endswith(".tmp")
                   and (p / "state.json").is_file())
    return found[-1] if found else None
