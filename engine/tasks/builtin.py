"""Built-in tasks with verifiable answers, small enough for the embedded model."""

from __future__ import annotations

import string

from engine.tasks.base import Problem, Task, TaskError, rng_for

EVAL_SALT = 0x5EED  # the eval stream never overlaps a training stream


class ArithmeticTask(Task):
    """Integer arithmetic: `37+45=` -> `82`. `digits` sets operand size, `ops` the operators."""

    name = "arithmetic"

    def __init__(self, digits: int = 2, ops: str = "+", eval_size: int = 64):
        if not 1 <= digits <= 4:
            raise TaskError("task_args.digits: must be between 1 and 4")
        if not ops or set(ops) - set("+-*"):
            raise TaskError("task_args.ops: use a non-empty subset of '+-*'")
        self.digits, self.ops, self.eval_size = digits, ops, eval_size

    def _make(self, rng) -> Problem:
        hi = 10**self.digits - 1
        a, b = rng.randint(0, hi), rng.randint(0, hi)
        op = rng.choice(self.ops)
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        return Problem(f"{a}{op}{b}=", str(value))

    def problem(self, seed: int, index: int) -> Problem:
        return self._make(rng_for(seed, index))

    def eval_set(self) -> list[Problem]:
        return [self._make(rng_for(0, i, EVAL_SALT)) for i in range(self.eval_size)]


class ReverseTask(Task):
    """String reversal: `rev:abcd=` -> `dcba`."""

    name = "reverse"

    def __init__(self, min_len: int = 3, max_len: int = 5, eval_size: int = 64):
        if not 1 <= min_len <= max_len <= 8:
            raise TaskError("task_args: need 1 <= min_len <= max_len <= 8")
        self.min_len, self.max_len, self.eval_size = min_len, max_len, eval_size

    def _make(self, rng) -> Problem:
        word = "".join(rng.choice(string.ascii_lowercase[:10]) for _ in range(rng.randint(self.min_len, self.max_len)))
        return Problem(f"rev:{word}=", word[::-1])

    def problem(self, seed: int, index: int) -> Problem:
        return self._make(rng_for(seed, index, 1))

    def eval_set(self) -> list[Problem]:
        return [self._make(rng_for(0, i, EVAL_SALT + 1)) for i in range(self.eval_size)]


class SortTask(Task):
    """Digit sorting: `sort:3142=` -> `1234`."""

    name = "sort"

    def __init__(self, min_len: int = 3, max_len: int = 5, eval_size: int = 64):
        if not 1 <= min_len <= max_len <= 8:
            raise TaskError("task_args: need 1 <= min_len <= max_len <= 8")
        self.min_len, self.max_len, self.eval_size = min_len, max_len, eval_size

    def _make(self, rng) -> Problem:
        digits = "".join(rng.choice(string.digits) for _ in range(rng.randint(self.min_len, self.max_len)))
        return Problem(f"sort:{digits}=", "".join(sorted(digits)))

    def problem(self, seed: int, index: int) -> Problem:
        return self._make(rng_for(seed, index, 2))

    def eval_set(self) -> list[Problem]:
        return [self._make(rng_for(0, i, EVAL_SALT + 2)) for i in range(self.eval_size)]
