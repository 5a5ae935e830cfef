"""Both rollout backends on the embedded model: routing, weight sync, log-prob agreement."""

import pytest
import torch

from engine.config import EngineConfig, LoraSpec, OptimSpec, GrpoSpec
from engine.loading import load_everything
from engine.rollout.base import SampleRequest
from engine.train.batch import TrainBatch
from tests.modelpaths import BACKENDS, model_dir

PROMPTS = ["37+45=", "rev:abcd=", "12+9="]


@pytest.fixture(scope="module", params=BACKENDS)
def loaded(request):
    config = EngineConfig(model=model_dir(), backend=request.param, max_loras=4, max_lora_rank=16,
                          vllm_kv_cache_bytes=64 << 20)
    everything = load_everything(config)
    trainer = everything.trainer
    trainer.add_adapter("a", LoraSpec(rank=8), OptimSpec(lr=1e-2), seed=1)
    trainer.add_adapter("b", LoraSpec(rank=4, target_modules=["q_proj", "v_proj", "up_proj"]), OptimSpec(lr=1e-2), seed=2)
    # Give the two adapters different, non-trivial weights (LoRA B starts at zero).
    with torch.no_grad():
        for name, seed in (("a", 10), ("b", 20)):
            gen = torch.Generator().manual_seed(seed)
            for p in trainer.parameters(name):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    everything.backend.add_adapter("a")
    everything.backend.add_adapter("b")
    yield everything
    everything.backend.close()


def encode(loaded, text):
    return loaded.tokenizer.encode(text, add_special_tokens=False)


def trainer_logprobs(loaded, adapter, prompt_ids, completion):
    """The trainer's log-probs of a completion, on the same left-padded layout the engine uses."""
    ids = torch.tensor([prompt_ids + completion.token_ids])
    batch = TrainBatch(input_ids=ids, attention_mask=torch.ones_like(ids),
                       completion_mask=torch.ones(1, len(completion.token_ids)),
                       advantages=torch.zeros(1), prompt_width=len(prompt_ids))
    with torch.no_grad():
        logp, _ = loaded.trainer.completion_logprobs([adapter], batch)
    return logp[0]


def sample(loaded, adapter, prompt, n=4, greedy=False, seed=0):
    return loaded.backend.generate([SampleRequest(adapter=adapter, prompt_ids=encode(loaded, prompt), n=n,
                                                  max_tokens=6, temperature=1.0, seed=seed, greedy=greedy)])[0]


def mean_abs_diff(loaded, adapter, prompt, completions):
    diffs = []
    for c in completions:
        theirs = torch.tensor(c.logprobs)
        ours = trainer_logprobs(loaded, adapter, encode(loaded, prompt), c)
        diffs.append((theirs - ours).abs().mean().item())
    return max(diffs)


def test_each_tenants_rollouts_come_from_its_own_adapter(loaded):
    prompt_ids = encode(loaded, "37+45=")
    requests = [SampleRequest(adapter=name, prompt_ids=prompt_ids, n=1, max_tokens=6, greedy=True) for name in ("a", "b")]
    out_a, out_b = loaded.backend.generate(requests)  # one shared batch, two adapters
    a, b = out_a[0], out_b[0]
    # Each completion's sampler log-probs are what *its* adapter gives, not the other's.
    own_a = trainer_logprobs(loaded, "a", prompt_ids, a)
    other_a = trainer_logprobs(loaded, "b", prompt_ids, a)
    assert torch.allclose(torch.tensor(a.logprobs), own_a, atol=1e-3)
    assert not torch.allclose(torch.tensor(a.logprobs), other_a, atol=1e-2)
    own_b = trainer_logprobs(loaded, "b", prompt_ids, b)
    assert torch.allclose(torch.tensor(b.logprobs), own_b, atol=1e-3)


def test_sampler_and_trainer_logprobs_agree_in_fp32(loaded):
    for prompt in PROMPTS:
        for adapter in ("a", "b"):
            assert mean_abs_diff(loaded, adapter, prompt, sample(loaded, adapter, prompt, seed=3)) < 1e-4


def make_batch(loaded, prompt, completions, advantages):
    p = encode(loaded, prompt)
    width = max(len(c.token_ids) for c in completions)
    pad = loaded.tokenizer.pad_token_id
    ids = torch.full((len(completions), len(p) + width), pad)
    attn, cmask = torch.zeros_like(ids), torch.zeros(len(completions), width)
    for i, c in enumerate(completions):
        ids[i, : len(p)] = torch.tensor(p)
        ids[i, len(p) : len(p) + len(c.token_ids)] = torch.tensor(c.token_ids)
        attn[i, : len(p) + len(c.token_ids)] = 1
        cmask[i, : len(c.token_ids)] = 1
    return TrainBatch(ids, attn, cmask, torch.tensor(advantages, dtype=torch.float32), len(p))


def test_a_training_step_changes_only_its_own_tenant(loaded):
    trainer = loaded.trainer
    before = {name: trainer.adapter_state(name) for name in ("a", "b")}
    completions = sample(loaded, "a", "37+45=", n=4, seed=5)
    trainer.train_step("a", make_batch(loaded, "37+45=", completions, [1.0, -1.0, 0.5, -0.5]), GrpoSpec(), 6)
    after = {name: trainer.adapter_state(name) for name in ("a", "b")}
    assert any(not torch.equal(before["a"][k], after["a"][k]) for k in before["a"])
    assert all(torch.equal(before["b"][k], after["b"][k]) for k in before["b"])


def test_weight_sync_makes_the_sampler_use_the_new_weights(loaded):
    prompt = "12+9="
    completions = sample(loaded, "a", prompt, n=4, seed=7)
    old = [torch.tensor(c.logprobs) for c in completions]
    for _ in range(3):
        loaded.trainer.train_step("a", make_batch(loaded, prompt, completions, [1.0, -1.0, 1.0, -1.0]), GrpoSpec(), 6)
    loaded.backend.sync_adapter("a")
    # The same tokens, scored by the sampler again: the in-place reload must show the update.
    again = sample(loaded, "a", prompt, n=4, seed=7)
    assert mean_abs_diff(loaded, "a", prompt, again) < 1e-4
    new_trainer = [trainer_logprobs(loaded, "a", encode(loaded, prompt), c) for c in completions]
    assert any(not torch.allclose(o, n, atol=1e-3) for o, n in zip(old, new_trainer))


def test_removed_adapter_is_freed_in_sampler_and_trainer(loaded):
    loaded.trainer.add_adapter("gone", LoraSpec(rank=4), OptimSpec(), seed=0)
    loaded.backend.add_adapter("gone")
    assert loaded.trainer.adapter_bytes("gone") > 0
    loaded.backend.remove_adapter("gone")
    loaded.trainer.remove_adapter("gone")
    assert loaded.trainer.parameters("gone") == [] and "gone" not in loaded.trainer.optimizers
    if loaded.backend_name == "vllm":
        assert len(loaded.backend.llm.llm_engine.list_loras()) == 2


def test_fused_update_equals_one_tenant_at_a_time(loaded):
    """Several tenants' updates from one mixed-adapter forward/backward give the same
    per-tenant gradients as training each tenant alone (within float tolerance)."""
    trainer = loaded.trainer
    lora_a, lora_b = LoraSpec(rank=8), LoraSpec(rank=4, target_modules=["q_proj", "v_proj", "up_proj"])
    for name, lora in (("fa", lora_a), ("sa", lora_a), ("fb", lora_b), ("sb", lora_b)):
        trainer.add_adapter(name, lora, OptimSpec(lr=1e-2), seed=0)
    with torch.no_grad():  # identical non-zero starting weights for each fused/serial pair
        for fused, serial, seed in (("fa", "sa", 1), ("fb", "sb", 2)):
            gen = torch.Generator().manual_seed(seed)
            for p, q in zip(trainer.parameters(fused), trainer.parameters(serial)):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
                q.copy_(p)
    try:
        batch_a = make_batch(loaded, "37+45=", sample(loaded, "a", "37+45=", n=4, seed=1), [1.0, -1.0, 0.5, -0.5])
        batch_b = make_batch(loaded, "sort:3142=", sample(loaded, "b", "sort:3142=", n=3, seed=2), [0.3, -1.0, 0.7])
        grpo_a, grpo_b = GrpoSpec(loss_type="dapo"), GrpoSpec(loss_type="grpo", beta=0.05)
        fused = trainer.train({"fa": (batch_a, grpo_a, 6), "fb": (batch_b, grpo_b, 6)}, fused=True)
        serial = {"sa": trainer.train_step("sa", batch_a, grpo_a, 6), "sb": trainer.train_step("sb", batch_b, grpo_b, 6)}
        for f, s in (("fa", "sa"), ("fb", "sb")):
            assert fused[f].loss == pytest.approx(serial[s].loss, abs=1e-6)
            assert fused[f].grad_norm == pytest.approx(serial[s].grad_norm, rel=1e-4)
            # .grad keeps the (clipped) gradient each optimizer stepped with.
            for p, q in zip(trainer.parameters(f), trainer.parameters(s)):
                assert (p.grad - q.grad).abs().max() <= 1e-3 * q.grad.abs().max() + 1e-8
    finally:
        for name in ("fa", "sa", "fb", "sb"):
            trainer.remove_adapter(name)


def test_an_exported_adapter_loads_with_peft_from_pretrained(loaded, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = loaded.trainer.save_adapter("a", tmp_path / "adapter-a")
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir()), str(out)).eval()
    ids = torch.tensor([encode(loaded, "37+45=")])
    with torch.no_grad():
        theirs = fresh(input_ids=ids).logits
        ours = loaded.trainer.model(input_ids=ids, adapter_names=["a"]).logits
    assert torch.allclose(theirs, ours, atol=1e-5)
