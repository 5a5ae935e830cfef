"""One tenant: its state machine, data cursor, and the pure parts of its step.

A tenant's data position is its step number: step k samples training problems
k*prompts_per_step ... (k+1)*prompts_per_step-1 of its task stream, with sampling
seeds derived from (seed, step). Checkpointing the step therefore checkpoints the
data cursor and the sampling RNG exactly.
"""

from __future__ import annotations

import enum
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine import protocol
from engine.config import ExperimentSpec
from engine.rollout.base import Completion, SampleRequest
from engine.tasks import Task, make_task
from engine.tasks.base import Problem
from engine.tasks.client import CLIENT_TASK
from engine.tasks.reward_worker import RewardWorker
from engine.train.grpo import group_advantages
from engine.train.batch import TrainBatch


class State(str, enum.Enum):
    """A tenant's state; the values are the protocol's state names."""

    QUEUED = protocol.QUEUED
    WARMING = protocol.WARMING
    RUNNING = protocol.RUNNING
    PAUSED = protocol.PAUSED
    DONE = protocol.DONE
    KILLED = protocol.KILLED
    FAILED = protocol.FAILED


FINAL_STATES = {State(name) for name in protocol.FINAL_STATES}
IN_FLIGHT_STATES = {State.WARMING, State.RUNNING, State.PAUSED}  # hold an adapter slot

# Legal transitions; anything else is refused with a reason.
TRANSITIONS = {
# (DONE from QUEUED, WARMING or PAUSED: a Tinker client finished its session meanwhile.)
    State.QUEUED: {State.WARMING, State.PAUSED, State.DONE, State.KILLED, State.FAILED},
    State.WARMING: {State.RUNNING, State.PAUSED, State.DONE, State.KILLED, State.FAILED},
    State.RUNNING: {State.PAUSED, State.DONE, State.KILLED, State.FAILED},
    State.PAUSED: {State.RUNNING, State.QUEUED, State.DONE, State.KILLED, State.FAILED},
    State.DONE: set(), State.KILLED: set(), State.FAILED: set(),
}


def derived_seed(*parts: object) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF


@dataclass
class Rollouts:
    """What one step sampled: problems, their completions and the decoded texts."""

    problems: list[Problem]
    completions: list[list[Completion]]
    texts: list[list[str]]


@dataclass
class Tenant:
    id: str
    spec: ExperimentSpec
    state: State = State.QUEUED
    step: int = 0  # completed updates
    reason: str = ""
    error: str = ""
    created: float = field(default_factory=time.time)
    started: float | None = None  # start request accepted (warm-up is measured from here)
    first_step: float | None = None
    finished: float | None = None
    restore_from: Path | None = None  # checkpoint to load when (re)admitted after an engine restart
    warmup_s: float | None = None
    ready_since: float | None = None  # when it last became ready for a rollout (queue wait starts)
    phase: str = protocol.QUEUED
    phase_since: float = field(default_factory=time.time)
    last_eval_step: int = -1
    paused_from: State | None = None
    checkpoint_owed: bool = False  # a checkpoint failed (disk full): retried until it is written
    task: Task | None = None
    reward: RewardWorker | None = None  # user reward code, in its own process
    env: object | None = None  # multi-turn tasks: engine.tasks.env_worker.EnvWorker (its own process)
    restore_optimizer: bool = True  # with restore_from: load the optimizer state too
    client_step: object | None = None  # client tenants: engine.client_jobs.ClientStep since the last step
    logged: dict = field(default_factory=dict)  # client tenants: metrics the client logged for its next step

    def load_task(self) -> None:
        """Build the task; a user reward gets a worker process (started on first use)."""
        self.task = make_task(self.spec.task, self.spec.task_args)
        self.reward = RewardWorker(self.spec.reward) if self.spec.reward else None
        if self.multi_turn:
            from engine.tasks.env_worker import EnvWorker

            self.env = EnvWorker(self.task.ref, self.task.env_args)

    def close(self) -> None:
        """Stop the reward worker (the tenant left the engine or failed)."""
        if self.reward is not None:
            self.reward.close()
        if self.env is not None:
            self.env.close()

    @property
    def adapter(self) -> str:
        return self.id

    @property
    def multi_turn(self) -> bool:
        """Episodes with an environment (engine.episodes), not one prompt -> one completion."""
        return bool(getattr(self.task, "multi_turn", False))

    @property
    def client_driven(self) -> bool:
        """Driven by an API client (a Tinker training client), not by the scheduler's own loop."""
        return self.spec.task == CLIENT_TASK

    def set_phase(self, phase: str) -> None:
        self.phase, self.phase_since = phase, time.time()

    # -- step pieces ----------------------------------------------------------------
    def problems(self, step: int | None = None) -> list[Problem]:
        """The training prompts of a step (default: the next one to be trained, `self.step`)."""
        step = self.step if step is None else step
        per = self.spec.rollout.prompts_per_step
        return [self.task.problem(self.spec.seed, step * per + i) for i in range(per)]

    def sample_requests(self, tokenizer, problems: list[Problem], step: int | None = None) -> list[SampleRequest]:
        step = self.step if step is None else step
        ro = self.spec.rollout
        return [SampleRequest(adapter=self.adapter, prompt_ids=tokenizer.encode(p.prompt, add_special_tokens=False),
                              n=ro.num_generations, max_tokens=ro.max_tokens, temperature=ro.temperature,
                              top_p=ro.top_p, seed=derived_seed(self.spec.seed, step, i),
                              ignore_eos=ro.ignore_eos, priority=self.spec.priority)
                for i, p in enumerate(problems)]

    def eval_due(self) -> bool:
        return self.last_eval_step < self.step and self.eval_due_at(self.step)

    def eval_due_at(self, step: int) -> bool:
        """An eval is scheduled before training step `step` (and after the last one)."""
        every = self.spec.eval_every
        return every > 0 and (step % every == 0 or step >= self.spec.steps)

    def eval_requests(self, tokenizer) -> list[SampleRequest]:
        return [SampleRequest(adapter=self.adapter, prompt_ids=tokenizer.encode(p.prompt, add_special_tokens=False),
                              n=1, max_tokens=self.spec.rollout.max_tokens, greedy=True, seed=0,
                              priority=self.spec.priority)
                for p in self.task.eval_set()]

    def eval_accuracy(self, texts: list[str]) -> float:
        problems = self.task.eval_set()
        return sum(self.task.is_correct(t, p.answer) for t, p in zip(texts, problems)) / max(1, len(problems))

    def score(self, rollouts: Rollouts) -> tuple[list[float], list[bool]]:
        """Rewards and correctness, row-major (problem after problem, samples inside)."""
        items = [(p.prompt, text, p.answer) for p, texts in zip(rollouts.problems, rollouts.texts) for text in texts]
        correct = [self.task.is_correct(c, a) for _, c, a in items]
        if self.reward is None:
            return [1.0 if ok else 0.0 for ok in correct], correct
        return self.reward.score(items, self.spec.reward_timeout_s), correct

    def train_batch(self, tokenizer, rollouts: Rollouts, rewards: list[float]) -> tuple[TrainBatch, torch.Tensor]:
        """Left-padded prompts + right-padded completions, and the sampler's log-probs."""
        pad = tokenizer.pad_token_id
        prompt_ids = [tokenizer.encode(p.prompt, add_special_tokens=False) for p in rollouts.problems]
        rows = [(prompt_ids[i], c) for i, group in enumerate(rollouts.completions) for c in group]
        p_width = max(len(p) for p, _ in rows)
        c_width = max(1, max(len(c.token_ids) for _, c in rows))
        ids = torch.full((len(rows), p_width + c_width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        cmask = torch.zeros((len(rows), c_width), dtype=torch.float32)
        sampler_lp = torch.zeros((len(rows), c_width), dtype=torch.float32)
        for r, (p, c) in enumerate(rows):
            ids[r, p_width - len(p) : p_width] = torch.tensor(p)
            attn[r, p_width - len(p) : p_width] = 1
            n = len(c.token_ids)
            if n:
                ids[r, p_width : p_width + n] = torch.tensor(c.token_ids)
                attn[r, p_width : p_width + n] = 1
                cmask[r, :n] = 1
                if len(c.logprobs) == n:
                    sampler_lp[r, :n] = torch.tensor(c.logprobs)
        adv = group_advantages(torch.tensor(rewards, dtype=torch.float32), self.spec.rollout.num_generations,
                               scale=self.spec.grpo.scale_rewards)
        return TrainBatch(input_ids=ids, attention_mask=attn, completion_mask=cmask, advantages=adv,
                          prompt_width=p_width), sampler_lp
