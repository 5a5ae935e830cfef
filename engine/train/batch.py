"""Training batches as tensors: one tenant's rollouts, several tenants stacked, and the
row structure the trainer exploits (GRPO groups sharing a prompt, completion-length tiers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Left-padded rows start their positions at their first real token, as a sampler does."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


_TIER_BOUNDS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384])


def prompt_groups(slots: torch.Tensor, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
    """Runs of consecutive rows with the same adapter slot and the same (padded) prompt.
    Returns (group index of each row [rows], first row of each group [groups])."""
    key = torch.cat([slots.unsqueeze(1), prompt_ids, prompt_mask], dim=1)
    _, group_of, counts = torch.unique_consecutive(key, dim=0, return_inverse=True, return_counts=True)
    return group_of, counts.cumsum(0) - counts


@dataclass
class TrainBatch:
    """One tenant's rollouts as tensors: left-padded prompt + right-padded completion."""

    input_ids: torch.Tensor  # [B, P+T]
    attention_mask: torch.Tensor  # [B, P+T]
    completion_mask: torch.Tensor  # [B, T]
    advantages: torch.Tensor  # [B]
    prompt_width: int
    # Off-policy steps: the sampler's log-probs [B, T]. The loss's importance ratio is then
    # taken against the policy that really sampled, not the trainer's weights before the update.
    behavior_logprobs: torch.Tensor | None = None
    # Client-built rows (Tinker datums) name their targets [B, T]: completion position i predicts
    # targets[i] (default: the next input token, ids[:, P + i]).
    targets: torch.Tensor | None = None


def concat_batches(batches: list[TrainBatch], pad_id: int = 0) -> tuple[TrainBatch, list[slice]]:
    """Stack several tenants' batches into one: prompts right-aligned to a common width,
    completions left-aligned after it. Positions come from the attention mask, so the
    extra padding changes no token's position or attention."""
    p_width = max(b.prompt_width for b in batches)
    c_width = max(b.completion_mask.shape[1] for b in batches)
    rows = sum(b.input_ids.shape[0] for b in batches)
    ids = torch.full((rows, p_width + c_width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    cmask = torch.zeros((rows, c_width), dtype=torch.float32)
    adv = torch.zeros(rows, dtype=torch.float32)
    behavior = torch.zeros((rows, c_width), dtype=torch.float32) if any(
        b.behavior_logprobs is not None for b in batches) else None
    slices, start = [], 0
    for b in batches:
        n, p, c = b.input_ids.shape[0], b.prompt_width, b.completion_mask.shape[1]
        ids[start : start + n, p_width - p : p_width + c] = b.input_ids
        attn[start : start + n, p_width - p : p_width + c] = b.attention_mask
        cmask[start : start + n, :c] = b.completion_mask
        adv[start : start + n] = b.advantages
        if b.behavior_logprobs is not None:
            behavior[start : start + n, :c] = b.behavior_logprobs
        slices.append(slice(start, start + n))
        start += n
    targets = None
    if any(b.targets is not None for b in batches):
        targets = ids[:, p_width:].clone()
        for b, s in zip(batches, slices):
            if b.targets is not None:
                targets[s, : b.targets.shape[1]] = b.targets
    return TrainBatch(ids, attn, cmask, adv, p_width, behavior, targets), slices


def completion_tiers(lengths: torch.Tensor) -> torch.Tensor:
    """Tier of each row by completion length: 1-2, 3, 4-5, 6-9, 10-17, ... (the tail pass
    predicts tokens 1.. of a completion, so a tier's width is its longest length - 1)."""
    return torch.bucketize((lengths - 1).clamp(min=1), _TIER_BOUNDS.to(lengths.device))
