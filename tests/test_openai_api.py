"""The engine's OpenAI-compatible endpoint, driven through the `openai` client package against a
real daemon (embedded model, PEFT backend): models, completions, chat, streaming, log-probs,
errors as OpenAI error objects, and sampling with a tenant's own adapter."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import urllib.error
import urllib.request

import pytest
import torch

from tests.daemon_helpers import Daemon, Homes, cli_json, pick_model, run_cli, wait_for
from tests.modelpaths import tiny_spec

openai = pytest.importorskip("openai")

PROMPTS = ["37+45=", "rev:abcd=", "12+9="]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def engine():
    """One daemon for the module, with one tenant trained a few steps and then paused (its
    adapter stays loaded and no longer changes)."""
    homes = Homes()
    model = pick_model()
    home = homes.new()
    status = cli_json(home, "engine", "start", "--model", str(model), "--backend", "peft", "--max-loras", "4",
                      "--max-lora-rank", "16", "--http-port", str(free_port()), timeout=600)
    daemon = Daemon(home, model, status)
    with daemon.client() as client:
        spec = tiny_spec("talker", steps=200, checkpoint_every=100, optim={"lr": 2e-2})
        tenant = client.call("start", spec=spec)["id"]
        wait_for(lambda: client.call("get", id=tenant)["step"] >= 2, timeout=120, what="two trained steps")
        client.call("pause", id=tenant)
        wait_for(lambda: client.call("get", id=tenant)["state"] == "paused", timeout=60, what="the pause")
    daemon.tenant = tenant
    daemon.status = daemon.json("engine", "status")
    yield daemon
    homes.cleanup()


@pytest.fixture(scope="module")
def client(engine):
    return openai.OpenAI(base_url=engine.status["openai_base_url"], api_key=engine.status["api_key"], max_retries=0)


def greedy(client, model, prompt, max_tokens=8, **extra):
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                     logprobs=1, **extra).choices[0]


# -- the endpoint -------------------------------------------------------------------------
def test_status_shows_base_url_and_a_tml_key(engine):
    status = engine.status
    assert status["openai_base_url"].startswith("http://127.0.0.1:") and status["openai_base_url"].endswith("/v1")
    assert status["api_key"].startswith("tml-") and len(status["api_key"]) > 40


def test_models_lists_the_base_and_live_tenants_by_id_and_name(client, engine):
    cards = {m.id: m for m in client.models.list().data}
    assert "embedded" in cards and cards["embedded"].name == "base model"
    assert cards[engine.tenant].name == "talker" and cards[engine.tenant].state == "paused"


def test_missing_or_wrong_key_is_401(engine):
    url = engine.status["openai_base_url"]
    for key in ("wrong", "tml-" + "0" * 64):
        with pytest.raises(openai.AuthenticationError) as err:
            openai.OpenAI(base_url=url, api_key=key, max_retries=0).models.list()
        assert err.value.body["code"] == "invalid_api_key"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{url}/models", timeout=30)
    assert err.value.code == 401 and json.load(err.value)["error"]["type"] == "authentication_error"


def test_x_api_key_header_is_accepted(engine):
    request = urllib.request.Request(f"{engine.status['openai_base_url']}/models",
                                     headers={"X-API-Key": engine.status["api_key"]})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200 and json.load(response)["object"] == "list"


def test_unknown_model_is_404_with_an_openai_error(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="e999", prompt="1+1=", max_tokens=2)
    assert err.value.body["code"] == "model_not_found" and err.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


def test_bad_request_is_400_with_an_openai_error(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="embedded", prompt="1+1=", max_tokens=2, temperature=-1)
    assert "temperature" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:  # beyond the embedded model's 128-token context
        client.completions.create(model="embedded", prompt="1+1=", max_tokens=1000)
    assert err.value.body["code"] == "context_length_exceeded"


# -- completions and chat -----------------------------------------------------------------
def test_completion_returns_text_token_ids_and_logprobs(client, engine):
    response = client.completions.create(model=engine.tenant, prompt=PROMPTS[:2], max_tokens=6, n=2, seed=3,
                                         logprobs=1)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    for choice in response.choices:
        assert choice.finish_reason in ("stop", "length")
        assert len(choice.token_ids) == len(choice.logprobs.token_logprobs) == len(choice.logprobs.tokens) <= 6
        assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)
        assert choice.text == "".join(t for t in choice.logprobs.tokens if t != "<eos>")
    assert response.choices[0].prompt_token_ids != response.choices[2].prompt_token_ids
    assert response.usage.completion_tokens == sum(len(c.token_ids) for c in response.choices)


def test_same_seed_same_samples(client):
    def draw():
        return [c.token_ids for c in client.completions.create(model="embedded", prompt="rev:abcde=", max_tokens=6,
                                                               n=3, seed=11, temperature=1.0).choices]
    assert draw() == draw()


def test_stop_string_ends_the_text(client):
    full = greedy(client, "embedded", "rev:abcdef=")
    at = next(j for j in range(1, len(full.text)) if full.text[j] not in full.text[:j])
    cut = greedy(client, "embedded", "rev:abcdef=", stop=["zz", full.text[at:at + 2]])
    assert cut.text == full.text[:at] and cut.finish_reason == "stop"
    assert len(cut.token_ids) <= len(full.token_ids)


def test_chat_without_a_template_continues_the_user_message(client, engine):
    chat = client.chat.completions.create(model=engine.tenant, messages=[{"role": "user", "content": PROMPTS[0]}],
                                          max_tokens=8, temperature=0, logprobs=True)
    plain = greedy(client, engine.tenant, PROMPTS[0])
    choice = chat.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == plain.text
    assert choice.token_ids == plain.token_ids
    assert [t.logprob for t in choice.logprobs.content] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-5)


def test_chat_streams_as_sse_chunks(client, engine):
    messages = [{"role": "user", "content": PROMPTS[1]}]
    whole = client.chat.completions.create(model=engine.tenant, messages=messages, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model=engine.tenant, messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completion_streams_as_sse_chunks(client):
    whole = greedy(client, "embedded", "rev:abc=")
    chunks = list(client.completions.create(model="embedded", prompt="rev:abc=", max_tokens=8, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert [t for c in chunks for t in (c.choices[0].token_ids or [])] == whole.token_ids


def test_concurrent_requests_share_the_batch_and_all_return(client, engine):
    models = ["embedded", engine.tenant] * 4
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda m: greedy(client, m, PROMPTS[2]), models))
    assert all(o.token_ids == outs[0].token_ids for o in outs[0::2])
    assert all(o.token_ids == outs[1].token_ids for o in outs[1::2])


# -- the tenant's own adapter ----------------------------------------------------------------
def reference_greedy(model, prompt_ids, steps):
    """Greedy tokens and their log-probs with a plain forward pass per token (no cache)."""
    ids, tokens, logprobs = list(prompt_ids), [], []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            lp = torch.log_softmax(logits, -1)
            token = int(lp.argmax())
            tokens.append(token)
            logprobs.append(float(lp[token]))
            ids.append(token)
            if token == 1:  # the embedded model's <eos>
                break
    return tokens, logprobs


def test_a_tenant_is_sampled_with_its_own_adapter(client, engine, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    exported = tmp_path / "adapter"
    run_cli(engine.home, "export", engine.tenant, str(exported), check=True)
    base = AutoModelForCausalLM.from_pretrained(str(engine.model)).eval()
    base_choice = greedy(client, "embedded", PROMPTS[0])
    ours = reference_greedy(base, base_choice.prompt_token_ids, 8)
    assert base_choice.token_ids == ours[0]
    assert base_choice.logprobs.token_logprobs == pytest.approx(ours[1], abs=1e-3)

    tuned = PeftModel.from_pretrained(base, str(exported)).eval()
    tenant_choice = greedy(client, engine.tenant, PROMPTS[0])
    theirs = reference_greedy(tuned, tenant_choice.prompt_token_ids, 8)
    assert tenant_choice.token_ids == theirs[0]
    assert tenant_choice.logprobs.token_logprobs == pytest.approx(theirs[1], abs=1e-3)
    # ...and the adapter matters: the base model scores the tenant's tokens differently.
    assert tenant_choice.logprobs.token_logprobs != pytest.approx(ours[1], abs=1e-3)


def test_a_killed_tenant_is_no_longer_a_model(client, engine):
    with engine.client() as socket_client:
        victim = socket_client.call("start", spec=tiny_spec("victim", steps=200, checkpoint_every=100))["id"]
        wait_for(lambda: socket_client.call("get", id=victim)["state"] == "running", timeout=60, what="running")
        assert greedy(client, victim, PROMPTS[2]).token_ids
        socket_client.call("kill", id=victim)
        wait_for(lambda: socket_client.call("get", id=victim)["state"] == "killed", timeout=60, what="the kill")
    assert victim not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError) as err:
        greedy(client, victim, PROMPTS[2])
    assert "killed" in err.value.body["message"]


def test_chat_command_talks_to_the_adapter(engine, client):
    expected = greedy(client, engine.tenant, PROMPTS[0]).text
    proc = run_cli(engine.home, "chat", engine.tenant, "--no-history", input_text=f"{PROMPTS[0]}\n/quit\n")
    assert proc.returncode == 0, proc.stderr
    assert f"{engine.tenant}> {expected}" in proc.stdout
