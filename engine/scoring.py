"""Scoring a finished rollout, in a pool thread (never on the scheduler's): eval accuracy,
rewards (user reward code runs in the tenant's worker process, with its deadline), and the
train batch. Pure of engine state: it reads the tenant's task and spec only.
"""

from __future__ import annotations

import time

from engine.tenant import Rollouts, Tenant


def completion_text(tokenizer, completion) -> str:
    """The completion's text, up to (without) its stop token."""
    ids, stops = completion.token_ids, {tokenizer.eos_token_id}
    cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    return tokenizer.decode(ids[:cut], skip_special_tokens=True)


def score_step(tenant: Tenant, tokenizer, plan: dict, flat: list) -> dict:
    """Eval accuracy (if the step began with an eval), rewards, correctness and the train batch."""
    out = {"eval_accuracy": None, "batch": None}
    if plan["eval"]:
        lo, hi = plan["eval"]
        out["eval_accuracy"] = tenant.eval_accuracy([completion_text(tokenizer, group[0]) for group in flat[lo:hi]])
    if not plan["train"]:
        return out
    lo, hi = plan["train"]
    completions = flat[lo:hi]
    texts = [[completion_text(tokenizer, c) for c in group] for group in completions]
    rollouts = Rollouts(plan["problems"], completions, texts)
    t0 = time.time()
    rewards, correct = tenant.score(rollouts)
    out["reward_s"] = time.time() - t0
    batch, sampler_lp = tenant.train_batch(tokenizer, rollouts, rewards)
    has_lp = all(len(c.logprobs) == len(c.token_ids) for g in completions for c in g)
    out.update(rewards=rewards, correct=correct, batch=batch, sampler_lp=sampler_lp if has_lp else None)
    return out
