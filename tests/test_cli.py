"""The command line against a real daemon: submit, ls, show, pause/resume/kill, clone, export, logs."""

from __future__ import annotations

import json

import pytest

from clora_tui.cli import parse_value, table
from tests.daemon_helpers import run_cli, wait_for, write_spec

LS_FIELDS = {"id", "name", "state", "step", "steps", "reward", "accuracy", "step_s", "warmup_s"}


def tenants(daemon) -> dict:
    return {row["id"]: row for row in daemon.json("ls")}


def test_two_experiments_pause_resume_kill(daemon, tmp_path):
    a = write_spec(tmp_path, "add", steps=5)
    b = write_spec(tmp_path, "rev", steps=40, task="reverse")
    first = daemon.cli("submit", a, check=True).stdout.strip()
    second = daemon.json("submit", b)
    assert first == "e1" and second["id"] == "e2" and second["name"] == "rev"

    rows = daemon.json("ls")
    assert [r["id"] for r in rows] == ["e1", "e2"]
    for row in rows:
        assert LS_FIELDS <= set(row), LS_FIELDS - set(row)

    wait_for(lambda: tenants(daemon)["e2"]["step"] >= 1, what="e2's first step")
    out = daemon.cli("pause", "e2", check=True).stdout
    assert "pausing e2" in out
    wait_for(lambda: tenants(daemon)["e2"]["state"] == "paused", what="e2 paused")
    paused_at = tenants(daemon)["e2"]["step"]
    assert daemon.cli("pause", "e2").returncode == 1  # already paused: refused, non-zero
    wait_for(lambda: tenants(daemon)["e1"]["state"] == "done", what="e1 done")
    assert tenants(daemon)["e2"]["step"] == paused_at  # nothing moved while paused

    daemon.cli("resume", "e2", check=True)
    wait_for(lambda: tenants(daemon)["e2"]["step"] > paused_at, what="e2 stepping again")
    daemon.cli("kill", "e2", check=True)
    wait_for(lambda: tenants(daemon)["e2"]["state"] == "killed", what="e2 killed")
    refused = daemon.cli("resume", "e2")
    assert refused.returncode == 1 and "killed" in refused.stderr

    done = tenants(daemon)["e1"]
    assert done["step"] == done["steps"] == 5
    assert done["reward"] is not None and done["accuracy"] is not None and done["step_s"] > 0
    assert done["warmup_s"] is not None and done["warmup_s"] >= 0

    show = daemon.json("show", "e1")
    assert show["spec"]["name"] == "add" and show["spec"]["rollout"]["num_generations"] == 4
    assert [h["step"] for h in show["history"]] == [1, 2, 3, 4, 5]
    assert all(h["total_s"] > 0 and h["rollout_s"] >= 0 and h["train_s"] > 0 for h in show["history"])
    human = daemon.cli("show", "e1", check=True).stdout
    assert "history:" in human and "rollout.num_generations" in human

    table_out = daemon.cli("ls", check=True).stdout.splitlines()
    assert table_out[0].split()[:3] == ["ID", "NAME", "STATE"] and len(table_out) == 3


def test_clone_export_logs_status(daemon, tmp_path):
    spec = write_spec(tmp_path, "base", steps=2)
    daemon.cli("submit", spec, check=True)
    clone = daemon.json("clone", "e1", "--set", "optim.lr=1e-3", "--set", "lora.rank=8", "--set", "name=base-b")
    assert clone["id"] == "e2" and clone["rank"] == 8
    assert daemon.json("show", "e2")["spec"]["optim"]["lr"] == pytest.approx(1e-3)
    bad = daemon.cli("clone", "e1", "--set", "lora.nope=3")
    assert bad.returncode == 1 and "lora.nope" in bad.stderr

    wait_for(lambda: all(r["state"] == "done" for r in tenants(daemon).values()), what="both done")
    target = tmp_path / "exported"
    out = daemon.cli("export", "e1", target, check=True).stdout
    assert "exported e1" in out
    assert (target / "adapter_config.json").is_file() and any(target.glob("adapter_model.*"))
    again = daemon.cli("export", "e1", target)
    assert again.returncode == 1 and "not empty" in again.stderr

    logs = daemon.cli("logs", check=True).stdout
    assert "stage: loading base model" in logs and "engine ready" in logs and "e1 done" in logs

    status = daemon.json("engine", "status")
    for key in ("pid", "model", "backend", "device", "uptime_s", "cold_start_s", "tenants", "slots_used",
                "slots_free", "slots_total", "system"):
        assert key in status, key
    assert status["pid"] == daemon.pid and status["backend"] == "peft" and status["ready"] is True
    assert status["tenants"] == {"done": 2} and status["slots_free"] == status["slots_total"] == 4
    assert status["system"]["process"]["rss"] > 0
    human = daemon.cli("engine", "status", check=True).stdout
    assert "adapter slots" in human and "memory" in human and "cold start" in human


def test_submit_refusals_name_the_problem(daemon, tmp_path):
    cases = {
        "steps": ("steps = 0", "steps: must be >= 1"),
        "rank": ("[lora]\nrank = 32", "max_lora_rank"),
        "task": ('task = "juggling"', "unknown task 'juggling'"),
        "reward": ('reward = "no_such_module_xyz:score"', "no_such_module_xyz"),
        "field": ("colour = 3", "colour"),
        "toml": ("steps = = 3", "not valid TOML"),
    }
    for label, (body, needle) in cases.items():
        path = tmp_path / f"{label}.toml"
        path.write_text(f'name = "x-{label}"\n{body}\n')
        proc = daemon.cli("submit", path)
        assert proc.returncode == 1, (label, proc.stdout, proc.stderr)
        assert needle in proc.stderr, (label, proc.stderr)
    missing = daemon.cli("submit", tmp_path / "missing.toml")
    assert missing.returncode == 1 and "no such file" in missing.stderr
    assert daemon.json("ls") == []  # nothing was created
    unknown = daemon.cli("pause", "e99")
    assert unknown.returncode == 1 and "no experiment 'e99'" in unknown.stderr

    good = [write_spec(tmp_path, f"sweep-{i}", steps=2) for i in range(2)]
    mixed = daemon.cli("submit", good[0], tmp_path / "steps.toml")  # one bad file: nothing is sent
    assert mixed.returncode == 1 and daemon.json("ls") == []
    ids = daemon.cli("submit", *good, check=True).stdout.split()
    assert ids == ["e1", "e2"]


def test_commands_without_engine_say_how_to_start_one(home):
    for args in (["ls"], ["engine", "status"], ["show", "e1"], ["pause", "e1"], ["logs"]):
        proc = run_cli(home, *args)
        assert proc.returncode == 3, (args, proc.stderr)
        assert "clora-tui engine start" in proc.stderr
    stop = run_cli(home, "engine", "stop")
    assert stop.returncode == 3 and "no engine running" in stop.stderr
    bad_model = run_cli(home, "engine", "start", "--model", "/nonexistent/model")
    assert bad_model.returncode == 1 and "config.json" in bad_model.stderr
    usage = run_cli(home, "frobnicate")
    assert usage.returncode == 2


def test_parse_value_and_table():
    assert parse_value("3") == 3 and parse_value("1e-3") == pytest.approx(1e-3)
    assert parse_value("true") is True and parse_value("[1, 2]") == [1, 2]
    assert parse_value('"x y"') == "x y" and parse_value("reverse") == "reverse"
    text = table([{"a": 1, "b": None}, {"a": 22.5, "b": "x"}], [("a", "a"), ("b", "bee")])
    assert text.splitlines() == ["A     BEE", "1     -", "22.5  x"]
    json.dumps(text)


def test_logs_follow_streams_new_lines(daemon, tmp_path):
    import subprocess
    import sys

    from tests.daemon_helpers import REPO, cli_env

    follower = subprocess.Popen([sys.executable, "-m", "clora_tui.cli", "logs", "-f"], env=cli_env(daemon.home),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO))
    try:
        lines = []
        for line in follower.stdout:  # the recent log first (from the snapshot) ...
            lines.append(line)
            if "engine ready" in line:
                break
        daemon.cli("submit", write_spec(tmp_path, "followed", steps=1), check=True)
        for line in follower.stdout:  # ... then new lines as they happen
            lines.append(line)
            if "e1 done" in line:
                break
        assert any("e1 done after 1 steps" in line for line in lines)
        assert sum("engine ready" in line for line in lines) == 1
    finally:
        follower.kill()
        follower.wait(timeout=30)


def test_export_falls_back_past_an_unreadable_checkpoint(daemon, tmp_path):
    daemon.cli("submit", write_spec(tmp_path, "ck", steps=4, checkpoint_every=2), check=True)
    wait_for(lambda: tenants(daemon)["e1"]["state"] == "done", what="e1 done")
    ckpts = sorted((daemon.home / "checkpoints" / "e1").glob("step-*"))
    assert [p.name for p in ckpts] == ["step-000002", "step-000004"]
    adapter = ckpts[-1] / "adapter" / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:200])  # the newest is truncated (a crash, a full disk)
    with daemon.client() as client:
        result = client.call("export", id="e1", path=str(tmp_path / "out"))
    assert result["step"] == 2  # the previous, readable checkpoint
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == \
        (ckpts[0] / "adapter" / "adapter_model.safetensors").read_bytes()
