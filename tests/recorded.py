"""A deterministic recording of an engine with six tenants in every state, for screenshots.

Shaped exactly like the engine's `subscribe` answer (status, tenants with spec, history
and evals, log events). `python tests/recorded.py` writes tests/data/fleet.json, which
`python -m clora_tui.app --replay tests/data/fleet.json` opens without any engine.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

CLOCK = 1_767_225_600.0  # 2026-01-01 00:00:00 UTC: a fixed "now" so nothing on screen moves

TENANTS = [
    # id, name, state, step, steps, rank, lr, task, reason
    ("e1", "add-r8-lr2e-3", "running", 18, 40, 8, 2e-3, "arithmetic", ""),
    ("e2", "add-r16-lr1e-3", "running", 12, 40, 16, 1e-3, "arithmetic", ""),
    ("e3", "sort-r8", "paused", 9, 30, 8, 2e-3, "sort", "paused by request"),
    ("e4", "reverse-r4", "done", 20, 20, 4, 3e-3, "reverse", "finished"),
    ("e5", "add-r32-lr5e-4", "queued", 0, 40, 32, 5e-4, "arithmetic", "waiting for an adapter slot (4 in use, #1 in line)"),
    ("e6", "sort-bad-reward", "failed", 3, 30, 8, 2e-3, "sort", "failed in reward"),
]


OFF_POLICY = {"e2"}  # samples one step ahead of its updates (rollout.off_policy_steps = 1)


def spec(name, steps, rank, lr, task, off_policy=False):
    return {"name": name, "task": task, "task_args": {}, "reward": None, "reward_timeout_s": 30.0, "steps": steps,
            "seed": 0, "priority": 2.0 if off_policy else 1.0, "checkpoint_every": 5, "eval_every": 5,
            "lora": {"rank": rank, "alpha": 2.0 * rank, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
            "optim": {"lr": lr, "betas": [0.9, 0.99], "weight_decay": 0.0, "grad_clip": 1.0},
            "rollout": {"prompts_per_step": 8, "num_generations": 8, "max_tokens": 8, "temperature": 1.0, "top_p": 1.0,
                        "ignore_eos": False, "off_policy_steps": 1 if off_policy else 0},
            "grpo": {"epsilon": 0.2, "epsilon_high": None, "beta": 0.0, "loss_type": "dapo", "scale_rewards": True,
                     "iterations": 1}}


def history(rng, steps, start_acc, slope, t_end, off_policy=False):
    rows, t = [], t_end - steps * 4.0
    for s in range(1, steps + 1):
        acc = max(0.0, min(1.0, start_acc + slope * (1 - math.exp(-s / 8)) + rng.uniform(-0.06, 0.06)))
        queue, rollout = rng.uniform(0.2, 1.4), rng.uniform(1.2, 1.8)
        reward, train, sync = rng.uniform(0.01, 0.04), rng.uniform(0.6, 0.9), rng.uniform(0.02, 0.06)
        ckpt = 0.25 if s % 5 == 0 else 0.0
        total = queue + rollout + reward + train + sync + ckpt
        t += total
        rows.append({"step": s, "time": round(t, 3), "reward_mean": round(acc, 4), "reward_std": round(rng.uniform(0.3, 0.5), 4),
                     "reward_min": 0.0, "reward_max": 1.0, "accuracy": round(acc, 4), "loss": round(rng.uniform(-0.05, 0.05), 5),
                     "kl": 0.0, "grad_norm": round(rng.uniform(0.2, 0.9), 4), "entropy": round(rng.uniform(0.8, 1.2), 4),
                     "clip_fraction": 0.0, "logprob_diff": round(rng.uniform(0, 1e-4), 7), "completion_tokens": 256,
                     "queue_s": round(queue, 4), "rollout_s": round(rollout, 4), "reward_s": round(reward, 4),
                     "train_s": round(train, 4), "sync_s": round(sync, 4), "checkpoint_s": ckpt, "total_s": round(total, 4),
                     "staleness": 1 if off_policy and s > 1 else 0})  # step 1 has no update to run ahead of
    return rows


def recording() -> dict:
    rng = random.Random(7)
    tenants = []
    for i, (tid, name, state, step, steps, rank, lr, task, reason) in enumerate(TENANTS):
        hist = history(rng, step, 0.25 + 0.05 * i, 0.45 - 0.05 * i, CLOCK - 2.0, off_policy=tid in OFF_POLICY)
        evals = [{"step": s, "accuracy": round(min(1.0, 0.2 + 0.02 * s + 0.03 * i), 4)} for s in range(0, step + 1, 5)]
        last = hist[-1] if hist else {}
        live = state in ("running", "paused")
        tenants.append({
            "id": tid, "name": name, "state": state, "reason": reason,
            "error": "reward: ValueError: reward function returned NaN" if state == "failed" else "",
            "step": step, "steps": steps, "task": task, "rank": rank, "reward": last.get("reward_mean"),
            "accuracy": last.get("accuracy"), "eval_accuracy": evals[-1]["accuracy"] if evals else None,
            "step_s": last.get("total_s"), "queue_s": last.get("queue_s"),
            "warmup_s": None if state == "queued" else round(0.8 + 0.4 * i, 3),
            "phase": {"running": "train" if tid == "e1" else "rollout"}.get(state, state),
            "phase_since": CLOCK - 1.5 if state == "running" else CLOCK - 30.0,
            "adapter_bytes": rank * 4 * 2 * 64 * 256 * 4 if live else 0,
            "spec": spec(name, steps, rank, lr, task, off_policy=tid in OFF_POLICY), "history": hist, "evals": evals, "checkpoints": [],
        })
    system = {"time": CLOCK, "process": {"cpu_percent": 187.5, "rss": 1_288_490_188, "peak_rss": 1_395_864_371, "processes": 1},
              "gpus": [], "gpu_error": "no NVIDIA GPU",
              "adapter_bytes": {t["id"]: t["adapter_bytes"] for t in tenants if t["adapter_bytes"]}}
    status = {"pid": 4242, "home": "/tmp/clora-demo", "stage": "ready", "ready": True, "failed": None,
              "model": "/opt/clora/engine/models/embedded", "backend": "peft", "device": "cpu", "dtype": "float32",
              "uptime_s": 512.0, "cold_start_s": 6.4, "tenants": {}, "slots_total": 4, "slots_used": 2, "slots_free": 2,
              "max_lora_rank": 64, "system": system}
    log = []
    lines = [(None, "info", "engine ready in 6.4 s: model embedded, backend peft, device cpu"),
             ("e4", "info", "e4 done after 20 steps"),
             ("e6", "error", "e6 failed in reward: ValueError: reward function returned NaN"),
             ("e3", "info", "e3 paused by request"),
             ("e5", "info", "e5 waiting for an adapter slot (4 in use, #1 in line)")]
    for n, (tid, level, message) in enumerate(lines):
        log.append({"seq": n + 1, "time": CLOCK - 60 + 10 * n, "kind": "log", "tenant": tid,
                    "data": {"level": level, "message": message}})
    return {"clock": CLOCK, "seq": 100, "snapshot": {"status": status, "tenants": tenants, "log": log}, "events": []}


if __name__ == "__main__":
    out = Path(__file__).parent / "data" / "fleet.json"
    out.write_text(json.dumps(recording(), indent=1))
    print(out)
