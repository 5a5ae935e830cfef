"""Rollouts through one vLLM engine with multi-LoRA: one LoRARequest per tenant.

After each training step the tenant's adapter is written as a PEFT directory (under
/dev/shm where it exists) and reloaded in place with `load_inplace=True` once, through
`add_lora`; generation requests then carry a plain LoRARequest. (A generation request
that itself carries `load_inplace=True` makes vLLM reload the adapter on every
scheduler step.)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from engine.rollout.base import Completion, RolloutBackend, SampleRequest
from engine.train.trainer import MultiAdapterTrainer


def adapter_scratch_dir() -> Path:
    root = Path("/dev/shm") if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else Path(tempfile.gettempdir())
    return Path(tempfile.mkdtemp(prefix="clora-adapters-", dir=root))


class VllmRolloutBackend(RolloutBackend):
    name = "vllm"

    def __init__(self, model_path: str, trainer: MultiAdapterTrainer, eos_id: int, *, max_loras: int,
                 max_lora_rank: int, dtype: str, seed: int, memory_fraction: float, kv_cache_bytes: int | None,
                 max_model_len: int | None, on_cuda: bool):
        from vllm import LLM  # imported here: the PEFT path must not need vLLM at all

        self.trainer, self.eos_id = trainer, eos_id
        self.scratch = adapter_scratch_dir()
        kwargs = dict(model=model_path, tokenizer=model_path, enable_lora=True, max_loras=max_loras,
                      max_lora_rank=max_lora_rank, max_cpu_loras=max_loras, dtype=dtype, seed=seed,
                      gpu_memory_utilization=memory_fraction,
                      enable_prefix_caching=False, skip_tokenizer_init=False)
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if not on_cuda:
            kwargs["enforce_eager"] = True
        if kv_cache_bytes and not on_cuda:
            kwargs["kv_cache_memory_bytes"] = kv_cache_bytes
        self.llm = LLM(**kwargs)
        self._slots = max_loras
        self._ids: dict[str, int] = {}
        self._next_id = 1
        self._jobs: dict = {}  # tag -> {"results": [...], "ids": {request id: index}}
        self._owner: dict[str, object] = {}  # vLLM request id -> tag
        self._ready: list = []
        self._next_request = 0

    @property
    def slots(self) -> int:
        return self._slots

    def _request(self, name: str, inplace: bool = False):
        from vllm.lora.request import LoRARequest

        return LoRARequest(lora_name=name, lora_int_id=self._ids[name], lora_path=str(self.scratch / name),
                           load_inplace=inplace)

    def add_adapter(self, name: str) -> None:
        self._ids[name] = self._next_id
        self._next_id += 1
        self.sync_adapter(name)

    def sync_adapter(self, name: str) -> None:
        self.trainer.save_adapter(name, self.scratch / name)
        self.llm.llm_engine.add_lora(self._request(name, inplace=True))

    def remove_adapter(self, name: str) -> None:
        lora_id = self._ids.pop(name, None)
        if lora_id is not None:
            self.llm.llm_engine.remove_lora(lora_id)
        shutil.rmtree(self.scratch / name, ignore_errors=True)

    def _params(self, req: SampleRequest):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=req.n, max_tokens=req.max_tokens, logprobs=0, seed=req.seed,
            temperature=0.0 if req.greedy else req.temperature, top_p=1.0 if req.greedy else req.top_p,
            stop_token_ids=[] if req.ignore_eos else [self.eos_id], ignore_eos=req.ignore_eos,
            skip_special_tokens=False, detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY)

    def submit(self, tag, requests: list[SampleRequest]) -> None:
        """Every request goes straight into vLLM's own continuous batch (per-request
        SamplingParams, one LoRARequest per tenant)."""
        from vllm.inputs import TokensPrompt

        engine = self.llm.llm_engine
        job = {"results": [None] * len(requests), "ids": {}}
        self._jobs[tag] = job
        for i, req in enumerate(requests):
            rid = f"clora-{self._next_request}"  # outputs and aborts use this external id
            self._next_request += 1
            # "__base__" (engine.external_jobs.BASE_ADAPTER): the base model, no LoRA.
            lora = None if req.adapter == "__base__" else self._request(req.adapter)
            engine.add_request(rid, TokensPrompt(prompt_token_ids=list(req.prompt_ids)), self._params(req),
                               lora_request=lora)
            job["ids"][rid] = i
            self._owner[rid] = tag
        if not requests:
            self._ready.append((tag, []))
            del self._jobs[tag]

    def cancel(self, tag) -> bool:
        job = self._jobs.pop(tag, None)
        if job is None:
            return False
        ids = list(job["ids"])
        for rid in ids:
            self._owner.pop(rid, None)
        self.llm.llm_engine.abort_request(ids)
        return True

    @property
    def busy(self) -> bool:
        return bool(self._jobs) or bool(self._ready)

    def advance(self) -> list:
        finished, self._ready = self._ready, []
        if not self._jobs:
            return finished
        for out in self.llm.llm_engine.step():
            tag = self._owner.get(out.request_id)
            if tag is None or not out.finished:
                continue
            del self._owner[out.request_id]
            job = self._jobs[tag]
            group = []
            for sample in out.outputs:
                ids = list(sample.token_ids)
                lps = [entry[tok].logprob for tok, entry in zip(ids, sample.logprobs or [])] if sample.logprobs else []
                group.append(Completion(token_ids=ids, logprobs=lps, finished=bool(ids) and ids[-1] == self.eos_id))
            job["results"][job["ids"][out.request_id]] = group
            if all(r is not None for r in job["results"]):
                finished.append((tag, job["results"]))
                del self._jobs[tag]
        return finished

    def close(self) -> None:
        try:
            self.llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
        shutil.rmtree(self.scratch, ignore_errors=True)
