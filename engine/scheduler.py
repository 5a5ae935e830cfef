"""The scheduler: every tenant's step goes through a pipeline, and nothing waits in lockstep.

    rollout (rows join the shared continuous batch; a job is back when its own rows are)
      -> score (rewards, eval, train batch: in a thread pool, user reward code in a
         worker process with its deadline; never on this thread)
      -> train (the ready tenants, fused in micro-batches; in staggered cohorts while
         rewards wait, so one cohort's wait is covered by the others' work)
      -> sync -> record (+ checkpoint) -> the tenant's next rollout joins the batch.

While one tenant's rewards wait on I/O the others keep sampling and training; a short
tenant does not wait for a long tenant's rollout. Only this thread touches the trainer
and the inference backend. A tenant's failure (bad task arguments, a reward that
raises, hangs or kills its worker, NaN loss, a bad adapter) fails that tenant only.
Commands (pause, kill) act between two decode steps: a tenant's sampling job is
cancelled and its step is redone on resume (its data and seeds derive from the step).
Admission control: at most `slots` tenants warming or running; the rest wait queued.
The tenant state machine (tenant.TRANSITIONS) is enforced by the lifecycle mixin
(engine.scheduler_lifecycle); checkpoints and a full disk are engine.scheduler_checkpoints'.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import math
import statistics
import threading
import time
import traceback
from dataclasses import dataclass, field

from engine.client_jobs import ClientWork
from engine.scheduler_episodes import EpisodeSteps
from engine.scheduler_checkpoints import DISK_RETRY_S, CheckpointKeeping
from engine.scheduler_lifecycle import TenantLifecycle
from engine.protocol import (CHECKPOINT_S, QUEUE_S, REWARD_S, ROLLOUT_S, STALENESS, SYNC_S, TOTAL_S,
                             TRAIN_S, TURNS)
from engine.scoring import score_step
from engine.tenant import State, Tenant

COALESCE_S = 0.1
REWARD_WAIT_S = 0.02  # a step's reward wait from which training in cohorts pays (see next_train_group)
DRAIN_STEPS = 16  # decode steps a nearly done batch may take before ready tenants train


@dataclass
class StepWork:
    """One tenant's step in flight."""

    tag: str
    plan: dict
    rollout_start: float
    train_clock_start: float
    step: int = 0  # the tenant step this work trains (tenant.step when it is trained)
    stale: int = 0  # 1: sampled before the previous update was applied (off-policy)
    rollout_s: float = 0.0
    future: concurrent.futures.Future | None = None
    extra: dict = field(default_factory=dict)
    episodes: object | None = None  # multi-turn tenants: engine.episodes.EpisodeRollout


class Scheduler(TenantLifecycle, CheckpointKeeping, ClientWork, EpisodeSteps):
    """The loop and the step pipeline; lifecycle, checkpoints, client tenants' work
    (engine.client_jobs) and multi-turn steps (engine.scheduler_episodes) are its mixins."""

    def __init__(self, engine):
        self.engine = engine
        self.loaded = engine.loaded
        self.tokenizer = engine.loaded.tokenizer
        self.trainer = engine.loaded.trainer
        self.backend = engine.loaded.backend
        self.last_system = 0.0
        self.last_disk_retry = 0.0
        fused = engine.config.fused_train
        self.fused = True if fused is None else fused
        self.work: dict[str, StepWork] = {}  # each running tenant's current step
        self.prefetch: dict[str, StepWork] = {}  # off-policy: its next step, sampling early
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(4, self.backend.slots),
                                                          thread_name_prefix="score")
        self.scored = threading.Event()  # set by a scoring thread when it finishes
        self.train_clock = 0.0  # seconds this thread spent training (not sampling)
        self.tags = itertools.count(1)
        self.ready: list[str] = []  # tenants scored and waiting to train, oldest first
        self.busy_s = 0.0  # seconds this thread spent sampling and training
        self.steps_trained = 0

    # -- loop -------------------------------------------------------------------------
    def run(self) -> None:
        engine = self.engine
        external = engine.external
        idle = True
        try:
            while not engine.stopping.is_set():
                try:
                    self.apply_commands()
                    self.admit()
                    self.maybe_sample_system()
                    external.submit_pending(self.backend, self.adapter_live)  # clients' jobs join the batch
                    running = self.running()
                    own = [t for t in running if not t.client_driven]  # client tenants step when asked
                    if not own and not self.work and not self.backend.busy and not self.client_jobs_runnable():
                        idle = True
                        with engine.wakeup:
                            if (not engine.commands and not external.waiting and not self.client_jobs_runnable()
                                    and not engine.stopping.is_set()):
                                engine.wakeup.wait(timeout=0.5)
                        continue
                    if idle and any(t.state == State.QUEUED for t in engine.tenants.values()):
                        # Waking from idle: experiments submitted together (a sweep) should
                        # share the first batch rather than start one behind the other.
                        idle = False
                        time.sleep(COALESCE_S)
                        self.apply_commands()
                        self.admit()
                        running = self.running()
                    self.cycle(running)
                except Exception as exc:  # noqa: BLE001 - the loop must survive anything
                    engine.log(f"scheduler error: {type(exc).__name__}: {exc}\n{traceback.format_exc()}", level="error")
                    time.sleep(0.5)
        finally:
            external.fail_all("the engine is stopping")
            engine.client_jobs.fail_all("the engine is stopping")
            self.pool.shutdown(wait=False, cancel_futures=True)

    def adapter_live(self, adapter: str) -> bool:
        """The adapter can be sampled now (external jobs check this before they join)."""
        return adapter in self.trainer.optimizers

    def running(self) -> list[Tenant]:
        return [t for t in self.engine.tenants.values() if t.state == State.RUNNING]

    def cycle(self, running: list[Tenant]) -> None:
        """One turn of the pipeline: start steps, one decode step, collect scores, train."""
        self.scored.clear()  # a scorer finishing from here on wakes the wait below
        for tenant in running:
            if tenant.id not in self.work and not tenant.client_driven:
                self.start_step(tenant)
        progressed = False
        if self.advance_episodes():
            progressed = True
        if self.backend.busy:
            t0 = time.time()
            finished = self.backend.advance()
            self.busy_s += time.time() - t0
            for tag, result in finished:
                self.rollout_done(tag, result)
            progressed = True
        self.ready += [t.id for t in self.collect_scored()]
        train_ready = bool(self.ready) and self.train_now()
        if train_ready:
            self.apply_commands()
        group = self.next_train_group() if train_ready else []
        passes = self.take_client_passes()  # client tenants' forward_backward: in the same fused pass
        if group or passes:
            self.train(group, passes)
            progressed = True
        if self.run_client_calls():
            progressed = True
        if not progressed:
            # Everyone is waiting on rewards (I/O): sleep until a scorer finishes.
            self.scored.wait(timeout=0.05)

    def maybe_sample_system(self) -> None:
        now = time.time()
        if now - self.last_system >= 2.0:
            self.last_system = now
            self.engine.events.emit("system", None, **self.engine.system_sample())
        if now - self.last_disk_retry >= DISK_RETRY_S:
            self.last_disk_retry = now
            self.retry_disk_paused()

    # -- the pipeline -------------------------------------------------------------------
    def phase(self, tenant: Tenant, name: str) -> None:
        tenant.set_phase(name)
        self.engine.events.emit("phase", tenant.id, phase=name, step=tenant.step + 1)

    def start_step(self, tenant: Tenant, prefetch: bool = False) -> None:
        """Plan the tenant's next step (a due eval, its training prompts) and submit its rows.
        `prefetch`: the step after the one in flight, sampled with the current weights."""
        now = time.time()
        if tenant.first_step is None:
            tenant.first_step = now
            tenant.warmup_s = round(now - (tenant.started or now), 3)
            self.engine.store.update_experiment(tenant.id, first_step=now, warmup_s=tenant.warmup_s)
        step = tenant.step + (1 if prefetch else 0)
        if tenant.multi_turn:
            self.start_episodes(tenant, step, now)
            return
        plan = {"eval": None, "train": None, "problems": []}
        requests = []
        try:
            if not prefetch and tenant.eval_due():
                reqs = tenant.eval_requests(self.tokenizer)
                plan["eval"] = (0, len(reqs))
                requests += reqs
            if step < tenant.spec.steps:
                problems = tenant.problems(step)
                reqs = tenant.sample_requests(self.tokenizer, problems, step)
                plan["train"] = (len(requests), len(requests) + len(reqs))
                plan["problems"] = problems
                requests += reqs
        except Exception as exc:  # noqa: BLE001 - bad task arguments fail this tenant only
            self.fail(tenant, exc, "rollout")
            return
        if not requests:
            if not prefetch:
                self.complete(tenant)
            return
        if not prefetch:
            self.phase(tenant, "rollout")
        tag = f"{tenant.id}#{next(self.tags)}"
        table = self.prefetch if prefetch else self.work
        table[tenant.id] = StepWork(tag=tag, plan=plan, rollout_start=now, train_clock_start=self.train_clock,
                                    step=step, stale=1 if prefetch else 0)
        try:
            self.backend.submit(tag, requests)
        except Exception as exc:  # noqa: BLE001
            table.pop(tenant.id, None)
            self.fail(tenant, exc, "rollout")

    def maybe_prefetch(self, tenant: Tenant, work: StepWork) -> None:
        """Off-policy mode: once a step's samples are in, sample the next step at once
        (unless that step starts with an eval, which must see the updated weights)."""
        nxt = work.step + 1
        if (tenant.spec.rollout.off_policy_steps < 1 or tenant.id in self.prefetch or nxt >= tenant.spec.steps
                or tenant.eval_due_at(nxt)):
            return
        self.start_step(tenant, prefetch=True)

    def _work_for(self, tag: str) -> tuple[Tenant, StepWork] | None:
        tenant = self.engine.tenants.get(tag.split("#")[0])
        if tenant is None or tenant.state != State.RUNNING:
            return None
        for table in (self.work, self.prefetch):
            work = table.get(tenant.id)
            if work is not None and work.tag == tag:
                return tenant, work
        return None

    def rollout_done(self, tag: str, result) -> None:
        if self.engine.external.done(tag, result):
            return  # a client's job (engine.external_jobs), not a tenant's step
        found = self._work_for(tag)
        if found is None:
            return  # cancelled meanwhile
        tenant, work = found
        if isinstance(result, BaseException):
            self.fail(tenant, result, "rollout")
            return
        if work.episodes is not None:  # a turn of a multi-turn step: its environments act next
            work.episodes.sampled(self.pool, result)
            self.phase(tenant, "env")
            return
        # Time this thread spent training others while these rows waited is queue, not rollout.
        wall = time.time() - work.rollout_start
        work.rollout_s = max(0.0, wall - (self.train_clock - work.train_clock_start))
        if self.work.get(tenant.id) is work:
            self.phase(tenant, "reward")
        work.future = self.pool.submit(score_step, tenant, self.tokenizer, work.plan, result)
        work.future.add_done_callback(lambda _f: self.scored.set())
        if self.work.get(tenant.id) is work:
            self.maybe_prefetch(tenant, work)

    def collect_scored(self) -> list[Tenant]:
        """Tenants whose scoring finished: record evals; return those with an update to train."""
        ready = []
        for tenant_id, work in list(self.work.items()):
            if work.future is None or not work.future.done() or work.extra:
                continue
            tenant = self.engine.tenants[tenant_id]
            try:
                out = work.future.result()
            except Exception as exc:  # noqa: BLE001
                self.fail(tenant, exc, "reward")
                continue
            if out["eval_accuracy"] is not None:
                with self.engine.events.lock:
                    self.engine.store.record_eval(tenant.id, tenant.step, out["eval_accuracy"])
                    self.engine.events.emit("eval", tenant.id, step=tenant.step, accuracy=out["eval_accuracy"])
                tenant.last_eval_step = tenant.step
            if out["batch"] is None:
                self.work.pop(tenant_id, None)
                self.complete(tenant)
                continue
            work.extra = out
            ready.append(tenant)
        return ready

    def train_now(self) -> bool:
        """Train the ready tenants now, or first let a batch that is a few decode steps from
        done finish (DRAIN_STEPS)? Finishing it sends its tenants to their rewards before this
        thread is tied up training: their reward waits then overlap the training instead of
        following it. A long batch (a long tenant's rollout) never holds training up."""
        drain = self.backend.steps_to_drain if self.backend.busy else 0
        return drain is None or drain == 0 or drain > DRAIN_STEPS

    def next_train_group(self) -> list[Tenant]:
        """The ready tenants to train this cycle, oldest first. When rewards wait (a judge, a
        sandbox), a cohort of them: the tenants just trained sample while the rest train next,
        so tenants fall into staggered cohorts and each cohort's reward wait is covered by the
        others' sampling and training instead of idling the engine for everyone at once."""
        live = []
        for tenant_id in dict.fromkeys(self.ready):  # once each, even if re-queued after a resume
            tenant, work = self.engine.tenants.get(tenant_id), self.work.get(tenant_id)
            if tenant is None or tenant.state != State.RUNNING or work is None or not work.extra:
                continue  # paused, killed or failed meanwhile: its work was dropped
            live.append((tenant, work))
        cap = self.cohort_rows(max((w.extra["reward_s"] for _, w in live), default=0.0))
        group, rows, waiting = [], 0, []
        for tenant, work in live:
            n = work.extra["batch"].input_ids.shape[0]
            if group and cap and rows >= cap:
                waiting.append(tenant.id)
                continue
            group.append(tenant)
            rows += n
        self.ready = waiting
        return group

    def cohort_rows(self, reward_wait: float) -> int:
        """Rows per training cohort (0: no cohorts, every ready tenant trains at once).

        With k cohorts, while one waits `reward_wait` for its rewards the other k-1 keep this
        thread busy for (k-1)/k of a round's work W (every running tenant's step, measured as
        this thread's busy time per trained step); the wait is covered when
        W (k-1)/k >= reward_wait, so k = ceil(W / (W - reward_wait)). Without reward waits
        there is nothing to cover: one group samples and trains together, which is cheapest on
        an overhead-bound decoder."""
        running = self.running()
        if reward_wait < REWARD_WAIT_S or not self.steps_trained or len(running) < 2:
            return 0
        work = self.busy_s / self.steps_trained * len(running)
        cohorts = len(running) if work <= reward_wait else min(len(running), math.ceil(work / (work - reward_wait)))
        rows = sum(t.spec.rollout.prompts_per_step * t.spec.rollout.num_generations for t in running)
        return math.ceil(rows / cohorts)

    def train(self, tenants: list[Tenant], passes: dict | None = None) -> None:
        """Train every ready tenant (fused where enabled) with the client tenants' passes, then
        sync, record and release them. Between a tenant's update and its record no command is
        applied: an update is always synced, counted and recorded, or the tenant fails."""
        passes = passes or {}
        if not tenants and not passes:
            return
        for tenant in tenants:
            self.phase(tenant, "train")
        for t in tenants:
            step_work = self.work[t.id]
            if step_work.stale and step_work.extra["sampler_lp"] is not None:
                step_work.extra["batch"].behavior_logprobs = step_work.extra["sampler_lp"]
        work = {t.id: (self.work[t.id].extra["batch"], t.spec.grpo, t.spec.rollout.max_tokens) for t in tenants}
        t0 = time.time()
        outcomes = self.trainer.train(work, fused=self.fused, passes={k: p for k, (p, _) in passes.items()})
        train_s = time.time() - t0
        self.train_clock += train_s
        self.busy_s += train_s
        self.steps_trained += len(tenants)
        self.finish_client_passes(passes, outcomes, train_s)
        for tenant in tenants:
            step_work = self.work.pop(tenant.id)
            outcome = outcomes[tenant.id]
            if isinstance(outcome, BaseException):
                self.fail(tenant, outcome, "train")
                continue
            try:
                self.publish(tenant, step_work, outcome, train_s)
            except Exception as exc:  # noqa: BLE001
                self.fail(tenant, exc, tenant.phase)

    def publish(self, tenant: Tenant, work: StepWork, stats, train_s: float) -> None:
        """sync -> count -> checkpoint -> record -> report, for one trained tenant."""
        engine = self.engine
        out = work.extra
        mask = out["batch"].completion_mask
        diff = None
        if out["sampler_lp"] is not None:
            diff = float(((stats.trainer_logprobs.cpu() - out["sampler_lp"]).abs() * mask).sum() / mask.sum().clamp(min=1))

        self.phase(tenant, "sync")
        t0 = time.time()
        self.backend.sync_adapter(tenant.adapter)
        sync_s = time.time() - t0

        tenant.step += 1
        checkpoint_s, checkpoint_error = 0.0, None
        if tenant.step % tenant.spec.checkpoint_every == 0 or tenant.step >= tenant.spec.steps:
            self.phase(tenant, "checkpoint")
            checkpoint_s, checkpoint_error = self.checkpoint(tenant)
        end = time.time()
        ready = tenant.ready_since or work.rollout_start
        rewards, correct = out["rewards"], out["correct"]
        row = {
            "tenant": tenant.id, "step": tenant.step, "time": end,
            "reward_mean": statistics.fmean(rewards), "reward_std": statistics.pstdev(rewards),
            "reward_min": min(rewards), "reward_max": max(rewards),
            "accuracy": sum(correct) / len(correct), "loss": stats.loss, "kl": stats.kl,
            "grad_norm": stats.grad_norm, "entropy": stats.entropy, "clip_fraction": stats.clip_fraction,
            "logprob_diff": diff, "completion_tokens": int(mask.sum().item()),
            ROLLOUT_S: work.rollout_s, REWARD_S: out["reward_s"], TRAIN_S: train_s, SYNC_S: sync_s,
            CHECKPOINT_S: checkpoint_s, TOTAL_S: end - ready, STALENESS: work.stale,
        }
        if out.get("turns") is not None:
            row[TURNS] = out["turns"]
        # Queue wait: everything in the step that was not this tenant's own work -- waiting
        # for the batch, for a scoring thread, and for other tenants' training.
        own = work.rollout_s + out["reward_s"] + train_s + sync_s + checkpoint_s
        row[QUEUE_S] = max(0.0, row[TOTAL_S] - own)
        self.phase(tenant, "record")
        with engine.events.lock:  # recorded before it is reported, atomically for snapshots
            engine.store.record_step(row)
            engine.events.emit("step", tenant.id, **{k: v for k, v in row.items() if k != "tenant"})
        tenant.ready_since = end
        tenant.set_phase("ready")
        if tenant.id in self.prefetch:  # off-policy: the next step is already sampling
            promoted = self.work[tenant.id] = self.prefetch.pop(tenant.id)
            if promoted.future is not None:  # ... or already sampled: sample the one after it
                self.maybe_prefetch(tenant, promoted)
        if checkpoint_error is not None:
            self.pause_for_disk(tenant, checkpoint_error)
        elif tenant.step >= tenant.spec.steps and not tenant.eval_due():
            self.complete(tenant)

    # -- checkpoints and a full disk ---------------------------------------------------------