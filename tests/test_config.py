"""Experiment files: defaults, validation that names the field, overrides."""

import pytest

from engine.config import ExperimentSpec, SpecError, load_spec, parse_spec

ISSUE_EXAMPLE = '''
name = "add-r8-lr3e-4"
task = "arithmetic"
steps = 40
seed = 0
checkpoint_every = 5
eval_every = 5
[lora]
rank = 8
alpha = 16
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"]
[optim]
lr = 3e-4
[rollout]
prompts_per_step = 8
num_generations = 8
max_tokens = 8
temperature = 1.0
[grpo]
epsilon = 0.2
beta = 0.0
loss_type = "dapo"
'''


def test_the_documented_experiment_file_parses(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text(ISSUE_EXAMPLE)
    spec = load_spec(path)
    assert spec.name == "add-r8-lr3e-4" and spec.lora.rank == 8 and spec.optim.lr == 3e-4
    assert spec.lora.alpha == 16.0 and isinstance(spec.lora.alpha, float)
    assert spec.grpo.loss_type == "dapo" and spec.rollout.num_generations == 8


def test_every_field_but_name_has_a_default():
    spec = parse_spec({"name": "x"})
    assert isinstance(spec, ExperimentSpec) and spec.steps > 0 and spec.lora.rank > 0
    with pytest.raises(SpecError, match="^name: required"):
        parse_spec({})


@pytest.mark.parametrize("data, field", [
    ({"name": "x", "lora": {"rank": 0}}, "lora.rank"),
    ({"name": "x", "optim": {"lr": -1.0}}, "optim.lr"),
    ({"name": "x", "optim": {"betas": [0.9]}}, "optim.betas"),
    ({"name": "x", "rollout": {"temperature": 0}}, "rollout.temperature"),
    ({"name": "x", "rollout": {"top_p": 1.5}}, "rollout.top_p"),
    ({"name": "x", "rollout": {"num_generations": "eight"}}, "rollout.num_generations"),
    ({"name": "x", "grpo": {"loss_type": "ppo"}}, "grpo.loss_type"),
    ({"name": "x", "steps": 0}, "steps"),
    ({"name": "x", "lora": {"rnak": 8}}, "lora.rnak"),
    ({"name": "x", "lora": 8}, "lora"),
    ({"name": "bad name!"}, "name"),
])
def test_invalid_values_are_rejected_with_the_field_named(data, field):
    with pytest.raises(SpecError) as err:
        parse_spec(data)
    assert str(err.value).startswith(field + ":")


def test_invalid_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("name = \n")
    with pytest.raises(SpecError, match="broken.toml: not valid TOML"):
        load_spec(path)


def test_overrides_apply_dotted_keys_and_revalidate():
    spec = parse_spec({"name": "x"})
    clone = spec.with_overrides({"lora.rank": 16, "optim.lr": 1e-3, "name": "y"})
    assert (clone.lora.rank, clone.optim.lr, clone.name) == (16, 1e-3, "y")
    assert spec.lora.rank == 8  # the original is untouched
    with pytest.raises(SpecError, match="lora.rank"):
        spec.with_overrides({"lora.rank": -2})
    with pytest.raises(SpecError, match="lora.nope: no such field"):
        spec.with_overrides({"lora.nope": 1})


def test_relative_dataset_and_reward_paths_resolve_against_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "exp.toml"
    path.write_text('name = "j"\ntask = "jsonl:data/d.jsonl"\nreward = "r.py:score"\n')
    spec = load_spec(path)
    assert spec.task == f"jsonl:{tmp_path / 'sub' / 'data' / 'd.jsonl'}"
    assert spec.reward == f"{tmp_path / 'sub' / 'r.py'}:score"


def test_shipped_examples_are_valid():
    from pathlib import Path

    from engine.tasks import make_task
    from engine.tasks.rewards import load_reward

    examples = sorted(Path(__file__).resolve().parent.parent.joinpath("examples").rglob("*.toml"))
    assert len(examples) >= 8
    for path in examples:
        spec = load_spec(path)
        make_task(spec.task, spec.task_args)
        if spec.reward:
            load_reward(spec.reward)


@pytest.mark.parametrize("data, field", [
    ({"name": "x", "reward_timeout_s": float("inf")}, "reward_timeout_s"),
    ({"name": "x", "optim": {"lr": float("inf")}}, "optim.lr"),
    ({"name": "x", "optim": {"lr": float("nan")}}, "optim.lr"),
    ({"name": "x", "optim": {"grad_clip": float("inf")}}, "optim.grad_clip"),
    ({"name": "x", "optim": {"betas": [0.9, float("nan")]}}, "optim.betas"),
    ({"name": "x", "grpo": {"beta": float("inf")}}, "grpo.beta"),
    ({"name": "x", "lora": {"alpha": float("inf")}}, "lora.alpha"),
])
def test_non_finite_numbers_are_refused_with_the_field_named(data, field):
    with pytest.raises(SpecError) as err:
        parse_spec(data)
    assert str(err.value).startswith(field) and ("finite" in str(err.value) or "[0, 1)" in str(err.value))


def test_inf_in_an_experiment_file_is_refused(tmp_path):
    path = tmp_path / "inf.toml"
    path.write_text('name = "x"\nreward_timeout_s = inf\n[optim]\nlr = inf\n')
    with pytest.raises(SpecError, match=r"^reward_timeout_s: must be a finite number, got inf"):
        load_spec(path)


@pytest.mark.parametrize("task, args, message", [
    ("arithmetic", {"digits": 2.5}, "task_args.digits: must be an integer 1..4, got 2.5"),
    ("arithmetic", {"digits": True}, "task_args.digits: must be an integer"),
    ("arithmetic", {"ops": 3}, "task_args.ops: must be a string"),
    ("arithmetic", {"ops": "/"}, "task_args.ops: use a non-empty subset of '+-*'"),
    ("arithmetic", {"size": 2}, "task_args.size: not an argument of task 'arithmetic' (allowed: digits, eval_size, ops)"),
    ("reverse", {"min_len": 1.5}, "task_args.min_len: must be an integer 1..8, got 1.5"),
    ("sort", {"max_len": "5"}, "task_args.max_len: must be an integer 1..8, got '5'"),
    ("sort", {"min_len": 6}, "task_args.min_len: need min_len <= max_len"),
    ("reverse", {"digits": 2}, "task_args.digits: not an argument of task 'reverse' (allowed: eval_size, max_len, min_len)"),
    ("arithmetic", {"eval_size": 100000}, "task_args.eval_size: must be an integer 1..1024, got 100000"),
    ("arithmetic", {"eval_size": 0}, "task_args.eval_size: must be an integer 1..1024"),
    ("jsonl:/nonexistent.jsonl", {"match": "fuzzy"}, "task_args.match: must be one of 'exact', 'numeric'"),
    ("jsonl:/nonexistent.jsonl", {"eval_size": 5000}, "task_args.eval_size: must be an integer 1..1024"),
])
def test_task_args_are_validated_when_the_spec_is_parsed(task, args, message):
    with pytest.raises(SpecError) as err:
        parse_spec({"name": "x", "task": task, "task_args": args})
    assert str(err.value).startswith(message), str(err.value)


def test_task_args_overrides_are_validated():
    spec = parse_spec({"name": "x", "task_args": {"digits": 3}})
    assert spec.with_overrides({"task_args.digits": 1}).task_args == {"digits": 1}
    with pytest.raises(SpecError, match=r"^task_args.digits: must be an integer 1..4, got 2.5"):
        spec.with_overrides({"task_args.digits": 2.5})


def test_tests_use_the_committed_model_only(monkeypatch, tmp_path):
    import tests.modelpaths as modelpaths

    monkeypatch.setattr(modelpaths, "EMBEDDED_MODEL_DIR", tmp_path / "missing")
    assert modelpaths.model_dir() == str(tmp_path / "missing")  # no fallback to a developer's scratch path
