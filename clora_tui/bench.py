"""Concurrent multi-LoRA throughput against one-experiment-at-a-time, on this machine.

    clora-tui bench [--quick] [--n 1,2,4,8] [--steps S] [--model M] [--backend peft|vllm|all]
                           [--tasks arithmetic,sort] [--json FILE] [--plot FILE.png]

For each N: the first N experiments run concurrently on one engine, against the
baseline of the same N experiments run one after another, each on a freshly started
single-tenant engine (max_loras=1) -- the same code doing the same work. Every engine
is a real daemon process started from scratch, so its cold start is what a user waits
for (process start, imports, model load, inference engine start). Completion
lengths are fixed (`ignore_eos`), so every run samples the same number of tokens.
The baseline's single-tenant runs are shared between N values: experiment i is the
same spec (seed i) whatever N is.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from clora_tui.client import EngineClient
from clora_tui.launcher import start_daemon, stop_daemon

FINAL_STATES = {"done", "killed", "failed"}

REFERENCE = {  # SkyRL concurrent multi-LoRA, one H200, Qwen3-4B-Instruct, GSM8K
    "throughput_gain_n8": 2.81, "best_mean_experiment_time_gain": (1.88, 4), "step_time_n1_s": 191,
    "step_time_n8_s": 500, "rollout_n1_s": 162, "rollout_n8_s": 401, "rollout_overhead_n2": 0.15,
    "final_experiment_time_n8_s": 5433,
}
PHASES = ("queue_s", "rollout_s", "reward_s", "train_s", "sync_s", "checkpoint_s")


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
    fused_train: bool | None = None  # None: the engine's default for its device


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def experiment_spec(i: int, cfg: BenchConfig) -> dict:
    return {
        "name": f"bench-{i}", "task": cfg.tasks[i % len(cfg.tasks)], "seed": i, "steps": cfg.steps,
        "eval_every": cfg.steps, "checkpoint_every": cfg.steps,
        "rollout": {"prompts_per_step": cfg.prompts_per_step, "num_generations": cfg.num_generations,
                    "max_tokens": cfg.max_tokens, "ignore_eos": True},
    }


def vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def run_engine(cfg: BenchConfig, backend: str, indices: list[int], label: str) -> dict:
    """Start a fresh engine daemon, run these experiments concurrently to the end, stop it."""
    home = Path(tempfile.mkdtemp(prefix="clora-bench-", dir="/tmp"))
    extra = {None: [], True: ["--fused-train"], False: ["--serial-train"]}[cfg.fused_train]
    launched = time.time()
    try:
        start_daemon(home, model=cfg.model, backend=backend, max_loras=max(1, len(indices)),
                     say=lambda _message: None, extra_args=extra)
        cold = time.time() - launched  # process start -> ready, as a single-tenant stack pays it
        peak_rss = peak_gpu = 0
        with EngineClient(home, timeout=120).connect() as client:
            submitted = time.time()
            ids = [client.call("start", spec=experiment_spec(i, cfg))["id"] for i in indices]
            last_report = 0.0
            while True:
                system = client.call("status")["system"]
                peak_rss = max(peak_rss, system["process"]["rss"])
                peak_gpu = max(peak_gpu, sum(g.get("memory_used", 0) for g in system["gpus"]))
                rows = {r["id"]: r for r in client.call("list") if r["id"] in ids}
                if all(r["state"] in FINAL_STATES for r in rows.values()):
                    break
                if time.time() - last_report > 10:
                    log(f"{label}: {sum(r['step'] for r in rows.values())}/{cfg.steps * len(ids)} steps")
                    last_report = time.time()
                time.sleep(0.25)
            wall = max(r["finished"] for r in rows.values()) - submitted
            details = {t: client.call("get", id=t) for t in ids}
    finally:
        try:
            stop_daemon(home, say=lambda _message: None)
        finally:
            shutil.rmtree(home, ignore_errors=True)
    failed = [f"{t}: {d['error']}" for t, d in details.items() if d["state"] != "done"]
    if failed:
        raise RuntimeError(f"{label}: experiments failed: {failed}")
    steps = [r for t in ids for r in details[t]["history"]]
    return {
        "cold_start_s": cold, "wall_s": wall,
        "finish_s": [details[t]["finished"] - submitted for t in ids],
        "steps_done": [len(details[t]["history"]) for t in ids],
        "step_s": statistics.fmean(r["total_s"] for r in steps),
        "phases": {p: statistics.fmean(r[p] for r in steps) for p in PHASES},
        "warmup_s": statistics.fmean(details[t]["warmup_s"] for t in ids), "peak_rss": peak_rss, "peak_gpu": peak_gpu,
        "accuracy": [{"first": details[t]["evals"][0]["accuracy"], "final": details[t]["evals"][-1]["accuracy"]}
                     for t in ids],
    }


def summarise(n: int, concurrent: dict, singles: list[dict]) -> dict:
    base = singles[:n]
    seq_with_cold = sum(s["cold_start_s"] + s["wall_s"] for s in base)
    seq_warm = sum(s["wall_s"] for s in base)
    conc_with_cold = concurrent["cold_start_s"] + concurrent["wall_s"]
    # Completion time of each experiment measured from the start of the whole batch.
    seq_finish, clock = [], 0.0
    for s in base:
        clock += s["cold_start_s"] + s["wall_s"]
        seq_finish.append(clock)
    conc_finish = [concurrent["cold_start_s"] + f for f in concurrent["finish_s"]]
    return {
        "n": n,
        "throughput_gain": seq_with_cold / conc_with_cold,
        "throughput_gain_without_cold_starts": seq_warm / concurrent["wall_s"],
        "mean_experiment_time_s": statistics.fmean(conc_finish),
        "baseline_mean_experiment_time_s": statistics.fmean(seq_finish),
        "mean_experiment_time_gain": statistics.fmean(seq_finish) / statistics.fmean(conc_finish),
        "mean_step_s": concurrent["step_s"],
        "baseline_mean_step_s": statistics.fmean(s["step_s"] for s in base),
        "step_breakdown_s": concurrent["phases"],
        "rollout_s": concurrent["phases"]["rollout_s"],
        "warmup_s": concurrent["warmup_s"],
        "engine_cold_start_s": concurrent["cold_start_s"],
        "final_experiment_time_s": conc_with_cold,
        "baseline_final_experiment_time_s": seq_with_cold,
        "baseline_final_experiment_time_without_cold_starts_s": seq_warm,
        "peak_rss_bytes": concurrent["peak_rss"], "peak_gpu_bytes": concurrent["peak_gpu"],
        "accuracy": concurrent["accuracy"], "baseline_accuracy": [s["accuracy"][0] for s in base],
        "steps_done": concurrent["steps_done"],
    }


def run_backend(cfg: BenchConfig, backend: str) -> dict:
    top = max(cfg.ns)
    # One unmeasured run first: the process's one-time costs (lazy imports, allocator and
    # kernel warm-up) would otherwise land on whichever arm happens to run first.
    log(f"{backend}: warm-up run (not measured)")
    run_engine(replace(cfg, steps=2), backend, [0], f"{backend} warm-up")
    singles = []
    for i in range(top):
        log(f"{backend}: baseline experiment {i + 1}/{top} on a fresh single-tenant engine")
        singles.append(run_engine(cfg, backend, [i], f"{backend} baseline {i + 1}/{top}"))
    rows = []
    for n in cfg.ns:
        log(f"{backend}: {n} experiment(s) concurrently on one engine")
        concurrent = run_engine(cfg, backend, list(range(n)), f"{backend} N={n}")
        rows.append(summarise(n, concurrent, singles))
    by_n = {r["n"]: r for r in rows}
    n1 = by_n.get(1)
    for r in rows:
        r["step_time_ratio_vs_n1"] = r["mean_step_s"] / n1["mean_step_s"] if n1 else None
        r["rollout_overhead_vs_n1"] = r["rollout_s"] / n1["rollout_s"] - 1 if n1 else None
    return {"backend": backend, "rows": rows, "baseline_runs": singles}


def format_table(result: dict) -> str:
    cols = [("N", "n", "{:d}"), ("gain", "throughput_gain", "{:.2f}x"),
            ("gain warm", "throughput_gain_without_cold_starts", "{:.2f}x"),
            ("mean exp s", "mean_experiment_time_s", "{:.1f}"), ("seq mean s", "baseline_mean_experiment_time_s", "{:.1f}"),
            ("exp gain", "mean_experiment_time_gain", "{:.2f}x"), ("step s", "mean_step_s", "{:.2f}"),
            ("step/N1", "step_time_ratio_vs_n1", "{:.2f}x"), ("rollout s", "rollout_s", "{:.2f}"),
            ("rollout +", "rollout_overhead_vs_n1", "{:+.0%}"), ("warm-up s", "warmup_s", "{:.2f}"),
            ("cold s", "engine_cold_start_s", "{:.1f}"), ("final s", "final_experiment_time_s", "{:.1f}"),
            ("seq final s", "baseline_final_experiment_time_s", "{:.1f}"), ("peak RSS", "peak_rss_bytes", "{}")]
    lines = [f"backend {result['backend']}"]
    table = [[c[0] for c in cols]]
    for r in result["rows"]:
        row = []
        for _, key, fmt in cols:
            v = r.get(key)
            if v is None:
                row.append("-")
            elif key == "peak_rss_bytes":
                row.append(f"{v / 2**30:.2f} GiB")
            else:
                row.append(fmt.format(v))
        table.append(row)
    widths = [max(len(t[i]) for t in table) for i in range(len(cols))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(t, widths)) for t in table]
    lines.append("step breakdown (mean s): " + "; ".join(
        f"N={r['n']}: " + " ".join(f"{p[:-2]} {r['step_breakdown_s'][p]:.2f}" for p in PHASES) for r in result["rows"]))
    lines.append("accuracy first->final (concurrent | baseline): " + "; ".join(
        f"N={r['n']}: " + ",".join(f"{a['first']:.2f}->{a['final']:.2f}" for a in r["accuracy"]) + " | "
        + ",".join(f"{a['first']:.2f}->{a['final']:.2f}" for a in r["baseline_accuracy"]) for r in result["rows"]))
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for res in results:
        ns = [r["n"] for r in res["rows"]]
        ax1.plot(ns, [r["throughput_gain"] for r in res["rows"]], marker="o", label=f"{res['backend']}")
        ax1.plot(ns, [r["throughput_gain_without_cold_starts"] for r in res["rows"]], marker="x", linestyle="--",
                 label=f"{res['backend']} (no cold starts)")
        ax2.plot(ns, [r["mean_step_s"] for r in res["rows"]], marker="o", label=res["backend"])
    ax1.scatter([8], [REFERENCE["throughput_gain_n8"]], color="grey", marker="*", s=120, zorder=3,
                label="reference N=8 (SkyRL, H200)")
    ax1.set(xlabel="concurrent experiments N", ylabel="experiment throughput gain", title="Throughput gain")
    ax2.set(xlabel="concurrent experiments N", ylabel="mean step time (s)", title="Step time")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv=None) -> tuple[BenchConfig, list[str], argparse.Namespace]:
    p = argparse.ArgumentParser(prog="clora-tui bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="N=1,2,4 and 4 short steps: a smoke run in a few minutes")
    p.add_argument("--model", default="embedded", help="embedded, a local HF directory, or random:SIZE (e.g. random:30M)")
    p.add_argument("--backend", default="peft", help="peft, vllm, or all (every installed backend)")
    p.add_argument("--n", default=None, help="comma-separated N values (default 1,2,4,8)")
    p.add_argument("--steps", type=int, default=None, help="steps per experiment (default 20)")
    p.add_argument("--tasks", default="arithmetic", help="comma-separated tasks, assigned round-robin")
    p.add_argument("--prompts-per-step", type=int, default=None)
    p.add_argument("--num-generations", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    train = p.add_mutually_exclusive_group()
    train.add_argument("--fused-train", dest="fused_train", action="store_const", const=True, default=None,
                       help="one fused mixed-adapter training step for all tenants (default on CUDA)")
    train.add_argument("--serial-train", dest="fused_train", action="store_const", const=False,
                       help="train tenants one at a time (default on CPU)")
    p.add_argument("--json", type=Path, help="write every number to this file")
    p.add_argument("--plot", type=Path, help="draw throughput gain and step time against N (PNG)")
    args = p.parse_args(argv)
    cfg = BenchConfig(model=args.model, tasks=args.tasks.split(","), fused_train=args.fused_train)
    if args.quick:
        cfg.ns, cfg.steps, cfg.prompts_per_step, cfg.num_generations = [1, 2, 4], 4, 4, 4
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
    return cfg, backends, args


def main(argv=None) -> int:
    cfg, backends, args = parse_args(argv)
    started = time.time()
    results = []
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
