"""Reward environments: built-in verifiable tasks, JSONL datasets, plugin rewards."""

from engine.tasks.base import Problem, Task, TaskError
from engine.tasks.registry import BUILTIN_TASKS, check_task_args, make_task

__all__ = ["BUILTIN_TASKS", "Problem", "Task", "TaskError", "check_task_args", "make_task"]
