"""Issue 8's proof, short version: scripts/chaos.py --quick against a real engine daemon.

Every case (bad task_args, user code that exits or spins, specs over the work budget, pause /
kill / stop during a long batch, submit-then-kill cycles, a full disk, a truncated checkpoint, a
shared CLORA_HOME, protocol abuse, idempotency, event pruning) must end with its named outcome
while two other tenants keep training and the engine stays up. The full run (50 kill cycles,
the issue's own timings) is `python scripts/chaos.py`; it is not part of the test suite.
"""

from __future__ import annotations

import subprocess
import sys

from tests.daemon_helpers import REPO, pick_model


def test_chaos_quick():
    # About 1.5 minutes on two otherwise idle cores; up to 4 when the machine is busy elsewhere.
    pick_model()  # skips without the embedded model
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "chaos.py"), "--quick"], capture_output=True,
                          text=True, timeout=600, cwd=str(REPO))
    out = proc.stdout
    table = out[out.index("== chaos"):] if "== chaos" in out else out
    rows = [line for line in table.splitlines() if line.endswith(("| PASS", "| FAIL", "| SKIP"))]
    print(table)
    assert proc.returncode == 0, f"chaos failed (exit {proc.returncode}):\n{table}\n{proc.stderr[-3000:]}"
    assert len(rows) >= 30 and not [r for r in rows if r.endswith("| FAIL")], table
    # Only cases that need what a machine may lack (a tmpfs mount, a measurable worker) may skip.
    skipped = {r.split()[0] for r in rows if r.endswith("| SKIP")}
    assert skipped <= {"5a", "5c", "8c", "8e"}, table
