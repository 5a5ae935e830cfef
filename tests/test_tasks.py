"""Tasks, datasets and plugin reward functions."""

import json
import time

import pytest

from engine.tasks import BUILTIN_TASKS, TaskError, make_task
from engine.tasks.rewards import RewardError, load_reward, score_all


@pytest.mark.parametrize("name", sorted(n for n, cls in BUILTIN_TASKS.items() if not getattr(cls, "multi_turn", False)))
def test_builtin_tasks_are_deterministic_and_verifiable(name):
    task = make_task(name)
    first = [task.problem(3, i) for i in range(20)]
    assert first == [task.problem(3, i) for i in range(20)]
    assert first != [task.problem(4, i) for i in range(20)]
    for p in first:
        assert task.reward(p.prompt, p.answer, p.answer) == 1.0
        assert task.reward(p.prompt, p.answer + "9", p.answer) == 0.0
    assert len(task.eval_set()) == task.eval_size and task.eval_set() == make_task(name).eval_set()


def test_arithmetic_sizes_are_configurable():
    task = make_task("arithmetic", {"digits": 3, "ops": "*"})
    p = task.problem(0, 0)
    a, b = p.prompt.rstrip("=").split("*")
    assert int(a) * int(b) == int(p.answer)
    with pytest.raises(TaskError, match="task_args.digits"):
        make_task("arithmetic", {"digits": 9})
    with pytest.raises(TaskError, match="task_args"):
        make_task("arithmetic", {"size": 2})


def test_unknown_task_is_named():
    with pytest.raises(TaskError, match="unknown task 'gsm9k'"):
        make_task("gsm9k")


def test_jsonl_task_exact_and_numeric(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"{i}*2=", "answer": str(2 * i)}) for i in range(40)))
    task = make_task(f"jsonl:{path}", {"match": "numeric"})
    assert len(task.eval_set()) == 10  # a quarter held out
    train_prompts = {task.problem(0, i).prompt for i in range(30)}
    assert len(train_prompts) == 30 and not train_prompts & {p.prompt for p in task.eval_set()}
    assert task.is_correct(" 4.0 ", "4") and not task.is_correct("x", "4")


def test_jsonl_task_reports_bad_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a"}\n')
    with pytest.raises(TaskError, match=r"d.jsonl:1: need an object with 'prompt' and 'answer'"):
        make_task(f"jsonl:{path}")
    with pytest.raises(TaskError, match="does not exist"):
        make_task(f"jsonl:{tmp_path}/missing.jsonl")


def test_reward_from_file_and_module(tmp_path):
    plugin = tmp_path / "my_reward.py"
    plugin.write_text("def score(prompt, completion, answer):\n    return float(len(completion))\n")
    fn = load_reward(f"{plugin}:score")
    assert score_all(fn, [("p", "abc", "a")], timeout_s=5) == [3.0]
    assert load_reward("os.path:exists") is not None


@pytest.mark.parametrize("ref, message", [
    ("nomodule_xyz:score", "cannot import"),
    ("os.path:nothing_here", "no callable"),
    ("just_a_name", "must be 'module:function'"),
    ("/nonexistent/file.py:f", "does not exist"),
])
def test_bad_reward_references_are_refused(ref, message):
    with pytest.raises(TaskError, match=message):
        load_reward(ref)


def test_reward_that_raises_hangs_or_returns_nan_is_reported():
    def boom(p, c, a):
        raise ZeroDivisionError("bad")

    def hang(p, c, a):
        time.sleep(30)

    with pytest.raises(RewardError, match="raised ZeroDivisionError: bad"):
        score_all(boom, [("p", "c", "a")], timeout_s=5)
    start = time.time()
    with pytest.raises(RewardError, match="did not return within 0.3 s"):
        score_all(hang, [("p", "c", "a")], timeout_s=0.3)
    assert time.time() - start < 5
    with pytest.raises(RewardError, match="non-finite"):
        score_all(lambda p, c, a: float("nan"), [("p", "c", "a")], timeout_s=5)


@pytest.mark.parametrize("name, args, message", [
    ("arithmetic", {"digits": 2.5}, r"^task_args.digits: must be an integer 1..4, got 2.5$"),
    ("reverse", {"min_len": 1.5}, r"^task_args.min_len: must be an integer 1..8, got 1.5$"),
    ("sort", {"min_len": 1.5}, r"^task_args.min_len: must be an integer 1..8, got 1.5$"),
    ("arithmetic", {"eval_size": 100000}, r"^task_args.eval_size: must be an integer 1..1024, got 100000$"),
    ("sort", {"nope": 1}, r"^task_args.nope: not an argument of task 'sort' \(allowed: eval_size, max_len, min_len\)$"),
])
def test_task_args_types_and_ranges_are_checked(name, args, message):
    with pytest.raises(TaskError, match=message):
        make_task(name, args)


def test_jsonl_task_args_and_unreadable_dataset(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) for i in range(8)))
    with pytest.raises(TaskError, match=r"^task_args.eval_size: must be an integer 1..1024, got 100000$"):
        make_task(f"jsonl:{path}", {"eval_size": 100000})
    with pytest.raises(TaskError, match=r"^task_args.digits: not an argument of task 'jsonl' \(allowed: eval_size, match\)"):
        make_task(f"jsonl:{path}", {"digits": 2})
    assert len(make_task(f"jsonl:{path}", {"eval_size": 1}).eval_set()) == 1
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(b"\xff\xfe{}\n")
    with pytest.raises(TaskError, match="cannot read dataset"):
        make_task(f"jsonl:{binary}")


def test_sample_prompts_cover_the_longest_prompts(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": "x" * n, "answer": "1"} for n in (3, 50, 7, 9)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert max(map(len, make_task(f"jsonl:{path}").sample_prompts(0, 2))) == 50
    assert all(p.endswith("=") for p in make_task("arithmetic").sample_prompts(0, 4))
