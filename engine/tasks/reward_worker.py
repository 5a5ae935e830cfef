"""User reward code runs in a worker process of its own, never in the engine.

A reward function can raise, hang, spin on the CPU, leak memory or call `os._exit`.
In a thread of the engine any of these stalls or kills every tenant; in a process the
engine kills it at the deadline and only its tenant fails, with the reason. The
worker imports nothing heavy (no torch), so it starts in a fraction of a second.

Protocol (JSON lines on the worker's stdin/stdout): the engine sends
`{"ref": "module:function"}`, the worker answers `{"ok": true}` or `{"error": ...}`;
then each `{"items": [[prompt, completion, answer], ...]}` is answered with
`{"scores": [...]}` or `{"error": ...}`. User prints go to stderr, not the pipe.
"""

from __future__ import annotations

import json
import math
import os
import select
import subprocess
import sys
import time

from engine.tasks.rewards import RewardError


class RewardWorker:
    """One tenant's reward function, behind a killable process."""

    MODULE = "engine.tasks.reward_worker"  # what the process runs (`python -m MODULE`)

    def __init__(self, ref: str, start_timeout_s: float = 30.0):
        self.ref = ref
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.calls = 0

    # -- process ---------------------------------------------------------------------
    def _popen(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        self.proc = subprocess.Popen([sys.executable, "-m", self.MODULE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=os.getcwd(),
                                     start_new_session=True)

    def _spawn(self) -> None:
        self._popen()
        reply = self._ask({"ref": self.ref}, self.start_timeout_s, "loading the reward")
        if "error" in reply:
            self.close()
            raise RewardError(reply["error"])

    def _ask(self, message: dict, timeout_s: float, doing: str) -> dict:
        proc = self.proc
        try:
            proc.stdin.write((json.dumps(message) + "\n").encode())
            proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise RewardError(self._death(doing)) from None
        deadline = time.monotonic() + timeout_s
        buffer = b""
        fd = proc.stdout.fileno()
        while not buffer.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                self.close()
                raise RewardError(f"reward function did not return within {timeout_s:g} s ({doing}); "
                                  "its worker process was killed")
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if not ready:
                continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise RewardError(self._death(doing))
            buffer += chunk
        return json.loads(buffer)

    def _death(self, doing: str) -> str:
        code = self.proc.wait(timeout=5) if self.proc else None
        self.proc = None
        return f"reward worker process exited with code {code} while {doing}"

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)

    # -- use ---------------------------------------------------------------------------
    def check(self) -> None:
        """Import the reward in a worker (at submit): raises RewardError saying what is wrong."""
        self._spawn()
        self.close()

    def score(self, items: list[tuple[str, str, str]], timeout_s: float) -> list[float]:
        if self.proc is None or self.proc.poll() is not None:
            self._spawn()
        reply = self._ask({"items": items}, timeout_s, "scoring")
        if "error" in reply:
            raise RewardError(reply["error"])
        scores = reply["scores"]
        bad = [s for s in scores if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s)]
        if bad:
            raise RewardError(f"reward function returned {bad[0]!r}; it must return a finite number")
        if len(scores) != len(items):
            raise RewardError(f"reward worker answered {len(scores)} scores for {len(items)} items")
        return [float(s) for s in scores]


def reply_channel():
    """The worker's side of the pipe: a `say(message)` on the real stdout, while the user's
    prints go to stderr (they must not corrupt the protocol)."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def say(message: dict) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    return say


def _serve() -> None:
    """The worker's side: import the function, then score batches until stdin closes."""
    say = reply_channel()
    fn = None
    for line in sys.stdin:
        message = json.loads(line)
        if "ref" in message:
            try:
                from engine.tasks.rewards import load_reward

                fn = load_reward(message["ref"])
                say({"ok": True})
            except BaseException as exc:  # noqa: BLE001 - anything the import did
                say({"error": str(exc)})
            continue
        try:
            scores = []
            for prompt, completion, answer in message["items"]:
                value = fn(prompt, completion, answer)
                # Only real numbers: a string "0.5" is a bug in the reward, not a score.
                scores.append(value if isinstance(value, (int, float)) and not isinstance(value, bool)
                              else repr(value))
            say({"scores": scores})
        except BaseException as exc:  # noqa: BLE001
            say({"error": f"reward function raised {type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    _serve()
