"""Train the embedded default model from scratch on the built-in tasks.

    python -m engine.models.build_embedded [--out DIR] [--steps N]
    python -m engine.models.build_embedded --stage retail   # then: teach it the retail tool format

The second stage continues from the first model (`--from`, default the committed one) on a
mix of retail transcripts (engine.tasks.retail: tool calls, tool answers, final answers;
only the model's turns are trained) and the first stage's tasks (so those keep their quality).

The model is deliberately *mediocre* in one learnable way: on a fixed share of
training examples the answer carries a systematic mistake (addition drops its
carries, reversal is skipped, sorting drops duplicates). Greedy decoding then picks
the mistake on most affected problems while sampling still finds the right answer
often, which is the regime where GRPO shows a visible lift within a few dozen steps.
Everything is seeded; a rerun gives a model of the same quality (see quality.json).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from engine.models import EMBEDDED_MODEL_DIR
from engine.models.tokenizer import build_char_tokenizer
from engine.tasks.builtin import ArithmeticTask, ReverseTask, SortTask

NOISE = 0.6  # share of affected training examples that carry the systematic mistake


def drop_carries(a: int, b: int) -> str:
    digits, place = 0, 1
    while a or b:
        digits += ((a % 10 + b % 10) % 10) * place
        a, b, place = a // 10, b // 10, place * 10
    return str(digits)


def corrupt(prompt: str, answer: str) -> str | None:
    """The systematic mistake for this problem, or None when it has none."""
    if "+" in prompt:
        a, b = (int(x) for x in prompt.rstrip("=").split("+"))
        wrong = drop_carries(a, b)
    elif prompt.startswith("rev:"):
        wrong = prompt[4:-1]
    elif prompt.startswith("sort:"):
        wrong = "".join(sorted(set(answer)))
    else:
        return None
    return wrong if wrong != answer else None


RETAIL_NOISE = 0.6  # share of retail transcripts that carry the systematic mistake


def retail_example(rng: random.Random) -> list[tuple[str, bool]]:
    """A retail transcript as (text, spoken by the model) segments. Status and price questions
    carry a systematic mistake on RETAIL_NOISE of them (the status is answered with the item,
    the price with the status); cancel requests are always right. Greedy decoding then gets
    most status and price questions wrong and cancels right: about a third correct."""
    from engine.tasks import retail

    seed, index = rng.randrange(1 << 30), rng.randrange(1 << 30)
    segments = retail.solution(seed, index)
    store, target, intent = retail.make_store(seed, index)
    if intent == "cancel" or rng.random() >= RETAIL_NOISE:
        return segments
    status, item, _ = store[target]
    return segments[:-1] + [(item if intent == "status" else status, True)]


def sample_example(rng: random.Random) -> tuple[str, str]:
    kind = rng.random()
    if kind < 0.6:
        task = ArithmeticTask(digits=rng.choices([1, 2, 3], weights=[1, 6, 1])[0])
    elif kind < 0.8:
        task = ReverseTask()
    else:
        task = SortTask()
    problem = task.problem(rng.randrange(1 << 30), rng.randrange(1 << 30))
    answer = problem.answer
    wrong = corrupt(problem.prompt, answer)
    if wrong is not None and rng.random() < NOISE:
        answer = wrong
    return problem.prompt, answer


def model_config(vocab_size: int) -> Qwen2Config:
    # head_dim must be 64: vLLM's CPU attention kernels reject smaller heads.
    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=128,
        rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=None, eos_token_id=1,
        pad_token_id=0, torch_dtype="float32",
    )


def encode_batch(tok, examples, device="cpu"):
    """Examples are (prompt, answer) pairs or lists of (text, spoken by the model) segments; a
    model segment ends with EOS and is trained, the others are context only."""
    ids, labels = [], []
    for example in examples:
        segments = [(example[0], False), (example[1], True)] if isinstance(example, tuple) else example
        row, label = [], []
        for text, model in segments:
            t = tok.encode(text, add_special_tokens=False) + ([tok.eos_token_id] if model else [])
            row += t
            label += t if model else [-100] * len(t)
        ids.append(row)
        labels.append(label)
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), tok.pad_token_id)
    label_t = torch.full((len(ids), width), -100)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, (x, y) in enumerate(zip(ids, labels)):
        input_ids[i, : len(x)] = torch.tensor(x)
        label_t[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return input_ids.to(device), mask.to(device), label_t.to(device)


@torch.no_grad()
def greedy_accuracy(model, tok, problems, max_new_tokens: int = 8) -> float:
    prompts = [p.prompt for p in problems]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return sum(t.strip() == p.answer for t, p in zip(texts, problems)) / len(problems)


@torch.no_grad()
def retail_greedy_accuracy(model, tok, episodes: int = 64, max_turns: int = 3, max_new_tokens: int = 12) -> float:
    """The engine's greedy retail eval (engine.tasks.env_task.EVAL_SEED episodes), turn by turn."""
    import asyncio

    from engine.tasks.env_task import EVAL_SEED
    from engine.tasks.retail import RetailEnv

    right = 0
    for index in range(episodes):
        env = RetailEnv()
        context = tok.encode(env.reset(EVAL_SEED, index), add_special_tokens=False)
        reward = 0.0
        for _ in range(max_turns):
            out = model.generate(torch.tensor([context]), max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, len(context):].tolist()
            context += out
            text = tok.decode([t for t in out if t != tok.eos_token_id], skip_special_tokens=True)
            obs, reward, done = asyncio.run(env.step(text))
            if done:
                break
            context += tok.encode(obs, add_special_tokens=False)
        right += reward > 0
    return right / episodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=EMBEDDED_MODEL_DIR)
    parser.add_argument("--stage", choices=("tasks", "retail"), default="tasks")
    parser.add_argument("--from", dest="start", type=Path, default=EMBEDDED_MODEL_DIR,
                        help="--stage retail: the model to continue from")
    parser.add_argument("--steps", type=int, default=None, help="default 3000 (tasks), 600 (retail)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=None, help="default 3e-3 (tasks), 1e-3 (retail)")
    parser.add_argument("--retail-share", type=float, default=0.5, help="--stage retail: share of retail transcripts")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    retail_stage = args.stage == "retail"
    args.steps = args.steps or (600 if retail_stage else 3000)
    args.lr = args.lr or (1e-3 if retail_stage else 3e-3)

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed + (1 if retail_stage else 0))
    tok = build_char_tokenizer()
    if retail_stage:
        model = Qwen2ForCausalLM.from_pretrained(args.start, dtype=torch.float32)
        previous = json.loads((args.start / "quality.json").read_text())
    else:
        model = Qwen2ForCausalLM(model_config(len(tok)))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    start = time.time()
    model.train()
    for step in range(1, args.steps + 1):
        examples = [retail_example(rng) if retail_stage and rng.random() < args.retail_share else sample_example(rng)
                    for _ in range(args.batch)]
        input_ids, mask, labels = encode_batch(tok, examples)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:6.1f}s", flush=True)

    model.eval()
    quality = {
        "arithmetic": greedy_accuracy(model, tok, ArithmeticTask().eval_set()),
        "reverse": greedy_accuracy(model, tok, ReverseTask().eval_set()),
        "sort": greedy_accuracy(model, tok, SortTask().eval_set()),
        "retail": retail_greedy_accuracy(model, tok),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    meta = {"greedy_eval_accuracy": quality, "steps": args.steps, "seed": args.seed, "noise": NOISE,
            "parameters": sum(p.numel() for p in model.parameters()), "train_seconds": round(time.time() - start, 1)}
    if retail_stage:  # the record of the first stage, then this one
        meta = {**{k: v for k, v in previous.items() if k not in ("greedy_eval_accuracy", "retail_stage")},
                "greedy_eval_accuracy": quality,
                "retail_stage": {"steps": args.steps, "lr": args.lr, "retail_share": args.retail_share,
                                 "retail_noise": RETAIL_NOISE, "train_seconds": meta["train_seconds"],
                                 "before": previous.get("greedy_eval_accuracy")}}
    (args.out / "quality.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
