"""Measure the app against a real engine: key press -> confirmed state in the table, and the
app's own CPU use idle and with 4 tenants running.  `python scripts/measure_app.py`

Runs the real app headless (App.run_test) in this process; the engine is its own daemon.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clora_tui.app import CloraApp  # noqa: E402
from clora_tui.client import EngineClient  # noqa: E402
from clora_tui.source import EngineSource  # noqa: E402
from clora_tui.widgets.tenant_table import TenantTable  # noqa: E402
from tests.daemon_helpers import Homes, pick_model, start_engine  # noqa: E402
from tests.modelpaths import tiny_spec  # noqa: E402


def call(home, op, **args):
    with EngineClient(home, timeout=30).connect() as client:
        return client.call(op, **args)


async def cpu_over(pilot, seconds: float) -> float:
    proc = psutil.Process()
    t0, c0 = time.monotonic(), sum(proc.cpu_times()[:2])
    await pilot.pause(seconds)
    return 100.0 * (sum(proc.cpu_times()[:2]) - c0) / (time.monotonic() - t0)


async def main() -> None:
    homes = Homes()
    home = homes.new()
    try:
        start_engine(home, pick_model(), max_loras=4)
        app = CloraApp(source=EngineSource(home, autostart=False), remember_theme=False)
        async with app.run_test(size=(160, 45)) as pilot:
            while app.connection != "attached":
                await pilot.pause(0.2)
            idle = await cpu_over(pilot, 10)
            ids = [call(home, "start", spec=tiny_spec(f"busy-{i}", steps=100000))["id"] for i in range(4)]
            table = app.query_one(TenantTable)
            while not all(app.model.tenants.get(i) and app.model.tenants[i].state == "running" for i in ids):
                await pilot.pause(0.2)
            busy = await cpu_over(pilot, 10)
            latencies = []
            for n in range(12):
                tid = ids[n % 4]
                table.move_cursor(row=table.order.index(tid), animate=False)
                await pilot.pause(0.05)
                want = "resume" if app.model.tenants[tid].state == "paused" else "pause"
                target = ("running", "queued") if want == "resume" else ("paused",)
                t0 = time.monotonic()
                await pilot.press("p")
                while not (app.model.tenants[tid].pending is None and table.get_cell(tid, "state").plain in target):
                    await pilot.pause(0.01)
                latencies.append(time.monotonic() - t0)
            for tid in ids:
                call(home, "kill", id=tid)
        print(f"key press -> confirmed in table, 4 tenants busy: median {statistics.median(latencies):.3f} s "
              f"(min {min(latencies):.3f}, max {max(latencies):.3f}, n={len(latencies)})")
        print(f"app CPU idle (attached, no tenant running): {idle:.1f}% of one core")
        print(f"app CPU with 4 tenants running: {busy:.1f}% of one core")
    finally:
        homes.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
