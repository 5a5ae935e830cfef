"""A dataset task: one `{"prompt": ..., "answer": ...}` object per line."""

from __future__ import annotations

import json
import math
from pathlib import Path

from engine.tasks.base import EVAL_SIZE_ARG, Arg, Problem, Task, TaskError, normalize, rng_for


class JsonlTask(Task):
    """Problems from a JSONL file; the last `eval_size` lines (at most a quarter) are held out.

    `match = "exact"` compares stripped strings, `"numeric"` compares as numbers.
    """

    name = "jsonl"
    ARGS = {"match": Arg(str, choices=("exact", "numeric")), "eval_size": EVAL_SIZE_ARG}

    def __init__(self, path: str, match: str = "exact", eval_size: int = 64):
        self.check_args({"match": match, "eval_size": eval_size})
        self.path, self.match = Path(path).expanduser(), match
        self.problems = self._read(self.path)
        held = min(eval_size, len(self.problems) // 4)
        self.train = self.problems[: len(self.problems) - held] if held else self.problems
        self.held_out = self.problems[len(self.problems) - held :] if held else self.problems[:eval_size]
        self.eval_size = len(self.held_out)

    @staticmethod
    def _read(path: Path) -> list[Problem]:
        if not path.is_file():
            raise TaskError(f"task: dataset {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TaskError(f"task: cannot read dataset {path}: {exc}") from None
        problems = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                problems.append(Problem(str(row["prompt"]), str(row["answer"])))
            except (ValueError, KeyError, TypeError) as exc:
                raise TaskError(f"task: {path}:{lineno}: need an object with 'prompt' and 'answer' ({exc})") from None
        if not problems:
            raise TaskError(f"task: dataset {path} has no problems")
        return problems

    def problem(self, seed: int, index: int) -> Problem:
        # A fresh shuffle each epoch, fixed by the seed.
        epoch, pos = divmod(index, len(self.train))
        order = list(range(len(self.train)))
        rng_for(seed, epoch, 3).shuffle(order)
        return self.train[order[pos]]

    def eval_set(self) -> list[Problem]:
        return list(self.held_out)

    def sample_prompts(self, seed: int, n: int = 64) -> list[str]:
        return sorted((p.prompt for p in self.problems), key=len, reverse=True)[:n]

    def is_correct(self, completion: str, answer: str) -> bool:
        if self.match == "exact":
            return normalize(completion) == normalize(answer)
        try:
            return math.isclose(float(completion.strip()), float(answer.strip()), rel_tol=1e-6, abs_tol=1e-9)
        except ValueError:
            return False
