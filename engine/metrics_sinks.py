"""Every tenant's metrics out of the engine: TensorBoard event files under CLORA_HOME/tb/<id>
(on by default, `tensorboard --logdir ~/.clora/tb`; CLORA_TENSORBOARD=0 turns it off) and,
when `wandb` is installed and CLORA_WANDB is `offline` or `online`, one W&B run per tenant.

A thread of its own follows the event stream (steps, evals, states), so a slow writer or a
W&B sync never holds up the scheduler; a sink that fails is logged once and turned off.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from engine import protocol

SCALARS = {  # step field -> TensorBoard tag
    "reward_mean": "reward/mean", "reward_std": "reward/std", "accuracy": "reward/accuracy",
    "loss": "train/loss", "kl": "train/kl", "grad_norm": "train/grad_norm", "entropy": "train/entropy",
    "clip_fraction": "train/clip_fraction", "logprob_diff": "train/logprob_diff",
    "completion_tokens": "rollout/completion_tokens", protocol.STALENESS: "rollout/staleness",
    **{name: f"time/{name}" for name in (*protocol.TIMING_PARTS, protocol.TOTAL_S)},
}


class MetricsSinks:
    def __init__(self, engine):
        self.engine = engine
        self.root = Path(engine.home) / "tb"
        self.tensorboard = os.environ.get("CLORA_TENSORBOARD", "1").lower() not in ("0", "false", "off", "no")
        self.wandb_mode = os.environ.get("CLORA_WANDB", "").lower() or None
        self.writers: dict = {}
        self.runs: dict = {}
        self.thread: threading.Thread | None = None
        self.sub = None

    def start(self) -> None:
        if not self.tensorboard and not self.wandb_mode:
            return
        _, _, self.sub = self.engine.events.snapshot_then_follow(lambda: None)
        self.thread = threading.Thread(target=self._follow, name="metrics-sinks", daemon=True)
        self.thread.start()

    def _follow(self) -> None:
        while not self.engine.stopping.is_set():
            event = self.sub.get(timeout=0.5)
            if event is not None:
                self.handle(event)
        while (event := self.sub.get(timeout=0)) is not None:  # what came before the stop
            self.handle(event)

    def handle(self, event: dict) -> None:
        tenant, data, kind = event.get("tenant"), event["data"], event["kind"]
        if tenant is None:
            return
        if kind == "step":
            values = {tag: data[field] for field, tag in SCALARS.items() if isinstance(data.get(field), (int, float))}
            self._write(tenant, values, int(data["step"]))
        elif kind == "eval" and data.get("accuracy") is not None:
            self._write(tenant, {"eval/accuracy": data["accuracy"]}, int(data.get("step") or 0))
        elif kind == "state" and data.get("state") in protocol.FINAL_STATES:
            self._close(tenant)

    def _write(self, tenant: str, values: dict, step: int) -> None:
        if self.tensorboard:
            try:
                writer = self.writers.get(tenant)
                if writer is None:
                    from tensorboardX import SummaryWriter

                    writer = self.writers[tenant] = SummaryWriter(logdir=str(self.root / tenant), flush_secs=5)
                for tag, value in values.items():
                    writer.add_scalar(tag, value, step)
            except Exception as exc:  # noqa: BLE001 - a full disk, a missing package: metrics stop, work goes on
                self.tensorboard = False
                self.engine.log(f"TensorBoard logging off: {type(exc).__name__}: {exc}", level="warning")
        if self.wandb_mode:
            try:
                run = self.runs.get(tenant)
                if run is None:
                    run = self.runs[tenant] = self._wandb_run(tenant)
                run.log(values, step=step)
            except Exception as exc:  # noqa: BLE001
                self.wandb_mode = None
                self.engine.log(f"W&B logging off: {type(exc).__name__}: {exc}", level="warning")

    def _wandb_run(self, tenant: str):
        import wandb

        live = self.engine.tenants.get(tenant)
        name = live.spec.name if live is not None else tenant
        config = live.spec.to_dict() if live is not None else {}
        return wandb.init(project=os.environ.get("WANDB_PROJECT", "clora-tui"), name=f"{tenant}-{name}",
                          dir=str(self.engine.home), mode=self.wandb_mode, config=config, reinit="create_new")

    def _close(self, tenant: str) -> None:
        writer, run = self.writers.pop(tenant, None), self.runs.pop(tenant, None)
        for close in ((writer.close if writer else None), (run.finish if run else None)):
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001
                    pass

    def close(self) -> None:
        if self.thread is not None:
            self.thread.join(timeout=10)
        if self.sub is not None:
            self.engine.events.unsubscribe(self.sub)
        for tenant in list(self.writers) + list(self.runs):
            self._close(tenant)
