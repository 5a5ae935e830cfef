"""Built-in tasks with verifiable answers, small enough for the embedded model."""

from __future__ import annotations

import string

from engine.tasks.base import EVAL_SIZE_ARG, Arg, Problem, Task, TaskError, rng_for

EVAL_SALT = 0x5EED  # the eval stream never overlaps a training stream


def _ops_problem(ops: str) -> str | None:
    return "use a non-empty subset of '+-*'" if not ops or set(ops) - set("+-*") else None


class _LengthTask(Task):
    """Tasks over strings of min_len..max_len characters."""

    ARGS = {"min_len": Arg(int, 1, 8), "max_len": Arg(int, 1, 8), "eval_size": EVAL_SIZE_ARG}

    @classmethod
    def check_args(cls, args):
        super().check_args(args)
        lo, hi = args.get("min_len", 3), args.get("max_len", 5)
        if lo > hi:
            key = "min_len" if "min_len" in args else "max_len"
            raise TaskError(f"task_args.{key}: need min_len <= max_len, got min_len {lo} and max_len {hi}")
        return args


class ArithmeticTask(Task):
    """Integer arithmetic: `37+45=` -> `82`. `digits` sets operand size, `ops` the operators."""

    name = "arithmetic"
    ARGS = {"digits": Arg(int, 1, 4), "ops": Arg(str, check=_ops_problem), "eval_size": EVAL_SIZE_ARG}

    def __init__(self, digits: int = 2, ops: str = "+", eval_size: int = 64):
        self.check_args({"digits": digits, "ops": ops, "eval_size": eval_size})
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


class ReverseTask(_LengthTask):
    """String reversal: `rev:abcd=` -> `dcba`."""

    name = "reverse"

    def __init__(self, min_len: int = 3, max_len: int = 5, eval_size: int = 64):
        self.check_args({"min_len": min_len, "max_len": max_len, "eval_size": eval_size})
        self.min_len, self.max_len, self.eval_size = min_len, max_len, eval_size

    def _make(self, rng) -> Problem:
        word = "".join(rng.choice(string.ascii_lowercase[:10]) for _ in range(rng.randint(self.min_len, self.max_len)))
        return Problem(f"rev:{word}=", word[::-1])

    def problem(self, seed: int, index: int) -> Problem:
        return self._make(rng_for(seed, index, 1))

    def eval_set(self) -> list[Problem]:
        return [self._make(rng_for(0, i, EVAL_SALT + 1)) for i in range(self.eval_size)]


class SortTask(_LengthTask):
    """Digit sorting: `sort:3142=` -> `1234`."""

    name = "sort"

    def __init__(self, min_len: int = 3, max_len: int = 5, eval_size: int = 64):
        self.check_args({"min_len": min_len, "max_len": max_len, "eval_size": eval_size})
        self.min_len, self.max_len, self.eval_size = min_len, max_len, eval_size

    def _make(self, rng) -> Problem:
        digits = "".join(rng.choice(string.digits) for _ in range(rng.randint(self.min_len, self.max_len)))
        return Problem(f"sort:{digits}=", "".join(sorted(digits)))

    def problem(self, seed: int, index: int) -> Problem:
        return self._make(rng_for(seed, index, 2))

    def eval_set(self) -> list[Problem]:
        return [self._make(rng_for(0, i, EVAL_SALT + 2)) for i in range(self.eval_size)]
