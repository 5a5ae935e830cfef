"""Sampling with the trainer's own PEFT model: continuous multi-adapter batches.

No weight sync is needed: the sampler *is* the trainer's model. The work is done by
engine.rollout.decoder.BatchDecoder (vectorized sampling, rows leave when they stop,
one gathered LoRA computation for all adapters). Each request draws from its own
seeded stream, so a tenant's samples do not depend on which other tenants share the batch.
"""

from __future__ import annotations

from engine.rollout.base import Completion, RolloutBackend, SampleRequest
from engine.rollout.decoder import BatchDecoder
from engine.train.trainer import MultiAdapterTrainer


class PeftRolloutBackend(RolloutBackend):
    name = "peft"

    def __init__(self, trainer: MultiAdapterTrainer, pad_id: int, stop_ids: list[int] | int, max_slots: int,
                 max_batch: int = 1024):
        self.trainer, self.pad_id = trainer, pad_id
        self.stop_ids = [stop_ids] if isinstance(stop_ids, int) else list(stop_ids)
        self._slots, self.max_batch = max_slots, max_batch
        self.decoder = self._new_decoder()
        self.jobs: dict[object, list[SampleRequest]] = {}

    def _new_decoder(self) -> BatchDecoder:
        return BatchDecoder(self.trainer, self.pad_id, self.stop_ids, max_rows=self.max_batch)

    @property
    def slots(self) -> int:
        return self._slots

    def add_adapter(self, name: str) -> None:
        pass  # the trainer already holds it

    def sync_adapter(self, name: str) -> None:
        pass  # same weights, nothing to copy (the decoder notices the trainer's version)

    def remove_adapter(self, name: str) -> None:
        pass  # the trainer frees it

    def submit(self, tag, requests: list[SampleRequest]) -> None:
        self.decoder.submit(tag, requests)
        self.jobs[tag] = requests

    def cancel(self, tag) -> bool:
        self.jobs.pop(tag, None)
        return self.decoder.cancel(tag)

    @property
    def busy(self) -> bool:
        return self.decoder.busy

    @property
    def steps_to_drain(self) -> int | None:
        return self.decoder.steps_to_drain

    @property
    def active_rows(self) -> int:
        return self.decoder.active_rows

    def advance(self) -> list[tuple[object, list[list[Completion]] | BaseException]]:
        try:
            finished = self.decoder.advance()
        except Exception:  # noqa: BLE001 - find the job that broke the shared batch
            return self._isolate()
        for tag, _ in finished:
            self.jobs.pop(tag, None)
        return finished

    def _isolate(self) -> list:
        """The shared batch failed: run every job alone so only the culprit fails."""
        jobs, self.jobs = self.jobs, {}
        self.decoder = self._new_decoder()
        out = []
        for tag, requests in jobs.items():
            alone = self._new_decoder()
            try:
                out.append((tag, alone.generate(requests)))
            except Exception as exc:  # noqa: BLE001
                out.append((tag, exc))
        return out
