"""One PEFT model holding every tenant's LoRA adapter; one AdamW per tenant.

Invariant: a tenant's optimizer holds exactly that tenant's LoRA parameters, so a
step of one tenant can never move another tenant's weights. The model stays in eval
mode (no dropout); gradients flow all the same. Rows of many adapters share every
forward through one segmented LoRA computation (engine.batched_lora), for sampling and
for training alike.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file
from transformers import DynamicCache

from engine import batched_lora
from engine.config import GrpoSpec, LoraSpec, OptimSpec
from engine.train.batch import TrainBatch, completion_tiers, concat_batches, position_ids_from_mask, prompt_groups
from engine.train.grpo import grpo_loss

ANCHOR = "__anchor__"  # a rank-1 adapter nobody uses: PEFT needs at least one adapter to exist


@dataclass
class ClientPass:
    """A forward (and backward, unless `forward_only`) asked for by a client-driven tenant (a
    Tinker training client). `loss(logp, mask)` -> (summed loss, per-token loss [B, T]); its
    gradient accumulates into the adapter's .grad until the client's optimizer step."""

    batch: TrainBatch
    loss: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    forward_only: bool = False


@dataclass
class PassResult:
    logprobs: torch.Tensor  # [B, T] detached, on the CPU
    elementwise_loss: torch.Tensor  # [B, T] detached, on the CPU
    loss: float


@dataclass
class StepStats:
    loss: float
    kl: float
    grad_norm: float
    entropy: float
    clip_fraction: float
    trainer_logprobs: torch.Tensor  # [B, T] before the update, detached


class MultiAdapterTrainer:
    """Adds, trains, saves and removes named LoRA adapters on one frozen base model."""

    def __init__(self, base_model: torch.nn.Module, device: torch.device):
        self.device = device
        for p in base_model.parameters():
            p.requires_grad_(False)
        anchor = LoraConfig(r=1, lora_alpha=1, target_modules=["q_proj"], lora_dropout=0.0)
        self.model: PeftModel = get_peft_model(base_model, anchor, adapter_name=ANCHOR)
        self.model.eval()
        batched_lora.install(self.model)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.specs: dict[str, tuple[LoraSpec, OptimSpec]] = {}
        # The sampler (PEFT backend) and the trainer share weights; one lock orders them.
        self.lock = threading.RLock()
        # Bumped whenever any adapter's weights change: samplers that cache stacked
        # LoRA weights (engine.batched_lora) rebuild them when it moves.
        self.version = 0
        self.micro_batch_rows = 1024
        self._stepped = False

    # -- adapters ---------------------------------------------------------------
    def add_adapter(self, name: str, lora: LoraSpec, optim: OptimSpec, seed: int) -> None:
        with self.lock:
            if name in self.optimizers:
                raise ValueError(f"adapter {name!r} exists")
            config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=list(lora.target_modules),
                                lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
            # LoRA A is drawn from the global RNG: seed it so a tenant's init depends on its seed only.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.model.add_adapter(name, config)
            self.model.eval()
            params = self.parameters(name)
            if not params:
                raise ValueError(f"lora.target_modules {lora.target_modules} match no module of the base model")
            for p in params:
                p.requires_grad_(True)
            # fused: one kernel for all of the adapter's tensors (the per-tensor loop costs
            # more than the math for LoRA-sized parameters).
            self.optimizers[name] = torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas),
                                                      weight_decay=optim.weight_decay, fused=True)
            self.specs[name] = (lora, optim)
            batched_lora.install(self.model)
            self._keep_trainable()
            self.version += 1

    def remove_adapter(self, name: str) -> None:
        with self.lock:
            self.optimizers.pop(name, None)
            self.specs.pop(name, None)
            if name in self.model.peft_config:
                self.model.delete_adapter(name)
            self._keep_trainable()
            self.version += 1

    def _keep_trainable(self) -> None:
        """PEFT marks only its *active* adapter trainable when adapters come and go; every
        tenant's parameters must keep requiring grad, or its update would silently be zero."""
        for opt in self.optimizers.values():
            for p in opt.param_groups[0]["params"]:
                p.requires_grad_(True)

    def parameters(self, name: str) -> list[torch.nn.Parameter]:
        opt = self.optimizers.get(name)
        if opt is not None:  # the optimizer holds exactly this adapter's parameters
            return list(opt.param_groups[0]["params"])
        marker = f".{name}."
        return [p for n, p in self.model.named_parameters() if marker in n]

    def adapter_bytes(self, name: str) -> int:
        """Weights plus optimizer moments held for this tenant."""
        weights = sum(p.numel() * p.element_size() for p in self.parameters(name))
        opt = self.optimizers.get(name)
        moments = 0
        if opt is not None:
            for state in opt.state.values():
                moments += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
        return weights + moments

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model, adapter_name=name).items()}

    def save_adapter(self, name: str, directory: Path) -> Path:
        """Write a standard PEFT adapter directory (loadable by PeftModel and by vLLM)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with self.lock:
            state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(self.model, adapter_name=name).items()}
            config = self.model.peft_config[name]
        tmp = directory / "adapter_model.safetensors.tmp"
        save_file(state, str(tmp), metadata={"format": "pt"})
        tmp.replace(directory / "adapter_model.safetensors")
        base = config.base_model_name_or_path
        config.base_model_name_or_path = str(getattr(self.model.base_model.model.config, "_name_or_path", "") or base or "")
        config.save_pretrained(str(directory))
        return directory

    def load_adapter_weights(self, name: str, state: dict[str, torch.Tensor]) -> None:
        with self.lock:
            result = set_peft_model_state_dict(self.model, state, adapter_name=name)
            missing = [k for k in getattr(result, "unexpected_keys", []) if name in k]
            if missing:
                raise ValueError(f"checkpoint does not fit adapter {name}: {missing[:3]}")
            self.version += 1

    def optimizer_state(self, name: str) -> dict:
        return self.optimizers[name].state_dict()

    def load_optimizer_state(self, name: str, state: dict) -> None:
        self.optimizers[name].load_state_dict(state)

    # -- forward ----------------------------------------------------------------
    def completion_logprobs(self, adapter_names: list[str], batch: TrainBatch, with_entropy: bool = False):
        """Per-token log-probs of the completion tokens under each row's adapter
        ("__base__": no adapter), from segmented multi-adapter forwards.

        A GRPO group is many completions of one prompt under one adapter: consecutive rows
        with the same adapter and the same prompt run the prompt once (its KV cache, with
        its gradient, is shared by the group's rows through an index), then all rows run
        their completions against it. Exactly the full forward (tests compare), with a
        group of 8 paying for 1/8 of its prompt tokens."""
        ids, mask = batch.input_ids.to(self.device), batch.attention_mask.to(self.device)
        width, prompt = batch.completion_mask.shape[1], batch.prompt_width
        routing = batched_lora.AdapterRouting(adapter_names, adapter_names, self.device)
        group_of, first = prompt_groups(routing.index, ids[:, :prompt], mask[:, :prompt])
        if prompt == 0 or len(first) == len(adapter_names):  # nothing shared: one plain pass
            with batched_lora.routed(routing):
                # Only the completion positions need logits (a real model's vocabulary is large).
                out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                                 use_cache=False, logits_to_keep=width + 1)
            logits = out.logits[:, :width].float()
        else:
            # The completion's span (multi-turn rows hold environment tokens the mask leaves out).
            lengths = mask[:, prompt:].sum(1).long()
            logits = self._shared_prompt_logits(adapter_names, ids, mask, prompt, width, group_of, first, routing,
                                                lengths)
        logp_all = torch.log_softmax(logits, dim=-1)
        targets = batch.targets.to(self.device) if batch.targets is not None else ids[:, prompt : prompt + width]
        logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
        return logp, entropy

    def _shared_prompt_logits(self, adapter_names, ids, mask, prompt, width, group_of, first, routing,
                              lengths):
        """Logits predicting each completion token: the prompt pass once per group, then the
        completions (all but their last token) against the group's cache, in length tiers.

        Completions that stop at EOS differ in length; padding all of them to the longest
        would multiply the tail's tokens (on this CPU compute is linear in tokens). Rows are
        tiered by completion length (batch.completion_tiers), each tier runs at its own width, in
        the batch's row order, so every adapter's rows stay one contiguous segment."""
        group_adapters = [adapter_names[i] for i in first.tolist()]
        g_mask = mask[first, :prompt]
        prompt_cache = DynamicCache()
        with batched_lora.routed(batched_lora.AdapterRouting(group_adapters, group_adapters, self.device)):
            head = self.model(input_ids=ids[first, :prompt], attention_mask=g_mask,
                              position_ids=position_ids_from_mask(g_mask), past_key_values=prompt_cache,
                              use_cache=True, logits_to_keep=1).logits[:, -1]
        head = head[group_of].unsqueeze(1)  # predicts completion token 0
        if width == 1:
            return head.float()
        tiers = completion_tiers(lengths)
        order, tails = [], []
        for tier in torch.unique(tiers).tolist():
            rows = (tiers == tier).nonzero().squeeze(1)
            w = min(width - 1, int(lengths[rows].max()) - 1) if len(rows) else 0
            if w < 1:  # one-token completions: the head predicted everything they have
                tails.append(head.new_zeros((len(rows), width - 1, head.shape[-1])))
                order.append(rows)
                continue
            cache = DynamicCache()
            for i, layer in enumerate(prompt_cache.layers):  # each row reads its group's prompt
                cache.update(layer.keys[group_of[rows]], layer.values[group_of[rows]], i)
            full = mask[rows, : prompt + w]
            names = [adapter_names[r] for r in rows.tolist()]
            with batched_lora.routed(batched_lora.AdapterRouting(names, names, self.device)):
                tail = self.model(input_ids=ids[rows, prompt : prompt + w], attention_mask=full,
                                  position_ids=position_ids_from_mask(full)[:, prompt:], past_key_values=cache,
                                  use_cache=True).logits
            tails.append(torch.nn.functional.pad(tail, (0, 0, 0, width - 1 - w)))
            order.append(rows)
        order = torch.cat(order)
        tail = torch.cat(tails)[torch.argsort(order)]
        return torch.cat([head, tail], dim=1).float()

    def train_step(self, name: str, batch: TrainBatch, grpo: GrpoSpec, max_tokens: int) -> StepStats:
        """GRPO update of one tenant's adapter: only its optimizer steps. Raises on failure."""
        outcome = self.train({name: (batch, grpo, max_tokens)})[name]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def train(self, work: dict[str, tuple[TrainBatch, GrpoSpec, int]], fused: bool = True,
              passes: dict[str, ClientPass] | None = None) -> dict:
        """One GRPO update per tenant of `work`, and one forward(-backward) per client pass;
        returns StepStats / PassResult, or the exception that fails that tenant or pass (the
        others still go on). `fused`: everyone shares forward/backward passes in micro-batches
        of whole tenants up to `micro_batch_rows` rows (exact: tenant A's loss does not depend
        on tenant B's weights, so the summed loss gives each adapter the gradient it would get
        alone); otherwise one at a time."""
        passes = passes or {}
        if not fused:
            results = {}
            for name, item in work.items():
                results.update(self.train({name: item}))
            for name, item in passes.items():
                results.update(self.train({}, passes={name: item}))
            return results
        with self.lock:
            try:
                return self._train_fused(work, passes)
            except Exception as exc:  # noqa: BLE001
                if len(work) + len(passes) == 1 or self._stepped:
                    # Some optimizers may have stepped already: retrying would update twice.
                    return {name: exc for name in [*work, *passes]}
            # Nothing stepped yet (client gradients were put back): train each one alone.
            results = {name: self._train_alone({name: item}, {}) for name, item in work.items()}
            results.update({name: self._train_alone({}, {name: item}) for name, item in passes.items()})
            return results

    def _train_alone(self, work, passes):
        try:
            return next(iter(self._train_fused(work, passes).values()))
        except Exception as exc:  # noqa: BLE001
            return exc

    def _micro_batches(self, batches: dict[str, TrainBatch]) -> list[list[str]]:
        chunks, current, rows = [], [], 0
        for name, batch in batches.items():
            n = batch.input_ids.shape[0]
            if current and rows + n > self.micro_batch_rows:
                chunks.append(current)
                current, rows = [], 0
            current.append(name)
            rows += n
        if current:
            chunks.append(current)
        return chunks

    def _train_fused(self, work: dict[str, tuple[TrainBatch, GrpoSpec, int]],
                     passes: dict[str, ClientPass] | None = None) -> dict:
        """Client passes accumulate into .grad; their earlier gradients (from the client's
        previous forward_backward calls) are set aside meanwhile and added back only when the
        whole call succeeded, so a failed call adds nothing and can be retried."""
        passes = passes or {}
        self._stepped = False
        batches = {**{n: item[0] for n, item in work.items()}, **{n: p.batch for n, p in passes.items()}}
        chunks = []
        for chunk_names in self._micro_batches(batches):
            batch, slices = concat_batches([batches[n] for n in chunk_names])
            rows = [n for n, s in zip(chunk_names, slices) for _ in range(s.stop - s.start)]
            ref = None
            if any(work[n][1].beta > 0 for n in chunk_names if n in work):
                with torch.no_grad():
                    ref, _ = self.completion_logprobs(["__base__"] * len(rows), batch)
            chunks.append({"names": chunk_names, "batch": batch, "slices": dict(zip(chunk_names, slices)),
                           "rows": rows, "ref": ref, "mask": batch.completion_mask.to(self.device),
                           "adv": batch.advantages.to(self.device), "old": None, "entropy": None})
        params = {n: self.parameters(n) for n in batches}
        saved = {n: [p.grad for p in params[n]] for n in passes if not passes[n].forward_only}
        for n in saved:
            for p in params[n]:
                p.grad = None
        try:
            results = self._fused_iterations(work, passes, chunks, params)
        except BaseException:
            for n, grads in saved.items():  # a failed call adds nothing
                for p, g in zip(params[n], grads):
                    p.grad = g
            raise
        for n, grads in saved.items():
            for p, g in zip(params[n], grads):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g
        return results

    def _fused_iterations(self, work, passes, chunks, params) -> dict:
        results: dict = {}
        live = list(work)
        parts_by, norms = {}, {}
        rounds = max([work[n][1].iterations for n in work] + [1 if passes else 0])
        for it in range(rounds):
            active = [n for n in live if work[n][1].iterations > it]
            clients = list(passes) if it == 0 else []
            if not active and not clients:
                break
            for n in active:
                self.optimizers[n].zero_grad(set_to_none=True)
            for chunk in chunks:
                mine = [n for n in chunk["names"] if n in active or n in clients]
                if not mine:
                    continue
                grad = any(n in active or not passes[n].forward_only for n in mine)
                with torch.set_grad_enabled(grad):
                    logp, entropy = self.completion_logprobs(chunk["rows"], chunk["batch"], with_entropy=(it == 0))
                if chunk["old"] is None:
                    chunk["old"], chunk["entropy"] = logp.detach(), entropy.detach()
                    chunk["ratio_base"] = chunk["old"].clone()
                    behavior = chunk["batch"].behavior_logprobs
                    for n in chunk["names"]:
                        if n in work and work[n][0].behavior_logprobs is not None:
                            s = chunk["slices"][n]
                            chunk["ratio_base"][s] = behavior[s].to(self.device)
                total = None
                for n in mine:
                    s = chunk["slices"][n]
                    if n in passes:
                        width = passes[n].batch.completion_mask.shape[1]
                        loss, elementwise = passes[n].loss(logp[s, :width], chunk["mask"][s, :width])
                        if not torch.isfinite(loss):
                            results[n] = FloatingPointError(f"loss is {loss.item()}")
                            continue
                        results[n] = PassResult(logprobs=logp[s, :width].detach().cpu(),
                                                elementwise_loss=elementwise.detach().cpu(), loss=float(loss.detach()))
                        if not passes[n].forward_only:
                            total = loss if total is None else total + loss
                        continue
                    _, grpo, max_tokens = work[n]
                    parts = grpo_loss(logp[s], chunk["ratio_base"][s], chunk["adv"][s], chunk["mask"][s],
                                      epsilon=grpo.epsilon, epsilon_high=grpo.epsilon_high, beta=grpo.beta,
                                      ref_logprobs=chunk["ref"][s] if chunk["ref"] is not None else None,
                                      loss_type=grpo.loss_type, max_completion_length=max_tokens)
                    if not torch.isfinite(parts.loss):
                        results[n] = FloatingPointError(f"loss is {parts.loss.item()} at iteration {it}")
                        live.remove(n)
                        active.remove(n)
                        continue
                    parts_by[n] = parts
                    total = parts.loss if total is None else total + parts.loss
                if total is not None and total.requires_grad:
                    total.backward()
            for n in list(active):
                clip = self.specs[n][1].grad_clip
                norm = torch.nn.utils.clip_grad_norm_(params[n], clip if clip > 0 else math.inf)
                if not torch.isfinite(norm):
                    self.optimizers[n].zero_grad(set_to_none=True)
                    results[n] = FloatingPointError(f"gradient norm is {norm.item()}")
                    live.remove(n)
                    continue
                norms[n] = float(norm)
                self.optimizers[n].step()
                self._stepped = True
            if active:
                self.version += 1
        for chunk in chunks:
            for n in chunk["names"]:
                if n not in live:
                    continue
                s, m = chunk["slices"][n], chunk["mask"][chunk["slices"][n]]
                results[n] = StepStats(loss=float(parts_by[n].loss.detach()), kl=parts_by[n].kl, grad_norm=norms[n],
                                       entropy=float((chunk["entropy"][s] * m).sum() / m.sum().clamp(min=1)),
                                       clip_fraction=parts_by[n].clip_fraction,
                                       trainer_logprobs=chunk["old"][s][:, : work[n][0].completion_mask.shape[1]])
        return results

    # -- client optimizer steps -----------------------------------------------------
    def client_step(self, name: str, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                    grad_clip: float) -> float:
        """A client's optimizer step (Tinker's optim_step): AdamW with the step's own
        hyper-parameters over the gradients its forward_backward calls accumulated; then the
        gradients are cleared. Returns the gradient norm (before clipping)."""
        with self.lock:
            opt, params = self.optimizers[name], self.parameters(name)
            norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
            if not torch.isfinite(norm):
                opt.zero_grad(set_to_none=True)
                raise FloatingPointError(f"gradient norm is {norm.item()}")
            for group in opt.param_groups:
                group.update(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
            opt.step()
            opt.zero_grad(set_to_none=True)
            self.version += 1
            return float(norm)
