"""Reward environments: built-in verifiable tasks, JSONL datasets, plugin rewards."""

from engine.tasks.base import Problem, Task, TaskError
from engine.tasks.registry import BUILTIN_TASKS, make_task

__all__ = ["BUILTIN_TASKS", "Problem", "Task", "TaskError", "make_task"]
