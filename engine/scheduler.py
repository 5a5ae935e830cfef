"""The scheduler loop: one shared rollout batch for every running tenant, then per-tenant
reward -> advantages -> train -> sync -> record (+ checkpoint).

Only this thread touches the trainer and the inference backend. A tenant's failure
(reward raises or hangs, NaN loss, a bad adapter) fails that tenant and nothing else.
Admission control: at most `slots` tenants warming or running; the rest wait queued,
in submission order, with the reason shown.
"""

from __future__ import annotations

import statistics
import time
import traceback


from engine.checkpoint import CheckpointError, load_checkpoint, prune_checkpoints, save_checkpoint, dir_bytes
from engine.tenant import FINAL_STATES, Rollouts, State, Tenant


class Scheduler:
    def __init__(self, engine):
        self.engine = engine
        self.loaded = engine.loaded
        self.tokenizer = engine.loaded.tokenizer
        self.trainer = engine.loaded.trainer
        self.backend = engine.loaded.backend
        self.last_system = 0.0

    # -- loop -------------------------------------------------------------------------
    def run(self) -> None:
        engine = self.engine
        while not engine.stopping.is_set():
            try:
                self.apply_commands()
                self.admit()
                self.maybe_sample_system()
                running = [t for t in engine.tenants.values() if t.state == State.RUNNING]
                if not running:
                    with engine.wakeup:
                        if not engine.commands and not engine.stopping.is_set():
                            engine.wakeup.wait(timeout=0.5)
                    continue
                self.step_all(running)
            except Exception as exc:  # noqa: BLE001 - the loop must survive anything
                engine.log(f"scheduler error: {type(exc).__name__}: {exc}\n{traceback.format_exc()}", level="error")
                time.sleep(0.5)

    def maybe_sample_system(self) -> None:
        if time.time() - self.last_system >= 2.0:
            self.last_system = time.time()
            self.engine.events.emit("system", None, **self.engine.system_sample())

    # -- state changes ----------------------------------------------------------------
    def set_state(self, tenant: Tenant, state: State, reason: str = "", error: str = "") -> None:
        tenant.state, tenant.reason = state, reason
        if error:
            tenant.error = error
        fields = {"state": state.value, "reason": reason, "error": tenant.error}
        if state in FINAL_STATES:
            fields["finished"] = time.time()
            tenant.set_phase(state.value)
        self.engine.store.update_experiment(tenant.id, **fields)
        self.engine.events.emit("state", tenant.id, state=state.value, reason=reason, error=tenant.error,
                                step=tenant.step)

    def release(self, tenant: Tenant) -> None:
        """Free the adapter in the sampler and in the trainer (memory goes back)."""
        for free in (self.backend.remove_adapter, self.trainer.remove_adapter):
            try:
                free(tenant.adapter)
            except Exception as exc:  # noqa: BLE001
                self.engine.log(f"{tenant.id}: freeing adapter: {exc}", tenant.id, level="warning")

    def fail(self, tenant: Tenant, exc: BaseException, where: str) -> None:
        message = f"{where}: {type(exc).__name__}: {exc}"
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
            elif op == "pause" and tenant.state != State.PAUSED:
                tenant.paused_from = tenant.state
                tenant.set_phase("paused")
                self.set_state(tenant, State.PAUSED, reason="paused by request")
            elif op == "resume" and tenant.state == State.PAUSED:
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
                ckpt = getattr(tenant, "restore_from", None)
                if ckpt is not None:
                    state = load_checkpoint(self.trainer, tenant.adapter, ckpt)
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
        self.set_state(tenant, State.RUNNING, reason="")

    # -- one loop of every running tenant ---------------------------------------------------
    def phase(self, tenant: Tenant, name: str) -> None:
        tenant.set_phase(name)
        self.engine.events.emit("phase", tenant.id, phase=name, step=tenant.step + 1)

    def step_all(self, tenants: list[Tenant]) -> None:
        plans, requests = {}, []
        now = time.time()
        for tenant in tenants:
            if tenant.first_step is None:
                tenant.first_step = now
                tenant.warmup_s = round(now - (tenant.started or now), 3)
                self.engine.store.update_experiment(tenant.id, first_step=now, warmup_s=tenant.warmup_s)
            self.phase(tenant, "rollout")
            plan = {"eval": None, "train": None, "problems": []}
            if tenant.eval_due():
                reqs = tenant.eval_requests(self.tokenizer)
                plan["eval"] = (len(requests), len(requests) + len(reqs))
                requests += reqs
            if tenant.step < tenant.spec.steps:
                problems = tenant.problems()
                reqs = tenant.sample_requests(self.tokenizer, problems)
                plan["train"] = (len(requests), len(requests) + len(reqs))
                plan["problems"] = problems
                requests += reqs
            plans[tenant.id] = plan
        rollout_start = time.time()
        results = self.generate_isolated(tenants, requests, plans)
        rollout_s = time.time() - rollout_start

        self.apply_commands()  # a phase boundary
        for tenant in tenants:
            if tenant.state != State.RUNNING or tenant.id not in results:
                continue
            try:
                self.finish_step(tenant, plans[tenant.id], results[tenant.id], rollout_start, rollout_s)
            except Exception as exc:  # noqa: BLE001 - one tenant's failure is only its own
                self.fail(tenant, exc, tenant.phase)
            self.apply_commands()

    def generate_isolated(self, tenants, requests, plans) -> dict:
        """One shared batch; if it fails, retry per tenant so only the culprit fails."""
        try:
            flat = self.backend.generate(requests)
            return {t.id: flat for t in tenants}
        except Exception:  # noqa: BLE001
            pass
        results = {}
        for tenant in tenants:
            plan = plans[tenant.id]
            spans = [s for s in (plan["eval"], plan["train"]) if s]
            own = [r for lo, hi in spans for r in requests[lo:hi]]
            try:
                out = self.backend.generate(own)
            except Exception as exc:  # noqa: BLE001
                self.fail(tenant, exc, "rollout")
                continue
            flat: list = [None] * len(requests)
            pos = 0
            for lo, hi in spans:
                flat[lo:hi] = out[pos : pos + hi - lo]
                pos += hi - lo
            results[tenant.id] = flat
        return results

    def decode(self, completion) -> str:
        ids = [i for i in completion.token_ids if i != self.tokenizer.eos_token_id]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def finish_step(self, tenant: Tenant, plan: dict, flat: list, rollout_start: float, rollout_s: float) -> None:
        engine = self.engine
        if plan["eval"]:
            lo, hi = plan["eval"]
            accuracy = tenant.eval_accuracy([self.decode(group[0]) for group in flat[lo:hi]])
            engine.store.record_eval(tenant.id, tenant.step, accuracy)
            tenant.last_eval_step = tenant.step
            engine.events.emit("eval", tenant.id, step=tenant.step, accuracy=accuracy)
        if not plan["train"]:
            self.complete(tenant)
            return
        lo, hi = plan["train"]
        completions = flat[lo:hi]
        rollouts = Rollouts(plan["problems"], completions, [[self.decode(c) for c in g] for g in completions])

        self.phase(tenant, "reward")
        t0 = time.time()
        rewards, correct = tenant.score(rollouts)
        reward_s = time.time() - t0

        self.phase(tenant, "train")
        t0 = time.time()
        batch, sampler_lp = tenant.train_batch(self.tokenizer, rollouts, rewards)
        stats = self.trainer.train_step(tenant.adapter, batch, tenant.spec.grpo, tenant.spec.rollout.max_tokens)
        train_s = time.time() - t0
        mask = batch.completion_mask
        has_lp = all(len(c.logprobs) == len(c.token_ids) for g in completions for c in g)
        diff = float(((stats.trainer_logprobs.cpu() - sampler_lp).abs() * mask).sum() / mask.sum().clamp(min=1)) if has_lp else None

        self.phase(tenant, "sync")
        t0 = time.time()
        self.backend.sync_adapter(tenant.adapter)
        sync_s = time.time() - t0

        tenant.step += 1
        checkpoint_s = 0.0
        if tenant.step % tenant.spec.checkpoint_every == 0 or tenant.step >= tenant.spec.steps:
            self.phase(tenant, "checkpoint")
            checkpoint_s = self.checkpoint(tenant)
        end = time.time()
        ready = tenant.ready_since or rollout_start
        row = {
            "tenant": tenant.id, "step": tenant.step, "time": end,
            "reward_mean": statistics.fmean(rewards), "reward_std": statistics.pstdev(rewards),
            "reward_min": min(rewards), "reward_max": max(rewards),
            "accuracy": sum(correct) / len(correct), "loss": stats.loss, "kl": stats.kl,
            "grad_norm": stats.grad_norm, "entropy": stats.entropy, "clip_fraction": stats.clip_fraction,
            "logprob_diff": diff, "completion_tokens": int(mask.sum().item()),
            "queue_s": max(0.0, rollout_start - ready), "rollout_s": rollout_s, "reward_s": reward_s,
            "train_s": train_s, "sync_s": sync_s, "checkpoint_s": checkpoint_s, "total_s": end - ready,
        }
        self.phase(tenant, "record")
        engine.store.record_step(row)  # recorded before it is reported
        engine.events.emit("step", tenant.id, **{k: v for k, v in row.items() if k != "tenant"})
        tenant.ready_since = end
        tenant.set_phase("ready")
        if tenant.step >= tenant.spec.steps and not tenant.eval_due():
            self.complete(tenant)

    def complete(self, tenant: Tenant) -> None:
        self.engine.log(f"{tenant.id} done after {tenant.step} steps", tenant.id)
        self.release(tenant)
        self.set_state(tenant, State.DONE, reason="finished")

    def checkpoint(self, tenant: Tenant) -> float:
        t0 = time.time()
        root = self.engine.checkpoint_root
        try:
            path = save_checkpoint(self.trainer, tenant.id, tenant.step, root, {"tenant": tenant.id,
                                   "last_eval_step": tenant.last_eval_step})
        except CheckpointError as exc:
            self.engine.log(f"{exc}; keeping the previous checkpoint", tenant.id, level="error")
            return time.time() - t0
        self.engine.store.add_checkpoint(tenant.id, tenant.step, str(path), dir_bytes(path))
        for step in prune_checkpoints(root, tenant.id):
            self.engine.store.drop_checkpoint(tenant.id, step)
        return time.time() - t0

    def checkpoint_all(self) -> None:
        """At shutdown: a checkpoint of every tenant that holds an adapter, at its current step."""
        for tenant in list(self.engine.tenants.values()):
            if tenant.state not in FINAL_STATES and tenant.adapter in self.trainer.optimizers and tenant.step > 0:
                existing = {c["step"] for c in self.engine.store.checkpoints(tenant.id)}
                if tenant.step not in existing:
                    self.checkpoint(tenant)
