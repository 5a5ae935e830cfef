"""The real app (App.run_test) against a real engine daemon on the embedded model.

Effects are checked through the engine (EngineClient), not only on the screen.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from clora_tui.app import CloraApp
from clora_tui.client import EngineClient
from clora_tui.screens.confirm import ConfirmScreen
from clora_tui.screens.new_experiment import NewExperimentScreen, field_id
from clora_tui.screens.warmup import WarmupScreen
from clora_tui.source import EngineSource
from clora_tui.widgets.tenant_table import TenantTable
from tests.daemon_helpers import Homes, pick_model, start_engine
from tests.modelpaths import tiny_spec

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def engine_home():
    """One engine shared by the attach / pause / kill / new tests (starting one costs seconds)."""
    model = pick_model()
    homes = Homes()
    home = homes.new()
    start_engine(home, model)
    yield home
    homes.cleanup()


def call(home, op, **args):
    with EngineClient(home, timeout=30).connect() as client:
        return client.call(op, **args)


async def engine(home, op, **args):
    return await asyncio.to_thread(call, home, op, **args)


async def until(pilot, predicate, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await pilot.pause(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


async def state_of(home, tid) -> str:
    return (await engine(home, "get", id=tid))["state"]


def app_for(home, **kw) -> CloraApp:
    return CloraApp(source=EngineSource(home, autostart=kw.pop("autostart", False), engine_args=kw.pop("engine_args", None)),
                    remember_theme=False, **kw)


async def select(pilot, tid: str) -> None:
    table = pilot.app.query_one(TenantTable)
    await until(pilot, lambda: tid in table.order, 30, f"{tid} in the table")
    table.focus()
    table.move_cursor(row=table.order.index(tid), animate=False)
    await pilot.pause()
    assert pilot.app.selected_id() == tid


async def test_attach_shows_existing_tenants(engine_home):
    a = await engine(engine_home, "start", spec=tiny_spec("attach-a"))
    b = await engine(engine_home, "start", spec=tiny_spec("attach-b"))
    async with app_for(engine_home).run_test(size=(120, 36)) as pilot:
        table = pilot.app.query_one(TenantTable)
        await until(pilot, lambda: {a["id"], b["id"]} <= set(table.order), 30, "both tenants listed")
        assert table.get_cell(a["id"], "name").plain.endswith("attach-a")
        assert pilot.app.connection == "attached"
        # history arrives live: the table's step column follows the engine
        await until(pilot, lambda: pilot.app.model.tenants[a["id"]].history, 120, "a step of attach-a")


async def test_p_pauses_the_selected_tenant_in_the_engine_and_p_resumes_it(engine_home):
    t = await engine(engine_home, "start", spec=tiny_spec("pause-me", steps=500))
    async with app_for(engine_home).run_test(size=(120, 36)) as pilot:
        await select(pilot, t["id"])
        await pilot.press("p")
        # Shown at once as pending -- unless the engine's confirmation already arrived.
        view = pilot.app.model.tenants[t["id"]]
        assert view.pending == "pause" or view.state == "paused"
        await until(pilot, lambda: _is(engine_home, t["id"], "paused"), 120, "engine reports paused")
        await until(pilot, lambda: pilot.app.model.tenants[t["id"]].pending is None
                    and pilot.app.query_one(TenantTable).get_cell(t["id"], "state").plain == "paused", 30,
                    "table confirms paused")
        await pilot.press("p")
        await until(pilot, lambda: _is(engine_home, t["id"], "running", "queued", "warming"), 120, "engine resumed")
    await engine(engine_home, "kill", id=t["id"])


async def _is(home, tid, *states) -> bool:
    return (await state_of(home, tid)) in states


async def test_k_and_confirm_kills_the_selected_tenant(engine_home):
    t = await engine(engine_home, "start", spec=tiny_spec("kill-me", steps=500))
    async with app_for(engine_home).run_test(size=(120, 36)) as pilot:
        await select(pilot, t["id"])
        await pilot.press("k")
        await until(pilot, lambda: isinstance(pilot.app.screen, ConfirmScreen), 10, "the confirmation")
        assert await state_of(engine_home, t["id"]) != "killed"  # nothing happens before the answer
        await pilot.press("y")
        await until(pilot, lambda: _is(engine_home, t["id"], "killed"), 120, "engine reports killed")
        await until(pilot, lambda: pilot.app.model.tenants[t["id"]].state == "killed", 30, "table shows killed")


async def test_n_and_the_form_start_a_tenant_that_reaches_running(engine_home):
    async with app_for(engine_home).run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: pilot.app.connection == "attached", 30, "attached")
        await pilot.press("n")
        await until(pilot, lambda: isinstance(pilot.app.screen, NewExperimentScreen), 10, "the form")
        form = pilot.app.screen
        values = {"name": "from-form", "steps": "5", "rollout.prompts_per_step": "2", "rollout.num_generations": "4",
                  "rollout.max_tokens": "6", "lora.rank": "4", "eval_every": "0", "checkpoint_every": "2"}
        for key, value in values.items():
            form.query_one(f"#{field_id(key)}").value = value
        await pilot.press("ctrl+s")

        def started():
            return next((t for t in pilot.app.model.tenants.values() if t.name == "from-form" and t.id.startswith("e")), None)

        view = await until(pilot, started, 60, "the engine's id for the new tenant")
        seen = set()

        async def reached_running():
            got = await engine(engine_home, "get", id=view.id)
            seen.add(got["state"])
            return "running" in seen or got["step"] >= 1

        await until(pilot, reached_running, 180, "the new tenant running")
        assert (await engine(engine_home, "get", id=view.id))["spec"]["rollout"]["num_generations"] == 4


async def test_the_warmup_screen_shows_when_no_engine_runs_then_the_dashboard():
    model = pick_model()
    homes = Homes()
    home = homes.new()
    try:
        args = {"model": str(model), "backend": "peft", "max_loras": 2, "max_lora_rank": 16}
        async with app_for(home, autostart=True, engine_args=args).run_test(size=(100, 30)) as pilot:
            await until(pilot, lambda: isinstance(pilot.app.screen, WarmupScreen), 30, "the warm-up screen")
            stages = set()

            def ready():
                screen = pilot.app.warmup_screen()
                if screen is not None:
                    stages.add(screen.stage)
                return screen is None and pilot.app.connection == "attached"

            await until(pilot, ready, 600, "the dashboard after warm-up")
            assert stages  # the stage was shown while warming
            status = await engine(home, "status")
            assert status["ready"] and status["backend"] == "peft"
    finally:
        homes.cleanup()


async def test_a_dead_engine_is_reported_the_data_kept_and_the_app_reattaches():
    model = pick_model()
    homes = Homes()
    home = homes.new()
    try:
        start_engine(home, model, max_loras=2)
        t = await engine(home, "start", spec=tiny_spec("survivor", steps=3))
        async with app_for(home).run_test(size=(100, 30)) as pilot:
            table = pilot.app.query_one(TenantTable)
            await until(pilot, lambda: t["id"] in table.order, 30, "the tenant listed")
            pid = (await engine(home, "status"))["pid"]
            os.kill(pid, signal.SIGKILL)
            await until(pilot, lambda: pilot.app.connection == "lost", 30, "the loss reported")
            assert t["id"] in table.order  # last data stays on screen
            assert any("engine lost" in str(n.title) for n in pilot.app._notifications)
            await asyncio.to_thread(start_engine, home, model, 2)
            await until(pilot, lambda: pilot.app.connection == "attached", 120, "reattached")
            assert t["id"] in pilot.app.query_one(TenantTable).order
    finally:
        homes.cleanup()
