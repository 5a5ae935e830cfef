"""The engine with several tenants on both backends: lifecycle, isolation, records."""

import time

import pytest
import torch

from engine.config import EngineConfig
from engine.core import Engine, EngineError
from tests.daemon_helpers import wait_for as wait_until
from tests.modelpaths import BACKENDS, model_dir, tiny_spec


@pytest.fixture(scope="module", params=BACKENDS)
def engine(request, tmp_path_factory):
    # Fused training (the default) runs on the vLLM engine here, one-at-a-time training
    # (--serial-train) on the PEFT one, so both paths are exercised.
    eng = Engine(EngineConfig(model=model_dir(), backend=request.param, max_loras=4, max_lora_rank=16,
                              vllm_kv_cache_bytes=64 << 20, fused_train=request.param == "vllm"),
                 tmp_path_factory.mktemp(f"home-{request.param}"))
    eng.warm_up()
    yield eng
    eng.shutdown()


def wait_for(predicate, timeout=180.0, what="condition"):
    return wait_until(predicate, timeout=timeout, interval=0.05, what=what)


def state(engine, tid):
    return engine.tenants[tid].state.value


def wait_state(engine, tid, *states, timeout=180.0):
    return wait_for(lambda: state(engine, tid) in states, timeout, f"{tid} to reach {states}")


def test_two_tenants_of_different_ranks_and_tasks_run_to_done(engine):
    a = engine.submit(tiny_spec("add", lora={"rank": 8}))["id"]
    b = engine.submit(tiny_spec("rev", task="reverse", lora={"rank": 4, "target_modules": ["q_proj", "v_proj"]}))["id"]
    for tid in (a, b):
        wait_state(engine, tid, "done")
        steps = engine.history(tid)
        assert [s["step"] for s in steps] == [1, 2, 3, 4]
        for row in steps:
            assert row["logprob_diff"] is not None and row["logprob_diff"] < 1e-3
            assert row["completion_tokens"] > 0 and row["total_s"] >= row["rollout_s"] > 0
            assert 0 <= row["accuracy"] <= 1 and row["reward_min"] <= row["reward_mean"] <= row["reward_max"]
            parts = ("queue_s", "rollout_s", "reward_s", "train_s", "sync_s", "checkpoint_s")
            assert sum(row[p] for p in parts) == pytest.approx(row["total_s"], abs=1e-6)  # the breakdown is whole
        assert engine.list_tenants()[-1]["warmup_s"] is not None
    assert engine.tenants[a].spec.lora.rank == 8 and engine.tenants[b].spec.lora.rank == 4


def test_pause_keeps_the_step_and_resume_continues_from_it(engine):
    tid = engine.submit(tiny_spec("pausable", steps=8))["id"]
    wait_for(lambda: engine.tenants[tid].step >= 1, what="first step")
    engine.pause(tid)
    wait_state(engine, tid, "paused")
    paused_at = engine.tenants[tid].step
    assert tid in engine.loaded.trainer.optimizers  # adapter and optimizer kept
    time.sleep(1.0)
    assert engine.tenants[tid].step == paused_at
    engine.resume(tid)
    wait_state(engine, tid, "done")
    assert [s["step"] for s in engine.history(tid)] == list(range(1, 9))
    with pytest.raises(EngineError, match="done"):
        engine.pause(tid)


def test_kill_frees_the_adapter_and_the_others_go_on(engine):
    victim = engine.submit(tiny_spec("victim", steps=50))["id"]
    other = engine.submit(tiny_spec("survivor", steps=5))["id"]
    wait_for(lambda: engine.tenants[victim].step >= 1, what="victim's first step")
    engine.kill(victim)
    wait_state(engine, victim, "killed")
    assert victim not in engine.loaded.trainer.optimizers
    assert engine.loaded.trainer.parameters(victim) == []
    wait_state(engine, other, "done")


def test_a_reward_that_raises_fails_only_its_tenant(engine, tmp_path):
    plugin = tmp_path / "bad_reward.py"
    plugin.write_text("def score(prompt, completion, answer):\n    raise RuntimeError('reward exploded')\n")
    bad = engine.submit(tiny_spec("bad-reward", reward=f"{plugin}:score"))["id"]
    good = engine.submit(tiny_spec("good"))["id"]
    wait_state(engine, bad, "failed")
    assert "reward exploded" in engine.tenants[bad].error
    assert bad not in engine.loaded.trainer.optimizers
    wait_state(engine, good, "done")


def test_a_reward_that_hangs_fails_only_its_tenant(engine, tmp_path):
    plugin = tmp_path / "slow_reward.py"
    plugin.write_text("import time\ndef score(prompt, completion, answer):\n    time.sleep(60)\n    return 1.0\n")
    slow = engine.submit(tiny_spec("hangs", reward=f"{plugin}:score", reward_timeout_s=1.0))["id"]
    good = engine.submit(tiny_spec("fine"))["id"]
    wait_state(engine, slow, "failed")
    assert "did not return within 1 s" in engine.tenants[slow].error
    wait_state(engine, good, "done")


@pytest.mark.parametrize("spec, message", [
    (tiny_spec("big", lora={"rank": 32}), "lora.rank: 32 is above this engine's max_lora_rank 16"),
    (tiny_spec("nope", task="nosuchtask"), "unknown task 'nosuchtask'"),
    (tiny_spec("badmod", reward="no_such_module_xyz:f"), "cannot import 'no_such_module_xyz'"),
    (tiny_spec("badtarget", lora={"target_modules": ["wq"]}), "lora.target_modules"),
    ({"name": "x", "rollout": {"temperature": -1}}, "rollout.temperature"),
])
def test_bad_specs_are_refused_at_submit(engine, spec, message):
    with pytest.raises(EngineError, match=message.replace(".", r"\.").replace("'", "'")):
        engine.submit(spec)


def test_checkpoint_restores_weights_optimizer_and_step_exactly(engine, tmp_path):
    from engine.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint


    tid = engine.submit(tiny_spec("ckpt", steps=200, checkpoint_every=1000))["id"]
    wait_for(lambda: engine.tenants[tid].step >= 2, what="two steps")
    engine.pause(tid)
    wait_state(engine, tid, "paused")
    trainer = engine.loaded.trainer
    with trainer.lock:
        save_checkpoint(trainer, tid, engine.tenants[tid].step, tmp_path, {})
        weights = trainer.adapter_state(tid)
        moments = trainer.optimizer_state(tid)
        trainer.add_adapter("restored", engine.tenants[tid].spec.lora, engine.tenants[tid].spec.optim, seed=99)
        state = load_checkpoint(trainer, "restored", latest_checkpoint(tmp_path, tid))
    assert state["step"] == engine.tenants[tid].step
    restored = trainer.adapter_state("restored")
    assert set(restored) == set(weights) and all(torch.equal(restored[k], weights[k]) for k in weights)
    got = trainer.optimizer_state("restored")["state"]
    for key, slot in moments["state"].items():
        for name, value in slot.items():
            assert torch.equal(torch.as_tensor(got[key][name]), torch.as_tensor(value))
    trainer.remove_adapter("restored")
    engine.kill(tid)
    wait_state(engine, tid, "killed")
