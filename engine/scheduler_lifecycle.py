"""The scheduler's tenant lifecycle: the enforced state machine, commands (pause, resume,
kill), admission into adapter slots, warm-up, and giving an adapter back.

Invariant: every state change goes through `set_state`, which applies only the changes
tenant.TRANSITIONS allows (recorded, then reported), so a kill is never overwritten by a
late failure or a late step. Mixed into engine.scheduler.Scheduler, whose thread alone
runs these.
"""

from __future__ import annotations

import time

from engine.checkpoint import load_checkpoint
from engine.tenant import FINAL_STATES, TRANSITIONS, State, Tenant


class TenantLifecycle:
    """State changes, commands and admission of the scheduler's tenants."""

    def set_state(self, tenant: Tenant, state: State, reason: str = "", error: str = "") -> bool:
        """Apply a legal state change (recorded, then reported); refuse an illegal one."""
        if state != tenant.state and state not in TRANSITIONS[tenant.state]:
            self.engine.log(f"{tenant.id}: refused state change {tenant.state.value} -> {state.value} ({reason})",
                            tenant.id, level="warning")
            return False
        tenant.state, tenant.reason = state, reason
        if error:
            tenant.error = error
        fields = {"state": state.value, "reason": reason, "error": tenant.error}
        if state in FINAL_STATES:
            fields["finished"] = tenant.finished = time.time()
            tenant.set_phase(state.value)
        self.engine.store.update_experiment(tenant.id, **fields)
        self.engine.events.emit("state", tenant.id, state=state.value, reason=reason, error=tenant.error,
                                step=tenant.step)
        return True

    def drop_work(self, tenant: Tenant) -> None:
        """Abandon the tenant's steps in flight (their sampling rows leave the batch)."""
        for table in (self.work, self.prefetch):
            work = table.pop(tenant.id, None)
            if work is not None:
                self.backend.cancel(work.tag)

    def release(self, tenant: Tenant) -> None:
        """Free the adapter in the sampler and in the trainer (memory goes back)."""
        self.drop_work(tenant)
        self.engine.external.drop_adapter(tenant.adapter, self.backend,
                                          f"{tenant.id} stopped (killed, failed or done); its adapter is no longer loaded")
        self.engine.client_jobs.fail_tenant(tenant.id, f"{tenant.id} stopped ({tenant.reason or 'killed, failed or done'}); "
                                            "its training run is over")
        tenant.close()
        for free in (self.backend.remove_adapter, self.trainer.remove_adapter):
            try:
                free(tenant.adapter)
            except Exception as exc:  # noqa: BLE001
                self.engine.log(f"{tenant.id}: freeing adapter: {exc}", tenant.id, level="warning")

    def fail(self, tenant: Tenant, exc: BaseException | str, where: str) -> None:
        if tenant.state in FINAL_STATES:
            return  # killed or done meanwhile: a late error changes nothing
        message = f"{where}: {exc}" if isinstance(exc, str) else f"{where}: {type(exc).__name__}: {exc}"
        self.engine.log(f"{tenant.id} failed in {message}", tenant.id, level="error")
        self.release(tenant)
        self.set_state(tenant, State.FAILED, reason=f"failed in {where}", error=message)

    def apply_commands(self) -> None:
        engine = self.engine
        while True:
            with engine.lock:
                if not engine.commands:
                    return
                op, tenant_id = engine.commands.popleft()
                tenant = engine.tenants.get(tenant_id)
            if tenant is None or tenant.state in FINAL_STATES:
                continue
            if op == "kill":
                self.release(tenant)
                self.set_state(tenant, State.KILLED, reason="killed by request")
                engine.log(f"{tenant.id} killed at step {tenant.step}", tenant.id)
            elif op == "finish":
                self.release(tenant)
                self.set_state(tenant, State.DONE, reason="its Tinker session finished")
                engine.log(f"{tenant.id} done after {tenant.step} steps (its client finished)", tenant.id)
            elif op == "pause" and tenant.state != State.PAUSED:
                self.drop_work(tenant)  # the step is redone on resume, with the same data
                tenant.paused_from = tenant.state
                tenant.set_phase("paused")
                self.set_state(tenant, State.PAUSED, reason="paused by request")
            elif op == "resume" and tenant.state == State.PAUSED:
                self.resume(tenant)

    def resume(self, tenant: Tenant) -> None:
        has_adapter = tenant.adapter in self.trainer.optimizers
        if has_adapter and self.in_flight() < self.backend.slots:
            tenant.ready_since = time.time()
            tenant.set_phase("ready")
            self.set_state(tenant, State.RUNNING, reason="")
        else:
            tenant.set_phase("queued")
            self.set_state(tenant, State.QUEUED, reason="waiting for an adapter slot")

    def in_flight(self) -> int:
        return sum(1 for t in self.engine.tenants.values() if t.state in (State.WARMING, State.RUNNING))

    def admit(self) -> None:
        """Warm up queued tenants, oldest first, while adapter slots are free."""
        queued = sorted((t for t in self.engine.tenants.values() if t.state == State.QUEUED),
                        key=lambda t: (t.created, t.id))
        for position, tenant in enumerate(queued):
            if self.in_flight() >= self.backend.slots:
                reason = f"waiting for an adapter slot ({self.backend.slots} in use, #{position + 1} in line)"
                if tenant.reason != reason:
                    tenant.reason = reason
                    self.engine.store.update_experiment(tenant.id, reason=reason)
                    self.engine.events.emit("state", tenant.id, state=tenant.state.value, reason=reason, step=tenant.step)
                continue
            self.warm(tenant)

    def warm(self, tenant: Tenant) -> None:
        self.set_state(tenant, State.WARMING, reason="creating adapter")
        tenant.set_phase("warming")
        try:
            if tenant.adapter not in self.trainer.optimizers:
                spec = tenant.spec
                self.trainer.add_adapter(tenant.adapter, spec.lora, spec.optim, seed=spec.seed)
                ckpt = tenant.restore_from
                if ckpt is not None:
                    state = load_checkpoint(self.trainer, tenant.adapter, ckpt, optimizer=tenant.restore_optimizer)
                    tenant.step = int(state["step"])
                    self.engine.log(f"{tenant.id} resumed from checkpoint at step {tenant.step}", tenant.id)
                    tenant.restore_from = None
                self.backend.add_adapter(tenant.adapter)
            else:
                self.backend.sync_adapter(tenant.adapter)
        except Exception as exc:  # noqa: BLE001
            self.fail(tenant, exc, "warm-up")
            return
        tenant.ready_since = time.time()
        tenant.set_phase("ready")
        if tenant.client_driven and tenant.first_step is None:  # its client may step from now on
            tenant.first_step = tenant.ready_since
            tenant.warmup_s = round(tenant.ready_since - (tenant.started or tenant.ready_since), 3)
            self.engine.store.update_experiment(tenant.id, first_step=tenant.first_step, warmup_s=tenant.warmup_s)
        self.set_state(tenant, State.RUNNING, reason="")

    def complete(self, tenant: Tenant) -> None:
        self.engine.log(f"{tenant.id} done after {tenant.step} steps", tenant.id)
        self.release(tenant)
        self.set_state(tenant, State.DONE, reason="finished")
