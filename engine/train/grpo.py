"""The GRPO objective: group-relative advantages, PPO-clipped per-token loss, KL, aggregation.

Names follow TRL's GRPOTrainer: `grpo` averages each sequence over its own tokens and
then over sequences; `dr_grpo` divides the token sum by (sequences x max completion
length); `dapo` divides the token sum by the number of tokens in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """(r - group mean) [/ group std], rewards laid out group after group."""
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        # Unbiased std as TRL uses; a group of one has no spread.
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
        centred = centred / (std + eps)
    return centred.reshape(-1)


@dataclass
class LossParts:
    loss: torch.Tensor
    kl: float
    clip_fraction: float


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon: float,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
) -> LossParts:
    """Per-token clipped policy-gradient loss with optional k3 KL to the reference policy.

    logprobs/old_logprobs/ref_logprobs/mask: [batch, tokens]; advantages: [batch].
    """
    mask = mask.to(logprobs.dtype)
    eps_high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages.unsqueeze(1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + eps_high) * adv
    per_token = -torch.min(unclipped, clipped)
    kl_value = 0.0
    if beta > 0:
        if ref_logprobs is None:
            raise ValueError("beta > 0 needs ref_logprobs")
        delta = ref_logprobs - logprobs
        per_token_kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * per_token_kl
        kl_value = float((per_token_kl * mask).sum() / mask.sum().clamp(min=1))
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif loss_type == "dr_grpo":
        width = max_completion_length or mask.shape[1]
        loss = (per_token * mask).sum() / (mask.shape[0] * width)
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    is_clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    clip_fraction = float((is_clipped.to(mask.dtype) * mask).sum() / mask.sum().clamp(min=1))
    return LossParts(loss=loss, kl=kl_value, clip_fraction=clip_fraction)
