"""The Engine: one warm base model, many tenants; the public face the daemon serves.

Commands (pause, resume, kill) are queued and applied by the scheduler thread at the
next phase boundary, so the trainer and the inference backend are only ever touched
from that one thread. `submit` validates synchronously and refuses bad specs at once.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from engine.checkpoint import checkpoint_step, latest_readable_checkpoint
from engine.config import EngineConfig, ExperimentSpec, SpecError, parse_spec
from engine.events import EventBus
from engine.client_jobs import ClientJobError, ClientJobs
from engine.external_jobs import BASE_ADAPTER, ExternalJobs
from engine.protocol import QUEUE_S, TOTAL_S
from engine.restore import TenantRestore
from engine.store import Store
from engine.tasks import TaskError
from engine.telemetry import GpuProbe, ProcessProbe
from engine.tasks.client import CLIENT_TASK
from engine.tasks.rewards import RewardError
from engine.tenant import FINAL_STATES, State, Tenant


class EngineError(ValueError):
    """A request the engine refuses; the message says why."""


class UnknownModel(EngineError):
    """No live tenant (or base model) answers to that name."""


class ModelNotReady(EngineError):
    """The model exists but cannot be sampled now (warming up, queued for a slot)."""


class EngineWarming(ModelNotReady):
    """The engine itself is not ready yet (model loading, scheduler not started)."""


BASE_ALIASES = ("base", BASE_ADAPTER)


def default_home() -> Path:
    return Path(os.environ.get("CLORA_HOME", "~/.clora")).expanduser()


class Engine(TenantRestore):
    def __init__(self, config: EngineConfig, home: Path | None = None):
        self.config = config
        self.home = Path(home or default_home())
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.checkpoint_root = self.home / "checkpoints"
        self.store = Store(self.home / "clora.db")
        self.events = EventBus(self.store)
        self.tenants: dict[str, Tenant] = {}
        self.lock = threading.RLock()
        self.wakeup = threading.Condition(self.lock)
        self.commands: collections.deque = collections.deque()
        self.external = ExternalJobs(self.lock)  # clients' sampling jobs (HTTP APIs)
        self.client_jobs = ClientJobs(self.lock)  # client tenants' training jobs (the Tinker API)
        self.loaded = None
        self.stage = "created"
        self.created = time.time()
        self.ready_at: float | None = None
        self.cold_start_s: float | None = None
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.gpu = GpuProbe()
        self.process = ProcessProbe()
        self.last_system: dict = {}
        self.adapter_bytes_seen: dict[str, int] = {}  # last value read under the trainer lock
        self.checkpointed: int | None = None  # checkpoints written at shutdown
        self.stopped_event: dict | None = None  # the last event, announcing the shutdown
        self.sinks = None  # engine.metrics_sinks.MetricsSinks: TensorBoard (and W&B) out

    # -- lifecycle ------------------------------------------------------------------
    def set_stage(self, stage: str) -> None:
        self.stage = stage
        self.events.emit("engine", None, stage=stage, elapsed_s=round(time.time() - self.created, 2))

    def warm_up(self) -> None:
        """Load model and backend, restore tenants from the store, start the scheduler."""
        from engine.loading import configure_cpu_threads, load_everything
        from engine.metrics_sinks import MetricsSinks
        from engine.scheduler import Scheduler

        configure_cpu_threads()
        self.loaded = load_everything(self.config, self.set_stage)
        self.set_stage("restoring experiments")
        self._restore_tenants()
        self.sinks = MetricsSinks(self)
        self.sinks.start()
        self.cold_start_s = round(time.time() - self.created, 3)
        self.ready_at = time.time()
        self.store.set_meta("last_cold_start_s", self.cold_start_s)
        self.scheduler = Scheduler(self)
        self.thread = threading.Thread(target=self.scheduler.run, name="scheduler", daemon=True)
        self.thread.start()
        self.set_stage("ready")
        self.log(f"engine ready in {self.cold_start_s:.1f} s: model {self.loaded.model_path.name}, "
                 f"backend {self.loaded.backend_name}, device {self.loaded.device}")

    def shutdown(self, checkpoint: bool = True) -> int:
        """Stop the loop, checkpoint every tenant holding an adapter, release the backend.
        Returns how many checkpoints were written; the last event, a log line
        `engine stopped; ...`, carries it as `checkpointed`."""
        self.stopping.set()
        with self.wakeup:
            self.wakeup.notify_all()
        if self.thread and self.thread is not threading.current_thread():
            self.thread.join(timeout=600)
        written = 0
        if checkpoint and self.loaded is not None and hasattr(self, "scheduler"):
            written = self.scheduler.checkpoint_all()
        self.checkpointed = written
        message = (f"engine stopped; {written} tenant checkpoint(s) written" if written
                   else "engine stopped; no tenant needed a checkpoint")
        self.stopped_event = self.events.emit("log", None, level="info", message=message, stopped=True,
                                              checkpointed=written)
        if self.sinks is not None:
            self.sinks.close()
        if self.loaded is not None:
            self.loaded.backend.close()
        self.store.close()
        return written

    def log(self, message: str, tenant: str | None = None, level: str = "info") -> None:
        self.events.emit("log", tenant, level=level, message=message)

    # -- commands ---------------------------------------------------------------------
    def _tenant(self, tenant_id: str) -> Tenant:
        tenant = self.tenants.get(tenant_id)
        if tenant is None:
            for t in self.tenants.values():  # allow the experiment's name as well
                if t.spec.name == tenant_id and t.state not in FINAL_STATES:
                    return t
            raise EngineError(f"no experiment {tenant_id!r} (see `clora-tui ls`)")
        return tenant

    def validate(self, spec: ExperimentSpec | dict) -> ExperimentSpec:
        if isinstance(spec, dict):
            spec = parse_spec(spec)
        if spec.lora.rank > self.config.max_lora_rank:
            raise SpecError(f"lora.rank: {spec.lora.rank} is above this engine's max_lora_rank "
                            f"{self.config.max_lora_rank} (start the engine with a larger --max-lora-rank)")
        if self.loaded is not None:
            missing = [m for m in spec.lora.target_modules if m not in self.loaded.module_names]
            if missing:
                raise SpecError(f"lora.target_modules: {missing} not in the base model")
        probe = Tenant(id="probe", spec=spec)
        probe.load_task()  # raises TaskError for unknown tasks
        if probe.reward is not None:
            try:  # imported in a throwaway worker: user code never runs in the engine
                probe.reward.check()
            except RewardError as exc:
                raise TaskError(str(exc)) from None
        if probe.env is not None:
            try:  # the environment class is imported (and built) in a throwaway worker
                probe.env.ensure()
            except Exception as exc:  # noqa: BLE001 - EnvError, or the worker's own failure
                raise TaskError(str(exc)) from None
            finally:
                probe.env.close()
        self.check_work(spec, probe.task)
        return spec

    def check_work(self, spec: ExperimentSpec, task) -> None:
        """Refuse a spec whose step (or eval) would sample more tokens than this engine's budget
        (EngineConfig.max_step_tokens): sequences x (longest prompt + max_tokens)."""
        ro, budget = spec.rollout, self.config.max_step_tokens
        tokenizer = self.loaded.tokenizer if self.loaded is not None else None

        def length(text: str) -> int:
            return len(tokenizer.encode(text, add_special_tokens=False)) if tokenizer is not None else len(text)

        prompt = max((length(p) for p in task.sample_prompts(spec.seed, 64)), default=0)
        per_row = prompt + ro.max_tokens
        rows = ro.prompts_per_step * ro.num_generations
        if rows * per_row > budget:
            raise SpecError(f"rollout: one step would sample {rows:,} sequences (prompts_per_step x num_generations) "
                            f"of up to {prompt} prompt + {ro.max_tokens} new tokens = {rows * per_row:,} tokens, "
                            f"above this engine's max_step_tokens {budget:,}; lower rollout.prompts_per_step, "
                            "rollout.num_generations or rollout.max_tokens (or start the engine with a larger "
                            "--max-step-tokens)")
        eval_rows = len(task.eval_set()) if spec.eval_every > 0 else 0
        if eval_rows * per_row > budget:
            raise SpecError(f"task_args.eval_size: an eval would sample {eval_rows:,} sequences of up to {per_row} "
                            f"tokens = {eval_rows * per_row:,} tokens, above this engine's max_step_tokens "
                            f"{budget:,}; lower task_args.eval_size or rollout.max_tokens")

    def submit(self, spec: ExperimentSpec | dict, client: bool = False, restore_from: Path | None = None,
               restore_optimizer: bool = True) -> dict:
        """Queue a tenant. `client`: a client-driven tenant (task "tinker", made by the Tinker
        API), optionally starting from a saved state."""
        try:
            spec = self.validate(spec)
        except (SpecError, TaskError) as exc:
            raise EngineError(str(exc)) from None
        if (spec.task == CLIENT_TASK) != client:
            raise EngineError("task 'tinker' is the task of Tinker training clients: create one with the tinker SDK "
                              "(see `clora-tui tinker-env`), not with `start`")
        with self.lock:
            number = self.store.next_tenant_number()
            tenant = Tenant(id=f"e{number}", spec=spec, reason="waiting for an adapter slot",
                            restore_from=restore_from, restore_optimizer=restore_optimizer)
            tenant.load_task()
            tenant.started = time.time()
            self.store.add_experiment(tenant.id, number, spec.name, spec.to_dict(), tenant.state.value)
            self.tenants[tenant.id] = tenant
            self.events.emit("state", tenant.id, state=tenant.state.value, reason=tenant.reason, name=spec.name)
            self.wakeup.notify_all()
        return self.summary(tenant)

    def _command(self, op: str, tenant_id: str) -> dict:
        with self.lock:
            tenant = self._tenant(tenant_id)
            if tenant.state in FINAL_STATES:
                raise EngineError(f"{tenant.id} is {tenant.state.value}; nothing to {op}")
            if op == "pause" and tenant.state == State.PAUSED:
                raise EngineError(f"{tenant.id} is already paused")
            if op == "resume" and tenant.state != State.PAUSED:
                raise EngineError(f"{tenant.id} is {tenant.state.value}, not paused")
            self.commands.append((op, tenant.id))
            self.wakeup.notify_all()
            return {**self.summary(tenant), "pending": op}

    def pause(self, tenant_id: str) -> dict:
        return self._command("pause", tenant_id)

    def resume(self, tenant_id: str) -> dict:
        return self._command("resume", tenant_id)

    def kill(self, tenant_id: str) -> dict:
        return self._command("kill", tenant_id)

    def finish(self, tenant_id: str) -> dict:
        """A client tenant's client is done with it (its Tinker session finished): it ends as done."""
        return self._command("finish", tenant_id)

    def clone(self, tenant_id: str, overrides: dict[str, Any] | None = None) -> dict:
        with self.lock:
            source = self._tenant(tenant_id) if tenant_id in self.tenants else self._stored(tenant_id)
        overrides = dict(overrides or {})
        overrides.setdefault("name", f"{source.spec.name}-clone")
        try:
            spec = source.spec.with_overrides(overrides)
        except SpecError as exc:
            raise EngineError(str(exc)) from None
        return self.submit(spec)

    def _stored_row(self, tenant_id: str) -> dict:
        for row in self.store.experiments():
            if row["id"] == tenant_id or row["name"] == tenant_id:
                return row
        raise EngineError(f"no experiment {tenant_id!r} (see `clora-tui ls`)")

    def _stored(self, tenant_id: str) -> Tenant:
        row = self._stored_row(tenant_id)
        try:
            spec = parse_spec(row["spec"])
        except SpecError as exc:  # stored by an engine that accepted it; it failed at restore
            raise EngineError(f"{row['id']}: its stored spec is not valid for this engine ({exc})") from None
        return Tenant(id=row["id"], spec=spec, state=State(row["state"]), step=row["step"])

    def export(self, tenant_id: str, directory: str | Path) -> dict:
        """Write the tenant's adapter as a PEFT directory (live weights, or its last checkpoint)."""
        directory = Path(directory).expanduser().resolve()
        if directory.exists() and any(directory.iterdir()):
            raise EngineError(f"export: {directory} exists and is not empty")
        with self.lock:
            tenant = self.tenants.get(tenant_id) or self._stored(tenant_id)
            live = self.loaded is not None and tenant.id in self.loaded.trainer.optimizers
        try:
            if live:
                self.loaded.trainer.save_adapter(tenant.id, directory)
                step = tenant.step
            else:
                ckpt = latest_readable_checkpoint(self.checkpoint_root, tenant.id)
                if ckpt is None:
                    raise EngineError(f"export: {tenant.id} has no adapter in memory and no readable checkpoint")
                shutil.copytree(ckpt / "adapter", directory, dirs_exist_ok=True)
                step = checkpoint_step(ckpt)
        except OSError as exc:
            raise EngineError(f"export: cannot write {directory}: {exc}") from None
        return {"id": tenant.id, "path": str(directory), "step": step}

    # -- sampling for clients (the HTTP APIs) -------------------------------------------
    @property
    def base_model_id(self) -> str:
        """The base model's name in the APIs: its directory's name (`embedded` by default)."""
        return self.loaded.model_path.name if self.loaded is not None else str(self.config.model)

    def resolve_model(self, model: str) -> str:
        """The adapter that serves `model`: a live tenant's (by id or name), or BASE_ADAPTER.
        Raises UnknownModel or ModelNotReady with a message saying what to do."""
        if model == self.base_model_id or model in BASE_ALIASES:
            return BASE_ADAPTER
        with self.lock:
            try:
                tenant = self._tenant(model)
            except EngineError:
                raise UnknownModel(f"the model {model!r} does not exist: use the base model "
                                   f"{self.base_model_id!r} or a live experiment's id (see GET /v1/models)") from None
            if tenant.state in FINAL_STATES:
                raise UnknownModel(f"the model {model!r} is {tenant.id}, which is {tenant.state.value}: its adapter "
                                   "is no longer loaded (only live experiments can be sampled; export or clone it)")
            if self.loaded is None or tenant.adapter not in self.loaded.trainer.optimizers:
                raise ModelNotReady(f"{tenant.id} is {tenant.state.value} ({tenant.reason or 'no adapter yet'}): "
                                    "its adapter is not loaded yet; try again once it runs")
            return tenant.adapter

    def sample(self, model: str, requests: list) -> concurrent.futures.Future:
        """Sample `requests` (engine.rollout.base.SampleRequest) with the adapter `model` names
        (see resolve_model). The job joins the scheduler's shared batch in its next turn; the
        future resolves to one list of completions per request, or to SampleRefused."""
        if self.stopping.is_set():
            raise EngineError("the engine is stopping")
        if getattr(self, "scheduler", None) is None:
            raise EngineWarming(f"the engine is still warming up ({self.stage}); try again when it is ready")
        with self.lock:
            adapter = self.resolve_model(model)
            future = self.external.add(adapter, requests)
            self.wakeup.notify_all()
        return future

    def client_job(self, tenant_id: str, kind: str, payload) -> concurrent.futures.Future:
        """Queue work for a client tenant (engine.client_jobs); raises ClientJobError."""
        if self.stopping.is_set():
            raise ClientJobError("the engine is stopping", "server")
        with self.lock:
            tenant = self.tenants.get(tenant_id)
            if tenant is None or tenant.state in FINAL_STATES:
                state = tenant.state.value if tenant else "gone"
                raise ClientJobError(f"the training run {tenant_id} is {state}: it takes no more requests")
            future = self.client_jobs.add(tenant_id, kind, payload)
            self.wakeup.notify_all()
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            scheduler.scored.set()  # a cycle waiting on rewards takes it at once
        return future

    def models(self) -> list[dict]:
        """The base model and every live tenant, as the sampling APIs name them."""
        created = int(self.ready_at or self.created)
        rows = [{"id": self.base_model_id, "name": "base model", "state": "ready", "step": None,
                 "created": created, "adapter": None}]
        with self.lock:
            tenants = sorted((t for t in self.tenants.values() if t.state not in FINAL_STATES),
                             key=lambda t: (t.created, t.id))
            for t in tenants:
                rows.append({"id": t.id, "name": t.spec.name, "state": t.state.value, "step": t.step,
                             "created": int(t.created), "adapter": t.adapter})
        return rows

    # -- queries ----------------------------------------------------------------------
    def summary(self, tenant: Tenant) -> dict:
        last = self.store.steps(tenant.id, since=max(0, tenant.step - 1))
        last = last[-1] if last else {}
        evals = self.store.evals(tenant.id)
        adapter_bytes = self.adapter_bytes(tenant.id)
        return {
            "id": tenant.id, "name": tenant.spec.name, "state": tenant.state.value, "reason": tenant.reason,
            "error": tenant.error, "step": tenant.step, "steps": tenant.spec.steps, "task": tenant.spec.task,
            "rank": tenant.spec.lora.rank, "reward": last.get("reward_mean"), "accuracy": last.get("accuracy"),
            "eval_accuracy": evals[-1]["accuracy"] if evals else None, "step_s": last.get(TOTAL_S),
            "queue_s": last.get(QUEUE_S), "warmup_s": tenant.warmup_s, "phase": tenant.phase,
            "phase_since": tenant.phase_since, "adapter_bytes": adapter_bytes, "finished": tenant.finished,
            "turns": last.get("turns"),
        }

    def adapter_bytes(self, tenant_id: str) -> int:
        """Bytes of a tenant's adapter (weights + optimizer moments). The trainer's parameters are
        walked under its lock; while the trainer is busy (a step holds the lock for seconds) the
        value last read is reported instead of waiting."""
        loaded = self.loaded
        if loaded is None:
            return 0
        trainer = loaded.trainer
        lock = getattr(trainer, "lock", None)
        if lock is not None and not lock.acquire(blocking=False):
            return self.adapter_bytes_seen.get(tenant_id, 0)
        try:
            if tenant_id not in trainer.optimizers:
                self.adapter_bytes_seen.pop(tenant_id, None)
                return 0
            value = trainer.adapter_bytes(tenant_id)
        finally:
            if lock is not None:
                lock.release()
        self.adapter_bytes_seen[tenant_id] = value
        return value

    def list_tenants(self) -> list[dict]:
        with self.lock:
            live = {t.id: self.summary(t) for t in self.tenants.values()}
        rows = []
        for row in self.store.experiments():
            if row["id"] in live:
                rows.append(live[row["id"]])
                continue
            steps = self.store.steps(row["id"], since=max(0, row["step"] - 1))
            last = steps[-1] if steps else {}
            evals = self.store.evals(row["id"])
            rows.append({"id": row["id"], "name": row["name"], "state": row["state"], "reason": row["reason"] or "",
                         "error": row["error"] or "", "step": row["step"], "steps": row["spec"]["steps"],
                         "task": row["spec"]["task"], "rank": row["spec"]["lora"]["rank"],
                         "reward": last.get("reward_mean"), "accuracy": last.get("accuracy"),
                         "eval_accuracy": evals[-1]["accuracy"] if evals else None, "step_s": last.get(TOTAL_S),
                         "queue_s": last.get(QUEUE_S), "warmup_s": row["warmup_s"], "phase": row["state"],
                         "phase_since": row["finished"], "adapter_bytes": 0, "finished": row["finished"],
                         "turns": last.get("turns")})
        return rows

    def get(self, tenant_id: str) -> dict:
        with self.lock:
            tenant = self.tenants.get(tenant_id)
        if tenant is not None:
            tid, spec = tenant.id, tenant.spec.to_dict()
        else:  # not live: its spec as stored (even one this engine refuses, e.g. failed at restore)
            row = self._stored_row(tenant_id)
            tid, spec = row["id"], row["spec"]
        summary = next(r for r in self.list_tenants() if r["id"] == tid)
        return {**summary, "spec": spec, "history": self.store.steps(tid),
                "evals": self.store.evals(tid), "checkpoints": self.store.checkpoints(tid)}

    def history(self, tenant_id: str, since: int = 0) -> list[dict]:
        with self.lock:
            tenant = self.tenants.get(tenant_id)
        tid = tenant.id if tenant is not None else self._stored_row(tenant_id)["id"]
        return self.store.steps(tid, since=since)

    def status(self, system: dict | None = None, tenants: list[dict] | None = None) -> dict:
        counts = collections.Counter(t["state"] for t in (tenants if tenants is not None else self.list_tenants()))
        with self.lock:
            in_flight = sum(1 for t in self.tenants.values() if t.state in (State.WARMING, State.RUNNING))
        loaded = self.loaded
        return {
            "pid": os.getpid(), "home": str(self.home), "stage": self.stage,
            "model": str(loaded.model_path) if loaded else self.config.model,
            "backend": loaded.backend_name if loaded else self.config.backend,
            "device": str(loaded.device) if loaded else self.config.device,
            "dtype": str(loaded.dtype).replace("torch.", "") if loaded else self.config.dtype,
            "uptime_s": round(time.time() - self.created, 1), "cold_start_s": self.cold_start_s,
            "tenants": dict(counts), "slots_total": self.config.max_loras, "slots_used": in_flight,
            "slots_free": self.config.max_loras - in_flight, "max_lora_rank": self.config.max_lora_rank,
            "fused_train": getattr(getattr(self, "scheduler", None), "fused", None),
            "max_step_tokens": self.config.max_step_tokens,
            "system": system if system is not None else self.system_sample(),
        }

    def system_sample(self) -> dict:
        sample = {"time": time.time(), "process": self.process.sample(), "gpus": self.gpu.sample(),
                  "gpu_error": self.gpu.error}
        if self.loaded is not None:
            with self.lock:
                ids = [t.id for t in self.tenants.values() if t.id in self.loaded.trainer.optimizers]
            sample["adapter_bytes"] = {i: self.adapter_bytes(i) for i in ids}
        self.last_system = sample
        return sample
