"""End to end in a real terminal (tmux): keys in, screen out, the engine checked over its socket.

Launch clora-tui, start experiments from the keyboard through the form, pause one, kill
one, quit; the engine must still be running; relaunch; the history must be there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clora_tui.client import EngineClient
from tests.daemon_helpers import Homes, pick_model, start_engine, wait_for

pytestmark = pytest.mark.slow
TMUX = shutil.which("tmux")
SESSION = f"clora-e2e-{os.getpid()}"
CLORA = str(Path(sys.executable).with_name("clora-tui"))


def tmux(*args: str) -> str:
    return subprocess.run([TMUX, *args], check=True, capture_output=True, text=True).stdout


def screen() -> str:
    return tmux("capture-pane", "-p", "-t", SESSION)


def keys(*names: str) -> None:
    for name in names:
        tmux("send-keys", "-t", SESSION, name)
        time.sleep(0.15)


def text(value: str) -> None:
    tmux("send-keys", "-t", SESSION, "-l", value)
    time.sleep(0.15)


def wait_screen(needle: str, timeout: float = 60.0) -> str:
    return wait_for(lambda: needle in screen() and screen(), timeout, 0.3, f"{needle!r} on the screen:\n{screen()}")


def call(home: Path, op: str, **args):
    with EngineClient(home, timeout=30).connect() as client:
        return client.call(op, **args)


def set_field(value: str) -> None:
    keys("End", "C-u")
    text(value)


def new_experiment(name: str, steps: int) -> None:
    """Fill the form from the keyboard: name, (task), steps, prompts, generations, max tokens, ..., eval every."""
    keys("n")
    wait_screen("New experiment")
    set_field(name)
    keys("Tab", "Tab")  # task (a select) -> steps
    set_field(str(steps))
    for value in ("2", "4", "6"):  # prompts / step, generations, max tokens
        keys("Tab")
        set_field(value)
    keys(*["Tab"] * 7)  # temperature, rank, alpha, lr, loss, beta -> eval every
    set_field("0")
    keys("C-s")
    wait_for(lambda: "New experiment" not in screen(), 20, 0.3, "the form to close")


@pytest.fixture
def tmux_home():
    if TMUX is None:
        pytest.skip("tmux is not installed (apt-get install -y tmux)")
    if not Path(CLORA).exists():
        pytest.skip(f"the clora-tui entry point is not installed next to {sys.executable}")
    homes = Homes()
    home = homes.new()
    env = {"CLORA_HOME": str(home), "TERM": "xterm-256color", "TZ": "UTC"}
    tmux("new-session", "-d", "-s", SESSION, "-x", "110", "-y", "32",
         *[item for k, v in env.items() for item in ("-e", f"{k}={v}")], "bash --norc --noprofile")
    try:
        yield home
    finally:
        subprocess.run([TMUX, "kill-session", "-t", SESSION], capture_output=True)
        homes.cleanup()


def test_keyboard_session_survives_quit_and_relaunch(tmux_home):
    home = tmux_home
    start_engine(home, pick_model(), max_loras=4)
    keys(f"{CLORA} --home {home}", "Enter")
    wait_screen("attached", 60)

    new_experiment("tmux-a", 400)
    new_experiment("tmux-b", 400)
    new_experiment("tmux-c", 4)
    tenants = wait_for(lambda: (lambda ts: len(ts) == 3 and ts)(call(home, "list")), 60, 0.5, "three tenants")
    ids = {t["name"]: t["id"] for t in tenants}
    assert set(ids) == {"tmux-a", "tmux-b", "tmux-c"}
    wait_for(lambda: call(home, "get", id=ids["tmux-a"])["state"] == "running", 180, 0.5, "tmux-a running")

    keys("Home", "p")  # the first row: tmux-a
    wait_for(lambda: call(home, "get", id=ids["tmux-a"])["state"] == "paused", 120, 0.5, "tmux-a paused")
    keys("Down", "k")
    wait_screen("Kill")
    keys("y")
    wait_for(lambda: call(home, "get", id=ids["tmux-b"])["state"] == "killed", 120, 0.5, "tmux-b killed")
    wait_for(lambda: call(home, "get", id=ids["tmux-c"])["state"] == "done", 300, 0.5, "tmux-c done")
    wait_screen("4/4")

    keys("q")
    after_quit = wait_screen("engine keeps running", 20)
    assert "clora-tui engine stop" in after_quit
    status = call(home, "status")  # the engine outlived the app
    assert status["tenants"].get("paused") == 1

    keys("clear", "Enter")
    keys(f"{CLORA} --home {home}", "Enter")
    shown = wait_screen("tmux-c", 60)
    wait_screen("4/4", 30)
    shown = screen()
    assert "tmux-a" in shown and "paused" in shown and "killed" in shown
    history = call(home, "get", id=ids["tmux-c"])["history"]
    assert [row["step"] for row in history] == [1, 2, 3, 4]
    keys("q")
    wait_screen("engine keeps running", 20)
