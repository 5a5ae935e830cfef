"""Continuous batching over many adapters with the trainer's own model.

Rows of every tenant's requests share one decode batch. Each `advance()` first
prefills the rows that arrived since the last call and merges them into the batch
(their KV cache is left-padded to a common length), then draws one token for every
row at once, retires the rows that stopped (they leave the batch and its KV cache),
and runs one decode forward for the rest. A short tenant is done when its own rows
are, whoever else is still decoding; a job can be cancelled between two calls.

Sampling is vectorized: per-row temperature, top-p, greedy flag, stop tokens and
token budget are tensors, and each row draws its token by inverse CDF from a uniform
stream drawn up front from its request's own seeded generator. A tenant's samples
therefore do not depend on which other rows share the batch.

LoRA: one segmented computation for all adapters of the batch (engine.batched_lora).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from engine import batched_lora
from engine.rollout.base import Completion, SampleRequest


def top_p_filter(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per-row nucleus filter: keep the smallest set of tokens whose mass reaches top_p."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits, dim=-1)
    drop = probs.cumsum(-1) - probs > top_p.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def draw_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, greedy: torch.Tensor,
                uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row: argmax for greedy rows, inverse-CDF draws from `uniforms` [rows] for the rest."""
    chosen = logits.argmax(-1)
    if bool(greedy.all()):
        return chosen
    scaled = logits / temperature.clamp(min=1e-6).unsqueeze(1)
    if bool((top_p < 1.0).any()):
        scaled = top_p_filter(scaled, top_p)
    cdf = torch.softmax(scaled, dim=-1).cumsum(-1)
    sampled = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    sampled = sampled.clamp(max=logits.shape[-1] - 1)
    return torch.where(greedy, chosen, sampled)


@dataclass
class _Job:
    requests: list[SampleRequest]
    results: list[list[Completion | None]]
    remaining: int
    tokens: int = 0


@dataclass
class _Rows:
    """Per-row sampling state, all [rows] or [rows, width] tensors."""

    temperature: torch.Tensor
    top_p: torch.Tensor
    greedy: torch.Tensor
    use_stop: torch.Tensor
    limit: torch.Tensor
    count: torch.Tensor
    uniforms: torch.Tensor  # [rows, width]
    tokens: torch.Tensor  # [rows, width]
    logprobs: torch.Tensor  # [rows, width]
    owners: list = field(default_factory=list)  # (tag, request index, sample index) per row

    def select(self, keep: torch.Tensor, keep_list: list[int]) -> "_Rows":
        return _Rows(*(getattr(self, n)[keep] for n in _TENSORS), owners=[self.owners[i] for i in keep_list])

    @staticmethod
    def concat(a: "_Rows", b: "_Rows") -> "_Rows":
        width = max(a.tokens.shape[1], b.tokens.shape[1])
        parts = []
        for name in _TENSORS:
            x, y = getattr(a, name), getattr(b, name)
            if x.dim() == 2:
                x = torch.nn.functional.pad(x, (0, width - x.shape[1]))
                y = torch.nn.functional.pad(y, (0, width - y.shape[1]))
            parts.append(torch.cat([x, y]))
        return _Rows(*parts, owners=a.owners + b.owners)


_TENSORS = ("temperature", "top_p", "greedy", "use_stop", "limit", "count", "uniforms", "tokens", "logprobs")


def _left_pad_cache(cache: DynamicCache, extra: int) -> None:
    if extra:
        for layer in cache.layers:
            layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, extra, 0))
            layer.values = torch.nn.functional.pad(layer.values, (0, 0, extra, 0))


class BatchDecoder:
    """Jobs (a tag + requests) in, finished jobs out; rows of all jobs decode together."""

    def __init__(self, trainer, pad_id: int, stop_ids: list[int], max_rows: int = 1024):
        self.trainer, self.pad_id, self.max_rows = trainer, pad_id, max_rows
        self.device = trainer.device
        self.stop_ids = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=self.device)
        self.jobs: dict[object, _Job] = {}
        self.pending: list[tuple[object, int]] = []  # (tag, request index) not yet in the batch
        self.rows: _Rows | None = None
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, cache length]
        self.next_pos: torch.Tensor | None = None  # [rows]
        self.logits: torch.Tensor | None = None  # [rows, vocab]: each row's next-token logits
        self.routing: batched_lora.AdapterRouting | None = None
        self.decode_steps = 0

    # -- jobs -----------------------------------------------------------------------
    def submit(self, tag, requests: list[SampleRequest]) -> None:
        if tag in self.jobs:
            raise ValueError(f"job {tag!r} is already sampling")
        results = [[None] * r.n for r in requests]
        self.jobs[tag] = _Job(list(requests), results, remaining=sum(r.n for r in requests))
        self.pending += [(tag, i) for i in range(len(requests))]
        if not requests:
            self.jobs[tag].remaining = 0

    def cancel(self, tag) -> bool:
        """Drop a job's rows (pending and in the batch); True if it was there."""
        if self.jobs.pop(tag, None) is None:
            return False
        self.pending = [p for p in self.pending if p[0] != tag]
        if self.rows is not None:
            keep_list = [i for i, owner in enumerate(self.rows.owners) if owner[0] != tag]
            self._keep(keep_list)
        return True

    @property
    def busy(self) -> bool:
        return bool(self.jobs)

    @property
    def steps_to_drain(self) -> int:
        """The most decode steps any row in the batch or waiting to join still has to go."""
        waiting = max((self.jobs[t].requests[i].max_tokens for t, i in self.pending), default=0)
        running = int((self.rows.limit - self.rows.count).max()) if self.rows is not None else 0
        return max(waiting + 1, running) if waiting else running

    @property
    def active_rows(self) -> int:
        return 0 if self.rows is None else len(self.rows.owners)

    # -- one unit of work -------------------------------------------------------------
    @torch.inference_mode()  # cheaper dispatch than no_grad; nothing sampled is ever trained through
    def advance(self) -> list[tuple[object, list[list[Completion]]]]:
        """Join waiting rows, draw one token for every row, retire stopped rows, decode the
        rest one position. Returns the jobs that finished, with their completions."""
        finished = [(tag, []) for tag, job in self.jobs.items() if job.remaining == 0 and not job.requests]
        for tag, _ in finished:
            del self.jobs[tag]
        with self.trainer.lock:
            self._join()
            if self.rows is None:
                return finished
            rows = self.rows
            column = rows.count.clamp(max=rows.uniforms.shape[1] - 1).unsqueeze(1)
            chosen = draw_tokens(self.logits, rows.temperature, rows.top_p, rows.greedy,
                                 rows.uniforms.gather(1, column).squeeze(1))
            logp = torch.log_softmax(self.logits, dim=-1).gather(1, chosen.unsqueeze(1)).squeeze(1)
            rows.tokens.scatter_(1, column, chosen.unsqueeze(1))
            rows.logprobs.scatter_(1, column, logp.unsqueeze(1))
            rows.count += 1
            done = (rows.count >= rows.limit) | (rows.use_stop & torch.isin(chosen, self.stop_ids))
            if bool(done.any()):
                finished += self._retire(done)
            if self.rows is not None:
                self._decode(chosen[~done] if bool(done.any()) else chosen)
        return finished

    def generate(self, requests: list[SampleRequest]) -> list[list[Completion]]:
        """Blocking convenience: sample these requests (alone or beside running jobs)."""
        tag = object()
        self.submit(tag, requests)
        while True:
            for done_tag, results in self.advance():
                if done_tag is tag:
                    return results

    # -- internals --------------------------------------------------------------------
    def _join(self) -> None:
        room = self.max_rows - self.active_rows
        if not self.pending or room <= 0:
            return
        take = self._fair_share(room)
        if not take and self.rows is None:  # one request larger than max_rows: let it in alone
            take.append(self.pending.pop(0))
        if not take:
            return
        requests = [(owner, self.jobs[owner[0]].requests[owner[1]]) for owner in take]
        expanded = [((*owner, k), req) for owner, req in requests for k in range(req.n)]
        device, n = self.device, len(expanded)
        width = max(len(req.prompt_ids) for _, req in requests)
        # The prompt is prefilled once per request, not once per sample: its n samples
        # share one prompt, so their KV cache is that row's, repeated (a GRPO group of 8
        # costs the prefill of 1).
        ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        budget = max(req.max_tokens for _, req in requests)
        uniforms = torch.zeros((n, budget))
        row = 0
        for r, (_, req) in enumerate(requests):
            plen = len(req.prompt_ids)
            ids[r, width - plen :] = torch.tensor(req.prompt_ids)
            mask[r, width - plen :] = 1
            if not req.greedy:
                seed = req.seed if req.seed is not None else 0
                gen = torch.Generator().manual_seed(seed)
                uniforms[row : row + req.n, : req.max_tokens] = torch.rand((req.n, req.max_tokens), generator=gen)
            row += req.n
        new_rows = _Rows(
            temperature=torch.tensor([req.temperature for _, req in expanded], device=device),
            top_p=torch.tensor([req.top_p for _, req in expanded], device=device),
            greedy=torch.tensor([req.greedy for _, req in expanded], device=device),
            use_stop=torch.tensor([not req.ignore_eos for _, req in expanded], device=device),
            limit=torch.tensor([req.max_tokens for _, req in expanded], device=device),
            count=torch.zeros(n, dtype=torch.long, device=device),
            uniforms=uniforms.to(device),
            tokens=torch.full((n, budget), self.pad_id, dtype=torch.long, device=device),
            logprobs=torch.zeros((n, budget), device=device),
            owners=[owner for owner, _ in expanded],
        )
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        prompt_adapters = [req.adapter for _, req in requests]
        with batched_lora.routed(batched_lora.AdapterRouting(prompt_adapters, prompt_adapters, device)):
            out = self.trainer.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                     past_key_values=cache, use_cache=True, logits_to_keep=1)
        # Each request's row, once per sample (rows of a request stay contiguous).
        repeat = torch.repeat_interleave(torch.arange(len(requests), device=device),
                                         torch.tensor([req.n for _, req in requests], device=device))
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[repeat], layer.values[repeat]
        logits = out.logits[:, -1].float()[repeat]
        mask, positions = mask[repeat], positions[repeat]
        adapters = [req.adapter for _, req in expanded]
        routing = batched_lora.AdapterRouting(adapters, adapters, device)
        next_pos = positions[:, -1] + 1
        if self.rows is None:
            self.rows, self.cache, self.mask, self.next_pos, self.logits = new_rows, cache, mask, next_pos, logits
            self.routing = routing
            return
        old_len, new_len = self.mask.shape[1], mask.shape[1]
        length = max(old_len, new_len)
        _left_pad_cache(self.cache, length - old_len)
        _left_pad_cache(cache, length - new_len)
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([mine.keys, theirs.keys])
            mine.values = torch.cat([mine.values, theirs.values])
        self.mask = torch.cat([torch.nn.functional.pad(self.mask, (length - old_len, 0)),
                               torch.nn.functional.pad(mask, (length - new_len, 0))])
        self.next_pos = torch.cat([self.next_pos, next_pos])
        self.logits = torch.cat([self.logits, logits])
        self.rows = _Rows.concat(self.rows, new_rows)
        self.routing.append(routing)

    def _fair_share(self, room: int) -> list[tuple[object, int]]:
        """Waiting requests that fit in `room` rows. While rows are contended each job gets
        a share of the batch in proportion to its requests' `priority`: the next request
        comes from the job with the fewest rows in the batch per unit of priority."""
        if sum(self.jobs[t].requests[i].n for t, i in self.pending) <= room:
            take, self.pending = self.pending, []
            return take
        held: dict = {}
        for owner in (self.rows.owners if self.rows is not None else []):
            held[owner[0]] = held.get(owner[0], 0) + 1
        queues: dict = {}
        for tag, ri in self.pending:
            queues.setdefault(tag, []).append(ri)
        take = []
        while queues:
            def load(t):
                return held.get(t, 0) / max(self.jobs[t].requests[queues[t][0]].priority, 1e-9)
            tag = min(queues, key=load)
            ri = queues[tag][0]
            n = self.jobs[tag].requests[ri].n
            if n > room:
                del queues[tag]  # does not fit now; the others may
                continue
            queues[tag].pop(0)
            if not queues[tag]:
                del queues[tag]
            take.append((tag, ri))
            held[tag] = held.get(tag, 0) + n
            room -= n
        chosen = set(take)
        self.pending = [p for p in self.pending if p not in chosen]
        order = {tag: i for i, tag in enumerate(dict.fromkeys(t for t, _ in take))}
        return sorted(take, key=lambda o: (order[o[0]], o[1]))  # a job's rows stay contiguous

    def _retire(self, done: torch.Tensor) -> list[tuple[object, list[list[Completion]]]]:
        rows = self.rows
        done_idx = done.nonzero().squeeze(1).tolist()
        counts = rows.count[done].tolist()
        tokens = rows.tokens[done].tolist()
        logps = rows.logprobs[done].tolist()
        stops = set(self.stop_ids.tolist())
        finished = []
        for j, i in enumerate(done_idx):
            tag, ri, k = rows.owners[i]
            job = self.jobs.get(tag)
            if job is None:
                continue
            ids = tokens[j][: counts[j]]
            job.results[ri][k] = Completion(token_ids=ids, logprobs=logps[j][: counts[j]],
                                               finished=bool(ids) and ids[-1] in stops)
            job.tokens += counts[j]
            job.remaining -= 1
            if job.remaining == 0:
                finished.append((tag, job.results))
                del self.jobs[tag]
        self._keep([i for i, d in enumerate(done.tolist()) if not d])
        return finished

    def _keep(self, keep_list: list[int]) -> None:
        if not keep_list:
            self.rows = self.cache = self.mask = self.next_pos = self.logits = self.routing = None
            return
        if len(keep_list) == len(self.rows.owners):
            return
        keep = torch.tensor(keep_list, dtype=torch.long, device=self.device)
        self.rows = self.rows.select(keep, keep_list)
        self.mask, self.next_pos, self.logits = self.mask[keep], self.next_pos[keep], self.logits[keep]
        self.routing.select(keep)
        # Columns no remaining row attends to (left padding of retired long prompts) go too.
        first = int(self.mask.any(0).long().argmax())
        for layer in self.cache.layers:
            layer.keys = layer.keys[keep, :, first:]
            layer.values = layer.values[keep, :, first:]
        self.mask = self.mask[:, first:]

    def _decode(self, chosen: torch.Tensor) -> None:
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        with batched_lora.routed(self.routing):
            out = self.trainer.model(input_ids=chosen.unsqueeze(1), attention_mask=self.mask,
                                     position_ids=self.next_pos.unsqueeze(1), past_key_values=self.cache,
                                     use_cache=True)
        self.logits = out.logits[:, -1].float()
        self.next_pos = self.next_pos + 1
        self.decode_steps += 1
