"""The daemon's life: detached start, one engine per home, stale files, SIGTERM, warm-up progress."""

from __future__ import annotations

import os
import resource
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from engine import protocol
from engine.daemon import engine_running, pid_alive, read_pid
from tests.daemon_helpers import REPO, cli_env, run_cli, start_engine, wait_for


def test_daemon_is_detached_and_reports_warm_up(daemon):
    pid = daemon.pid
    assert read_pid(daemon.home) == pid and pid_alive(pid)
    assert os.getsid(pid) == pid  # its own session: survives the terminal / SSH connection
    assert os.getsid(pid) != os.getsid(0)
    status = daemon.json("engine", "status")
    assert status["ready"] and status["stage"] == "ready" and status["cold_start_s"] > 0
    log = protocol.log_path(daemon.home).read_text()
    # The socket is up before the model loads, so warm-up progress can be watched.
    assert log.index("listening on") < log.index("stage: loading base model") < log.index("stage: ready")
    with daemon.client() as client:
        stages = [e["data"]["stage"] for e in client.call("logs", limit=50) if e["kind"] == "engine"]
    assert stages[0] == "resolving model" and stages[-1] == "ready" and "loading base model" in stages


def test_second_engine_on_same_home_refused(daemon):
    again = run_cli(daemon.home, "engine", "start", "--model", str(daemon.model), "--backend", "peft")
    assert again.returncode == 1
    assert "already running" in again.stderr and str(daemon.pid) in again.stderr
    direct = subprocess.run([sys.executable, "-m", "engine", "serve", "--home", str(daemon.home),
                             "--model", str(daemon.model), "--backend", "peft"],
                            env=cli_env(daemon.home), capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert direct.returncode == 3 and "already running" in direct.stderr
    assert daemon.json("engine", "status")["pid"] == daemon.pid  # the first one is untouched
    assert read_pid(daemon.home) == daemon.pid


def test_stale_pid_file_and_socket_are_cleaned(home, model_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    protocol.pid_path(home).write_text(f"{dead.pid}\n")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(protocol.socket_path(home)))
    stale.close()  # the socket file stays, nobody listens
    ls = run_cli(home, "ls")
    assert ls.returncode == 3 and "engine start" in ls.stderr
    proc = run_cli(home, "engine", "start", "--model", model_path, "--backend", "peft", timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"removed stale pid file (pid {dead.pid}" in proc.stdout and "removed stale socket" in proc.stdout
    pid = read_pid(home)
    assert pid != dead.pid and pid_alive(pid)
    assert run_cli(home, "ls", "--json").stdout.strip() == "[]"


def test_sigterm_shuts_down_cleanly(daemon, tmp_path):
    with daemon.client() as client:
        client.call("start", spec={"name": "t", "steps": 200, "checkpoint_every": 100, "eval_every": 0,
                                   "rollout": {"prompts_per_step": 2, "num_generations": 4, "max_tokens": 6}})
    wait_for(lambda: daemon.json("ls")[0]["step"] >= 1, what="first step")
    os.kill(daemon.pid, signal.SIGTERM)
    wait_for(lambda: not pid_alive(daemon.pid), timeout=120, what="engine exit")
    assert engine_running(daemon.home) is None
    assert not protocol.pid_path(daemon.home).exists() and not protocol.socket_path(daemon.home).exists()
    log = protocol.log_path(daemon.home).read_text()
    assert "engine stopped" in log
    # The running tenant was checkpointed at the step it had reached (nothing lost on a clean stop).
    ckpts = sorted((daemon.home / "checkpoints" / "e1").glob("step-*"))
    assert ckpts and not ckpts[-1].name.endswith(".tmp")

    at = int(ckpts[-1].name.split("-")[1])
    status = start_engine(daemon.home, daemon.model)  # and it comes back with the tenant
    assert status["pid"] != daemon.pid
    row = daemon.json("ls")[0]
    assert row["id"] == "e1" and row["step"] >= at
    logs = daemon.cli("logs", check=True).stdout
    assert f"e1 restored at step {at}" in logs and "rolled back" not in logs
    daemon.cli("kill", "e1", check=True)


def test_shutdown_op_stops_the_process(daemon):
    t0 = time.time()
    proc = daemon.cli("engine", "stop")
    assert proc.returncode == 0 and f"pid {daemon.pid}" in proc.stdout
    # Nothing ran, so nothing was checkpointed, and the message does not claim otherwise.
    assert "no tenant needed a checkpoint" in proc.stdout and "tenants checkpointed" not in proc.stdout
    assert not pid_alive(daemon.pid) and time.time() - t0 < 60
    assert run_cli(daemon.home, "engine", "status").returncode == 3


def test_stop_reports_the_checkpoints_written(daemon):
    with daemon.client() as client:
        client.call("start", spec={"name": "t", "steps": 200, "checkpoint_every": 100, "eval_every": 0,
                                   "rollout": {"prompts_per_step": 2, "num_generations": 4, "max_tokens": 6}})
    wait_for(lambda: daemon.json("ls")[0]["step"] >= 1, what="first step")
    proc = daemon.cli("engine", "stop")
    assert proc.returncode == 0 and "stopped; 1 tenant checkpoint written" in proc.stdout, proc.stdout
    assert sorted((daemon.home / "checkpoints" / "e1").glob("step-*"))
    assert "engine stopped; 1 tenant checkpoint(s) written" in protocol.log_path(daemon.home).read_text()


def test_clora_home_permissions_are_never_changed(tmp_path):
    from engine.daemon import DaemonError, prepare_home

    fresh = prepare_home(tmp_path / "new" / "home")  # created by us: private
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    proc = run_cli(shared, "engine", "start", "--backend", "peft")
    assert proc.returncode == 1, proc.stderr
    assert "accessible by other users (mode 1777)" in proc.stderr and f"chmod 700 {shared}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o1777  # untouched
    assert not (shared / "token").exists() and not (shared / "engine.sock").exists()
    os.chmod(shared, 0o755)
    with pytest.raises(DaemonError, match="mode 0755"):
        prepare_home(shared)
    assert stat.S_IMODE(os.stat(shared).st_mode) == 0o755


def _disk_full(limit: int):
    """A child process whose files cannot grow past `limit` bytes: writes fail as on a full disk."""
    def setup():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return setup


def test_engine_start_on_a_full_disk_says_so(homes, model_path):
    home = homes.new()
    proc = subprocess.run([sys.executable, "-m", "clora_tui.cli", "engine", "start", "--model", str(model_path),
                           "--backend", "peft"], env=cli_env(home), capture_output=True, text=True, timeout=300,
                          cwd=str(REPO), preexec_fn=_disk_full(0))
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert f"error: cannot start the engine in {home}" in proc.stderr and "disk full" in proc.stderr, proc.stderr

    home = homes.new()  # the engine process itself: the database cannot be created
    proc = subprocess.run([sys.executable, "-m", "engine", "serve", "--home", str(home), "--model", str(model_path),
                           "--backend", "peft"], env=cli_env(home), capture_output=True, text=True, timeout=300,
                          cwd=str(REPO), preexec_fn=_disk_full(2048))
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert f"error: cannot start the engine in {home}" in proc.stderr and "disk full" in proc.stderr, proc.stderr
    assert engine_running(home) is None and not protocol.socket_path(home).exists()
