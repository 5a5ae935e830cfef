"""Starting and stopping the detached engine from the client side.

The engine runs as its own process (`python -m engine serve`, in its own session, so it
survives the terminal); this module launches it, waits for it over the socket, and
asks it to stop. It lives with the client so that the engine never imports the app.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from clora_tui.client import EngineClient, EngineRefused, EngineUnavailable
from engine import protocol
from engine.daemon import DaemonError, clean_stale, describe_io_error, engine_running, pid_alive, prepare_home

# -- the detached engine -----------------------------------------------------------------
def _hello_ok(home: Path, timeout: float = 2.0) -> dict | None:
    """The engine's status if it accepts an authenticated connection, else None."""
    try:
        with EngineClient(home, timeout=timeout).connect() as client:
            return client.call("status")
    except (EngineUnavailable, EngineRefused, OSError, ValueError):
        return None


def log_tail(home: Path, lines: int = 20) -> str:
    try:
        text = protocol.log_path(home).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def check_model(model: str) -> None:
    """The cheap part of the engine's model check, before forking (no torch import here)."""
    if model in ("", "embedded") or model.startswith("random:"):
        return
    if not (Path(model).expanduser() / "config.json").is_file():
        raise DaemonError(f"model {model!r}: not a local Hugging Face model directory (no config.json); "
                          "clora-tui never downloads weights, pass a directory, 'embedded' or 'random:SIZE'")


def start_daemon(home: Path, model: str = "embedded", backend: str = "auto", max_loras: int = 8,
                 max_lora_rank: int = 64, wait_ready: bool = True, timeout: float = 900.0,
                 say: Callable[[str], None] = print, extra_args: list[str] | None = None,
                 max_step_tokens: int | None = None, http_port: int | None = None) -> dict:
    """Start a detached engine (own session, survives the terminal) and return its status once
    it accepts connections (and, with `wait_ready`, once its warm-up is done). Raises DaemonError
    with a readable message for anything that goes wrong, a full disk or unwritable home included."""
    try:
        return _start_daemon(home, model, backend, max_loras, max_lora_rank, wait_ready, timeout, say,
                             list(extra_args or []) + (["--max-step-tokens", str(max_step_tokens)]
                                                       if max_step_tokens is not None else [])
                             + (["--http-port", str(http_port)] if http_port is not None else []))
    except OSError as exc:
        raise DaemonError(f"cannot start the engine in {home}: {describe_io_error(exc)}") from None


def _start_daemon(home, model, backend, max_loras, max_lora_rank, wait_ready, timeout, say, extra_args) -> dict:
    home = prepare_home(home)
    running = engine_running(home)
    if running is not None:
        raise DaemonError(f"an engine is already running on {home}" + (f" (pid {running})" if running else "")
                          + "; use it, or stop it with `clora-tui engine stop`")
    clean_stale(home, say)
    check_model(model)
    if model not in ("", "embedded") and not model.startswith("random:"):
        model = str(Path(model).expanduser().resolve())  # the engine runs with CLORA_HOME as its cwd
    log = protocol.log_path(home)
    cmd = [sys.executable, "-m", "engine", "serve", "--home", str(home), "--model", model, "--backend", backend,
           "--max-loras", str(max_loras), "--max-lora-rank", str(max_lora_rank), *(extra_args or [])]
    t0 = time.time()
    with open(log, "ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        out.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=str(home), close_fds=True)
    say(f"starting engine (pid {proc.pid}) on {home}; log: {log}")
    status, last_stage = None, None
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            tail = log_tail(home)
            raise DaemonError(f"the engine exited during start-up (exit code {proc.returncode}); "
                              f"last lines of {log}:\n{tail}")
        status = _hello_ok(home)
        if status is not None:
            if status.get("stage") != last_stage:
                last_stage = status.get("stage")
                say(f"  [{time.time() - t0:6.1f} s] {last_stage}")
            if status.get("failed"):
                proc.wait(timeout=30)
                raise DaemonError(f"the engine failed to start: {status['failed']}")
            if not wait_ready or status.get("ready"):
                break
        time.sleep(0.2)
    else:
        raise DaemonError(f"the engine did not become ready within {timeout:.0f} s (pid {proc.pid} still running; "
                          f"see {log}, stop it with `clora-tui engine stop`)")
    status["start_s"] = round(time.time() - t0, 3)
    return status


def stop_daemon(home: Path, timeout: float = 300.0, say: Callable[[str], None] = print) -> int:
    """Ask the engine to shut down (tenants checkpointed) and wait for its process to end.
    Returns its pid; raises DaemonError if none runs or it does not stop."""
    return stop_engine(home, timeout, say)["pid"]


def stop_engine(home: Path, timeout: float = 300.0, say: Callable[[str], None] = print) -> dict:
    """`stop_daemon`, returning {"pid", "checkpointed"}: how many tenant checkpoints the engine
    wrote while stopping, as it reported them (None when it could not say, e.g. after SIGTERM)."""
    home = Path(home).expanduser().resolve()
    if not home.is_dir():
        raise DaemonError(f"no engine running on {home}")
    pid = engine_running(home)
    if pid is None:
        clean_stale(home, say)
        raise DaemonError(f"no engine running on {home}")
    t0 = time.time()
    checkpointed = None
    try:
        with EngineClient(home, timeout=30).connect() as client:
            pid = client.call("shutdown").get("pid", pid)
            # The engine keeps this connection until it has stopped; its last event says how it went.
            while time.time() - t0 < timeout:
                try:
                    event = client.next_event(timeout=min(5.0, max(0.1, timeout - (time.time() - t0))))
                except (EngineUnavailable, ValueError):
                    break  # closed: the engine is gone
                if event and event.get("kind") == "log" and (event.get("data") or {}).get("stopped"):
                    checkpointed = event["data"].get("checkpointed")
                    break
                if event is None and engine_running(home, settle_s=0) is None:
                    break
    except (EngineUnavailable, EngineRefused) as exc:
        if not pid:
            raise DaemonError(f"cannot reach the engine on {home}: {exc}") from None
        say(f"engine not answering ({exc}); sending SIGTERM to pid {pid}")
        os.kill(pid, signal.SIGTERM)
    while time.time() - t0 < timeout:
        if engine_running(home) is None and not pid_alive(pid):  # lock released and process gone
            return {"pid": pid, "checkpointed": checkpointed}
        time.sleep(0.2)
    raise DaemonError(f"the engine (pid {pid}) did not stop within {timeout:.0f} s; "
                      f"`kill {pid}` (or kill -9) it; its tenants resume from their checkpoints")
