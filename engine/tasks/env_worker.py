"""Environment code (a multi-turn task's `reset` / `step`) runs in a worker process of its own,
never in the engine: like a reward function (engine.tasks.reward_worker) it can raise, hang
or exit, and then only its tenant fails. One worker per tenant holds one environment
instance per episode; the calls of one turn (every episode of the step) run concurrently in
the worker (async methods on one event loop, plain ones in threads), so a tool's latency is
paid once per turn, not once per episode.

Protocol (JSON lines): `{"ref": "...", "args": {...}}` -> `{"ok": true, "reward_mode", "role"}`
| `{"error"}`; `{"reset": [[episode, seed, index], ...]}` -> `{"obs": [...]}`;
`{"step": [[episode, text], ...]}` -> `{"results": [[obs or null, reward, done], ...]}`;
any failure -> `{"error": "..."}`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import sys
import threading

from engine.tasks.base import TaskError
from engine.tasks.reward_worker import RewardWorker, reply_channel
from engine.tasks.rewards import RewardError, import_plugin


def load_env_class(ref: str):
    """`path/file.py:Class` or `module:Class`; raises TaskError saying what is wrong."""
    module, attr = import_plugin(ref, "task: env", "'env:path/file.py:Class' or 'env:module:Class'", "clora_env_")
    module_part = ref.rpartition(":")[0]
    cls = getattr(module, attr, None)
    if not isinstance(cls, type):
        raise TaskError(f"task: {module_part!r} has no class {attr!r}")
    for method in ("reset", "step"):
        if not callable(getattr(cls, method, None)):
            raise TaskError(f"task: env class {attr!r} has no {method}() method")
    return cls


class EnvWorker(RewardWorker):
    """One tenant's environments, behind a killable process (the reward worker's pipe and deadline)."""

    MODULE = "engine.tasks.env_worker"

    def __init__(self, ref: str, args: dict, start_timeout_s: float = 30.0):
        super().__init__(ref, start_timeout_s)
        self.args = args
        self.info: dict = {}
        # One conversation at a time on the pipe: a step abandoned by a pause may still be
        # waiting for its answer when the redone step's reset is sent.
        self.lock = threading.Lock()

    def _spawn(self) -> None:
        self._popen()
        reply = self._call({"ref": self.ref, "args": self.args}, self.start_timeout_s, "starting the environment")
        self.info = reply

    def _call(self, message: dict, timeout_s: float, doing: str) -> dict:
        try:
            reply = self._ask(message, timeout_s, doing)
        except RewardError as exc:
            raise EnvError(str(exc).replace("reward function", "environment").replace("reward worker", "environment worker")) from None
        if "error" in reply:
            self.close()
            raise EnvError(reply["error"])
        return reply

    def ensure(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self._spawn()

    def _send(self, message: dict, timeout_s: float, doing: str) -> dict:
        with self.lock:
            self.ensure()
            return self._call(message, timeout_s, doing)

    def reset(self, episodes: list[tuple[str, int, int]], timeout_s: float) -> list[str]:
        obs = self._send({"reset": episodes}, timeout_s, "reset")["obs"]
        if len(obs) != len(episodes) or not all(isinstance(o, str) and o for o in obs):
            raise EnvError("reset() must return the first observation, a non-empty str")
        return obs

    def step(self, calls: list[tuple[str, str]], timeout_s: float) -> list[tuple[str | None, float, bool]]:
        results = self._send({"step": calls}, timeout_s, "step")["results"]
        out = []
        for obs, reward, done in results:
            if obs is not None and not isinstance(obs, str):
                raise EnvError(f"step() returned observation {obs!r}; it must be a str or None")
            if not isinstance(reward, (int, float)) or isinstance(reward, bool) or not math.isfinite(reward):
                raise EnvError(f"step() returned reward {reward!r}; it must be a finite number")
            out.append((obs, float(reward), bool(done) or obs is None))
        return out


class EnvError(RuntimeError):
    """An environment raised, hung, died, or returned something malformed."""


def _serve() -> None:
    say = reply_channel()
    cls, args, envs = None, {}, {}
    loop = asyncio.new_event_loop()

    async def together(calls):
        return await asyncio.gather(*calls)

    async def call(fn, *a):
        if inspect.iscoroutinefunction(fn):
            return await fn(*a)
        value = await asyncio.to_thread(fn, *a)
        return await value if inspect.isawaitable(value) else value

    for line in sys.stdin:
        message = json.loads(line)
        try:
            if "ref" in message:
                cls, args = load_env_class(message["ref"]), message.get("args") or {}
                try:
                    cls(**args)  # bad task_args fail at submit, not at the first step
                except Exception as exc:  # noqa: BLE001
                    raise TaskError(f"task_args: {cls.__name__}(**task_args) raised {type(exc).__name__}: {exc}") from None
                say({"ok": True, "reward_mode": getattr(cls, "reward_mode", "sum"), "role": getattr(cls, "role", "user")})
            elif "reset" in message:
                envs.clear()  # a new step: the last step's episodes are over
                for episode, _, _ in message["reset"]:
                    envs[episode] = cls(**args)
                obs = loop.run_until_complete(together(
                    [call(envs[e].reset, seed, index) for e, seed, index in message["reset"]]))
                say({"obs": list(obs)})
            else:
                results = loop.run_until_complete(together([call(envs[e].step, text) for e, text in message["step"]]))
                clean = []
                for r in results:
                    if not isinstance(r, (tuple, list)) or len(r) != 3:
                        raise TypeError(f"step() must return (observation or None, reward, done), got {r!r}")
                    obs, reward, done = r
                    clean.append([obs, reward if isinstance(reward, (int, float)) else repr(reward), bool(done)])
                say({"results": clean})
        except BaseException as exc:  # noqa: BLE001 - anything the environment did
            if isinstance(exc, TaskError):
                say({"error": str(exc)})
                continue
            where = "loading" if "ref" in message else ("reset()" if "reset" in message else "step()")
            say({"error": f"environment {where} raised {type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    _serve()
