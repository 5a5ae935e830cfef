"""Screenshots of the app on a recorded engine (tests/recorded.py): stable, no engine needed.

Update after an intended visual change with `pytest tests/test_app_snapshots.py --snapshot-update`.
"""

from __future__ import annotations

import time

import pytest

from clora_tui.app import CloraApp
from clora_tui.source import RecordedSource
from tests.recorded import recording


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def recorded_app(theme: str | None = None) -> CloraApp:
    return CloraApp(source=RecordedSource(recording()), theme=theme)


async def settle(pilot) -> None:
    await pilot.pause()
    await pilot.app.workers.wait_for_complete()
    await pilot.pause(0.2)


def test_dashboard_at_80x24(snap_compare):
    assert snap_compare(recorded_app(), terminal_size=(80, 24), run_before=settle)


def test_dashboard_at_200x50(snap_compare):
    assert snap_compare(recorded_app(), terminal_size=(200, 50), run_before=settle)


def test_timing_tab_of_the_second_tenant(snap_compare):
    assert snap_compare(recorded_app(), terminal_size=(120, 36), press=["down", "2"], run_before=settle)


def test_compare_two_marked_tenants_light_theme(snap_compare):
    assert snap_compare(recorded_app("light"), terminal_size=(120, 36), press=["space", "down", "space"],
                        run_before=settle)


def test_new_experiment_form(snap_compare):
    async def open_form(pilot):
        await pilot.press("n")
        await settle(pilot)
        for widget in pilot.app.screen.query("Input"):
            widget.cursor_blink = False
        await pilot.pause(0.1)

    assert snap_compare(recorded_app(), terminal_size=(80, 24), run_before=open_form)
