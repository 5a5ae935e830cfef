"""Helpers for tests that drive a real engine daemon through the CLI and the socket."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from engine.daemon import engine_running, read_pid
from tests.modelpaths import model_dir

REPO = Path(__file__).resolve().parents[1]
HELLO_TIMEOUT_S = "2"  # the daemon's hello deadline in tests (default 10 s)
MAX_LORA_RANK = 16


def pick_model() -> Path:
    path = Path(model_dir())
    if not (path / "config.json").is_file():
        pytest.skip(f"no embedded model at {path} (build it: python -m engine.models.build_embedded)")
    return path


def cli_env(home: Path) -> dict:
    env = dict(os.environ)
    env["CLORA_HOME"] = str(home)
    env["CLORA_HELLO_TIMEOUT_S"] = HELLO_TIMEOUT_S
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(home: Path, *args: str, timeout: float = 300, check: bool = False,
            input_text: str | None = None) -> subprocess.CompletedProcess:
    """Run `clora-tui ARGS` as its own process against `home` (`input_text` on its stdin)."""
    proc = subprocess.run([sys.executable, "-m", "clora_tui.cli", *map(str, args)], env=cli_env(home),
                          capture_output=True, text=True, timeout=timeout, cwd=str(REPO), input=input_text)
    if check and proc.returncode != 0:
        raise AssertionError(f"clora-tui {' '.join(map(str, args))} failed ({proc.returncode}):\n"
                             f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc


def cli_json(home: Path, *args: str, timeout: float = 300):
    return json.loads(run_cli(home, *args, "--json", timeout=timeout, check=True).stdout)


def kill_engine(home: Path) -> None:
    """Stop the engine of `home` cleanly if possible, else SIGKILL it."""
    pid = engine_running(home)
    if pid is None:
        return
    run_cli(home, "engine", "stop", "--timeout", "60", timeout=90)
    deadline = time.time() + 5
    while time.time() < deadline and engine_running(home) is not None:
        time.sleep(0.1)
    pid = engine_running(home) or read_pid(home)
    if engine_running(home) is not None and pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Homes:
    def __init__(self):
        self.homes: list[Path] = []

    def new(self) -> Path:
        home = Path(tempfile.mkdtemp(prefix="clora-", dir="/tmp"))
        self.homes.append(home)
        return home

    def cleanup(self) -> None:
        for home in self.homes:
            try:
                kill_engine(home)
            finally:
                shutil.rmtree(home, ignore_errors=True)


class Daemon:
    def __init__(self, home: Path, model: Path, status: dict):
        self.home, self.model, self.status = home, model, status

    @property
    def pid(self) -> int:
        return self.status["pid"]

    def cli(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return run_cli(self.home, *args, **kw)

    def json(self, *args: str):
        return cli_json(self.home, *args)

    def client(self, timeout: float = 60.0):
        from clora_tui.client import EngineClient

        return EngineClient(self.home, timeout=timeout).connect()


def start_engine(home: Path, model: Path, max_loras: int = 4) -> dict:
    # HTTP off: test engines must not take the default port (8473) from a real engine.
    return cli_json(home, "engine", "start", "--model", str(model), "--backend", "peft",
                    "--max-loras", str(max_loras), "--max-lora-rank", str(MAX_LORA_RANK), "--http-port", "0",
                    timeout=600)


def write_spec(directory: Path, name: str, steps: int = 4, **extra) -> Path:
    """A small, fast experiment file."""
    lines = [f'name = "{name}"', f"steps = {steps}", f"eval_every = {extra.pop('eval_every', 0)}",
             f"checkpoint_every = {extra.pop('checkpoint_every', 2)}"]
    task = extra.pop("task", None)
    if task:
        lines.append(f'task = "{task}"')
    for key, value in extra.pop("top", {}).items():
        lines.append(f"{key} = {json.dumps(value)}")
    lines += ["[rollout]", f"prompts_per_step = {extra.pop('prompts_per_step', 2)}",
              f"num_generations = {extra.pop('num_generations', 4)}", "max_tokens = 6"]
    lines += ["[lora]", f"rank = {extra.pop('rank', 4)}"]
    assert not extra, extra
    path = Path(directory) / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def wait_for(predicate, timeout: float = 180.0, interval: float = 0.2, what: str = "condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
