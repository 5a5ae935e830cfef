"""The floor under a step on this machine: the same rows through plain PEFT, no engine.

    python -m engine.floor --rows 64,512 --completion-tokens 4 [--task arithmetic] [--json FILE]

For a batch of `rows` prompts of the task: a plain decode (one adapter, a KV cache,
argmax, every row decodes `completion-tokens` tokens: no sampling logic, no stopping, no
scheduling) and a plain LoRA forward + backward + AdamW step over the same rows with
their completions. Their sum is what one step with that many rows cannot go below here;
`clora-tui bench` reports each measured step's distance to it. Best of `--repeats`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def measure_floor(rows_list: list[int], completion_tokens: int, task: str = "arithmetic", model: str = "embedded",
                  repeats: int = 3) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from engine.loading import configure_cpu_threads, resolve_model_path
    from engine.tasks import make_task

    configure_cpu_threads()
    path = resolve_model_path(model)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    base = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    for p in base.parameters():
        p.requires_grad_(False)
    lora = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                           lora_dropout=0.0))
    lora.eval()
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-4)
    the_task = make_task(task, {})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = {}
    for rows in rows_list:
        prompts = [tokenizer.encode(the_task.problem(0, i).prompt, add_special_tokens=False) for i in range(rows)]
        width = max(len(p) for p in prompts)
        ids = torch.full((rows, width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1

        def decode() -> torch.Tensor:
            with torch.no_grad():
                cache = DynamicCache()
                m = mask
                pos = (m.cumsum(-1) - 1).clamp(min=0)
                logits = lora(input_ids=ids, attention_mask=m, position_ids=pos, past_key_values=cache,
                              use_cache=True).logits[:, -1]
                nxt, tokens = pos[:, -1:] + 1, []
                for _ in range(completion_tokens):
                    tok = logits.argmax(-1, keepdim=True)
                    tokens.append(tok)
                    m = torch.cat([m, torch.ones_like(tok)], dim=1)
                    logits = lora(input_ids=tok, attention_mask=m, position_ids=nxt, past_key_values=cache,
                                  use_cache=True).logits[:, -1]
                    nxt = nxt + 1
                return torch.cat(tokens, dim=1)

        def train(completions: torch.Tensor) -> None:
            full = torch.cat([ids, completions], dim=1)
            m = torch.cat([mask, torch.ones_like(completions)], dim=1)
            logits = lora(input_ids=full, attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp(min=0)).logits
            loss = torch.log_softmax(logits[:, width - 1:-1].float(), -1).gather(-1, completions.unsqueeze(-1)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        decode_s = train_s = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            completions = decode()
            t1 = time.perf_counter()
            train(completions)
            t2 = time.perf_counter()
            decode_s, train_s = min(decode_s, t1 - t0), min(train_s, t2 - t1)
        out[rows] = {"rows": rows, "prompt_tokens": width, "completion_tokens": completion_tokens,
                     "decode_s": decode_s, "train_s": train_s, "floor_s": decode_s + train_s}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m engine.floor", description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="64,512")
    p.add_argument("--completion-tokens", type=int, default=4)
    p.add_argument("--task", default="arithmetic")
    p.add_argument("--model", default="embedded")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    result = measure_floor([int(r) for r in args.rows.split(",")], args.completion_tokens, args.task, args.model,
                           args.repeats)
    for r in result.values():
        print(f"rows {r['rows']:5d}: decode {r['decode_s'] * 1000:7.1f} ms  train {r['train_s'] * 1000:7.1f} ms  "
              f"floor {r['floor_s'] * 1000:7.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({str(k): v for k, v in result.items()}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
