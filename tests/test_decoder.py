"""The continuous multi-adapter decoder: vectorized sampling, rows that stop leave the
batch, jobs join mid-decode and can be cancelled, and a job's samples do not depend on
who shares the batch."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.config import LoraSpec, OptimSpec
from engine.rollout.base import SampleRequest
from engine.rollout.decoder import BatchDecoder, draw_tokens
from engine.train.trainer import MultiAdapterTrainer
from tests.modelpaths import model_dir


@pytest.fixture(scope="module")
def setup():
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    model = AutoModelForCausalLM.from_pretrained(model_dir(), dtype=torch.float32)
    trainer = MultiAdapterTrainer(model, torch.device("cpu"))
    for i, name in enumerate(("a", "b")):
        trainer.add_adapter(name, LoraSpec(rank=8 if name == "a" else 4), OptimSpec(), seed=i)
        gen = torch.Generator().manual_seed(7 + i)
        with torch.no_grad():
            for p in trainer.parameters(name):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return trainer, tokenizer


def decoder(setup, **kw):
    trainer, tokenizer = setup
    return BatchDecoder(trainer, tokenizer.pad_token_id, [tokenizer.eos_token_id], **kw)


def req(setup, adapter, prompt, **kw):
    _, tokenizer = setup
    args = dict(n=4, max_tokens=6, seed=3)
    args.update(kw)
    return SampleRequest(adapter=adapter, prompt_ids=tokenizer.encode(prompt, add_special_tokens=False), **args)


def tokens(results):
    return [[c.token_ids for c in group] for group in results]


def test_a_jobs_samples_do_not_depend_on_who_shares_the_batch(setup):
    mine = [req(setup, "a", "37+45="), req(setup, "a", "12+9=", seed=5)]
    alone = decoder(setup).generate(mine)
    crowded = decoder(setup)
    crowded.submit("other", [req(setup, "b", "rev:abcdef=", n=6, max_tokens=12, seed=9)])
    crowded.advance()  # the other job is mid-decode when ours joins
    together = crowded.generate(mine)
    assert tokens(together) == tokens(alone)
    for g1, g2 in zip(alone, together):
        for c1, c2 in zip(g1, g2):
            assert c1.logprobs == pytest.approx(c2.logprobs, abs=1e-4)


def test_greedy_rows_match_the_plain_model_argmax(setup):
    trainer, tokenizer = setup
    prompt = tokenizer.encode("58+27=", add_special_tokens=False)
    (group,) = decoder(setup).generate([SampleRequest(adapter="b", prompt_ids=prompt, n=1, max_tokens=5, greedy=True,
                                                      ignore_eos=True)])
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(5):
            logits = trainer.model(input_ids=torch.tensor([ids]), adapter_names=["b"]).logits[0, -1]
            ids.append(int(logits.argmax()))
    assert group[0].token_ids == ids[len(prompt):]


def test_rows_stop_at_eos_and_leave_the_batch(setup):
    dec = decoder(setup)
    dec.submit("job", [req(setup, "a", "37+45=", n=8, max_tokens=30)])
    sizes, done = [], []
    while not done:
        done = dec.advance()
        sizes.append(dec.active_rows)
    (_, results), = done
    eos = setup[1].eos_token_id
    lengths = [len(c.token_ids) for c in results[0]]
    assert all(c.token_ids[-1] == eos or len(c.token_ids) == 30 for c in results[0])
    assert min(lengths) < max(lengths)  # rows stopped at different times...
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] == 0  # ...and left the batch as they did
    assert all(c.finished == (c.token_ids[-1] == eos) for c in results[0])


def test_ignore_eos_samples_exactly_max_tokens(setup):
    (group,) = decoder(setup).generate([req(setup, "a", "37+45=", n=5, max_tokens=7, ignore_eos=True)])
    assert [len(c.token_ids) for c in group] == [7] * 5


def test_a_cancelled_job_leaves_and_others_finish(setup):
    dec = decoder(setup)
    dec.submit("keep", [req(setup, "a", "37+45=", n=3, max_tokens=6, ignore_eos=True)])
    dec.submit("drop", [req(setup, "b", "12+9=", n=3, max_tokens=6, ignore_eos=True)])
    dec.advance()
    assert dec.active_rows == 6
    assert dec.cancel("drop") and dec.active_rows == 3
    finished = []
    while dec.busy:
        finished += dec.advance()
    assert [tag for tag, _ in finished] == ["keep"]


def test_max_rows_bounds_the_batch_and_the_rest_waits(setup):
    dec = decoder(setup, max_rows=4)
    dec.submit("one", [req(setup, "a", "37+45=", n=4, ignore_eos=True)])
    dec.submit("two", [req(setup, "b", "12+9=", n=4, ignore_eos=True)])
    peak, finished = 0, []
    while dec.busy:
        finished += dec.advance()
        peak = max(peak, dec.active_rows)
    assert peak == 4 and sorted(tag for tag, _ in finished) == ["one", "two"]


def test_draw_tokens_per_row_settings():
    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0], [2.0, 1.0, 0.0]])
    temperature = torch.tensor([1.0, 1.0, 1.0])
    top_p = torch.tensor([1.0, 0.5, 1.0])
    greedy = torch.tensor([False, False, True])
    # u near 1 picks the last token with mass under top_p=1; top_p=0.5 keeps only the best.
    chosen = draw_tokens(logits, temperature, top_p, greedy, torch.tensor([0.999999, 0.999999, 0.5]))
    assert chosen.tolist() == [2, 1, 0]
    assert draw_tokens(logits, temperature, top_p, greedy, torch.tensor([0.0, 0.0, 0.0])).tolist()[0] == 0


def test_priority_decides_the_share_of_a_contended_batch(setup):
    dec = decoder(setup, max_rows=8)
    # Two jobs of 8 one-row requests each, more than the batch holds: weights 3 and 1.
    dec.submit("heavy", [req(setup, "a", "37+45=", n=1, max_tokens=40, ignore_eos=True, seed=i, priority=3.0)
                         for i in range(8)])
    dec.submit("light", [req(setup, "b", "12+9=", n=1, max_tokens=40, ignore_eos=True, seed=i, priority=1.0)
                         for i in range(8)])
    dec.advance()
    held = [owner[0] for owner in dec.rows.owners]
    assert held.count("heavy") == 6 and held.count("light") == 2
    while dec.busy:
        dec.advance()
