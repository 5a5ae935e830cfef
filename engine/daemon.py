"""Running the engine as a daemon: the foreground `serve`, the detached `start_daemon`, `stop_daemon`.

One engine per CLORA_HOME: the running engine holds an exclusive `fcntl.flock` on
CLORA_HOME/engine.lock for its whole life. The kernel drops that lock when the process
dies in any way (kill -9 included), so "is an engine running here?" is answered by trying
the lock, and a pid file or socket found without a lock holder is stale and removed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from engine import protocol
from engine.config import EngineConfig


class DaemonError(RuntimeError):
    """The engine could not be started or stopped; the message says why."""


def lock_path(home: Path) -> Path:
    return Path(home) / "engine.lock"


def read_pid(home: Path) -> int | None:
    try:
        return int(protocol.pid_path(home).read_text().strip())
    except (OSError, ValueError):
        return None


def pid_alive(pid: int | None) -> bool:
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not an engine
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def try_lock(home: Path):
    """The engine lock's open file if we got it, or None if an engine holds it."""
    Path(home).mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path(home), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return None
        raise
    return fd


def engine_running(home: Path) -> int | None:
    """The pid of the engine running under `home` (0 if its pid is unknown), else None."""
    fd = try_lock(home)
    if fd is None:
        pid = read_pid(home)
        return pid if pid_alive(pid) else 0
    os.close(fd)
    return None


def clean_stale(home: Path, say: Callable[[str], None] = print) -> list[str]:
    """Remove the pid file and socket of a dead engine. Call only while holding the lock
    (or after `engine_running` said none runs)."""
    removed = []
    pid = read_pid(home)
    pid_file = protocol.pid_path(home)
    if pid_file.exists() and pid != os.getpid():
        pid_file.unlink(missing_ok=True)
        removed.append(f"stale pid file (pid {pid}, not running)" if pid else "stale pid file")
    sock = protocol.socket_path(home)
    if sock.exists() or sock.is_symlink():
        sock.unlink(missing_ok=True)
        removed.append(f"stale socket {sock}")
    for what in removed:
        say(f"removed {what}")
    return removed


def prepare_home(home: Path) -> Path:
    home = Path(home).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    protocol.log_path(home).parent.mkdir(parents=True, exist_ok=True)
    if len(str(protocol.socket_path(home))) >= 104:
        raise DaemonError(f"CLORA_HOME {home} is too long for a Unix socket path (keep it under ~90 characters)")
    return home


# -- the foreground engine ------------------------------------------------------------------
def serve(home: Path, config: EngineConfig) -> int:
    """Run the engine in this process until SIGTERM/SIGINT or a `shutdown` request."""
    from engine.core import Engine
    from engine.server import EngineServer

    home = prepare_home(home)
    lock_fd = try_lock(home)
    if lock_fd is None:
        pid = read_pid(home)
        print(f"refused: an engine is already running on {home}" + (f" (pid {pid})" if pid else "")
              + "; stop it with `clora-tui engine stop`", file=sys.stderr, flush=True)
        return 3
    stop = threading.Event()
    try:
        clean_stale(home, lambda m: print(m, flush=True))
        protocol.pid_path(home).write_text(f"{os.getpid()}\n")
        engine = Engine(config, home)
        try:  # uptime and cold start count from the process start (imports included)
            import psutil

            engine.created = psutil.Process().create_time()
        except Exception:  # noqa: BLE001
            pass
        engine.events.listeners.append(_print_event)
        server = EngineServer(engine, home, on_shutdown=stop.set)
        server.start()
        print(f"engine pid {os.getpid()} listening on {server.path} (model {config.model}, backend {config.backend})",
              flush=True)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda signum, frame: stop.set())

        def warm() -> None:
            try:
                engine.warm_up()
                server.ready.set()
            except BaseException as exc:  # noqa: BLE001 - report any failure to clients and the log
                server.failed = f"{type(exc).__name__}: {exc}"
                engine.set_stage(f"failed: {server.failed}")
                engine.log(f"warm-up failed: {server.failed}", level="error")
                stop.set()

        warmer = threading.Thread(target=warm, name="clora-warm-up", daemon=True)
        warmer.start()
        while not stop.wait(0.5):  # wake regularly so signals are handled promptly
            pass
        print("engine stopping", flush=True)
        server.stopping.set()
        warmer.join(timeout=300)
        if server.failed:
            time.sleep(1.0)  # let attached clients read why
        engine.shutdown(checkpoint=True)
        server.close()
        print("engine stopped", flush=True)
        return 1 if server.failed else 0
    finally:
        protocol.pid_path(home).unlink(missing_ok=True)
        try:
            protocol.socket_path(home).unlink()
        except OSError:
            pass
        os.close(lock_fd)


def _print_event(event: dict) -> None:
    """Mirror stages and log lines into the engine's own log (its stdout)."""
    if event["kind"] == "engine":
        line = f"stage: {event['data'].get('stage')}"
    elif event["kind"] == "log":
        line = f"{event['data'].get('level', 'info')}: {event['data'].get('message')}"
    else:
        return
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event["time"]))
    print(f"{stamp} {line}", flush=True)


# -- the detached engine -----------------------------------------------------------------
def _hello_ok(home: Path, timeout: float = 2.0) -> dict | None:
    """The engine's status if it accepts an authenticated connection, else None."""
    from clora_tui.client import EngineClient, EngineRefused, EngineUnavailable

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
                 say: Callable[[str], None] = print, extra_args: list[str] | None = None) -> dict:
    """Start a detached engine (own session, survives the terminal) and return its status once
    it accepts connections (and, with `wait_ready`, once its warm-up is done)."""
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
    from clora_tui.client import EngineClient, EngineRefused, EngineUnavailable

    home = Path(home).expanduser().resolve()
    pid = engine_running(home)
    if pid is None:
        clean_stale(home, say)
        raise DaemonError(f"no engine running on {home}")
    try:
        with EngineClient(home, timeout=30).connect() as client:
            pid = client.call("shutdown").get("pid", pid)
    except (EngineUnavailable, EngineRefused) as exc:
        if not pid:
            raise DaemonError(f"cannot reach the engine on {home}: {exc}") from None
        say(f"engine not answering ({exc}); sending SIGTERM to pid {pid}")
        os.kill(pid, signal.SIGTERM)
    t0 = time.time()
    while time.time() - t0 < timeout:
        if engine_running(home) is None and not pid_alive(pid):  # lock released and process gone
            return pid
        time.sleep(0.2)
    raise DaemonError(f"the engine (pid {pid}) did not stop within {timeout:.0f} s; "
                      f"`kill {pid}` (or kill -9) it; its tenants resume from their checkpoints")


def config_from_args(args) -> EngineConfig:
    return EngineConfig(model=args.model, backend=args.backend, max_loras=args.max_loras,
                        max_lora_rank=args.max_lora_rank)
