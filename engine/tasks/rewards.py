"""User reward functions: `module:function` or `path/to/file.py:function`, run with a deadline."""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import threading
from pathlib import Path
from typing import Callable

from engine.tasks.base import TaskError

RewardFn = Callable[[str, str, str], float]


class RewardError(RuntimeError):
    """A reward function raised, hung, or returned something that is not a finite number."""


def import_plugin(ref: str, where: str, usage: str, prefix: str):
    """(module, attribute name) of a user plugin `module:attr` or `path/file.py:attr`; raises
    TaskError starting with `where` (e.g. "reward:") saying what is wrong."""
    module_part, sep, attr = ref.rpartition(":")
    if not sep or not module_part or not attr:
        raise TaskError(f"{where} {ref!r} must be {usage}")
    try:
        if module_part.endswith(".py"):
            path = Path(module_part).expanduser().resolve()
            if not path.is_file():
                raise TaskError(f"{where} file {path} does not exist")
            name = f"{prefix}{abs(hash(str(path)))}"
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_part)
    except TaskError:
        raise
    except Exception as exc:  # a plugin can fail to import in any way
        raise TaskError(f"{where} cannot import {module_part!r}: {type(exc).__name__}: {exc}") from None
    return module, attr


def load_reward(ref: str) -> RewardFn:
    """Import the callable a spec's `reward` names; raises TaskError saying what is wrong."""
    module, attr = import_plugin(ref, "reward:", "'module:function' or 'path/file.py:function'", "clora_reward_")
    module_part = ref.rpartition(":")[0]
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise TaskError(f"reward: {module_part!r} has no callable {attr!r}")
    return fn


def score_all(fn: RewardFn, items: list[tuple[str, str, str]], timeout_s: float) -> list[float]:
    """Score (prompt, completion, answer) triples in a daemon thread with a deadline.

    A hung function cannot be killed from Python; its thread is abandoned (daemon) so
    that only the tenant that owns it is failed and the engine goes on.
    """
    result: dict = {}

    def run() -> None:
        try:
            result["scores"] = [float(fn(p, c, a)) for p, c, a in items]
        except BaseException as exc:  # noqa: BLE001 - report anything the plugin raised
            result["error"] = exc

    worker = threading.Thread(target=run, name="reward", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise RewardError(f"reward function did not return within {timeout_s:g} s")
    if "error" in result:
        exc = result["error"]
        raise RewardError(f"reward function raised {type(exc).__name__}: {exc}")
    scores = result["scores"]
    bad = [s for s in scores if not math.isfinite(s)]
    if bad:
        raise RewardError(f"reward function returned a non-finite value ({bad[0]})")
    return scores
