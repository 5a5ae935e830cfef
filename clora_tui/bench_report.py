"""The bench's report: the table printed per backend, and the plot."""

from __future__ import annotations

from pathlib import Path

from engine.protocol import TIMING_PARTS as PHASES

REFERENCE = {  # SkyRL concurrent multi-LoRA, one H200, Qwen3-4B-Instruct, GSM8K
    "throughput_gain_n8": 2.81, "best_mean_experiment_time_gain": (1.88, 4), "step_time_n1_s": 191,
    "step_time_n8_s": 500, "rollout_n1_s": 162, "rollout_n8_s": 401, "rollout_overhead_n2": 0.15,
    "final_experiment_time_n8_s": 5433,
    # tau-bench retail (multi-turn tool use), N=2: 10 steps finished 1.28x sooner, each step 1.57x longer
    "tau_bench_n2_time_to_10_steps_gain": 1.28, "tau_bench_n2_step_time_ratio": 1.57,
}


def _fmt(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def format_table(result: dict) -> str:
    cols = [("N", "n", "{:d}"), ("vs fresh", "gain_vs_fresh", "{:.2f}x"), ("vs warm", "gain_vs_warm", "{:.2f}x"),
            ("vs TRL", "gain_vs_trl", "{:.2f}x"), ("vs TRL warm", "gain_vs_trl_without_startup", "{:.2f}x"),
            ("wall s", "wall_s", "{:.1f}"), ("step s", "mean_step_s", "{:.3f}"), ("floor s", "floor_s", "{:.3f}"),
            ("step/floor", "step_vs_floor", "{:.2f}x"), ("step/N1", "step_time_ratio_vs_n1", "{:.2f}x"),
            ("floor/N1", "floor_ratio_vs_n1", "{:.2f}x"), ("rollout +", "rollout_overhead_vs_n1", "{:+.0%}"),
            ("floor +", "floor_rollout_overhead_vs_n1", "{:+.0%}"), ("tok/s", "tokens_per_s", "{:.0f}"),
            ("cores", "cpu_cores_used", "{:.2f}"), ("warm-up s", "warmup_s", "{:.2f}"),
            ("cold s", "engine_cold_start_s", "{:.1f}"), ("peak RSS", "peak_rss_bytes", "{}")]
    lines = [f"backend {result['backend']}"]
    table = [[c[0] for c in cols]]
    for r in result["rows"]:
        row = []
        for _, key, fmt in cols:
            v = r.get(key)
            row.append(f"{v / 2**30:.2f} GiB" if key == "peak_rss_bytes" and v is not None else _fmt(v, fmt))
        table.append(row)
    widths = [max(len(t[i]) for t in table) for i in range(len(cols))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(t, widths)) for t in table]
    lines.append("step breakdown (mean s): " + "; ".join(
        f"N={r['n']}: " + " ".join(f"{p[:-2]} {r['step_breakdown_s'][p]:.3f}" for p in PHASES) for r in result["rows"]))
    lines.append(f"floor: plain PEFT decode of {result['floor_completion_tokens']} tokens + LoRA forward/backward, "
                 "same rows: " + "; ".join(f"N={r['n']}: {r['floor_decode_s']:.3f} + {r['floor_train_s']:.3f} s"
                                           for r in result["rows"]))
    work = []
    for r in result["rows"]:
        parts = [f"N={r['n']}: {r['completion_tokens']}"]
        for key, name in (("baseline_completion_tokens", "fresh"), ("warm_completion_tokens", "warm")):
            if r.get(key):
                parts.append(f"{name} {r[key]} ({r['completion_tokens'] / r[key] - 1:+.1%})")
        work.append(" ".join(parts))
    trl = result.get("trl")
    lines.append("completion tokens (concurrent vs baselines): " + "; ".join(work)
                 + (f"; TRL, all {len(trl['per_experiment_s'])}: {trl['completion_tokens']}" if trl else ""))
    if trl:
        line = (f"TRL {trl.get('trl_version', '?')}: load {trl['load_s']:.1f} s, per experiment "
                + ", ".join(f"{x:.1f}" for x in trl["per_experiment_s"]) + f" s; step {result['trl_step_s']:.3f} s")
        if result.get("single_tenant_step_vs_trl"):
            line += (f"; single-tenant step here {result['single_tenant_step_s']:.3f} s (mean of every run alone) "
                     f"= {result['single_tenant_step_vs_trl']:.2f}x TRL's")
        lines.append(line)
    lines.append("accuracy first->final (concurrent): " + "; ".join(
        f"N={r['n']}: " + ",".join(f"{a['first']:.2f}->{a['final']:.2f}" for a in r["accuracy"]) for r in result["rows"]))
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for res in results:
        ns = [r["n"] for r in res["rows"]]
        for key, label, style in (("gain_vs_fresh", "vs fresh engines", "-"), ("gain_vs_warm", "vs one warm engine", "--"),
                                  ("gain_vs_trl", "vs TRL GRPOTrainer", ":")):
            if all(r.get(key) is not None for r in res["rows"]):
                ax1.plot(ns, [r[key] for r in res["rows"]], marker="o", linestyle=style, label=f"{res['backend']} {label}")
        ax2.plot(ns, [r["mean_step_s"] for r in res["rows"]], marker="o", label=f"{res['backend']} step")
        ax2.plot(ns, [r["floor_s"] for r in res["rows"]], marker="x", linestyle="--", label=f"{res['backend']} floor")
    ax1.scatter([8], [REFERENCE["throughput_gain_n8"]], color="grey", marker="*", s=120, zorder=3,
                label="reference N=8 (SkyRL, H200)")
    ax1.set(xlabel="concurrent experiments N", ylabel="experiment throughput gain", title="Throughput gain")
    ax2.set(xlabel="concurrent experiments N", ylabel="seconds", title="Mean step vs its floor")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
