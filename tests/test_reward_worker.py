"""User reward code runs in a killable worker process: every way it can misbehave is a
named RewardError, and the calling process survives all of them."""

import os
import textwrap
import time

import pytest

from engine.tasks.reward_worker import RewardWorker
from engine.tasks.rewards import RewardError


def plugin(tmp_path, body: str) -> str:
    path = tmp_path / f"reward_{abs(hash(body))}.py"
    path.write_text(textwrap.dedent(body))
    return f"{path}:score"


def test_scores_come_back_in_order(tmp_path):
    worker = RewardWorker(plugin(tmp_path, """
        def score(prompt, completion, answer):
            print("user output must not break the protocol")
            return float(len(completion)) + (completion == answer)
    """))
    try:
        assert worker.score([("p", "abc", "abc"), ("p", "x", "y")], timeout_s=10) == [4.0, 1.0]
        assert worker.score([("p", "", "")], timeout_s=10) == [1.0]  # the same process serves again
    finally:
        worker.close()


@pytest.mark.parametrize("body, message", [
    ("def score(p, c, a):\n    raise KeyError('boom')\n", "raised KeyError"),
    ("def score(p, c, a):\n    return '0.5'\n", "must return a finite number"),
    ("def score(p, c, a):\n    return float('nan')\n", "must return a finite number"),
    ("import os\ndef score(p, c, a):\n    os._exit(3)\n", "exited with code 3"),
    ("import os\nos._exit(4)\n", "exited with code 4"),
    ("raise ImportError('no such thing')\n", "cannot import"),
])
def test_misbehaving_rewards_raise_a_named_error(tmp_path, body, message):
    worker = RewardWorker(plugin(tmp_path, body))
    try:
        with pytest.raises(RewardError, match=message):
            worker.score([("p", "c", "a")], timeout_s=10)
    finally:
        worker.close()


@pytest.mark.parametrize("body", [
    "import time\ndef score(p, c, a):\n    time.sleep(60)\n",
    "def score(p, c, a):\n    while True:\n        pass\n",  # spins holding its own GIL, not ours
])
def test_a_reward_past_its_deadline_is_killed(tmp_path, body):
    worker = RewardWorker(plugin(tmp_path, body))
    t0 = time.time()
    with pytest.raises(RewardError, match="did not return within 0.5 s"):
        worker.score([("p", "c", "a")], timeout_s=0.5)
    assert time.time() - t0 < 10
    assert worker.proc is None  # killed, not abandoned


def test_check_imports_in_a_worker_not_here(tmp_path):
    marker = tmp_path / "imported_here"
    ref = plugin(tmp_path, f"""
        import os
        open({str(marker)!r} + str(os.getpid()), "w").close()
        def score(p, c, a):
            return 1.0
    """)
    RewardWorker(ref).check()
    created = list(tmp_path.glob("imported_here*"))
    assert created and all(not p.name.endswith(str(os.getpid())) for p in created)
    with pytest.raises(RewardError, match="no callable 'nope'"):
        RewardWorker(ref.replace(":score", ":nope")).check()
