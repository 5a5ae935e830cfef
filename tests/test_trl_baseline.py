"""The TRL GRPOTrainer + PEFT baseline runs and trains on the embedded model."""

from clora_tui.trl_baseline import run_trl_sequential


def test_trl_baseline_runs_the_requested_steps():
    result = run_trl_sequential(n=1, steps=2, prompts_per_step=2, num_generations=2, max_tokens=4)
    assert result["steps_done"] == [2]
    assert result["completion_tokens"] > 0
    assert result["total_s"] > 0
