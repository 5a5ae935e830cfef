"""Running the engine as a daemon process: `serve` runs it in the foreground (what
`python -m engine serve` does); clora_tui/launcher.py starts that detached and stops it.
This module also holds what both sides need: the engine lock, the pid file, stale-file
cleanup and `prepare_home`.

CLORA_HOME must be private to its owner: a directory the engine creates is made 0700; an
existing one that other users can enter, or that another user owns, is refused with a
message saying how to fix it. Its permissions are never changed.

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
import sqlite3
import stat
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
    Path(home).mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(lock_path(home), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return None
        raise
    return fd


def engine_running(home: Path, settle_s: float = 5.0) -> int | None:
    """The pid of the engine running under `home` (0 if its pid is unknown), else None.

    A killed multi-threaded process shows as a zombie while its other threads are still
    exiting and still hold its files, the lock among them; give that a moment to settle.
    """
    deadline = time.time() + settle_s
    while True:
        fd = try_lock(home)
        if fd is not None:
            os.close(fd)
            return None
        pid = read_pid(home)
        if pid_alive(pid):
            return pid
        if time.time() >= deadline:
            return 0
        time.sleep(0.05)


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


def check_private(home: Path) -> None:
    """Refuse a CLORA_HOME other users can enter or that another user owns: it holds the
    engine's token, socket, database and checkpoints. Its permissions are left as they are."""
    st = os.stat(home)
    if not stat.S_ISDIR(st.st_mode):
        raise DaemonError(f"CLORA_HOME {home} is not a directory")
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != os.getuid():
        raise DaemonError(f"CLORA_HOME {home} belongs to another user (uid {st.st_uid}); point CLORA_HOME "
                          "(or --home) at a directory of your own, e.g. ~/.clora")
    if mode & 0o077:
        raise DaemonError(f"CLORA_HOME {home} is accessible by other users (mode {mode:04o}); it would hold the "
                          "engine's token, socket, database and checkpoints. Point CLORA_HOME (or --home) at a "
                          f"private directory (e.g. ~/.clora, created 0700), or make this one private: chmod 700 {home}")


def prepare_home(home: Path) -> Path:
    """Create CLORA_HOME (0700) if it does not exist, check that it is private, create logs/."""
    home = Path(home).expanduser().resolve()
    if len(str(protocol.socket_path(home))) >= 104:
        raise DaemonError(f"CLORA_HOME {home} is too long for a Unix socket path (keep it under ~90 characters)")
    try:
        home.parent.mkdir(parents=True, exist_ok=True)
        try:
            home.mkdir(mode=0o700)
        except FileExistsError:
            pass
        check_private(home)
        protocol.log_path(home).parent.mkdir(exist_ok=True, mode=0o700)
    except OSError as exc:
        raise DaemonError(f"cannot use CLORA_HOME {home}: {exc.strerror or exc}") from None
    return home


# -- the foreground engine ------------------------------------------------------------------
def serve(home: Path, config: EngineConfig) -> int:
    """Run the engine in this process until SIGTERM/SIGINT or a `shutdown` request."""
    from engine.core import Engine
    from engine.server import EngineServer

    home = prepare_home(home)
    try:
        lock_fd = try_lock(home)
    except OSError as exc:
        print(f"error: cannot start the engine in {home}: {describe_io_error(exc)}", file=sys.stderr, flush=True)
        return 1
    if lock_fd is None:
        pid = read_pid(home)
        print(f"refused: an engine is already running on {home}" + (f" (pid {pid})" if pid else "")
              + "; stop it with `clora-tui engine stop`", file=sys.stderr, flush=True)
        return 3
    stop = threading.Event()
    try:
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
            server.http = start_http(engine, server, config.http_port)
        except (OSError, sqlite3.Error) as exc:  # a full disk, a read-only or unwritable home
            print(f"error: cannot start the engine in {home}: {describe_io_error(exc)}", file=sys.stderr, flush=True)
            return 1
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
        if server.http is not None:
            server.http.close()
        server.announce_stopped(engine.stopped_event)
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


def start_http(engine, server, port: int):
    """The HTTP APIs beside the socket (None when off). A port in use or a missing package
    leaves the engine running without them; the reason is logged and shown by `engine status`."""
    if not port:
        return None
    try:
        from engine.http.server import HttpServer

        http = HttpServer(engine, server.token, port)
        http.start()
    except ImportError as exc:
        server.http_error = f"HTTP API off: {exc} (install fastapi and uvicorn)"
    except OSError as exc:
        server.http_error = (f"HTTP API off: cannot listen on 127.0.0.1:{port} ({exc.strerror or exc}); "
                             "start the engine with another --http-port (0 turns it off)")
    else:
        print(f"HTTP API on {http.base_url} (Tinker: {http.base_url}, OpenAI-compatible: {http.openai_base_url})", flush=True)
        return http
    engine.log(server.http_error, level="warning")
    return None


def describe_io_error(exc: BaseException) -> str:
    """One line for a failed write: what failed and the likely cause."""
    text = f"{exc.strerror} ({exc.filename})" if isinstance(exc, OSError) and exc.strerror and exc.filename \
        else (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc))
    errno_ = getattr(exc, "errno", None)
    lowered = str(exc).lower()
    if errno_ in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or "full" in lowered or "i/o error" in lowered:
        text += "; is the disk full? free some space (or point CLORA_HOME elsewhere) and start again"
    elif errno_ in (errno.EACCES, errno.EPERM, errno.EROFS) or "readonly" in lowered or "read-only" in lowered:
        text += "; CLORA_HOME must be writable by you"
    return text


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


def config_from_args(args) -> EngineConfig:
    extra = {}
    if getattr(args, "max_step_tokens", None) is not None:
        extra["max_step_tokens"] = args.max_step_tokens
    if getattr(args, "http_port", None) is not None:
        extra["http_port"] = args.http_port
    return EngineConfig(model=args.model, backend=args.backend, max_loras=args.max_loras,
                        max_lora_rank=args.max_lora_rank, fused_train=getattr(args, "fused_train", None), **extra)
