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


COALESCE_S = 0.1


class Scheduler:
    def __init__(self, engine):
        self.engine = engine
        self.loaded = engine.loaded
        self.tokenizer = engine.loaded.tokenizer
        self.trainer = engine.loaded.trainer
        self.backend = engine.loaded.backend
        self.last_system = 0.0
        fused = engine.config.fused_train
        self.fused = fused if fused is not None else engine.loaded.device.type == "cuda"

    # -- loop -------------------------------------------------------------------------
    def run(self) -> None:
        engine = self.engine
        idle = True
        while not engine.stopping.is_set():
            try:
                self.apply_commands()
                self.admit()
                self.maybe_sample_system()
                running = [t for t in engine.tenants.values() if t.state == State.RUNNING]
                if not running:
                    idle = True
                    with engine.wakeup:
                        if not engine.commands and not engine.stopping.is_set():
                            engine.wakeup.wait(timeout=0.5)
                    continue
                if idle:
                    # Waking from idle: experiments submitted together (a sweep) should share
                    # the first batch rather than wait a whole step behind the first one.
                    idle = False
                    time.sleep(COALESCE_S)
                    self.apply_commands()
                    self.admit()
                    running = [t for t in engine.tenants.values() if t.state == State.RUNNING]
                if running:
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
            fields["finished"] = tenant.finished = time.time()
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
                ckpt = tenant.restore_from
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
        prepared = {}
        for tenant in tenants:
            if tenant.state != State.RUNNING or tenant.id not in results:
                continue
            try:
                work = self.prepare(tenant, plans[tenant.id], results[tenant.id])
            except Exception as exc:  # noqa: BLE001 - one tenant's failure is only its own
                self.fail(tenant, exc, tenant.phase)
                continue
            if work is not None:
                prepared[tenant.id] = work
        self.apply_commands()
        prepared = {tid: w for tid, w in prepared.items() if self.engine.tenants[tid].state == State.RUNNING}
        # Between a tenant's update and its record no command is applied: an update is
        # always synced, counted and recorded, or the tenant fails.
        if self.fused and len(prepared) > 1:
            for tid in prepared:
                self.phase(self.engine.tenants[tid], "train")
            t0 = time.time()
            work = {tid: (w["batch"], self.engine.tenants[tid].spec.grpo, self.engine.tenants[tid].spec.rollout.max_tokens)
                    for tid, w in prepared.items()}
            try:
                outcomes = self.trainer.train_fused(work)
            except Exception:  # noqa: BLE001 - isolate the culprit: train one at a time
                outcomes = {}
                for tid, item in work.items():
                    try:
                        outcomes[tid] = self.trainer.train_step(tid, *item)
                    except Exception as exc:  # noqa: BLE001
                        outcomes[tid] = exc
            train_s = time.time() - t0
            for tid, work in prepared.items():
                self.publish_or_fail(self.engine.tenants[tid], work, outcomes[tid], train_s, rollout_start, rollout_s)
        else:
            for tid, work in prepared.items():
                tenant = self.engine.tenants[tid]
                self.phase(tenant, "train")
                t0 = time.time()
                try:
                    outcome = self.trainer.train_step(tid, work["batch"], tenant.spec.grpo, tenant.spec.rollout.max_tokens)
                except Exception as exc:  # noqa: BLE001
                    outcome = exc
                self.publish_or_fail(tenant, work, outcome, time.time() - t0, rollout_start, rollout_s)
                self.apply_commands()
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
        ids = completion.token_ids
        eos = self.tokenizer.eos_token_id
        if eos in ids:  # with ignore_eos the sampler runs on; the answer ends at the first stop
            ids = ids[: ids.index(eos)]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def prepare(self, tenant: Tenant, plan: dict, flat: list) -> dict | None:
        """Record a due eval, score the rollouts, build the train batch (None: nothing to train)."""
        engine = self.engine
        if plan["eval"]:
            lo, hi = plan["eval"]
            accuracy = tenant.eval_accuracy([self.decode(group[0]) for group in flat[lo:hi]])
            with engine.events.lock:
                engine.store.record_eval(tenant.id, tenant.step, accuracy)
                engine.events.emit("eval", tenant.id, step=tenant.step, accuracy=accuracy)
            tenant.last_eval_step = tenant.step
        if not plan["train"]:
            self.complete(tenant)
            return None
        lo, hi = plan["train"]
        completions = flat[lo:hi]
        rollouts = Rollouts(plan["problems"], completions, [[self.decode(c) for c in g] for g in completions])
        self.phase(tenant, "reward")
        t0 = time.time()
        rewards, correct = tenant.score(rollouts)
        reward_s = time.time() - t0
        batch, sampler_lp = tenant.train_batch(self.tokenizer, rollouts, rewards)
        has_lp = all(len(c.logprobs) == len(c.token_ids) for g in completions for c in g)
        return {"rewards": rewards, "correct": correct, "batch": batch, "sampler_lp": sampler_lp if has_lp else None,
                "reward_s": reward_s}

    def publish_or_fail(self, tenant: Tenant, work: dict, outcome, train_s: float, rollout_start: float,
                        rollout_s: float) -> None:
        if isinstance(outcome, BaseException):
            self.fail(tenant, outcome, "train")
            return
        try:
            self.publish(tenant, work, outcome, train_s, rollout_start, rollout_s)
        except Exception as exc:  # noqa: BLE001
            self.fail(tenant, exc, tenant.phase)

    def publish(self, tenant: Tenant, work: dict, stats, train_s: float, rollout_start: float, rollout_s: float) -> None:
        """sync -> count -> checkpoint -> record -> report, for one trained tenant."""
        engine = self.engine
        mask = work["batch"].completion_mask
        diff = None
        if work["sampler_lp"] is not None:
            diff = float(((stats.trainer_logprobs.cpu() - work["sampler_lp"]).abs() * mask).sum() / mask.sum().clamp(min=1))

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
        rewards, correct = work["rewards"], work["correct"]
        row = {
            "tenant": tenant.id, "step": tenant.step, "time": end,
            "reward_mean": statistics.fmean(rewards), "reward_std": statistics.pstdev(rewards),
            "reward_min": min(rewards), "reward_max": max(rewards),
            "accuracy": sum(correct) / len(correct), "loss": stats.loss, "kl": stats.kl,
            "grad_norm": stats.grad_norm, "entropy": stats.entropy, "clip_fraction": stats.clip_fraction,
            "logprob_diff": diff, "completion_tokens": int(mask.sum().item()),
            "rollout_s": rollout_s, "reward_s": work["reward_s"], "train_s": train_s, "sync_s": sync_s,
            "checkpoint_s": checkpoint_s, "total_s": end - ready,
        }
        # Queue wait: everything in the step that was not this tenant's own work -- waiting
        # for the shared batch to start and for other tenants' reward/train/sync turns.
        own = rollout_s + work["reward_s"] + train_s + sync_s + checkpoint_s
        row["queue_s"] = max(0.0, row["total_s"] - own)
        self.phase(tenant, "record")
        with engine.events.lock:  # recorded before it is reported, atomically for snapshots
            engine.store.record_step(row)
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
