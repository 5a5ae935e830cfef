"""The GRPO objective against a hand-computed example."""

import math

import pytest
import torch

from engine.train.grpo import group_advantages, grpo_loss


def test_advantages_are_group_relative_and_std_normalised():
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0]), group_size=2)
    s = math.sqrt(0.5)  # unbiased std of {1, 0}
    expected = [0.5 / (s + 1e-4), -0.5 / (s + 1e-4), -0.5 / (s + 1e-4), 0.5 / (s + 1e-4), 0.0, 0.0]
    assert adv.tolist() == pytest.approx(expected, rel=1e-6)


def test_advantages_without_std_scaling_are_mean_centred():
    adv = group_advantages(torch.tensor([3.0, 1.0, 2.0, 2.0]), group_size=2, scale=False)
    assert adv.tolist() == [1.0, -1.0, 0.0, 0.0]


def example():
    # Two sequences; the second has one real token. Ratios: [2, 1] and [0.5].
    logp = torch.log(torch.tensor([[0.5, 0.25], [0.125, 0.9]])).requires_grad_(True)
    old = torch.log(torch.tensor([[0.25, 0.25], [0.25, 0.9]]))
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    return logp, old, mask, adv


# per-token losses: seq1 = [-min(2, 1.2), -min(1, 1)] = [-1.2, -1]; seq2 = [-min(-0.5, -0.8)] = [0.8]
@pytest.mark.parametrize("loss_type, expected", [
    ("dapo", (-1.2 - 1.0 + 0.8) / 3),        # token sum / tokens in batch
    ("grpo", ((-1.2 - 1.0) / 2 + 0.8) / 2),  # mean over each sequence, then over sequences
    ("dr_grpo", (-1.2 - 1.0 + 0.8) / (2 * 4)),  # token sum / (sequences x max completion length)
])
def test_loss_aggregation_matches_hand_computation(loss_type, expected):
    logp, old, mask, adv = example()
    parts = grpo_loss(logp, old, adv, mask, epsilon=0.2, loss_type=loss_type, max_completion_length=4)
    assert parts.loss.item() == pytest.approx(expected, rel=1e-6)
    assert parts.clip_fraction == pytest.approx(2 / 3)


def test_clipped_tokens_get_no_gradient():
    logp, old, mask, adv = example()
    grpo_loss(logp, old, adv, mask, epsilon=0.2, loss_type="dapo").loss.backward()
    # Only seq1 token 2 (ratio 1, inside the clip range) pulls: d/dlogp of -A*ratio/3.
    assert logp.grad.flatten().tolist() == pytest.approx([0.0, -1 / 3, 0.0, 0.0], abs=1e-7)


def test_epsilon_high_widens_the_upper_clip_only():
    logp, old, mask, adv = example()
    parts = grpo_loss(logp, old, adv, mask, epsilon=0.2, epsilon_high=1.5, loss_type="dapo")
    # seq1 token 1 is no longer clipped (2 < 2.5): per-token -2 instead of -1.2.
    assert parts.loss.item() == pytest.approx((-2.0 - 1.0 + 0.8) / 3, rel=1e-6)


def test_kl_term_is_k3_estimator_against_reference():
    logp = torch.log(torch.tensor([[0.5]]))
    ref = torch.log(torch.tensor([[0.25]]))
    parts = grpo_loss(logp, logp.detach(), torch.tensor([0.0]), torch.ones(1, 1), epsilon=0.2,
                      beta=0.1, ref_logprobs=ref, loss_type="dapo")
    d = math.log(0.25) - math.log(0.5)
    k3 = math.exp(d) - d - 1
    assert parts.kl == pytest.approx(k3, rel=1e-6)
    assert parts.loss.item() == pytest.approx(0.1 * k3, rel=1e-6)


def test_unknown_loss_type_is_rejected():
    logp, old, mask, adv = example()
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(logp, old, adv, mask, epsilon=0.2, loss_type="ppo")
