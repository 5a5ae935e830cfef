"""The segmented multi-adapter LoRA computation equals PEFT's per-adapter forward, and its
gradients equal each adapter trained alone: different ranks, target modules, base rows."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import batched_lora
from engine.config import GrpoSpec, LoraSpec, OptimSpec
from engine.train.batch import TrainBatch, prompt_groups
from engine.train.trainer import MultiAdapterTrainer
from tests.modelpaths import model_dir

ADAPTERS = {
    "r8": LoraSpec(rank=8),
    "r4": LoraSpec(rank=4, target_modules=["q_proj", "v_proj", "up_proj"]),
    "r16": LoraSpec(rank=16, alpha=8, target_modules=["o_proj", "down_proj"]),
}


@pytest.fixture(scope="module")
def trainer():
    model = AutoModelForCausalLM.from_pretrained(model_dir(), dtype=torch.float32)
    trainer = MultiAdapterTrainer(model, torch.device("cpu"))
    for i, (name, spec) in enumerate(ADAPTERS.items()):
        trainer.add_adapter(name, spec, OptimSpec(lr=1e-2), seed=i)
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():  # B starts at zero: give every adapter a visible effect
            for p in trainer.parameters(name):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return trainer


def rows_of(pattern):
    return [name for name, count in pattern for _ in range(count)]


@pytest.mark.parametrize("pattern", [
    [("r8", 3), ("r4", 2), ("__base__", 1), ("r16", 2)],
    [("r4", 5)],
    [("r8", 1), ("r4", 1), ("r8", 2), ("__base__", 2)],  # an adapter in two segments
])
def test_routed_forward_equals_peft_per_adapter_forward(trainer, pattern):
    rows = rows_of(pattern)
    ids = torch.randint(3, 40, (len(rows), 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        peft = trainer.model(input_ids=ids, adapter_names=rows).logits
        with batched_lora.routed(batched_lora.AdapterRouting(rows, rows, torch.device("cpu"))):
            ours = trainer.model(input_ids=ids).logits
        base = trainer.model(input_ids=ids, adapter_names=["__base__"] * len(rows)).logits
    assert torch.allclose(ours, peft, atol=1e-4)  # the same sums in another order (logits up to ~16)
    assert not torch.allclose(ours, base, atol=1e-2)  # the adapters really act


def test_routed_gradients_equal_each_adapter_alone(trainer):
    rows = rows_of([("r8", 3), ("r4", 3), ("r16", 3)])
    ids = torch.randint(3, 40, (len(rows), 7), generator=torch.Generator().manual_seed(1))

    def grads(names, batch_ids):
        for name in ADAPTERS:
            trainer.optimizers[name].zero_grad(set_to_none=True)
        with batched_lora.routed(batched_lora.AdapterRouting(names, names, torch.device("cpu"))):
            trainer.model(input_ids=batch_ids).logits.logsumexp(-1).sum().backward()
        return {name: [p.grad.clone() if p.grad is not None else None for p in trainer.parameters(name)]
                for name in set(names)}

    together = grads(rows, ids)
    for name in ADAPTERS:
        own = [i for i, r in enumerate(rows) if r == name]
        alone = grads([name] * len(own), ids[own])
        for g_together, g_alone in zip(together[name], alone[name]):
            # The same sums in another order (batched matmuls): equal to float precision.
            assert float((g_together - g_alone).norm() / g_alone.norm()) < 1e-4


def test_fused_training_in_micro_batches_equals_one_pass(trainer):
    """Micro-batching bounds memory without changing any tenant's update."""
    def batch(seed):
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, 40, (4, 10), generator=gen)
        return TrainBatch(input_ids=ids, attention_mask=torch.ones_like(ids), completion_mask=torch.ones(4, 4),
                          advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]), prompt_width=6)

    work = {name: (batch(i), GrpoSpec(), 4) for i, name in enumerate(ADAPTERS)}
    snapshot = {n: [p.detach().clone() for p in trainer.parameters(n)] for n in ADAPTERS}
    opt_state = {n: trainer.optimizer_state(n) for n in ADAPTERS}
    import copy

    opt_state = copy.deepcopy(opt_state)

    def run(micro_rows):
        with torch.no_grad():
            for n in ADAPTERS:
                for p, s in zip(trainer.parameters(n), snapshot[n]):
                    p.copy_(s)
                trainer.load_optimizer_state(n, copy.deepcopy(opt_state[n]))
        trainer.micro_batch_rows = micro_rows
        stats = trainer.train(work, fused=True)
        return stats, {n: [p.detach().clone() for p in trainer.parameters(n)] for n in ADAPTERS}

    try:
        one_stats, one = run(1024)
        micro_stats, micro = run(4)  # one tenant per micro-batch
    finally:
        trainer.micro_batch_rows = 1024
    for n in ADAPTERS:
        assert abs(one_stats[n].loss - micro_stats[n].loss) < 1e-6
        for a, b, s in zip(one[n], micro[n], snapshot[n]):
            # The two updates agree to float precision (the one pass sums in batched matmuls).
            assert float((a - b).norm() / (b - s).norm()) < 1e-3
        assert any(not torch.equal(a, s) for a, s in zip(one[n], snapshot[n]))  # it did train


def test_shared_prompt_forward_equals_the_full_forward_with_its_gradients(trainer):
    """Rows of a GRPO group share their prompt pass; log-probs and gradients are the full forward's."""
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 40, (n,), generator=gen) for n in (5, 3, 5, 4)]
    groups = [("r8", 0, 3), ("r8", 1, 2), ("r4", 1, 3), ("__base__", 2, 2), ("r16", 3, 2), ("r8", 0, 1)]
    width, comp = 5, 4
    rows, ids, mask = [], [], []
    for adapter, p, count in groups:
        for _ in range(count):
            prompt = prompts[p]
            row = torch.full((width + comp,), 0, dtype=torch.long)
            row[width - len(prompt):width] = prompt
            n = int(torch.randint(1, comp + 1, (1,), generator=gen))
            row[width:width + n] = torch.randint(3, 40, (n,), generator=gen)
            m = torch.zeros(width + comp, dtype=torch.long)
            m[width - len(prompt):width + n] = 1
            rows.append(adapter), ids.append(row), mask.append(m)
    ids, mask = torch.stack(ids), torch.stack(mask)
    cmask = mask[:, width:].float()
    batch = TrainBatch(input_ids=ids, attention_mask=mask, completion_mask=cmask,
                       advantages=torch.zeros(len(rows)), prompt_width=width)

    def logp_and_grads(fn):
        for name in ADAPTERS:
            trainer.optimizers[name].zero_grad(set_to_none=True)
        logp = fn()
        (logp * cmask).sum().backward()
        return logp.detach(), {n: [p.grad.clone() for p in trainer.parameters(n)] for n in ADAPTERS}

    def full():
        routing = batched_lora.AdapterRouting(rows, rows, torch.device("cpu"))
        with batched_lora.routed(routing):
            logits = trainer.model(input_ids=ids, attention_mask=mask,
                                   position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        logp = torch.log_softmax(logits[:, width - 1:-1].float(), -1)
        return logp.gather(-1, ids[:, width:].unsqueeze(-1)).squeeze(-1)

    slots = batched_lora.AdapterRouting(rows, rows, torch.device("cpu")).index
    assert len(prompt_groups(slots, ids[:, :width], mask[:, :width])[1]) == len(groups)  # the shared path runs
    shared_lp, shared_g = logp_and_grads(lambda: trainer.completion_logprobs(rows, batch)[0])
    full_lp, full_g = logp_and_grads(full)
    assert torch.allclose(shared_lp * cmask, full_lp * cmask, atol=1e-5)
    for name in ADAPTERS:
        for a, b in zip(shared_g[name], full_g[name]):  # the same sums, in another order
            assert float((a - b).norm() / b.norm()) < 1e-3
