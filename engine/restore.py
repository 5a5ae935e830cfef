"""Bringing tenants back after an engine restart (a crash, kill -9, a power cut).

Every unfinished tenant resumes from its newest readable checkpoint: a checkpoint newer
than the last recorded step is dropped (it describes work nobody heard of), an unreadable
one is passed over for the one before, and the steps recorded after the checkpoint used
are marked rolled back, so each history stays contiguous. A stored tenant that cannot be
restored fails alone, with the reason. Mixed into engine.core.Engine.
"""

from __future__ import annotations

import shutil
import time

from engine.checkpoint import checkpoint_step, checkpoints, latest_readable_checkpoint
from engine.config import SpecError, parse_spec
from engine.tasks import TaskError
from engine.tasks.client import CLIENT_TASK
from engine.tenant import FINAL_STATES, State, Tenant


class TenantRestore:
    """The engine's restore of stored tenants at warm-up."""

    def _restore_tenants(self) -> None:
        """Bring back every unfinished tenant: running ones resume from their last checkpoint.
        A stored tenant that cannot be restored (a spec this version refuses, a missing dataset
        or reward module, unreadable files) is failed with the reason; the others go on."""
        for row in self.store.experiments():
            try:
                state = State(row["state"])
                if state in FINAL_STATES:
                    continue
                self._restore_one(row, state)
            except Exception as exc:  # noqa: BLE001 - one bad record must not stop the engine
                self.tenants.pop(row["id"], None)
                why = str(exc) if isinstance(exc, (SpecError, TaskError)) else f"{type(exc).__name__}: {exc}"
                self.store.update_experiment(row["id"], state=State.FAILED.value, reason="failed in restore",
                                             error=f"cannot restore: {why}", finished=time.time())
                self.log(f"{row['id']} cannot be restored: {why}", row["id"], level="error")

    def _restore_one(self, row: dict, state: State) -> None:
        spec = parse_spec(row["spec"])
        if spec.task == CLIENT_TASK:
            # Its client's session died with the engine; what it saved (save_state) is on disk,
            # and a client resumes from there with create_training_client_from_state.
            self.store.update_experiment(row["id"], state=State.DONE.value, finished=time.time(),
                                         reason="its Tinker session ended when the engine stopped")
            return
        tenant = Tenant(id=row["id"], spec=spec, created=row["created"])
        tenant.load_task()
        try:
            self._restore_checkpoint(tenant, state)
        except BaseException:
            tenant.close()  # its reward worker, if one was started
            raise

    def _restore_checkpoint(self, tenant: Tenant, state: State) -> None:
        # A checkpoint is written just before its step is recorded: one newer than the last
        # recorded step describes work nobody heard of; drop it. An unreadable one (truncated by
        # a crash or a full disk) is dropped too; the newest readable one before it is used.
        recorded = max((r["step"] for r in self.store.steps(tenant.id)), default=0)
        for path in checkpoints(self.checkpoint_root, tenant.id):
            if checkpoint_step(path) > recorded:
                shutil.rmtree(path, ignore_errors=True)
                self.store.drop_checkpoint(tenant.id, checkpoint_step(path))
        skipped: list = []
        ckpt = latest_readable_checkpoint(self.checkpoint_root, tenant.id, max_step=recorded, skipped=skipped)
        for path, why in skipped:
            self.log(f"{tenant.id}: checkpoint at step {checkpoint_step(path)} is unreadable ({why}); "
                     "falling back to the one before", tenant.id, level="warning")
            shutil.rmtree(path, ignore_errors=True)
            self.store.drop_checkpoint(tenant.id, checkpoint_step(path))
        ckpt_step = checkpoint_step(ckpt) if ckpt else 0
        undone = self.store.roll_back_after(tenant.id, ckpt_step)
        tenant.step = ckpt_step
        tenant.restore_from = ckpt
        tenant.last_eval_step = max((e["step"] for e in self.store.evals(tenant.id)), default=-1)
        tenant.started = time.time()
        if state == State.PAUSED:
            tenant.state, tenant.reason = State.PAUSED, "paused (restored after engine restart)"
            tenant.paused_from = State.QUEUED
        else:
            tenant.state = State.QUEUED
            tenant.reason = "restoring from checkpoint" if ckpt else "waiting for an adapter slot"
        self.tenants[tenant.id] = tenant
        self.store.update_experiment(tenant.id, state=tenant.state.value, reason=tenant.reason,
                                     restored_from=ckpt_step)
        if undone or state not in (State.QUEUED, State.PAUSED) or ckpt:
            self.log(f"{tenant.id} restored at step {ckpt_step}" + (f"; {undone} later step(s) rolled back" if undone else ""),
                     tenant.id)
