"""The Engine: one warm base model, many tenants; the public face the daemon serves.

Commands (pause, resume, kill) are queued and applied by the scheduler thread at the
next phase boundary, so the trainer and the inference backend are only ever touched
from that one thread. `submit` validates synchronously and refuses bad specs at once.
"""

from __future__ import annotations

import collections
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from engine.checkpoint import latest_checkpoint
from engine.config import EngineConfig, ExperimentSpec, SpecError, parse_spec
from engine.events import EventBus
from engine.store import Store
from engine.tasks import TaskError
from engine.telemetry import GpuProbe, ProcessProbe
from engine.tenant import FINAL_STATES, State, Tenant


class EngineError(ValueError):
    """A request the engine refuses; the message says why."""


def default_home() -> Path:
    return Path(os.environ.get("CLORA_HOME", "~/.clora")).expanduser()


class Engine:
    def __init__(self, config: EngineConfig, home: Path | None = None):
        self.config = config
        self.home = Path(home or default_home())
        self.home.mkdir(parents=True, exist_ok=True)
        self.checkpoint_root = self.home / "checkpoints"
        self.store = Store(self.home / "clora.db")
        self.events = EventBus(self.store)
        self.tenants: dict[str, Tenant] = {}
        self.lock = threading.RLock()
        self.wakeup = threading.Condition(self.lock)
        self.commands: collections.deque = collections.deque()
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

    # -- lifecycle ------------------------------------------------------------------
    def set_stage(self, stage: str) -> None:
        self.stage = stage
        self.events.emit("engine", None, stage=stage, elapsed_s=round(time.time() - self.created, 2))

    def warm_up(self) -> None:
        """Load model and backend, restore tenants from the store, start the scheduler."""
        from engine.loading import configure_cpu_threads, load_everything
        from engine.scheduler import Scheduler

        configure_cpu_threads()
        self.loaded = load_everything(self.config, self.set_stage)
        self.set_stage("restoring experiments")
        self._restore_tenants()
        self.cold_start_s = round(time.time() - self.created, 3)
        self.ready_at = time.time()
        self.store.set_meta("last_cold_start_s", self.cold_start_s)
        self.scheduler = Scheduler(self)
        self.thread = threading.Thread(target=self.scheduler.run, name="scheduler", daemon=True)
        self.thread.start()
        self.set_stage("ready")
        self.log(f"engine ready in {self.cold_start_s:.1f} s: model {self.loaded.model_path.name}, "
                 f"backend {self.loaded.backend_name}, device {self.loaded.device}")

    def _restore_tenants(self) -> None:
        """Bring back every unfinished tenant: running ones resume from their last checkpoint."""
        for row in self.store.experiments():
            state = State(row["state"])
            if state in FINAL_STATES:
                continue
            try:
                spec = parse_spec(row["spec"])
                tenant = Tenant(id=row["id"], spec=spec, created=row["created"])
                tenant.load_task()
            except (SpecError, TaskError) as exc:
                self.store.update_experiment(row["id"], state=State.FAILED.value, error=f"cannot restore: {exc}")
                continue
            # A checkpoint is written just before its step is recorded: one newer than the last
            # recorded step describes work nobody heard of; drop it and use the one before.
            recorded = max((r["step"] for r in self.store.steps(tenant.id)), default=0)
            ckpt = latest_checkpoint(self.checkpoint_root, tenant.id)
            while ckpt is not None and int(ckpt.name.split("-")[1]) > recorded:
                shutil.rmtree(ckpt, ignore_errors=True)
                self.store.drop_checkpoint(tenant.id, int(ckpt.name.split("-")[1]))
                ckpt = latest_checkpoint(self.checkpoint_root, tenant.id)
            ckpt_step = int(ckpt.name.split("-")[1]) if ckpt else 0
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

    def shutdown(self, checkpoint: bool = True) -> None:
        """Stop the loop, checkpoint every tenant holding an adapter, release the backend."""
        self.stopping.set()
        with self.wakeup:
            self.wakeup.notify_all()
        if self.thread and self.thread is not threading.current_thread():
            self.thread.join(timeout=600)
        if checkpoint and self.loaded is not None and hasattr(self, "scheduler"):
            self.scheduler.checkpoint_all()
        self.log("engine stopped")
        if self.loaded is not None:
            self.loaded.backend.close()
        self.store.close()

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
        probe.load_task()  # raises TaskError for unknown tasks / reward modules
        return spec

    def submit(self, spec: ExperimentSpec | dict) -> dict:
        try:
            spec = self.validate(spec)
        except (SpecError, TaskError) as exc:
            raise EngineError(str(exc)) from None
        with self.lock:
            number = self.store.next_tenant_number()
            tenant = Tenant(id=f"e{number}", spec=spec, reason="waiting for an adapter slot")
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

    def _stored(self, tenant_id: str) -> Tenant:
        for row in self.store.experiments():
            if row["id"] == tenant_id or row["name"] == tenant_id:
                return Tenant(id=row["id"], spec=parse_spec(row["spec"]), state=State(row["state"]), step=row["step"])
        raise EngineError(f"no experiment {tenant_id!r} (see `clora-tui ls`)")

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
                ckpt = latest_checkpoint(self.checkpoint_root, tenant.id)
                if ckpt is None:
                    raise EngineError(f"export: {tenant.id} has no adapter in memory and no checkpoint")
                shutil.copytree(ckpt / "adapter", directory, dirs_exist_ok=True)
                step = int(ckpt.name.split("-")[1])
        except OSError as exc:
            raise EngineError(f"export: cannot write {directory}: {exc}") from None
        return {"id": tenant.id, "path": str(directory), "step": step}

    # -- queries ----------------------------------------------------------------------
    def summary(self, tenant: Tenant) -> dict:
        last = self.store.steps(tenant.id, since=max(0, tenant.step - 1))
        last = last[-1] if last else {}
        evals = self.store.evals(tenant.id)
        adapter_bytes = 0
        if self.loaded is not None and tenant.id in self.loaded.trainer.optimizers:
            adapter_bytes = self.loaded.trainer.adapter_bytes(tenant.id)
        return {
            "id": tenant.id, "name": tenant.spec.name, "state": tenant.state.value, "reason": tenant.reason,
            "error": tenant.error, "step": tenant.step, "steps": tenant.spec.steps, "task": tenant.spec.task,
            "rank": tenant.spec.lora.rank, "reward": last.get("reward_mean"), "accuracy": last.get("accuracy"),
            "eval_accuracy": evals[-1]["accuracy"] if evals else None, "step_s": last.get("total_s"),
            "queue_s": last.get("queue_s"), "warmup_s": tenant.warmup_s, "phase": tenant.phase,
            "phase_since": tenant.phase_since, "adapter_bytes": adapter_bytes, "finished": tenant.finished,
        }

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
                         "eval_accuracy": evals[-1]["accuracy"] if evals else None, "step_s": last.get("total_s"),
                         "queue_s": last.get("queue_s"), "warmup_s": row["warmup_s"], "phase": row["state"],
                         "phase_since": row["finished"], "adapter_bytes": 0, "finished": row["finished"]})
        return rows

    def get(self, tenant_id: str) -> dict:
        with self.lock:
            tenant = self.tenants.get(tenant_id) or self._stored(tenant_id)
        summary = next(r for r in self.list_tenants() if r["id"] == tenant.id)
        return {**summary, "spec": tenant.spec.to_dict(), "history": self.store.steps(tenant.id),
                "evals": self.store.evals(tenant.id), "checkpoints": self.store.checkpoints(tenant.id)}

    def history(self, tenant_id: str, since: int = 0) -> list[dict]:
        with self.lock:
            tenant = self.tenants.get(tenant_id) or self._stored(tenant_id)
        return self.store.steps(tenant.id, since=since)

    def status(self) -> dict:
        counts = collections.Counter(t["state"] for t in self.list_tenants())
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
            "system": self.system_sample(),
        }

    def system_sample(self) -> dict:
        sample = {"time": time.time(), "process": self.process.sample(), "gpus": self.gpu.sample(),
                  "gpu_error": self.gpu.error}
        if self.loaded is not None:
            with self.lock:
                ids = [t.id for t in self.tenants.values() if t.id in self.loaded.trainer.optimizers]
            sample["adapter_bytes"] = {i: self.loaded.trainer.adapter_bytes(i) for i in ids}
        self.last_system = sample
        return sample
