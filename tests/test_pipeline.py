"""The scheduler is a pipeline, not a lockstep: slow rewards, long rollouts and dying
reward workers of one tenant never hold up the others, and a kill is always a kill."""

import textwrap
import time

import pytest

from engine.config import EngineConfig
from engine.core import Engine
from tests.daemon_helpers import wait_for as wait_until
from tests.modelpaths import model_dir, tiny_spec


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    eng = Engine(EngineConfig(model=model_dir(), backend="peft", max_loras=4, max_lora_rank=16),
                 tmp_path_factory.mktemp("home-pipeline"))
    eng.warm_up()
    yield eng
    eng.shutdown()


def wait_for(predicate, timeout=180.0, what="condition"):
    return wait_until(predicate, timeout=timeout, interval=0.02, what=what)


def state(engine, tid):
    return engine.tenants[tid].state.value


def reward_file(tmp_path, body):
    path = tmp_path / f"r{abs(hash(body))}.py"
    path.write_text(textwrap.dedent(body))
    return f"{path}:score"


def test_a_slow_reward_does_not_stall_the_other_tenants(engine, tmp_path):
    slow = reward_file(tmp_path, """
        import time
        def score(prompt, completion, answer):
            time.sleep(0.4)  # waits on a remote judge: 8 samples, 3.2 s per step
            return 1.0
    """)
    a = engine.submit(tiny_spec("slow-judge", reward=slow))["id"]
    b = engine.submit(tiny_spec("fast"))["id"]
    wait_for(lambda: state(engine, b) == "done", what="the fast tenant to finish")
    assert engine.tenants[a].step == 0 and state(engine, a) == "running"
    engine.kill(a)
    wait_for(lambda: state(engine, a) == "killed", what="kill")


def test_a_short_tenant_does_not_wait_for_a_long_rollout(engine):
    long = engine.submit(tiny_spec("long", steps=2, rollout={"prompts_per_step": 8, "num_generations": 8,
                                                              "max_tokens": 200, "ignore_eos": True}))["id"]
    short = engine.submit(tiny_spec("short", rollout={"max_tokens": 2}))["id"]
    wait_for(lambda: state(engine, short) == "done", what="the short tenant to finish")
    assert engine.tenants[long].step == 0  # its first rollout is still going
    engine.kill(long)
    wait_for(lambda: state(engine, long) == "killed", what="kill")


def test_kill_at_any_moment_ends_killed(engine):
    killed = []
    for i in range(12):
        ids = [engine.submit(tiny_spec(f"k{i}-{j}"))["id"] for j in range(2)]
        time.sleep(0.02 * (i % 6))  # queued, warming, sampling, scoring, training...
        for tid in ids:
            engine.kill(tid)
        killed += ids
    wait_for(lambda: all(state(engine, t) in ("killed", "done") for t in killed), what="kills")
    assert {state(engine, t) for t in killed} <= {"killed", "done"}
    assert not [t for t in killed if engine.tenants[t].error]


@pytest.mark.parametrize("body, reason", [
    ("import os\ndef score(p, c, a):\n    os._exit(1)\n", "exited with code 1"),
    ("def score(p, c, a):\n    while True:\n        pass\n", "did not return within 1 s"),
])
def test_a_reward_that_kills_or_spins_its_worker_fails_only_its_tenant(engine, tmp_path, body, reason):
    bad = engine.submit(tiny_spec("bad-reward", reward=reward_file(tmp_path, body), reward_timeout_s=1.0))["id"]
    good = engine.submit(tiny_spec("good"))["id"]
    wait_for(lambda: state(engine, bad) == "failed", what="the bad tenant to fail")
    assert reason in engine.tenants[bad].error
    wait_for(lambda: state(engine, good) == "done", what="the good tenant to finish")
    assert [s["step"] for s in engine.history(good)] == [1, 2, 3, 4]


def test_one_step_off_policy_samples_ahead_and_records_its_staleness(engine):
    tid = engine.submit(tiny_spec("async", steps=6, eval_every=3, rollout={"off_policy_steps": 1}))["id"]
    wait_for(lambda: state(engine, tid) == "done", what="the off-policy tenant to finish")
    history = engine.history(tid)
    assert [s["step"] for s in history] == [1, 2, 3, 4, 5, 6]
    stale = [s["staleness"] for s in history]
    # Step 1 and the steps that begin with an eval (4) are sampled on-policy; the rest ahead.
    assert stale == [0, 1, 1, 0, 1, 1]
    for row in history:
        assert row["loss"] == row["loss"] and row["logprob_diff"] is not None  # finite, measured
    on_policy = [s["logprob_diff"] for s in history if not s["staleness"]]
    assert max(on_policy) < 1e-3  # the sampler and trainer agree when nothing changed between


def test_priority_is_a_validated_spec_field(engine):
    from engine.core import EngineError

    with pytest.raises(EngineError, match="priority"):
        engine.submit(tiny_spec("p", priority=0))
    tid = engine.submit(tiny_spec("weighted", priority=4.0))["id"]
    wait_for(lambda: state(engine, tid) == "done", what="the weighted tenant")
