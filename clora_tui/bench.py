"""Concurrent multi-LoRA throughput against running the same experiments one after another.

    clora-tui bench [--quick] [--n 1,2,4,8] [--steps S] [--fixed-length] [--reward-latency-ms MS]
                    [--baselines fresh,warm,trl] [--backend peft|vllm|all] [--json FILE] [--plot FILE.png]

For each N the first N experiments run concurrently on one engine. Baselines, doing the
same work with the same seeds:
  fresh  one after another, each on a freshly started single-tenant engine daemon (the
         cold start a single-tenant stack pays every time);
  warm   one after another on ONE warm engine (no cold starts: what is left is the gain
         of sharing batches and overlapping waits);
  trl    TRL's GRPOTrainer + PEFT, one after another in one Python process
         (`python -m clora_tui.trl_baseline`), what most users would run instead.
The work is realistic by default: completions stop at EOS (`--fixed-length`: always
max_tokens). `--reward-latency-ms` gives every experiment a reward that waits that long
per sample (I/O, not CPU), the same on every side. The floor of each step on this
machine (the same rows through a plain PEFT decode and a plain LoRA forward/backward,
`python -m engine.floor`) is measured in the same run; every step is reported against it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from clora_tui.bench_report import REFERENCE, format_table, plot
from clora_tui.client import EngineClient
from clora_tui.launcher import start_daemon, stop_daemon
from engine.protocol import DONE, FINAL_STATES, ROLLOUT_S, TIMING_PARTS, TOTAL_S

PHASES = TIMING_PARTS
MULTI_TURN_TASKS = {"retail"}  # TRL's GRPOTrainer has no multi-turn environments: no TRL baseline for these


@dataclass
class BenchConfig:
    model: str = "embedded"
    backend: str = "peft"
    ns: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    steps: int = 20
    tasks: list[str] = field(default_factory=lambda: ["arithmetic"])
    prompts_per_step: int = 8
    num_generations: int = 8
    max_tokens: int = 8
    fused_train: bool | None = None  # None: the engine's default
    fixed_length: bool = False  # ignore_eos: every sample is max_tokens long
    reward_latency_ms: float = 0.0  # a reward that waits this long per sample
    tool_latency_ms: float = 0.0  # multi-turn `retail`: every tool call waits this long (a remote tool)
    max_turns: int = 3  # multi-turn tasks: model turns per episode at most
    baselines: list[str] = field(default_factory=lambda: ["fresh", "warm", "trl"])
    reward_ref: str | None = None  # set by the bench when reward_latency_ms > 0


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def experiment_spec(i: int, cfg: BenchConfig) -> dict:
    spec = {
        "name": f"bench-{i}", "task": cfg.tasks[i % len(cfg.tasks)], "seed": i, "steps": cfg.steps,
        "eval_every": cfg.steps, "checkpoint_every": cfg.steps,
        "rollout": {"prompts_per_step": cfg.prompts_per_step, "num_generations": cfg.num_generations,
                    "max_tokens": cfg.max_tokens, "ignore_eos": cfg.fixed_length},
    }
    if spec["task"] in MULTI_TURN_TASKS:
        spec["rollout"]["max_turns"] = cfg.max_turns
        spec["rollout"]["max_tokens"] = max(cfg.max_tokens, 12)  # per turn: `cancel:17` + EOS is 10
        if cfg.tool_latency_ms:
            spec["task_args"] = {"tool_latency_ms": cfg.tool_latency_ms}
    if cfg.reward_ref:
        spec["reward"] = cfg.reward_ref
    return spec


LATENCY_REWARD = """\
# Written by clora-tui bench: correctness, after waiting like a remote judge would.
import time
from engine.tasks import make_task

_tasks = {{}}


def score(prompt, completion, answer, _task={task!r}):
    time.sleep({seconds!r})
    task = _tasks.setdefault(_task, make_task(_task, {{}}))
    return 1.0 if task.is_correct(completion, answer) else 0.0
"""


def write_latency_reward(directory: Path, cfg: BenchConfig) -> str:
    path = directory / "latency_reward.py"
    path.write_text(LATENCY_REWARD.format(task=cfg.tasks[0], seconds=cfg.reward_latency_ms / 1000))
    return f"{path}:score"


def vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _engine_cpu_s(pid: int) -> float:
    """CPU seconds of the engine process and its children (vLLM workers, reward workers)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        total = sum(proc.cpu_times()[:2])
        for child in proc.children(recursive=True):
            try:
                total += sum(child.cpu_times()[:2])
            except psutil.Error:
                pass
        return total
    except psutil.Error:
        return 0.0


def _wait_done(client: EngineClient, ids: list[str], label: str, total_steps: int, peaks: dict) -> dict:
    last_report = 0.0
    while True:
        system = client.call("status")["system"]
        peaks["rss"] = max(peaks["rss"], system["process"]["rss"])
        peaks["gpu"] = max(peaks["gpu"], sum(g.get("memory_used", 0) for g in system["gpus"]))
        rows = {r["id"]: r for r in client.call("list") if r["id"] in ids}
        if all(r["state"] in FINAL_STATES for r in rows.values()):
            return rows
        if time.time() - last_report > 10:
            log(f"{label}: {sum(r['step'] for r in rows.values())}/{total_steps} steps")
            last_report = time.time()
        time.sleep(0.1)


def run_engine(cfg: BenchConfig, backend: str, indices: list[int], label: str, sequential: bool = False) -> dict:
    """Start a fresh engine daemon, run these experiments to the end (concurrently, or one
    after another when `sequential`), stop it."""
    home = Path(tempfile.mkdtemp(prefix="clora-bench-", dir="/tmp"))
    extra = {None: [], True: ["--fused-train"], False: ["--serial-train"]}[cfg.fused_train]
    launched = time.time()
    slots = 1 if sequential else max(1, len(indices))
    try:
        start_daemon(home, model=cfg.model, backend=backend, max_loras=slots, say=lambda _message: None,
                     extra_args=extra)
        cold = time.time() - launched  # process start -> ready, as a single-tenant stack pays it
        peaks = {"rss": 0, "gpu": 0}
        with EngineClient(home, timeout=120).connect() as client:
            pid = client.call("status")["pid"]
            cpu0 = _engine_cpu_s(pid)
            submitted = time.time()
            ids, walls = [], []
            if sequential:
                for i in indices:
                    t0 = time.time()
                    ids.append(client.call("start", spec=experiment_spec(i, cfg))["id"])
                    rows = _wait_done(client, ids[-1:], f"{label} {len(ids)}/{len(indices)}", cfg.steps, peaks)
                    walls.append(rows[ids[-1]]["finished"] - t0)
            else:
                ids = [client.call("start", spec=experiment_spec(i, cfg))["id"] for i in indices]
                _wait_done(client, ids, label, cfg.steps * len(ids), peaks)
            details = {t: client.call("get", id=t) for t in ids}
            wall = max(d["finished"] for d in details.values()) - submitted
            cpu_s = _engine_cpu_s(pid) - cpu0
    finally:
        try:
            stop_daemon(home, say=lambda _message: None)
        finally:
            shutil.rmtree(home, ignore_errors=True)
    failed = [f"{t}: {d['error']}" for t, d in details.items() if d["state"] != DONE]
    if failed:
        raise RuntimeError(f"{label}: experiments failed: {failed}")
    steps = [r for t in ids for r in details[t]["history"]]
    return {
        "cold_start_s": cold, "wall_s": wall, "experiment_wall_s": walls or None,
        "finish_s": [details[t]["finished"] - submitted for t in ids],
        "steps_done": [len(details[t]["history"]) for t in ids],
        "step_s": statistics.fmean(r[TOTAL_S] for r in steps),
        "phases": {p: statistics.fmean(r[p] for r in steps) for p in PHASES},
        "completion_tokens": sum(r["completion_tokens"] for r in steps),
        "tokens_per_experiment": [sum(r["completion_tokens"] for r in details[t]["history"]) for t in ids],
        "cpu_s": cpu_s,
        "warmup_s": statistics.fmean(details[t]["warmup_s"] for t in ids), "peak_rss": peaks["rss"],
        "peak_gpu": peaks["gpu"],
        "accuracy": [{"first": details[t]["evals"][0]["accuracy"], "final": details[t]["evals"][-1]["accuracy"]}
                     for t in ids],
    }


def summarise(n: int, concurrent: dict, baselines: dict, rows_per_step: int) -> dict:
    """One row of the table: N experiments concurrently against each baseline."""
    wall, cold = concurrent["wall_s"], concurrent["cold_start_s"]
    row = {
        "n": n, "wall_s": wall, "engine_cold_start_s": cold, "final_experiment_time_s": cold + wall,
        "mean_experiment_time_s": statistics.fmean(cold + f for f in concurrent["finish_s"]),
        "mean_step_s": concurrent["step_s"], "step_breakdown_s": concurrent["phases"],
        "rollout_s": concurrent["phases"][ROLLOUT_S], "warmup_s": concurrent["warmup_s"],
        "completion_tokens": concurrent["completion_tokens"],
        "tokens_per_s": concurrent["completion_tokens"] / wall,
        "cpu_cores_used": concurrent["cpu_s"] / wall,
        "peak_rss_bytes": concurrent["peak_rss"], "peak_gpu_bytes": concurrent["peak_gpu"],
        "accuracy": concurrent["accuracy"], "steps_done": concurrent["steps_done"],
        "rows_per_step": rows_per_step * n,
    }
    fresh = baselines.get("fresh")
    if fresh:
        base = fresh[:n]
        row["gain_vs_fresh"] = sum(s["cold_start_s"] + s["wall_s"] for s in base) / (cold + wall)
        clock, finish = 0.0, []
        for s in base:
            clock += s["cold_start_s"] + s["wall_s"]
            finish.append(clock)
        row["baseline_mean_experiment_time_s"] = statistics.fmean(finish)
        row["mean_experiment_time_gain"] = statistics.fmean(finish) / row["mean_experiment_time_s"]
        row["baseline_final_experiment_time_s"] = clock
        row["baseline_mean_step_s"] = statistics.fmean(s["step_s"] for s in base)
        row["baseline_completion_tokens"] = sum(s["completion_tokens"] for s in base)
        row["baseline_accuracy"] = [s["accuracy"][0] for s in base]
    warm = baselines.get("warm")
    if warm:
        walls = warm["experiment_wall_s"][:n]
        row["gain_vs_warm"] = sum(walls) / wall
        row["warm_completion_tokens"] = sum(warm["tokens_per_experiment"][:n])
    trl = baselines.get("trl")
    if trl:
        per = trl["per_experiment_s"][:n]
        row["gain_vs_trl"] = (trl["load_s"] + sum(per)) / (cold + wall)
        row["gain_vs_trl_without_startup"] = sum(per) / wall
    return row


def measure_floors(cfg: BenchConfig, rows: list[int], completion_tokens: int) -> dict:
    """The floor (python -m engine.floor) for these batch sizes, in a process of its own."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "floor.json"
        # Multi-turn steps: the floor is one turn of the same rows and tokens per row (arithmetic prompts).
        task = "arithmetic" if cfg.tasks[0] in MULTI_TURN_TASKS else cfg.tasks[0]
        cmd = [sys.executable, "-m", "engine.floor", "--rows", ",".join(map(str, rows)), "--completion-tokens",
               str(completion_tokens), "--task", task, "--model", cfg.model, "--json", str(out)]
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=1800)
        return {int(k): v for k, v in json.loads(out.read_text()).items()}


def run_trl(cfg: BenchConfig, n: int) -> dict | None:
    """TRL's GRPOTrainer + PEFT on the same experiments, one after another in one process."""
    import importlib.util

    if importlib.util.find_spec("trl") is None:
        log("trl is not installed (pip install -e '.[bench]'): no TRL baseline")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "trl.json"
        cmd = [sys.executable, "-m", "clora_tui.trl_baseline", "--n", str(n), "--steps", str(cfg.steps),
               "--prompts-per-step", str(cfg.prompts_per_step), "--num-generations", str(cfg.num_generations),
               "--max-tokens", str(cfg.max_tokens), "--model", cfg.model, "--json", str(out)]
        if cfg.fixed_length:
            cmd.append("--fixed-length")
        if cfg.reward_latency_ms:
            cmd += ["--reward-latency-ms", str(cfg.reward_latency_ms)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"TRL baseline failed: {proc.stderr[-2000:]}")
        return json.loads(out.read_text())


def run_backend(cfg: BenchConfig, backend: str) -> dict:
    top = max(cfg.ns)
    # One unmeasured run first: the process's one-time costs (lazy imports, allocator and
    # kernel warm-up) would otherwise land on whichever arm happens to run first.
    log(f"{backend}: warm-up run (not measured)")
    run_engine(replace(cfg, steps=2), backend, [0], f"{backend} warm-up")
    baselines: dict = {}
    if "fresh" in cfg.baselines:
        baselines["fresh"] = []
        for i in range(top):
            log(f"{backend}: baseline experiment {i + 1}/{top} on a fresh single-tenant engine")
            baselines["fresh"].append(run_engine(cfg, backend, [i], f"{backend} fresh {i + 1}/{top}"))
    if "warm" in cfg.baselines:
        log(f"{backend}: {top} experiments one after another on one warm engine")
        baselines["warm"] = run_engine(cfg, backend, list(range(top)), f"{backend} warm sequential", sequential=True)
    if "trl" in cfg.baselines:
        log(f"TRL GRPOTrainer + PEFT: {top} experiments one after another in one process")
        baselines["trl"] = run_trl(cfg, top)
    rows, runs = [], {}
    per_step = cfg.prompts_per_step * cfg.num_generations
    for n in cfg.ns:
        log(f"{backend}: {n} experiment(s) concurrently on one engine")
        runs[n] = run_engine(cfg, backend, list(range(n)), f"{backend} N={n}")
        rows.append(summarise(n, runs[n], baselines, per_step))
    # The floor: the same rows, as long as the completions were on average.
    mean_tokens = max(1, round(statistics.fmean(r["completion_tokens"] / (r["rows_per_step"] * cfg.steps) for r in rows)))
    log(f"floor: plain PEFT decode ({mean_tokens} tokens) + LoRA forward/backward for the same rows")
    floors = measure_floors(cfg, sorted({r["rows_per_step"] for r in rows}), mean_tokens)
    by_n = {r["n"]: r for r in rows}
    n1 = by_n.get(1)
    for r in rows:
        floor = floors[r["rows_per_step"]]
        r["floor_s"], r["floor_decode_s"], r["floor_train_s"] = floor["floor_s"], floor["decode_s"], floor["train_s"]
        r["step_vs_floor"] = r["mean_step_s"] / floor["floor_s"]
        r["step_time_ratio_vs_n1"] = r["mean_step_s"] / n1["mean_step_s"] if n1 else None
        r["rollout_overhead_vs_n1"] = r["rollout_s"] / n1["rollout_s"] - 1 if n1 else None
        r["floor_ratio_vs_n1"] = floor["floor_s"] / floors[n1["rows_per_step"]]["floor_s"] if n1 else None
        r["floor_rollout_overhead_vs_n1"] = (floor["decode_s"] / floors[n1["rows_per_step"]]["decode_s"] - 1
                                             if n1 else None)
    trl = baselines.get("trl")
    trl_step = statistics.fmean(trl["per_experiment_s"]) / cfg.steps if trl else None
    # One experiment alone on its own engine: the N=1 run and every fresh baseline run are
    # exactly that; their mean is steadier than the one N=1 run on a noisy machine.
    alone = [s["step_s"] for s in baselines.get("fresh", [])] + ([n1["mean_step_s"]] if n1 else [])
    single_step = statistics.fmean(alone) if alone else None
    return {"backend": backend, "rows": rows, "floor_completion_tokens": mean_tokens,
            "baseline_runs": baselines.get("fresh", []), "warm_sequential": baselines.get("warm"),
            "trl": trl, "trl_step_s": trl_step,
            "single_tenant_step_s": single_step,
            "single_tenant_step_vs_trl": (single_step / trl_step) if (trl_step and single_step) else None}


def parse_args(argv=None) -> tuple[BenchConfig, list[str], argparse.Namespace]:
    p = argparse.ArgumentParser(prog="clora-tui bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="N=1,2,4, 4 short steps, no TRL: a smoke run")
    p.add_argument("--model", default="embedded", help="embedded, a local HF directory, or random:SIZE (e.g. random:30M)")
    p.add_argument("--backend", default="peft", help="peft, vllm, or all (every installed backend)")
    p.add_argument("--n", default=None, help="comma-separated N values (default 1,2,4,8)")
    p.add_argument("--steps", type=int, default=None, help="steps per experiment (default 20)")
    p.add_argument("--tasks", default="arithmetic", help="comma-separated tasks, assigned round-robin")
    p.add_argument("--prompts-per-step", type=int, default=None)
    p.add_argument("--num-generations", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--fixed-length", action="store_true", help="ignore EOS: every sample is max_tokens long")
    p.add_argument("--reward-latency-ms", type=float, default=0.0,
                   help="every experiment's reward waits this long per sample (as a remote judge would)")
    p.add_argument("--tool-latency-ms", type=float, default=0.0,
                   help="retail: every tool call waits this long, like a remote tool (default 0)")
    p.add_argument("--baselines", default=None, help="comma-separated: fresh, warm, trl (default all three)")
    train = p.add_mutually_exclusive_group()
    train.add_argument("--fused-train", dest="fused_train", action="store_const", const=True, default=None,
                       help="fused multi-tenant training passes (the default)")
    train.add_argument("--serial-train", dest="fused_train", action="store_const", const=False,
                       help="train ready tenants one at a time")
    p.add_argument("--json", type=Path, help="write every number to this file")
    p.add_argument("--plot", type=Path, help="draw throughput gains and step time against N (PNG)")
    args = p.parse_args(argv)
    cfg = BenchConfig(model=args.model, tasks=args.tasks.split(","), fused_train=args.fused_train,
                      fixed_length=args.fixed_length, reward_latency_ms=args.reward_latency_ms,
                      tool_latency_ms=args.tool_latency_ms)
    if args.quick:
        cfg.ns, cfg.steps, cfg.prompts_per_step, cfg.num_generations = [1, 2, 4], 4, 4, 4
        cfg.baselines = ["fresh", "warm"]
    if args.baselines:
        cfg.baselines = [b for b in args.baselines.split(",") if b]
        unknown = set(cfg.baselines) - {"fresh", "warm", "trl"}
        if unknown:
            p.error(f"--baselines: unknown {sorted(unknown)}; use fresh, warm, trl")
    if args.n:
        cfg.ns = sorted({int(x) for x in args.n.split(",")})
    for name in ("steps", "prompts_per_step", "num_generations", "max_tokens"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.backend == "all":
        backends = ["peft"] + (["vllm"] if vllm_installed() else [])
    elif args.backend in ("peft", "vllm"):
        backends = [args.backend]
    else:
        p.error(f"--backend {args.backend!r}: use peft, vllm or all")
    if min(cfg.ns) < 1 or cfg.steps < 1:
        p.error("--n values and --steps must be >= 1")
    if cfg.reward_latency_ms < 0 or cfg.tool_latency_ms < 0:
        p.error("--reward-latency-ms and --tool-latency-ms must be >= 0")
    if set(cfg.tasks) & MULTI_TURN_TASKS and "trl" in cfg.baselines:
        cfg.baselines = [b for b in cfg.baselines if b != "trl"]
        log("TRL baseline left out: GRPOTrainer runs no multi-turn environments")
    return cfg, backends, args


def main(argv=None) -> int:
    cfg, backends, args = parse_args(argv)
    started = time.time()
    results = []
    with tempfile.TemporaryDirectory(prefix="clora-bench-reward-") as scratch:
        if cfg.reward_latency_ms > 0:
            cfg.reward_ref = write_latency_reward(Path(scratch), cfg)
        for backend in backends:
            result = run_backend(cfg, backend)
            results.append(result)
            print(format_table(result), flush=True)
    report = {"config": asdict(cfg), "reference": REFERENCE, "results": results,
              "seconds": round(time.time() - started, 1)}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        log(f"wrote {args.json}")
    if args.plot:
        plot(results, args.plot)
        log(f"wrote {args.plot}")
    log(f"finished in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
