"""The rollout interface: jobs of many tenants sampled together, continuously.

The scheduler submits a job (a tag and its requests), calls `advance()` as long as
the backend is busy, and gets each job back as soon as its own rows are done; a job
can be cancelled in between (pause, kill). `generate()` is the blocking form.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field


@dataclass
class SampleRequest:
    """`n` samples of one prompt with one tenant's adapter."""

    adapter: str
    prompt_ids: list[int]
    n: int
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    greedy: bool = False
    ignore_eos: bool = False
    priority: float = 1.0  # share of a contended batch, relative to other requests


@dataclass
class Completion:
    """Sampled tokens (the stop token included when one was sampled) and the sampler's
    raw log-probs of them, for the sampler/trainer mismatch metric."""

    token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    finished: bool = False


class RolloutBackend(ABC):
    """Generation for all tenants at once. Adapter names are tenant ids."""

    name = "base"

    @property
    @abstractmethod
    def slots(self) -> int:
        """How many adapters can be in one batch (admission control reads this)."""

    @abstractmethod
    def add_adapter(self, name: str) -> None:
        """Make a tenant's (freshly initialised) adapter available for sampling."""

    @abstractmethod
    def sync_adapter(self, name: str) -> None:
        """Publish the trainer's current weights of this adapter to the sampler."""

    @abstractmethod
    def remove_adapter(self, name: str) -> None:
        """Free the adapter's slot and memory in the sampler."""

    @abstractmethod
    def submit(self, tag, requests: list[SampleRequest]) -> None:
        """Start sampling a job; its rows join the shared batch at the next `advance()`."""

    @abstractmethod
    def cancel(self, tag) -> bool:
        """Drop a job wherever it is; True if it was there."""

    @abstractmethod
    def advance(self) -> list[tuple[object, list[list[Completion]] | BaseException]]:
        """Do one unit of sampling work (a decode step) for every job; return the jobs that
        finished, each with its completions (request order) or the error that failed it."""

    @property
    @abstractmethod
    def busy(self) -> bool:
        """Jobs are in flight."""

    @property
    def steps_to_drain(self) -> int | None:
        """At most how many more `advance()` calls finish every job in flight (None: unknown).
        The scheduler lets a batch this close to done finish before it trains anyone."""
        return None

    def generate(self, requests: list[SampleRequest]) -> list[list[Completion]]:
        """Completions for every request, in order (blocking; other jobs keep going)."""
        tag = ("generate", object())
        self.submit(tag, requests)
        while True:
            for done, result in self.advance():
                if done == tag:
                    if isinstance(result, BaseException):
                        raise result
                    return result

    def close(self) -> None:
        """Release the inference engine."""
