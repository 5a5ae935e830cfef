"""The task of a client-driven tenant (a Tinker training client): the client brings its own
prompts, rewards and losses through the API, so the engine samples nothing on its own."""

from __future__ import annotations

from engine.protocol import TINKER_TASK
from engine.tasks.base import Problem, Task, TaskError

CLIENT_TASK = TINKER_TASK


class ClientTask(Task):
    name = CLIENT_TASK
    ARGS: dict = {}

    def problem(self, seed: int, index: int) -> Problem:
        raise TaskError("a Tinker tenant has no built-in problems: its client sends its own data")

    def eval_set(self) -> list[Problem]:
        return []

    def sample_prompts(self, seed: int, n: int = 64) -> list[str]:
        return []

    def is_correct(self, completion: str, answer: str) -> bool:
        return False
