"""Tinker training inside the engine's trainer: the loss functions as Tinker documents them,
datums' log-probs equal a plain forward of their tokens, a client pass fused with built-in
tenants' updates gets exactly the gradient it gets alone, and gradients accumulate across
forward_backward calls until the client's optimizer step."""

import types as pytypes

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.client_jobs import datums_batch
from engine.config import GrpoSpec, LoraSpec, OptimSpec
from engine.tinker.losses import LossError, make_loss
from engine.train.batch import TrainBatch
from engine.train.trainer import ClientPass, MultiAdapterTrainer
from tests.modelpaths import model_dir


def test_loss_formulas():
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    q = torch.tensor([[-1.2, -1.0, -0.5]])
    adv = torch.tensor([[0.0, 2.0, -1.0]])
    mask = torch.ones(1, 3)
    ratio = torch.exp(logp - q)
    inputs = {"target_tokens": torch.zeros(1, 3, dtype=torch.long), "logprobs": q, "advantages": adv}
    ce = make_loss("cross_entropy", None, {"target_tokens": inputs["target_tokens"], "weights": torch.tensor([[0.0, 1.0, 2.0]])})
    assert float(ce(logp, mask)[0]) == pytest.approx(2.0 + 1.0)
    assert float(make_loss("importance_sampling", {}, inputs)(logp, mask)[0]) == pytest.approx(float(-(ratio * adv).sum()))
    ppo = make_loss("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}, inputs)
    expected = -torch.min(ratio * adv, ratio.clamp(0.9, 1.1) * adv).sum()
    assert float(ppo(logp, mask)[0]) == pytest.approx(float(expected))
    cispo = make_loss("cispo", None, inputs)  # defaults 0.0 / 4.0
    assert float(cispo(logp, mask)[0]) == pytest.approx(float(-(ratio.clamp(0.0, 4.0) * logp * adv).sum()))
    assert float(cispo(logp, torch.tensor([[1.0, 0.0, 0.0]]))[0]) == pytest.approx(0.0)  # padding adds nothing
    only_targets = {"target_tokens": inputs["target_tokens"]}
    for name, config, given, match in [("gspo", None, inputs, "not supported"), ("ppo", {"clip": 1.0}, inputs, "not understood"),
                                       ("importance_sampling", None, only_targets, "missing")]:
        with pytest.raises(LossError, match=match):
            make_loss(name, config, given)


@pytest.fixture(scope="module")
def trainer():
    model = AutoModelForCausalLM.from_pretrained(model_dir(), dtype=torch.float32)
    trainer = MultiAdapterTrainer(model, torch.device("cpu"))
    for i, name in enumerate(("builtin", "client")):
        trainer.add_adapter(name, LoraSpec(rank=4, target_modules=["q_proj", "v_proj", "up_proj"]), OptimSpec(lr=1e-2), seed=i)
        gen = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in trainer.parameters(name):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return trainer


def datums(seed):
    gen = np.random.default_rng(seed)
    out = []
    for n in (7, 4, 9):
        tokens = gen.integers(3, 40, n + 1).tolist()
        out.append(pytypes.SimpleNamespace(tokens=tokens[:-1], inputs={
            "target_tokens": np.array(tokens[1:]), "logprobs": gen.normal(-2, 0.3, n).astype(np.float32),
            "advantages": gen.normal(0, 1, n).astype(np.float32)}))
    return out


def client_pass(data, name="importance_sampling"):
    batch, inputs, lengths = datums_batch(data, pad_id=0)
    return ClientPass(batch, make_loss(name, None, inputs)), lengths


def builtin_work():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 40, (4, 10), generator=gen)
    batch = TrainBatch(input_ids=ids, attention_mask=torch.ones_like(ids), completion_mask=torch.ones(4, 4),
                       advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]), prompt_width=6)
    return {"builtin": (batch, GrpoSpec(), 4)}


def grads(trainer, name):
    return [p.grad.clone() for p in trainer.parameters(name)]


def test_datum_logprobs_are_a_plain_forward_of_their_tokens(trainer):
    data = datums(0)
    passed, lengths = client_pass(data)
    result = trainer.train({}, passes={"client": ClientPass(passed.batch, passed.loss, forward_only=True)})["client"]
    for i, (d, n) in enumerate(zip(data, lengths)):
        with torch.no_grad():
            logits = trainer.model(input_ids=torch.tensor([d.tokens]), adapter_names=["client"]).logits[0]
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(d.inputs["target_tokens"]).unsqueeze(-1))
        assert torch.allclose(result.logprobs[i, :n], expected.squeeze(-1), atol=1e-4)
    assert all(p.grad is None for p in trainer.parameters("client"))  # forward only: no gradient


def test_fused_with_builtin_equals_alone_and_gradients_accumulate(trainer):
    passed, _ = client_pass(datums(1))
    for p in trainer.parameters("client"):
        p.grad = None
    alone = trainer.train({}, passes={"client": passed})["client"]
    g_alone = grads(trainer, "client")
    for p in trainer.parameters("client"):
        p.grad = None
    before = [p.detach().clone() for p in trainer.parameters("builtin")]
    out = trainer.train(builtin_work(), passes={"client": passed})
    assert out["builtin"].loss == out["builtin"].loss  # the built-in tenant trained (stats) ...
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.parameters("builtin")))  # ... and stepped
    fused = out["client"]
    assert fused.loss == pytest.approx(alone.loss, rel=1e-4, abs=1e-5)  # a sum with cancellations
    assert torch.allclose(fused.logprobs, alone.logprobs, atol=1e-5)
    for a, b in zip(grads(trainer, "client"), g_alone):
        assert float((a - b).norm() / b.norm()) < 1e-4
    trainer.train({}, passes={"client": passed})  # a second forward_backward adds to the first
    for a, b in zip(grads(trainer, "client"), g_alone):
        assert float((a - 2 * b).norm() / b.norm()) < 1e-4
    snapshot = [p.detach().clone() for p in trainer.parameters("client")]
    norm = trainer.client_step("client", lr=1e-2, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0, grad_clip=0.0)
    assert norm > 0 and all(p.grad is None for p in trainer.parameters("client"))
    assert any(not torch.equal(a, b) for a, b in zip(snapshot, trainer.parameters("client")))


def test_a_failed_call_adds_no_gradient(trainer):
    passed, _ = client_pass(datums(2))
    for p in trainer.parameters("client"):
        p.grad = None
    trainer.train({}, passes={"client": passed})
    kept = grads(trainer, "client")

    def broken(logp, mask):
        raise RuntimeError("boom")

    out = trainer.train({}, passes={"client": ClientPass(passed.batch, broken)})
    assert isinstance(out["client"], RuntimeError)
    for a, b in zip(grads(trainer, "client"), kept):
        assert torch.equal(a, b)
