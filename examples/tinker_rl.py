"""GRPO on two-digit addition, written with the Tinker SDK only, against the local engine.

    eval "$(clora-tui tinker-env)"      # TINKER_BASE_URL and TINKER_API_KEY of the running engine
    python examples/tinker_rl.py        # watch it live in `clora-tui` (a tenant with the TNK badge)

Each iteration samples 8 completions for each of 8 prompts from the current weights, scores
them (1 if the sum is right), centres the rewards within each group (the advantage), and
trains with Tinker's `importance_sampling` loss, then takes one `optim_step`. The same script
runs against Tinker's hosted service (set TINKER_BASE_MODEL to a model it serves).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics

import httpx
import numpy as np
import tinker
from tinker import types


def problems(rng: random.Random, n: int) -> list[tuple[str, str]]:
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        out.append((f"{a}+{b}=", str(a + b)))
    return out


def log_reward(model_id: str, reward: float) -> None:
    """clora-tui's one extension (not part of Tinker): show the reward in the app. Harmless elsewhere."""
    url = os.environ.get("TINKER_BASE_URL", "").rstrip("/")
    try:
        httpx.post(f"{url}/api/v1/clora/log_metrics", json={"model_id": model_id, "metrics": {"reward": reward}},
                   headers={"X-API-Key": os.environ.get("TINKER_API_KEY", "")}, timeout=5)
    except httpx.HTTPError:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--groups", type=int, default=8, help="prompts per iteration")
    parser.add_argument("--group-size", type=int, default=8, help="samples per prompt")
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="tinker-rl")
    args = parser.parse_args()

    with tinker.ServiceClient() as service:  # TINKER_BASE_URL, TINKER_API_KEY; the run ends with the session
        train(service, args)


def train(service: tinker.ServiceClient, args) -> None:
    base_model = os.environ.get("TINKER_BASE_MODEL", "embedded")
    training = service.create_lora_training_client(base_model=base_model, rank=args.rank, seed=args.seed,
                                                   user_metadata={"name": args.name}).result()
    tokenizer = training.get_tokenizer()
    params = types.SamplingParams(max_tokens=8, temperature=1.0)
    rng = random.Random(args.seed)
    history = []
    for it in range(args.iterations):
        sampler = training.save_weights_and_get_sampling_client().result()
        batch = problems(rng, args.groups)
        prompts = [tokenizer.encode(p, add_special_tokens=False) for p, _ in batch]
        futures = [sampler.sample(prompt=types.ModelInput.from_ints(ids), num_samples=args.group_size,
                                  sampling_params=params) for ids in prompts]
        datums, rewards = [], []
        for (_, answer), prompt, future in zip(batch, prompts, futures):
            sequences = future.result().sequences
            group = [1.0 if tokenizer.decode(s.tokens, skip_special_tokens=True).strip() == answer else 0.0
                     for s in sequences]
            rewards += group
            mean = statistics.fmean(group)
            if all(r == mean for r in group):
                continue  # no signal in this group
            for seq, reward in zip(sequences, group):
                tokens = prompt + list(seq.tokens)
                n_prompt, n_out = len(prompt) - 1, len(seq.tokens)
                datums.append(types.Datum(
                    model_input=types.ModelInput.from_ints(tokens[:-1]),
                    loss_fn_inputs={
                        "target_tokens": np.array(tokens[1:], dtype=np.int64),
                        "logprobs": np.array([0.0] * n_prompt + list(seq.logprobs), dtype=np.float32),
                        "advantages": np.array([0.0] * n_prompt + [reward - mean] * n_out, dtype=np.float32),
                    }))
        reward = statistics.fmean(rewards)
        history.append(reward)
        log_reward(training.model_id, reward)
        if datums:
            step = training.forward_backward(datums, loss_fn="importance_sampling")
            optim = training.optim_step(types.AdamParams(learning_rate=args.lr))
            step.result()
            optim.result()
        print(f"iteration {it + 1:3d}  reward {reward:.3f}  datums {len(datums)}", flush=True)
    first, last = statistics.fmean(history[:5]), statistics.fmean(history[-5:])
    print(f"sampled reward: first 5 iterations {first:.3f}, last 5 {last:.3f} ({last - first:+.3f})")


if __name__ == "__main__":
    main()
