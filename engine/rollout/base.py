"""The rollout interface: one call samples for every tenant in one shared batch."""

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
    def generate(self, requests: list[SampleRequest]) -> list[list[Completion]]:
        """Completions for every request, in order; requests of many adapters share batches."""

    def close(self) -> None:
        """Release the inference engine."""
