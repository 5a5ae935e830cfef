"""Experiment and engine configuration: TOML parsing and validation.

Every field has a default except `name`. Validation errors name the field
(`rollout.temperature: must be > 0, got -1`) so a hand-written file is easy to fix.
"""

from __future__ import annotations

import copy
import math
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from engine.tasks import TaskError, check_task_args

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


class SpecError(ValueError):
    """An experiment spec is invalid; the message names the offending field."""


@dataclass
class LoraSpec:
    rank: int = 8
    alpha: float = 16.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class OptimSpec:
    lr: float = 2e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    grad_clip: float = 1.0


@dataclass
class RolloutSpec:
    prompts_per_step: int = 8
    num_generations: int = 8
    max_tokens: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    ignore_eos: bool = False  # always sample max_tokens (benchmarks: fixed work per step)
    # 1: sample step k+1 while step k scores and trains (one step off-policy; the loss's
    # importance ratio is taken against the sampler's own log-probs). 0: on-policy.
    off_policy_steps: int = 0
    max_turns: int = 4  # multi-turn (environment) tasks: model turns per episode at most


@dataclass
class GrpoSpec:
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: same as epsilon (DAPO's clip-higher when set)
    beta: float = 0.0
    loss_type: str = "dapo"
    scale_rewards: bool = True  # divide advantages by the group's reward std
    iterations: int = 1  # policy-gradient updates per rollout batch (the clip acts when > 1)


@dataclass
class ExperimentSpec:
    """One tenant: a LoRA adapter, its task, reward and hyper-parameters."""

    name: str
    task: str = "arithmetic"
    task_args: dict[str, Any] = field(default_factory=dict)
    reward: str | None = None
    reward_timeout_s: float = 30.0
    steps: int = 40
    seed: int = 0
    priority: float = 1.0  # share of a contended sampling batch, relative to other tenants
    checkpoint_every: int = 5
    eval_every: int = 5
    lora: LoraSpec = field(default_factory=LoraSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    rollout: RolloutSpec = field(default_factory=RolloutSpec)
    grpo: GrpoSpec = field(default_factory=GrpoSpec)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ExperimentSpec":
        return parse_spec(data)

    def with_overrides(self, overrides: dict[str, Any]) -> "ExperimentSpec":
        """A copy with dotted-key overrides applied (`lora.rank=16`), validated again."""
        data = self.to_dict()
        for key, value in overrides.items():
            node = data
            *parents, leaf = key.split(".")
            for part in parents:
                if not isinstance(node.get(part), dict):
                    raise SpecError(f"{key}: no such field")
                node = node[part]
            if leaf not in node and not (parents and parents[0] == "task_args") and key != "task_args":
                raise SpecError(f"{key}: no such field")
            node[leaf] = value
        return parse_spec(data)


def parse_literal(text: str) -> Any:
    """An override value as typed on a command line or in a form: a TOML literal
    (3, 1e-3, true, [1, 2], "x"), else the text itself as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


SECTIONS = {"lora": LoraSpec, "optim": OptimSpec, "rollout": RolloutSpec, "grpo": GrpoSpec}


def _coerce(where: str, value: Any, default: Any, annotation: str) -> Any:
    """Check a TOML value against the field's type; ints are accepted for floats."""
    if "float" in annotation and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if value is None and "None" in annotation:
        return None
    expected = {"int": int, "float": float, "str": str, "bool": bool}
    base = annotation.split("|")[0].strip()
    if base in expected:
        ok = isinstance(value, expected[base]) and not (base != "bool" and isinstance(value, bool))
        if not ok:
            raise SpecError(f"{where}: expected {base}, got {type(value).__name__} {value!r}")
        if base == "float" and not math.isfinite(value):
            raise SpecError(f"{where}: must be a finite number, got {value!r}")
    elif base.startswith("list"):
        if not isinstance(value, list):
            raise SpecError(f"{where}: expected a list, got {type(value).__name__}")
        for i, item in enumerate(value):
            if isinstance(item, float) and not math.isfinite(item):
                raise SpecError(f"{where}[{i}]: must be a finite number, got {item!r}")
    elif base.startswith("dict") and not isinstance(value, dict):
        raise SpecError(f"{where}: expected a table, got {type(value).__name__}")
    return value


def _fill(cls, data: dict[str, Any], prefix: str):
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise SpecError(f"{prefix}{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")
    values = {}
    for name, f in known.items():
        if name not in data:
            continue
        if name in SECTIONS and cls is ExperimentSpec:
            if not isinstance(data[name], dict):
                raise SpecError(f"{name}: expected a table [{name}]")
            values[name] = _fill(SECTIONS[name], data[name], f"{name}.")
        else:
            values[name] = _coerce(prefix + name, copy.deepcopy(data[name]), None, str(f.type))
    return cls(**values)


def _check(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise SpecError(f"{where}: {message}")


def parse_spec(data: dict[str, Any]) -> ExperimentSpec:
    """Build and validate a spec from a TOML-shaped dict."""
    if not isinstance(data, dict):
        raise SpecError("spec: expected a table of fields")
    if "name" not in data:
        raise SpecError("name: required (a short id such as 'add-r8-lr3e-4')")
    spec = _fill(ExperimentSpec, data, "")
    _check(bool(NAME_RE.match(spec.name)), "name", "use 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit")
    _check(spec.steps >= 1, "steps", f"must be >= 1, got {spec.steps}")
    _check(spec.checkpoint_every >= 1, "checkpoint_every", f"must be >= 1, got {spec.checkpoint_every}")
    _check(spec.eval_every >= 0, "eval_every", f"must be >= 0 (0 = never), got {spec.eval_every}")
    _check(spec.reward_timeout_s > 0, "reward_timeout_s", "must be > 0")
    lo, op, ro, gr = spec.lora, spec.optim, spec.rollout, spec.grpo
    _check(1 <= lo.rank <= 256, "lora.rank", f"must be in 1..256, got {lo.rank}")
    _check(lo.alpha > 0, "lora.alpha", f"must be > 0, got {lo.alpha}")
    _check(bool(lo.target_modules) and all(isinstance(m, str) and m for m in lo.target_modules),
           "lora.target_modules", "must be a non-empty list of module names")
    _check(op.lr > 0, "optim.lr", f"must be > 0, got {op.lr}")
    _check(len(op.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in op.betas),
           "optim.betas", f"must be two numbers in [0, 1), got {op.betas}")
    op.betas = [float(b) for b in op.betas]
    _check(op.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _check(op.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 = no clipping)")
    _check(1 <= ro.prompts_per_step <= 4096, "rollout.prompts_per_step", f"must be in 1..4096, got {ro.prompts_per_step}")
    _check(1 <= ro.num_generations <= 1024, "rollout.num_generations", f"must be in 1..1024, got {ro.num_generations}")
    _check(1 <= ro.max_tokens <= 32768, "rollout.max_tokens", f"must be in 1..32768, got {ro.max_tokens}")
    _check(ro.temperature > 0, "rollout.temperature", f"must be > 0, got {ro.temperature}")
    _check(0 < ro.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {ro.top_p}")
    _check(ro.off_policy_steps in (0, 1), "rollout.off_policy_steps", f"must be 0 or 1, got {ro.off_policy_steps}")
    _check(1 <= ro.max_turns <= 64, "rollout.max_turns", f"must be in 1..64, got {ro.max_turns}")
    _check(0 < spec.priority <= 1000, "priority", f"must be in (0, 1000], got {spec.priority}")
    _check(gr.epsilon >= 0, "grpo.epsilon", "must be >= 0")
    _check(gr.epsilon_high is None or gr.epsilon_high >= 0, "grpo.epsilon_high", "must be >= 0")
    _check(gr.beta >= 0, "grpo.beta", "must be >= 0")
    _check(gr.loss_type in LOSS_TYPES, "grpo.loss_type", f"must be one of {', '.join(LOSS_TYPES)}, got {gr.loss_type!r}")
    _check(1 <= gr.iterations <= 16, "grpo.iterations", "must be in 1..16")
    try:
        check_task_args(spec.task, spec.task_args)
    except TaskError as exc:
        raise SpecError(str(exc)) from None
    return spec


def load_spec(path: str | Path) -> ExperimentSpec:
    """Read and validate an experiment file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: not valid TOML: {exc}") from None
    return resolve_relative_paths(parse_spec(data), path.resolve().parent)


def resolve_relative_paths(spec: ExperimentSpec, base: Path) -> ExperimentSpec:
    """Dataset and reward-file paths in an experiment file are relative to that file,
    not to wherever the engine daemon happens to run."""
    if spec.task.startswith("jsonl:"):
        data = Path(spec.task[len("jsonl:") :]).expanduser()
        if not data.is_absolute():
            spec.task = f"jsonl:{base / data}"
    if spec.reward:
        module, sep, fn = spec.reward.rpartition(":")
        if sep and module.endswith(".py") and not Path(module).expanduser().is_absolute():
            spec.reward = f"{base / module}:{fn}"
    return spec


DEFAULT_MAX_STEP_TOKENS = 1 << 18
DEFAULT_HTTP_PORT = 8473


@dataclass
class EngineConfig:
    """How the engine runs: model, backend, capacity. Set at `engine start`."""

    model: str = "embedded"
    backend: str = "auto"  # auto | vllm | peft
    max_loras: int = 8  # adapter slots: tenants in flight at once
    max_lora_rank: int = 64
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"
    seed: int = 0
    vllm_memory_fraction: float = 0.15  # on CPU this is a share of host RAM
    vllm_kv_cache_bytes: int = 256 << 20
    max_model_len: int | None = None  # None: the model's own maximum
    # Work budget per step of one tenant: prompts_per_step * num_generations * (longest prompt +
    # max_tokens) tokens. The default experiment needs ~1k; a spec above this is refused at submit.
    max_step_tokens: int = DEFAULT_MAX_STEP_TOKENS
    # One mixed-adapter forward/backward for all tenants' updates (exact, see MultiAdapterTrainer.train).
    # None = auto = fused (micro-batched, so peak memory stays bounded): with the shared prompt
    # pass and the batched LoRA it halves training time on this CPU too (8 tenants x 64 rows:
    # 302 ms fused vs 628 ms one tenant at a time, p25); --serial-train turns it off.
    fused_train: bool | None = None
    # The HTTP APIs (OpenAI-compatible /v1) on 127.0.0.1:http_port; 0 turns them off.
    http_port: int = DEFAULT_HTTP_PORT
