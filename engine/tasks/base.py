"""The task interface: a stream of prompts with verifiable answers."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

MAX_EVAL_SIZE = 1024  # held-out problems scored greedily at each eval; more stalls every tenant's loop


class TaskError(ValueError):
    """A task could not be built from its spec (unknown name, unreadable dataset...)."""


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str


@dataclass(frozen=True)
class Arg:
    """One task argument: an integer in lo..hi, or a string (one of `choices`, or passing `check`)."""

    kind: type
    lo: int | None = None
    hi: int | None = None
    choices: tuple[str, ...] | None = None
    check: Callable[[str], str | None] | None = None  # returns what is wrong, or None

    def validate(self, where: str, value: Any) -> None:
        if self.kind is int:
            if not isinstance(value, int) or isinstance(value, bool) or not self.lo <= value <= self.hi:
                raise TaskError(f"{where}: must be an integer {self.lo}..{self.hi}, got {value!r}")
            return
        if self.kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and self.lo <= value <= self.hi
            if not ok:
                raise TaskError(f"{where}: must be a number {self.lo}..{self.hi}, got {value!r}")
            return
        if not isinstance(value, str):
            raise TaskError(f"{where}: must be a string, got {type(value).__name__} {value!r}")
        if self.choices is not None and value not in self.choices:
            raise TaskError(f"{where}: must be one of {', '.join(repr(c) for c in self.choices)}, got {value!r}")
        problem = self.check(value) if self.check else None
        if problem:
            raise TaskError(f"{where}: {problem}, got {value!r}")


EVAL_SIZE_ARG = Arg(int, 1, MAX_EVAL_SIZE)


class Task:
    """A source of training problems, a fixed held-out eval set, and a default reward.

    Training problems are addressed by an integer cursor so that a tenant's data
    position is one number that checkpoints and resumes exactly.
    """

    name = "task"
    eval_size = 64
    ARGS: dict[str, Arg] = {"eval_size": EVAL_SIZE_ARG}  # what `task_args` may hold

    @classmethod
    def check_args(cls, args: Any) -> dict:
        """Validate `task_args` without building the task (no dataset is read); raises
        TaskError naming the field: `task_args.digits: must be an integer 1..4, got 2.5`."""
        if not isinstance(args, dict):
            raise TaskError(f"task_args: expected a table, got {type(args).__name__}")
        unknown = sorted(set(args) - set(cls.ARGS))
        if unknown:
            raise TaskError(f"task_args.{unknown[0]}: not an argument of task {cls.name!r} "
                            f"(allowed: {', '.join(sorted(cls.ARGS))})")
        for key, value in args.items():
            cls.ARGS[key].validate(f"task_args.{key}", value)
        return args

    def problem(self, seed: int, index: int) -> Problem:
        """The index-th training problem of the stream for this seed."""
        raise NotImplementedError

    def eval_set(self) -> list[Problem]:
        """A fixed held-out set, the same for every tenant of this task."""
        raise NotImplementedError

    def sample_prompts(self, seed: int, n: int = 64) -> list[str]:
        """Prompts representative of the longest this task asks (for the engine's work budget)."""
        return [p.prompt for p in self.eval_set()[:n]] + [self.problem(seed, i).prompt for i in range(n)]

    def is_correct(self, completion: str, answer: str) -> bool:
        return normalize(completion) == normalize(answer)

    def reward(self, prompt: str, completion: str, answer: str) -> float:
        return 1.0 if self.is_correct(completion, answer) else 0.0


def normalize(text: str) -> str:
    return text.strip()


def rng_for(seed: int, index: int, salt: int = 0) -> random.Random:
    """An independent RNG per (seed, index): problem i never depends on problems < i."""
    return random.Random((seed * 1_000_003 + index) * 7919 + salt)
