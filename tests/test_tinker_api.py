"""The Tinker API, driven through the official `tinker` SDK (unmodified) against a real daemon
(embedded model, PEFT backend): a LoRA training client samples, trains with cross_entropy and
importance_sampling, steps, saves and resumes from its state (also after an engine restart),
shows up as a tenant, waits while paused, fails when killed, and ends with its session."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from tests.daemon_helpers import Daemon, Homes, cli_json, pick_model, wait_for

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(home, model, port):
    return cli_json(home, "engine", "start", "--model", str(model), "--backend", "peft", "--max-loras", "4",
                    "--max-lora-rank", "16", "--tinker-port", str(port), timeout=600)


@pytest.fixture(scope="module")
def engine():
    homes = Homes()
    model = pick_model()
    home, port = homes.new(), free_port()
    daemon = Daemon(home, model, start(home, model, port))
    daemon.port = port
    yield daemon
    homes.cleanup()


@pytest.fixture()
def service(engine):
    status = engine.json("engine", "status")
    client = tinker.ServiceClient(base_url=status["tinker_url"], api_key=status["api_key"])
    yield client
    client.close("success").result()


def encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def sft_datum(tokenizer, prompt, answer):
    p, full = encode(tokenizer, prompt), encode(tokenizer, prompt + answer) + [tokenizer.eos_token_id]
    weights = [0.0] * (len(p) - 1) + [1.0] * (len(full) - len(p))
    return types.Datum(model_input=types.ModelInput.from_ints(full[:-1]),
                       loss_fn_inputs={"target_tokens": np.array(full[1:], dtype=np.int64),
                                       "weights": np.array(weights, dtype=np.float32)})


def tenant_of(engine, name):
    return next(r for r in engine.json("ls", "--json") if r["name"] == name)


def test_training_client_samples_trains_saves_and_resumes(engine, service):
    training = service.create_lora_training_client(base_model="embedded", rank=8, seed=1,
                                                   user_metadata={"name": "sdk-run"}).result()
    assert training.get_info().model_data.tokenizer_id == str(engine.model)  # local: nothing is downloaded
    tokenizer = training.get_tokenizer()
    row = tenant_of(engine, "sdk-run")
    assert row["task"] == "tinker" and row["state"] == "running" and row["rank"] == 8

    sampler = training.save_weights_and_get_sampling_client().result()
    prompt = encode(tokenizer, "12+7=")
    out = sampler.sample(prompt=types.ModelInput.from_ints(prompt), num_samples=4,
                         sampling_params=types.SamplingParams(max_tokens=6, temperature=1.0, seed=3)).result()
    assert len(out.sequences) == 4 and len({s.sequence_id for s in out.sequences}) == 4
    for seq in out.sequences:
        assert 1 <= len(seq.tokens) <= 6 and len(seq.logprobs) == len(seq.tokens)
        assert seq.stop_reason == ("stop" if seq.tokens[-1] == tokenizer.eos_token_id else "length")

    # cross_entropy: Tinker's loss is the weighted SUM of -logp over the datum's tokens.
    data = [sft_datum(tokenizer, "12+7=", "5"), sft_datum(tokenizer, "3+4=", "77")]  # wrong: far from learnt
    before = training.forward_backward(data, "cross_entropy").result()
    for datum, output in zip(data, before.loss_fn_outputs):
        assert output["logprobs"].shape == datum.loss_fn_inputs["target_tokens"].shape
    expected = -sum(float((o["logprobs"].to_numpy() * d.loss_fn_inputs["weights"].to_numpy()).sum())
                    for d, o in zip(data, before.loss_fn_outputs))
    assert before.metrics["loss:sum"] == pytest.approx(expected, rel=1e-4)
    training.optim_step(types.AdamParams(learning_rate=5e-3)).result()
    for _ in range(3):
        training.forward_backward(data, "cross_entropy").result()
        training.optim_step(types.AdamParams(learning_rate=5e-3, grad_clip_norm=1.0)).result()
    after = training.forward(data, "cross_entropy").result()
    assert after.metrics["loss:sum"] < before.metrics["loss:sum"]
    wait_for(lambda: tenant_of(engine, "sdk-run")["step"] == 4, timeout=30, what="4 recorded steps")
    history = engine.json("show", "sdk-run", "--json")["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4] and all(h["total_s"] > 0 for h in history)
    csv_path = engine.home / "sdk-run.csv"
    engine.cli("metrics", "sdk-run", "--csv", str(csv_path), check=True)
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("step,time,") and "loss" in lines[0] and len(lines) == 5
    tb = engine.home / "tb" / row["id"]  # TensorBoard, on by default
    wait_for(lambda: list(tb.glob("events.out.tfevents.*")), timeout=30, what="TensorBoard event files")

    # importance_sampling on the sampled tokens: the ratio is 1 at the sampler's own log-probs.
    seq = out.sequences[0]
    tokens = prompt + list(seq.tokens)
    sampler2 = training.save_weights_and_get_sampling_client().result()
    seq = sampler2.sample(prompt=types.ModelInput.from_ints(prompt), num_samples=1,
                          sampling_params=types.SamplingParams(max_tokens=6, temperature=1.0)).result().sequences[0]
    tokens = prompt + list(seq.tokens)
    n = len(prompt) - 1
    rl = types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                     loss_fn_inputs={"target_tokens": np.array(tokens[1:], dtype=np.int64),
                                     "logprobs": np.array([0.0] * n + list(seq.logprobs), dtype=np.float32),
                                     "advantages": np.array([0.0] * n + [1.0] * len(seq.tokens), dtype=np.float32)})
    result = training.forward_backward([rl], "importance_sampling").result()
    trained = result.loss_fn_outputs[0]["logprobs"].to_numpy()[n:]
    assert np.allclose(trained, seq.logprobs, atol=2e-3)  # sampler and trainer agree on these weights
    assert result.metrics["loss:sum"] == pytest.approx(-len(seq.tokens), rel=1e-2)
    training.optim_step(types.AdamParams(learning_rate=1e-3)).result()

    # save_state -> a new training client from it has the same weights and the optimizer state.
    path = training.save_state("ckpt-a").result().path
    assert path.startswith("tinker://") and path.endswith("/weights/ckpt-a")
    assert (engine.home / "tinker" / training.model_id / "weights" / "ckpt-a" / "optimizer.pt").is_file()
    resumed = service.create_training_client_from_state_with_optimizer(path).result()
    assert resumed.model_id != training.model_id
    mine = training.forward(data, "cross_entropy").result().metrics["loss:sum"]
    theirs = resumed.forward(data, "cross_entropy").result().metrics["loss:sum"]
    assert theirs == pytest.approx(mine, rel=1e-5)


def test_unsupported_loss_and_bad_requests_are_clear_errors(engine, service):
    training = service.create_lora_training_client(base_model="embedded", rank=4).result()
    tokenizer = training.get_tokenizer()
    with pytest.raises(Exception, match="dro.*not supported"):
        training.forward_backward([sft_datum(tokenizer, "1+1=", "2")], "dro").result()
    with pytest.raises(Exception, match="needs loss_fn_inputs"):
        training.forward_backward([sft_datum(tokenizer, "1+1=", "2")], "ppo").result()
    with pytest.raises(Exception, match="not served here"):
        service.create_lora_training_client(base_model="Qwen/Qwen3-4B", rank=4).result()
    status = engine.json("engine", "status")
    url = f"{status['tinker_url']}/api/v1/forward_backward"
    request = urllib.request.Request(url, data=b"\xff\x00garbage", method="POST",
                                     headers={"Content-Type": "application/x-protobuf", "X-API-Key": status["api_key"]})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 400 and b"not a ForwardBackwardRequest" in err.value.read()
    request = urllib.request.Request(url, data=b"", method="POST", headers={"Content-Type": "application/x-protobuf"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 401


def test_pause_makes_requests_wait_kill_fails_them_and_finish_ends_the_run(engine):
    status = engine.json("engine", "status")
    service = tinker.ServiceClient(base_url=status["tinker_url"], api_key=status["api_key"])
    training = service.create_lora_training_client(base_model="embedded", rank=4,
                                                   user_metadata={"name": "pausable"}).result()
    tokenizer = training.get_tokenizer()
    data = [sft_datum(tokenizer, "2+2=", "4")]
    training.forward_backward(data, "cross_entropy").result()
    tid = tenant_of(engine, "pausable")["id"]
    engine.cli("pause", tid, check=True)
    wait_for(lambda: tenant_of(engine, "pausable")["state"] == "paused", timeout=30, what="the pause")
    future = training.forward_backward(data, "cross_entropy")
    time.sleep(1.5)
    assert not future.future().done()  # it waits while the tenant is paused
    engine.cli("resume", tid, check=True)
    assert future.result(timeout=60).metrics["loss:sum"] > 0
    engine.cli("pause", tid, check=True)
    wait_for(lambda: tenant_of(engine, "pausable")["state"] == "paused", timeout=30, what="the pause")
    waiting = training.optim_step(types.AdamParams(learning_rate=1e-3))
    time.sleep(0.5)
    engine.cli("kill", tid, check=True)
    with pytest.raises(Exception, match="training run is over|killed"):
        waiting.result(timeout=60)
    service.close("success").result()

    # a run whose client closes its session is done
    with tinker.ServiceClient(base_url=status["tinker_url"], api_key=status["api_key"]) as other:
        other.create_lora_training_client(base_model="embedded", rank=4, user_metadata={"name": "closing"}).result()
    wait_for(lambda: tenant_of(engine, "closing")["state"] == "done", timeout=30, what="the run to end")


def test_saved_state_survives_an_engine_restart(engine):
    status = engine.json("engine", "status")
    with tinker.ServiceClient(base_url=status["tinker_url"], api_key=status["api_key"]) as service:
        training = service.create_lora_training_client(base_model="embedded", rank=4).result()
        tokenizer = training.get_tokenizer()
        data = [sft_datum(tokenizer, "5+5=", "10")]
        training.forward_backward(data, "cross_entropy").result()
        training.optim_step(types.AdamParams(learning_rate=2e-2)).result()
        path = training.save_state("before-restart").result().path
        loss = training.forward(data, "cross_entropy").result().metrics["loss:sum"]
    engine.cli("engine", "stop", check=True)
    start(engine.home, engine.model, engine.port)
    status = engine.json("engine", "status")
    with tinker.ServiceClient(base_url=status["tinker_url"], api_key=status["api_key"]) as service:
        resumed = service.create_training_client_from_state_with_optimizer(path).result()
        assert resumed.forward(data, "cross_entropy").result().metrics["loss:sum"] == pytest.approx(loss, rel=1e-5)
        resumed.forward_backward(data, "cross_entropy").result()
        resumed.optim_step(types.AdamParams(learning_rate=2e-2)).result()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_app_shows_a_tinker_run_live_and_pauses_it_from_the_keys(engine, anyio_backend):
    import asyncio

    from tests.test_app_engine import app_for, select, until
    from clora_tui.widgets.tenant_table import TenantTable

    status = engine.json("engine", "status")
    service = tinker.ServiceClient(base_url=status["tinker_url"], api_key=status["api_key"])
    training = service.create_lora_training_client(base_model="embedded", rank=4,
                                                   user_metadata={"name": "live-run"}).result()
    tokenizer = training.get_tokenizer()
    data = [sft_datum(tokenizer, "8+8=", "16")]

    def step():
        training.forward_backward(data, "cross_entropy").result()
        return training.optim_step(types.AdamParams(learning_rate=1e-3)).result()

    tid = tenant_of(engine, "live-run")["id"]
    async with app_for(engine.home).run_test(size=(120, 36)) as pilot:
        table = pilot.app.query_one(TenantTable)
        await select(pilot, tid)
        assert "TNK" in table.get_cell(tid, "name").plain
        for _ in range(2):
            await asyncio.to_thread(step)
        await until(pilot, lambda: table.get_cell(tid, "step").plain == "2", 30, "two Tinker steps in the table")
        await pilot.press("p")
        await until(pilot, lambda: tenant_of(engine, "live-run")["state"] == "paused", 60, "the pause")
        waiting = training.forward_backward(data, "cross_entropy")
        await asyncio.sleep(1.0)
        assert not waiting.future().done()
        await pilot.press("p")
        await asyncio.to_thread(waiting.result, 60)
    service.close("success").result()
