"""Tenant checkpoints: adapter (a PEFT directory), optimizer state, step (= data cursor and RNG).

A checkpoint is written to `step-K.tmp`, every file and directory of it is fsynced, and it is
renamed into place (then the parent directory is fsynced), so a crash, a power cut or a full
disk mid-write leaves the previous checkpoint intact and never a half-written one. Any failure
while writing (OSError, but also torch's RuntimeError and safetensors' SafetensorError on a full
disk) raises CheckpointError and removes the `.tmp` directory.

Reading back, `latest_readable_checkpoint` skips a newest checkpoint that cannot be read (a
truncated or corrupt file) and falls back to the one before.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from engine.train.trainer import MultiAdapterTrainer

KEEP = 2  # checkpoints kept per tenant
ADAPTER_FILE = "adapter_model.safetensors"


class CheckpointError(RuntimeError):
    """Writing a checkpoint failed (e.g. disk full); the previous one is kept."""


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every directory (deepest first), then `root`."""
    dirs = []
    for here, subdirs, files in os.walk(root):
        for name in files:
            _fsync_path(Path(here) / name)
        dirs.append(Path(here))
    for d in reversed(dirs):
        _fsync_path(d, directory=True)


def checkpoint_step(path: Path) -> int:
    return int(Path(path).name.split("-")[1])


def save_checkpoint(trainer: MultiAdapterTrainer, tenant_id: str, step: int, root: Path, extra: dict) -> Path:
    root = Path(root) / tenant_id
    return write_state(trainer, tenant_id, root / f"step-{step:06d}", {"step": step, **extra},
                       what=f"checkpoint of {tenant_id} at step {step}")


def write_state(trainer: MultiAdapterTrainer, tenant_id: str, final: Path, state: dict, optimizer: bool = True,
                what: str | None = None) -> Path:
    """Write the adapter (+ optimizer state) and `state.json` to `final`, atomically (see the
    module's docstring); raises CheckpointError."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        trainer.save_adapter(tenant_id, tmp / "adapter")
        if optimizer:
            torch.save(trainer.optimizer_state(tenant_id), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"time": time.time(), **state}))
        _fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_path(final.parent, directory=True)
    except Exception as exc:  # noqa: BLE001 - OSError, RuntimeError (torch), SafetensorError, ...
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{what or f'saving {tenant_id} to {final}'} failed: "
                              f"{type(exc).__name__}: {exc}") from exc
    return final


def prune_checkpoints(root: Path, tenant_id: str, keep: int = KEEP) -> list[int]:
    """Delete all but the newest `keep` checkpoints; returns the steps removed."""
    found = sorted(p for p in (Path(root) / tenant_id).glob("step-*") if not p.name.endswith(".tmp"))
    removed = []
    for old in found[:-keep] if keep else found:
        shutil.rmtree(old, ignore_errors=True)
        removed.append(checkpoint_step(old))
    return removed


def load_checkpoint(trainer: MultiAdapterTrainer, tenant_id: str, path: Path, optimizer: bool = True) -> dict:
    """Put a checkpoint's weights (and optimizer state) into the tenant's (existing) adapter."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    weights = load_file(str(path / "adapter" / ADAPTER_FILE))
    # PEFT directory keys carry no adapter name; set_peft_model_state_dict adds it back.
    trainer.load_adapter_weights(tenant_id, weights)
    if optimizer:
        trainer.load_optimizer_state(tenant_id, torch.load(path / "optimizer.pt", weights_only=False))
    return state


def checkpoints(root: Path, tenant_id: str) -> list[Path]:
    """A tenant's complete checkpoints (state.json written), oldest first."""
    return sorted(p for p in (Path(root) / tenant_id).glob("step-*") if not p.name.endswith(".tmp")
                  and (p / "state.json").is_file())


def latest_checkpoint(root: Path, tenant_id: str) -> Path | None:
    found = checkpoints(root, tenant_id)
    return found[-1] if found else None


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be read (header, and the data its header promises), or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return "truncated header"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return "truncated header"
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    if not isinstance(header, dict):
        return "malformed header"
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        return f"{size} bytes on disk, {8 + n + end} expected (truncated)"
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint directory cannot be restored (missing or truncated files), or None.
    Cheap: reads headers and sizes, not the tensors."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        int(state["step"])
        json.loads((path / "adapter" / "adapter_config.json").read_text())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"state.json or adapter_config.json unreadable ({type(exc).__name__}: {exc})"
    problem = _safetensors_problem(path / "adapter" / ADAPTER_FILE)
    if problem:
        return f"{ADAPTER_FILE}: {problem}"
    try:
        with zipfile.ZipFile(path / "optimizer.pt") as archive:  # torch.save writes a zip archive
            if not archive.namelist():
                return "optimizer.pt: empty archive"
    except (OSError, zipfile.BadZipFile) as exc:
        return f"optimizer.pt: {type(exc).__name__}: {exc}"
    return None


def latest_readable_checkpoint(root: Path, tenant_id: str, max_step: int | None = None,
                               skipped: list | None = None) -> Path | None:
    """The newest checkpoint (of step <= max_step) that can be read; an unreadable newer one
    (truncated adapter, corrupt optimizer state) is passed over for the one before it.
    `skipped` collects (path, reason) of each checkpoint passed over as unreadable."""
    for path in reversed(checkpoints(root, tenant_id)):
        if max_step is not None and checkpoint_step(path) > max_step:
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        if skipped is not None:
            skipped.append((path, problem))
    return None
