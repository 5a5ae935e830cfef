"""The loss functions of Tinker's forward_backward, as Tinker documents them: every loss is a
SUM over the datum's tokens (no normalization; the client scales its advantages or weights).

    cross_entropy        -(logp * weights)
    importance_sampling  -(exp(logp - q) * A)
    ppo                  -min(r A, clip(r, lo, hi) A)            lo, hi = 0.8, 1.2 by default
    cispo                -(sg(clip(r, lo, hi)) * logp * A)        lo, hi = 0.0, 4.0 by default

with q the sampler's log-probs (`logprobs`), A the `advantages`, r = exp(logp - q). Each
loss names the loss_fn_inputs it needs; a missing one is the client's error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED = ("cross_entropy", "importance_sampling", "ppo", "cispo")
KNOWN_UNSUPPORTED = ("dro", "gspo", "stable_reinforce", "custom")
DEFAULT_CLIP = {"ppo": (0.8, 1.2), "cispo": (0.0, 4.0)}
INPUTS = {"cross_entropy": ("target_tokens", "weights"), "importance_sampling": ("target_tokens", "logprobs", "advantages"),
          "ppo": ("target_tokens", "logprobs", "advantages"), "cispo": ("target_tokens", "logprobs", "advantages")}


class LossError(ValueError):
    """The client asked for a loss (or config) this engine cannot compute."""


@dataclass
class TinkerLoss:
    """One loss with its config, applied to a batch of datums: `inputs[name]` is [B, T]."""

    name: str
    inputs: dict[str, torch.Tensor]
    clip: tuple[float, float] | None = None

    def __call__(self, logp: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = {k: v.to(logp.device, logp.dtype) for k, v in self.inputs.items() if k != "target_tokens"}
        if self.name == "cross_entropy":
            per_token = -logp * x["weights"]
        else:
            ratio = torch.exp(logp - x["logprobs"])
            adv = x["advantages"]
            if self.name == "importance_sampling":
                per_token = -ratio * adv
            elif self.name == "ppo":
                lo, hi = self.clip
                per_token = -torch.min(ratio * adv, torch.clamp(ratio, lo, hi) * adv)
            else:  # cispo
                lo, hi = self.clip
                per_token = -torch.clamp(ratio, lo, hi).detach() * logp * adv
        per_token = per_token * mask
        return per_token.sum(), per_token


def make_loss(name: str, config: dict | None, inputs: dict[str, torch.Tensor]) -> TinkerLoss:
    """Validate a loss request; raises LossError with what to do."""
    if name not in SUPPORTED:
        known = " (a Tinker loss this engine does not implement)" if name in KNOWN_UNSUPPORTED else ""
        raise LossError(f"loss_fn {name!r} is not supported{known}: use one of {', '.join(SUPPORTED)}")
    missing = [k for k in INPUTS[name] if k not in inputs]
    if missing:
        raise LossError(f"loss_fn {name!r} needs loss_fn_inputs {list(INPUTS[name])}; missing {missing}")
    config = dict(config or {})
    clip = None
    if name in DEFAULT_CLIP:
        lo, hi = DEFAULT_CLIP[name]
        clip = (float(config.pop("clip_low_threshold", lo)), float(config.pop("clip_high_threshold", hi)))
        if clip[0] > clip[1]:
            raise LossError(f"loss_fn_config: clip_low_threshold {clip[0]} is above clip_high_threshold {clip[1]}")
    if config:
        raise LossError(f"loss_fn_config: {sorted(config)} not understood by {name!r}"
                        + (" (it takes clip_low_threshold, clip_high_threshold)" if clip else " (it takes none)"))
    return TinkerLoss(name, inputs, clip)
