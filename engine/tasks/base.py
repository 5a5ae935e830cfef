"""The task interface: a stream of prompts with verifiable answers."""

from __future__ import annotations

import random
from dataclasses import dataclass


class TaskError(ValueError):
    """A task could not be built from its spec (unknown name, unreadable dataset...)."""


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str


class Task:
    """A source of training problems, a fixed held-out eval set, and a default reward.

    Training problems are addressed by an integer cursor so that a tenant's data
    position is one number that checkpoints and resumes exactly.
    """

    name = "task"
    eval_size = 64

    def problem(self, seed: int, index: int) -> Problem:
        """The index-th training problem of the stream for this seed."""
        raise NotImplementedError

    def eval_set(self) -> list[Problem]:
        """A fixed held-out set, the same for every tenant of this task."""
        raise NotImplementedError

    def is_correct(self, completion: str, answer: str) -> bool:
        return normalize(completion) == normalize(answer)

    def reward(self, prompt: str, completion: str, answer: str) -> float:
        return 1.0 if self.is_correct(completion, answer) else 0.0


def normalize(text: str) -> str:
    return text.strip()


def rng_for(seed: int, index: int, salt: int = 0) -> random.Random:
    """An independent RNG per (seed, index): problem i never depends on problems < i."""
    return random.Random((seed * 1_000_003 + index) * 7919 + salt)
