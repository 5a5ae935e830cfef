"""Work of client-driven tenants (Tinker training clients), run by the scheduler thread.

An HTTP thread queues a job on the tenant's own FIFO (`ClientJobs.add`, under the engine
lock) and gets a concurrent Future. The scheduler takes, in each cycle, the run of
forward_backward jobs at the head of every running client tenant's queue and trains them in
the same fused pass as the built-in tenants that are ready (ClientWork.train_with_clients),
then runs the optimizer steps, saves and loads that follow. Order per tenant is the order
the client sent (the SDK sends a training client's requests in seq_id order).

A paused tenant's jobs wait (its client sees `try_again`); a tenant that leaves the engine
(killed, failed, its session finished) fails its jobs with the reason. Every future is
resolved exactly once.
"""

from __future__ import annotations

import collections
import concurrent.futures
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from engine.external_jobs import resolve
from engine.protocol import CHECKPOINT_S, QUEUE_S, REWARD_S, ROLLOUT_S, STALENESS, SYNC_S, TOTAL_S, TRAIN_S
from engine.tenant import State, Tenant
from engine.train.batch import TrainBatch, concat_batches
from engine.train.trainer import ClientPass

FORWARD_BACKWARD, OPTIM_STEP, CALL = "forward_backward", "optim_step", "call"


class ClientJobError(RuntimeError):
    """A client job that cannot be done; `category` is Tinker's: "user" or "server"."""

    def __init__(self, message: str, category: str = "user"):
        super().__init__(message)
        self.category = category


@dataclass
class ClientJob:
    kind: str
    payload: Any  # forward_backward: (datums batch, loss, forward_only); optim_step: Adam params; call: fn(scheduler)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    queued: float = field(default_factory=time.time)


@dataclass
class ClientStep:
    """What a client tenant did since its last optimizer step (one recorded step)."""

    since: float = field(default_factory=time.time)
    loss: float = 0.0  # Tinker's loss:sum, over the step's forward_backward calls
    tokens: int = 0
    train_s: float = 0.0
    queue_s: float = 0.0
    sample_s: float = 0.0  # its sampling jobs' time in the shared batch (the union of their spans)
    sampled_until: float = 0.0
    sampled_tokens: int = 0


def datums_batch(datums: list, pad_id: int) -> tuple[TrainBatch, dict[str, torch.Tensor], list[int]]:
    """Tinker datums -> a TrainBatch whose completion position i predicts target_tokens[i] from
    model_input[:i+1] (prompt width 1: the first input token), plus the loss inputs as [B, T]
    tensors and each datum's length. Raises ClientJobError for malformed datums."""
    lengths = [len(d.tokens) for d in datums]
    if not datums or min(lengths) < 1:
        raise ClientJobError("forward_backward: every datum needs a non-empty model_input")
    width = max(lengths)
    ids = torch.full((len(datums), width + 1), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    cmask = torch.zeros((len(datums), width), dtype=torch.float32)
    names = sorted({k for d in datums for k in d.inputs})
    inputs = {k: torch.zeros((len(datums), width), dtype=torch.long if k == "target_tokens" else torch.float32)
              for k in names}
    for r, (d, n) in enumerate(zip(datums, lengths)):
        ids[r, :n] = torch.tensor(d.tokens)
        attn[r, : n + 1] = 1
        cmask[r, :n] = 1
        for k in names:
            value = d.inputs.get(k)
            if value is None:
                raise ClientJobError(f"forward_backward: data[{r}] lacks loss_fn_inputs[{k!r}] that other datums have")
            if value.size != n:
                raise ClientJobError(f"forward_backward: data[{r}].loss_fn_inputs[{k!r}] has {value.size} values "
                                     f"for a model_input of {n} tokens (they must align: position i predicts token i+1)")
            inputs[k][r, :n] = torch.from_numpy(np.asarray(value))
    if "target_tokens" not in inputs:
        raise ClientJobError("forward_backward: loss_fn_inputs must hold target_tokens")
    batch = TrainBatch(input_ids=ids, attention_mask=attn, completion_mask=cmask,
                       advantages=torch.zeros(len(datums)), prompt_width=1, targets=inputs["target_tokens"])
    return batch, inputs, lengths


class SplitLoss:
    """One loss callable for a merged batch of several forward_backward jobs (rows by job)."""

    def __init__(self, parts: list[tuple[slice, Any]]):
        self.parts = parts

    def __call__(self, logp, mask):
        total, rows = None, []
        for s, loss in self.parts:
            width = loss.inputs["target_tokens"].shape[1]
            value, per_token = loss(logp[s, :width], mask[s, :width])
            rows.append(torch.nn.functional.pad(per_token, (0, logp.shape[1] - width)))
            total = value if total is None else total + value
        return total, torch.cat(rows)


class ClientJobs:
    """The per-tenant queues (filled by any thread under the engine lock)."""

    def __init__(self, lock):
        self.lock = lock
        self.queues: dict[str, collections.deque[ClientJob]] = {}
        self.closed = False

    def add(self, tenant_id: str, kind: str, payload: Any) -> concurrent.futures.Future:
        """Queue a job (the caller holds the engine lock and wakes the scheduler)."""
        if self.closed:
            raise ClientJobError("the engine is stopping", "server")
        job = ClientJob(kind, payload)
        self.queues.setdefault(tenant_id, collections.deque()).append(job)
        return job.future

    def waiting(self, runnable) -> bool:
        """Jobs of a tenant that can run now wait (read under the engine lock by the idle wait)."""
        return any(q and runnable(t) for t, q in self.queues.items())

    def fail_tenant(self, tenant_id: str, why: str, category: str = "user") -> None:
        with self.lock:
            jobs = list(self.queues.pop(tenant_id, ()))
        for job in jobs:
            resolve(job.future, error=ClientJobError(why, category))

    def fail_all(self, why: str) -> None:
        with self.lock:
            self.closed = True
            queues, self.queues = self.queues, {}
        for jobs in queues.values():
            for job in jobs:
                resolve(job.future, error=ClientJobError(why, "server"))

    def take(self, tenant_id: str, kinds: tuple[str, ...]) -> list[ClientJob]:
        """Pop the run of jobs of `kinds` at the head of the tenant's queue (cancelled ones dropped)."""
        taken = []
        with self.lock:
            queue = self.queues.get(tenant_id)
            while queue and queue[0].kind in kinds:
                job = queue.popleft()
                if not job.future.cancelled():
                    taken.append(job)
                if job.kind != FORWARD_BACKWARD:
                    break  # an optimizer step or a call runs alone, after what came before it
        return taken


class ClientWork:
    """The scheduler's side of client tenants (mixed into engine.scheduler.Scheduler)."""

    def client_tenants(self) -> list[Tenant]:
        return [t for t in self.running() if t.client_driven]

    def take_client_passes(self) -> dict[str, tuple[ClientPass, list]]:
        """The forward_backward jobs at the head of every running client tenant's queue, each
        tenant's merged into one pass (same forward_only flag, in order)."""
        passes = {}
        for tenant in self.client_tenants():
            jobs = self.engine.client_jobs.take(tenant.id, (FORWARD_BACKWARD,))
            if not jobs:
                continue
            now = time.time()
            try:
                batches, parts, start = [], [], 0
                for job in jobs:
                    batch, loss, forward_only = job.payload
                    n = batch.input_ids.shape[0]
                    batches.append(batch)
                    parts.append((slice(start, start + n), loss))
                    start += n
                merged, _ = concat_batches(batches, pad_id=self.tokenizer.pad_token_id or 0)
                forward_only = all(job.payload[2] for job in jobs)
                if any(job.payload[2] for job in jobs) and not forward_only:
                    # mixed: the forward-only jobs' rows must not add gradient
                    parts = [(s, loss if not job.payload[2] else _no_grad(loss)) for (s, loss), job in zip(parts, jobs)]
            except Exception as exc:  # noqa: BLE001
                for job in jobs:
                    resolve(job.future, error=ClientJobError(f"forward_backward: {exc}"))
                continue
            stats = self.client_step_stats(tenant)
            stats.queue_s += sum(now - job.queued for job in jobs)
            passes[tenant.id] = (ClientPass(merged, SplitLoss(parts), forward_only), jobs)
        return passes

    def finish_client_passes(self, passes: dict, outcomes: dict, train_s: float) -> None:
        for tenant_id, (client_pass, jobs) in passes.items():
            outcome = outcomes.get(tenant_id)
            if isinstance(outcome, BaseException) or outcome is None:
                for job in jobs:
                    resolve(job.future, error=ClientJobError(f"forward_backward failed: {type(outcome).__name__}: "
                                                             f"{outcome}", "server"))
                continue
            tenant = self.engine.tenants.get(tenant_id)
            stats = self.client_step_stats(tenant) if tenant is not None else ClientStep()
            stats.train_s += train_s
            for job, (s, loss) in zip(jobs, client_pass.loss.parts):
                lengths = job.payload[0].completion_mask.sum(1).long().tolist()
                logp = outcome.logprobs[s]
                per_token = outcome.elementwise_loss[s]
                value = float(per_token.sum())
                if not job.payload[2]:
                    stats.loss += value
                    stats.tokens += int(sum(lengths))
                fields = {"logprobs": [logp[i, :n].numpy() for i, n in enumerate(lengths)],
                          "elementwise_loss": [per_token[i, :n].numpy() for i, n in enumerate(lengths)]}
                resolve(job.future, (fields, {"loss:sum": value}))

    def client_step_stats(self, tenant: Tenant) -> ClientStep:
        if tenant.client_step is None:
            tenant.client_step = ClientStep(since=tenant.ready_since or time.time())
        return tenant.client_step

    def client_jobs_runnable(self) -> bool:
        return self.engine.client_jobs.waiting(
            lambda tid: (t := self.engine.tenants.get(tid)) is not None and t.state == State.RUNNING)

    def run_client_calls(self) -> bool:
        """Optimizer steps and calls (save, load) at the head of running client tenants' queues."""
        ran = False
        for tenant in self.client_tenants():
            for job in self.engine.client_jobs.take(tenant.id, (OPTIM_STEP, CALL)):
                ran = True
                try:
                    if job.kind == OPTIM_STEP:
                        result = self.client_optim_step(tenant, job)
                    else:
                        result = job.payload(self, tenant)
                except ClientJobError as exc:
                    resolve(job.future, error=exc)
                except Exception as exc:  # noqa: BLE001
                    resolve(job.future, error=ClientJobError(f"{type(exc).__name__}: {exc}", "server"))
                else:
                    resolve(job.future, result)
                if tenant.state != State.RUNNING:
                    break
        return ran

    def client_optim_step(self, tenant: Tenant, job: ClientJob) -> dict:
        """One Tinker optim_step = one recorded step of the tenant."""
        p = job.payload
        stats = self.client_step_stats(tenant)
        t0 = time.time()
        stats.queue_s += t0 - job.queued
        try:
            grad_norm = self.trainer.client_step(tenant.adapter, lr=p.learning_rate, betas=(p.beta1, p.beta2),
                                                 eps=p.eps, weight_decay=p.weight_decay, grad_clip=p.grad_clip_norm)
        except FloatingPointError as exc:
            raise ClientJobError(f"optim_step: {exc}; the gradients were dropped") from None
        train_s = time.time() - t0 + stats.train_s
        t1 = time.time()
        self.backend.sync_adapter(tenant.adapter)
        sync_s = time.time() - t1
        tenant.step += 1
        end = time.time()
        total = end - stats.since
        row = {"tenant": tenant.id, "step": tenant.step, "time": end,
               "loss": stats.loss if stats.tokens else None, "grad_norm": grad_norm,
               "completion_tokens": stats.sampled_tokens or stats.tokens,
               ROLLOUT_S: stats.sample_s, TRAIN_S: train_s, SYNC_S: sync_s, CHECKPOINT_S: 0.0, TOTAL_S: total,
               QUEUE_S: stats.queue_s, STALENESS: 0}
        # The client's own time (its rewards, its loop) between the tenant's requests.
        row[REWARD_S] = max(0.0, total - stats.sample_s - train_s - sync_s - stats.queue_s)
        reward = tenant.logged.pop("reward", None)
        if reward is not None:
            row["reward_mean"] = reward
        with self.engine.events.lock:
            self.engine.store.record_step(row)
            self.engine.events.emit("step", tenant.id, **{k: v for k, v in row.items() if k != "tenant"})
        tenant.client_step = ClientStep(since=end)
        tenant.ready_since = end
        return {"metrics": {"grad_norm:mean": grad_norm}}


def _no_grad(loss):
    def detached(logp, mask):
        value, per_token = loss(logp.detach(), mask)
        return value.detach(), per_token.detach()

    detached.inputs = loss.inputs
    return detached
