"""The scheduler's checkpoints, and what a full disk does to them.

A failed checkpoint (a full disk) keeps the previous one; the tenant pauses with the reason,
keeps its adapter in memory, and resumes by itself once a retry writes the checkpoint.
Mixed into engine.scheduler.Scheduler.
"""

from __future__ import annotations

import shutil
import time

from engine.checkpoint import CheckpointError, dir_bytes, prune_checkpoints, save_checkpoint
from engine.tenant import FINAL_STATES, State, Tenant

DISK_RETRY_S = 5.0  # between checkpoint retries of tenants paused for a full disk


class CheckpointKeeping:
    """Checkpoints of the scheduler's tenants: at their steps, retried after a full disk, at shutdown."""

    def checkpoint(self, tenant: Tenant) -> tuple[float, CheckpointError | None]:
        """Write a checkpoint; on failure the previous one stays and the error is returned."""
        t0 = time.time()
        root = self.engine.checkpoint_root
        try:
            path = save_checkpoint(self.trainer, tenant.id, tenant.step, root, {"tenant": tenant.id,
                                   "last_eval_step": tenant.last_eval_step})
        except CheckpointError as exc:
            self.engine.log(f"{exc}; keeping the previous checkpoint", tenant.id, level="error")
            return time.time() - t0, exc
        tenant.checkpoint_owed = False
        self.engine.store.add_checkpoint(tenant.id, tenant.step, str(path), dir_bytes(path))
        for step in prune_checkpoints(root, tenant.id):
            self.engine.store.drop_checkpoint(tenant.id, step)
        return time.time() - t0, None

    def pause_for_disk(self, tenant: Tenant, error: CheckpointError) -> None:
        """Keep the adapter in memory, pause, and retry the checkpoint until space returns."""
        where = self.engine.checkpoint_root / tenant.id  # may be another filesystem than the root
        where = where if where.exists() else self.engine.checkpoint_root
        free = shutil.disk_usage(where).free if where.exists() else 0
        tenant.checkpoint_owed = True
        tenant.paused_from = State.RUNNING
        tenant.set_phase("paused")
        self.set_state(tenant, State.PAUSED, reason=f"disk full: checkpoint of step {tenant.step} failed "
                       f"({free / 2**20:.0f} MiB free); resumes by itself when space returns")

    def retry_disk_paused(self) -> None:
        for tenant in list(self.engine.tenants.values()):
            if tenant.state != State.PAUSED or not getattr(tenant, "checkpoint_owed", False):
                continue
            if tenant.adapter not in self.trainer.optimizers:
                continue
            _, error = self.checkpoint(tenant)
            if error is None:
                self.engine.log(f"{tenant.id}: checkpoint of step {tenant.step} written; resuming", tenant.id)
                if tenant.step >= tenant.spec.steps and not tenant.eval_due():
                    self.set_state(tenant, State.RUNNING, reason="")
                    self.complete(tenant)
                else:
                    self.resume(tenant)

    def checkpoint_all(self) -> int:
        """At shutdown: a checkpoint of every tenant that holds an adapter, at its current
        step. Returns how many were written."""
        written = 0
        for tenant in list(self.engine.tenants.values()):
            if tenant.state not in FINAL_STATES and tenant.adapter in self.trainer.optimizers and tenant.step > 0:
                existing = {c["step"] for c in self.engine.store.checkpoints(tenant.id)}
                if tenant.step not in existing:
                    _, error = self.checkpoint(tenant)
                    written += error is None
        return written
