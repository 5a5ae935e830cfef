"""Task lookup by name: built-ins, or `jsonl:PATH`."""

from __future__ import annotations

from engine.tasks.base import Task, TaskError
from engine.tasks.builtin import ArithmeticTask, ReverseTask, SortTask
from engine.tasks.client import ClientTask
from engine.tasks.env_task import ENV_PREFIX, EnvTask, RetailTask
from engine.tasks.jsonl import JsonlTask

BUILTIN_TASKS = {cls.name: cls for cls in (ArithmeticTask, ReverseTask, SortTask, RetailTask)}
CLIENT_TASKS = {ClientTask.name: ClientTask}  # tenants driven by an API client (not `start`)


def task_class(name: str) -> type[Task]:
    if name.startswith("jsonl:"):
        return JsonlTask
    if name.startswith(ENV_PREFIX):
        return EnvTask
    if name in CLIENT_TASKS:
        return CLIENT_TASKS[name]
    if name not in BUILTIN_TASKS:
        known = ", ".join(sorted(BUILTIN_TASKS))
        raise TaskError(f"task: unknown task {name!r}; use one of {known}, 'jsonl:PATH' or 'env:path/file.py:Class'")
    return BUILTIN_TASKS[name]


def check_task_args(name: str, args: dict | None) -> None:
    """Validate a spec's `task_args` for its task (types, ranges, known keys) without building
    the task; raises TaskError naming the field. Unknown task names are left to make_task."""
    try:
        cls = task_class(name)
    except TaskError:
        return
    cls.check_args({} if args is None else args)


def make_task(name: str, args: dict | None = None) -> Task:
    """Build the task a spec names; raises TaskError naming what is wrong."""
    cls = task_class(name)
    args = dict(cls.check_args({} if args is None else args))
    try:
        if cls is JsonlTask:
            return JsonlTask(name[len("jsonl:") :], **args)
        if cls is EnvTask:
            return EnvTask(name[len(ENV_PREFIX) :], **args)
        return cls(**args)
    except TypeError as exc:
        raise TaskError(f"task_args: {exc}") from None
