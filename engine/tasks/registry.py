"""Task lookup by name: built-ins, or `jsonl:PATH`."""

from __future__ import annotations

from engine.tasks.base import Task, TaskError
from engine.tasks.builtin import ArithmeticTask, ReverseTask, SortTask
from engine.tasks.jsonl import JsonlTask

BUILTIN_TASKS = {cls.name: cls for cls in (ArithmeticTask, ReverseTask, SortTask)}


def make_task(name: str, args: dict | None = None) -> Task:
    """Build the task a spec names; raises TaskError naming what is wrong."""
    args = dict(args or {})
    try:
        if name.startswith("jsonl:"):
            return JsonlTask(name[len("jsonl:") :], **args)
        if name not in BUILTIN_TASKS:
            known = ", ".join(sorted(BUILTIN_TASKS))
            raise TaskError(f"task: unknown task {name!r}; use one of {known} or 'jsonl:PATH'")
        return BUILTIN_TASKS[name](**args)
    except TypeError as exc:
        raise TaskError(f"task_args: {exc}") from None
