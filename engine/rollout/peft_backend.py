"""Sampling with the trainer's own PEFT model in mixed-adapter batches.

No weight sync is needed: the sampler *is* the trainer's model. Each request samples
with its own torch.Generator, so a tenant's samples do not depend on which other
tenants share the batch (concurrency does not change what a tenant learns).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from engine.rollout.base import Completion, RolloutBackend, SampleRequest
from engine.train.trainer import MultiAdapterTrainer


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits, dim=-1)
    drop = probs.cumsum(-1) - probs > top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


class PeftRolloutBackend(RolloutBackend):
    name = "peft"

    def __init__(self, trainer: MultiAdapterTrainer, pad_id: int, eos_id: int, max_slots: int, max_batch: int = 1024):
        self.trainer, self.pad_id, self.eos_id = trainer, pad_id, eos_id
        self._slots, self.max_batch = max_slots, max_batch

    @property
    def slots(self) -> int:
        return self._slots

    def add_adapter(self, name: str) -> None:
        pass  # the trainer already holds it

    def sync_adapter(self, name: str) -> None:
        pass  # same weights, nothing to copy

    def remove_adapter(self, name: str) -> None:
        pass  # the trainer frees it

    def generate(self, requests: list[SampleRequest]) -> list[list[Completion]]:
        rows = [(ri, req) for ri, req in enumerate(requests) for _ in range(req.n)]
        results: list[list[Completion]] = [[] for _ in requests]
        generators = {ri: torch.Generator().manual_seed(req.seed if req.seed is not None else ri) for ri, req in enumerate(requests)}
        for start in range(0, len(rows), self.max_batch):
            chunk = rows[start : start + self.max_batch]
            for (ri, _), completion in zip(chunk, self._generate_rows(chunk, generators)):
                results[ri].append(completion)
        return results

    @torch.no_grad()
    def _generate_rows(self, rows, generators) -> list[Completion]:
        device = self.trainer.device
        width = max(len(req.prompt_ids) for _, req in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (_, req) in enumerate(rows):
            ids[i, width - len(req.prompt_ids) :] = torch.tensor(req.prompt_ids)
            mask[i, width - len(req.prompt_ids) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        names = [req.adapter for _, req in rows]
        temps = torch.tensor([req.temperature for _, req in rows], device=device).unsqueeze(1)
        limits = [req.max_tokens for _, req in rows]
        stops = [None if req.ignore_eos else self.eos_id for _, req in rows]
        # Rows of one request sit next to each other: sample them with that request's generator.
        spans: list[tuple[int, int, SampleRequest, int]] = []
        for i, (ri, req) in enumerate(rows):
            if spans and spans[-1][3] == ri:
                spans[-1] = (spans[-1][0], i + 1, req, ri)
            else:
                spans.append((i, i + 1, req, ri))

        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        with self.trainer.lock:
            out = self.trainer.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                     past_key_values=cache, use_cache=True, adapter_names=names)
            logits = out.logits[:, -1].float()
            tokens: list[list[int]] = [[] for _ in rows]
            logps: list[list[float]] = [[] for _ in rows]
            done = [False] * len(rows)
            next_pos = positions[:, -1:] + 1
            for t in range(max(limits)):
                raw_logp = torch.log_softmax(logits, dim=-1)
                chosen = torch.empty(len(rows), dtype=torch.long, device=device)
                for lo, hi, req, ri in spans:
                    if req.greedy:
                        chosen[lo:hi] = logits[lo:hi].argmax(-1)
                        continue
                    scaled = top_p_filter(logits[lo:hi] / temps[lo:hi], req.top_p)
                    probs = torch.softmax(scaled, dim=-1).cpu()
                    chosen[lo:hi] = torch.multinomial(probs, 1, generator=generators[ri]).squeeze(1).to(device)
                picked = raw_logp.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
                for i, tok in enumerate(chosen.tolist()):
                    if done[i]:
                        continue
                    tokens[i].append(tok)
                    logps[i].append(picked[i])
                    if tok == stops[i] or len(tokens[i]) >= limits[i]:
                        done[i] = True
                if all(done):
                    break
                step_ids = chosen.masked_fill(torch.tensor(done, device=device), self.pad_id).unsqueeze(1)
                mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
                out = self.trainer.model(input_ids=step_ids, attention_mask=mask, position_ids=next_pos,
                                         past_key_values=cache, use_cache=True, adapter_names=names)
                logits = out.logits[:, -1].float()
                next_pos = next_pos + 1
        return [Completion(token_ids=tokens[i], logprobs=logps[i], finished=bool(tokens[i]) and tokens[i][-1] == self.eos_id)
                for i in range(len(rows))]
