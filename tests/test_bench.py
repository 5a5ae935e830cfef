"""`clora-tui bench --quick`: real engine daemons, both baselines, the floor, the full table."""

import json
import subprocess
import sys


def test_bench_quick_writes_the_full_table(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = subprocess.run([sys.executable, "-m", "clora_tui.cli", "bench", "--quick", "--n", "1,2",
                           "--json", str(out), "--plot", str(png)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "vs fresh" in proc.stdout and "vs warm" in proc.stdout and "backend peft" in proc.stdout
    assert "step/floor" in proc.stdout and "completion tokens" in proc.stdout
    report = json.loads(out.read_text())
    assert png.stat().st_size > 1000
    cfg = report["config"]
    assert cfg["ns"] == [1, 2] and report["reference"]["throughput_gain_n8"] == 2.81
    assert cfg["fixed_length"] is False  # realistic work by default: completions stop at EOS
    (result,) = report["results"]
    assert result["backend"] == "peft"
    assert len(result["baseline_runs"]) == 2
    for run in result["baseline_runs"]:
        assert run["steps_done"] == [cfg["steps"]] and run["cold_start_s"] > 0
    assert result["warm_sequential"]["steps_done"] == [cfg["steps"]] * 2
    for row, n in zip(result["rows"], cfg["ns"]):
        assert row["n"] == n and row["steps_done"] == [cfg["steps"]] * n
        for key in ("gain_vs_fresh", "gain_vs_warm", "mean_experiment_time_s", "baseline_mean_experiment_time_s",
                    "mean_step_s", "rollout_s", "warmup_s", "engine_cold_start_s", "final_experiment_time_s",
                    "baseline_final_experiment_time_s", "peak_rss_bytes", "step_time_ratio_vs_n1",
                    "rollout_overhead_vs_n1", "floor_s", "step_vs_floor", "tokens_per_s", "cpu_cores_used"):
            assert isinstance(row[key], (int, float)), key
        assert row["floor_s"] > 0 and row["completion_tokens"] > 0
        # Same seeds on both sides: the work differs only by what the samples happen to be.
        assert row["baseline_completion_tokens"] > 0 and row["warm_completion_tokens"] > 0
        assert set(row["step_breakdown_s"]) == {"queue_s", "rollout_s", "reward_s", "train_s", "sync_s", "checkpoint_s"}
        assert len(row["accuracy"]) == n and all(0 <= a["final"] <= 1 for a in row["accuracy"])
    assert result["rows"][0]["step_time_ratio_vs_n1"] == 1.0


def test_bench_retail_specs_carry_turns_and_tool_latency():
    from clora_tui.bench import experiment_spec, parse_args
    from engine.config import parse_spec

    cfg, backends, _ = parse_args(["--tasks", "retail", "--n", "1,2", "--steps", "10", "--tool-latency-ms", "50"])
    assert "trl" not in cfg.baselines and backends == ["peft"]  # GRPOTrainer has no environments
    spec = parse_spec(experiment_spec(1, cfg))  # a spec the engine accepts
    assert spec.task == "retail" and spec.task_args == {"tool_latency_ms": 50.0} and spec.rollout.max_turns == 3
