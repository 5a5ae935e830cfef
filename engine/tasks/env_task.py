"""Multi-turn environments as tasks: `task = "env:path/file.py:Class"` or `"env:module:Class"`
(its `task_args` go to the constructor, one instance per episode), and the built-in `retail`.

An environment has `reset(seed, index) -> str` (the first observation) and
`step(text) -> (observation or None, reward, done)`; either may be `async`. Its class may say
`reward_mode = "sum"` (default: the episode's reward is the sum of its steps' rewards) or
`"last"`, and `role = "user"` (default) or `"tool"` (how its turns are rendered with a chat
template). The code runs in the tenant's worker process (engine.tasks.env_worker); episodes
are run by engine.episodes. `task_args.eval_size` (not passed to the environment) sets the
greedy eval's episodes.
"""

from __future__ import annotations

from engine.tasks.base import EVAL_SIZE_ARG, Arg, Problem, Task, TaskError

ENV_PREFIX = "env:"
RETAIL_REF = "engine.tasks.retail:RetailEnv"
EVAL_SEED = 0x5EED


class EnvTask(Task):
    name = "env"
    multi_turn = True

    def __init__(self, ref: str, eval_size: int = 64, **env_args):
        self.ref, self.env_args, self.eval_size = ref, env_args, eval_size

    @classmethod
    def check_args(cls, args):
        if not isinstance(args, dict):
            raise TaskError(f"task_args: expected a table, got {type(args).__name__}")
        if "eval_size" in args:
            EVAL_SIZE_ARG.validate("task_args.eval_size", args["eval_size"])
        return args

    def episodes(self, seed: int, start: int, count: int) -> list[tuple[int, int]]:
        return [(seed, start + i) for i in range(count)]

    def eval_episodes(self) -> list[tuple[int, int]]:
        return [(EVAL_SEED, i) for i in range(self.eval_size)]

    def problem(self, seed: int, index: int) -> Problem:
        return Problem(prompt="", answer="")  # episodes begin with the environment's reset()

    def eval_set(self) -> list[Problem]:
        return [Problem(prompt="", answer="") for _ in range(self.eval_size)]

    def sample_prompts(self, seed: int, n: int = 64) -> list[str]:
        return []


class RetailTask(EnvTask):
    """The built-in tool-use world (engine.tasks.retail)."""

    name = "retail"
    ARGS = {"tool_latency_ms": Arg(float, 0, 60_000), "orders": Arg(int, 1, 20), "eval_size": EVAL_SIZE_ARG}

    def __init__(self, eval_size: int = 64, **env_args):
        super().__init__(RETAIL_REF, eval_size, **env_args)

    check_args = classmethod(Task.check_args.__func__)  # its own ARGS, strictly (EnvTask's accepts any)
