"""Multi-turn environment tasks: the retail world's rewards for hand-written transcripts, an env
plugin (from a temp file) run as episodes on the real PEFT backend with the right masks (the
trained tokens are exactly the model's turns), and, on a real daemon, a raising or hanging
environment failing only its own tenant while a retail tenant trains and reports its turns."""

from __future__ import annotations

import asyncio
import concurrent.futures
import textwrap
import time

import pytest

from engine.config import EngineConfig, parse_spec
from engine.episodes import EpisodeRollout
from engine.loading import load_everything
from engine.tasks import retail
from engine.tenant import Tenant
from tests.daemon_helpers import Daemon, Homes, pick_model, start_engine, wait_for
from tests.modelpaths import model_dir, tiny_spec


def play(env, seed, index, turns):
    """Run a transcript of model turns through an environment; (observations, rewards, done)."""
    first = env.reset(seed, index)
    seen, rewards, done = [first], [], False
    for text in turns:
        obs, reward, done = asyncio.run(env.step(text))
        rewards.append(reward)
        if done:
            break
        seen.append(obs)
    return seen, rewards, done


def find(intent, status=None):
    for index in range(1000):
        store, target, kind = retail.make_store(7, index)
        if kind == intent and (status is None or store[target][0] == status):
            return index, store, target
    raise AssertionError("no such episode")


def test_retail_rewards_for_hand_written_transcripts():
    env = retail.RetailEnv()
    index, store, target = find("status")
    status, item, price = store[target]
    seen, rewards, done = play(env, 7, index, [f"look:{target}", status])
    assert seen == [f"status?{target}", f"={status},{item},{price}:"] and rewards == [0.0, 1.0] and done
    assert play(env, 7, index, [f"look:{target}", item])[1][-1] == 0.0  # the item is not the status
    assert play(env, 7, index, [status])[1] == [1.0]  # right without looking is right (a guess)
    assert play(env, 7, index, [f"cancel:{target}", status])[1][-1] == 0.0 or store[target][0] != "pending"

    index, store, target = find("price")
    assert play(env, 7, index, [f"look:{target}", str(store[target][2])])[1][-1] == 1.0

    index, store, target = find("cancel", "pending")
    seen, rewards, _ = play(env, 7, index, [f"cancel:{target}", "done"])
    assert seen[-1] == "=ok:" and rewards[-1] == 1.0
    assert play(env, 7, index, ["done"])[1] == [0.0]  # said done without cancelling: the store disagrees
    other = next(i for i in store if i != target)
    assert play(env, 7, index, [f"cancel:{other}", "done"])[1][-1] == 0.0 or store[other][0] != "pending"

    index, store, target = find("cancel", "shipped")
    seen, rewards, _ = play(env, 7, index, [f"cancel:{target}", "cannot"])
    assert seen[-1] == "=no,shipped:" and rewards[-1] == 1.0
    assert play(env, 7, index, [f"look:{target}"] * 4)[1][-1] == 0.0  # more than 3 tool calls
    for seed, index in ((0, 0), (3, 11), (9, 5)):  # the build script's solutions score 1
        turns = [text for text, model in retail.solution(seed, index) if model]
        assert play(env, seed, index, turns)[1][-1] == 1.0


PLUGIN = '''
class Countdown:
    """Says a number; the model's turn is echoed back as `<n-1>:`; done after `turns` turns."""
    reward_mode = "sum"

    def __init__(self, turns=3, mode="ok"):
        self.turns, self.mode = turns, mode

    def reset(self, seed, index):
        self.left = self.turns
        return f"{index}+{seed % 10}="

    async def step(self, text):
        if self.mode == "raise":
            raise RuntimeError("the tool broke")
        if self.mode == "hang":
            import time
            time.sleep(3600)
        self.left -= 1
        if self.left == 0:
            return None, 1.0 if text else 0.5, True
        return f"={self.left}:", 0.25, False
'''


@pytest.fixture(scope="module")
def loaded():
    everything = load_everything(EngineConfig(model=model_dir(), backend="peft", max_loras=4, max_lora_rank=16))
    yield everything
    everything.backend.close()


def test_env_plugin_episodes_train_exactly_the_model_turns(loaded, tmp_path):
    plugin = tmp_path / "countdown.py"
    plugin.write_text(PLUGIN)
    spec = parse_spec(tiny_spec("episodes", task=f"env:{plugin}:Countdown", task_args={"turns": 3},
                                rollout={"prompts_per_step": 2, "num_generations": 3, "max_tokens": 4,
                                         "max_turns": 4}))
    tenant = Tenant(id="m1", spec=spec)
    tenant.load_task()
    loaded.trainer.add_adapter("m1", spec.lora, spec.optim, seed=0)
    loaded.backend.add_adapter("m1")
    pool = concurrent.futures.ThreadPoolExecutor(2)
    sampled: dict[str, list[list[int]]] = {}
    try:
        rollout = EpisodeRollout(tenant, loaded.tokenizer, step=0, train=True, evaluate=False, context=128)
        rollout.start(pool, lambda: None)
        while rollout.result is None:
            while rollout.busy_with_env and not rollout.future.done():
                time.sleep(0.01)
            requests = rollout.poll()
            if requests:
                completions = loaded.backend.generate(requests)
                for e, c in zip(rollout.sampling, [c for group in completions for c in group]):
                    sampled.setdefault(e.key, []).append(list(c.token_ids))
                rollout.sampled(pool, completions)
        out = rollout.result
    finally:
        pool.shutdown()
        tenant.close()
        loaded.backend.remove_adapter("m1")
        loaded.trainer.remove_adapter("m1")
    batch = out["batch"]
    train = [e for e in rollout.episodes if e.group >= 0]
    assert batch.input_ids.shape[0] == 6 and out["turns"] == 3.0
    encode = lambda text: loaded.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    for row, episode in enumerate(train):
        assert episode.prompt == encode(f"{episode.index}+0=")  # the group's first observation is the prompt
        mask = batch.completion_mask[row].tolist()
        ids = batch.input_ids[row, batch.prompt_width:].tolist()
        model_tokens = [t for t, m in zip(ids, mask) if m == 1.0]
        env_tokens = [t for t, m, a in zip(ids, mask, batch.attention_mask[row, batch.prompt_width:].tolist())
                      if m == 0.0 and a == 1]
        assert model_tokens == [t for turn in sampled[episode.key] for t in turn]  # exactly the model's turns
        assert env_tokens == encode("=2:") + encode("=1:")  # the observations, never trained
    assert all(r in (1.5, 1.0) for r in out["rewards"])  # summed: 0.25 + 0.25 + (1 or 0.5)
    assert batch.advantages.shape == (6,)


@pytest.fixture(scope="module")
def daemon():
    homes = Homes()
    model = pick_model()
    home = homes.new()
    yield Daemon(home, model, start_engine(home, model))
    homes.cleanup()


def test_raising_or_hanging_env_fails_only_its_tenant(daemon, tmp_path):
    plugin = tmp_path / "countdown.py"
    plugin.write_text(textwrap.dedent(PLUGIN))
    env = f"env:{plugin}:Countdown"
    rollout = {"prompts_per_step": 2, "num_generations": 4, "max_tokens": 4, "max_turns": 3}
    with daemon.client() as client:
        good = client.call("start", spec=tiny_spec("shop", task="retail", steps=3, rollout=rollout))["id"]
        broken = client.call("start", spec=tiny_spec("broken", task=env, task_args={"mode": "raise"}, rollout=rollout))["id"]
        hung = client.call("start", spec=tiny_spec("hung", task=env, task_args={"mode": "hang"}, rollout=rollout,
                                                   reward_timeout_s=2.0))["id"]
        wait_for(lambda: client.call("get", id=broken)["state"] == "failed", timeout=120, what="the raising env to fail")
        wait_for(lambda: client.call("get", id=hung)["state"] == "failed", timeout=120, what="the hanging env to fail")
        assert "the tool broke" in client.call("get", id=broken)["error"]
        assert "did not return within 2 s" in client.call("get", id=hung)["error"]
        wait_for(lambda: client.call("get", id=good)["state"] == "done", timeout=300, what="the retail tenant")
        info = client.call("get", id=good)
        assert [h["step"] for h in info["history"]] == [1, 2, 3]
        assert all(1 <= h["turns"] <= 3 for h in info["history"])
    rows = {r["id"]: r for r in daemon.json("ls", "--json")}
    assert rows[good]["turns"] == info["history"][-1]["turns"]


def test_bad_env_refused_at_submit(daemon, tmp_path):
    plugin = tmp_path / "bad.py"
    plugin.write_text("class NoStep:\n    def reset(self, seed, index):\n        return 'x'\n")
    with daemon.client() as client:
        with pytest.raises(Exception, match="has no step"):
            client.call("start", spec=tiny_spec("nostep", task=f"env:{plugin}:NoStep"))
        with pytest.raises(Exception, match="does not exist"):
            client.call("start", spec=tiny_spec("nofile", task=f"env:{tmp_path}/missing.py:Env"))
        with pytest.raises(Exception, match="tool_latency_ms"):
            client.call("start", spec=tiny_spec("badarg", task="retail", task_args={"tool_latency_ms": -1}))


def test_chat_template_renders_environment_turns_as_messages():
    from transformers import AutoTokenizer

    from engine.episodes import Episode, Renderer

    tok = AutoTokenizer.from_pretrained(model_dir())
    tok.chat_template = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}.{% endfor %}"
                         "{% if add_generation_prompt %}a:{% endif %}")
    renderer = Renderer(tok, "tool")
    episode = Episode("e", 0, 0, 0)
    renderer.first(episode, "status?17")
    assert tok.decode(episode.prompt) == "u:status?17.a:"
    ids = renderer.observation(episode, "look:17", "=shipped,mug,5:")
    assert tok.decode(ids) == "t:=shipped,mug,5:.a:"  # a `tool` message, then the model's turn again
    assert [m["role"] for m in episode.messages] == ["user", "assistant", "tool"]
