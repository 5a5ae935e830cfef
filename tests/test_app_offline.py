"""The app's behaviour on recorded data: keys, views and the local form validation."""

from __future__ import annotations

import pytest

from clora_tui.app import CloraApp, parse_overrides
from clora_tui.model import FleetModel
from clora_tui.screens.new_experiment import NewExperimentScreen, field_id
from clora_tui.source import RecordedSource
from clora_tui.widgets.spec_view import SpecView
from clora_tui.widgets.tenant_table import TenantTable
from clora_tui.widgets.timing_breakdown import TimingBreakdown
from tests.recorded import recording

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def recorded_app(**kw) -> CloraApp:
    return CloraApp(source=RecordedSource(recording()), **kw)


async def test_recorded_tenants_fill_the_table_in_id_order():
    async with recorded_app().run_test(size=(100, 30)) as pilot:
        await pilot.pause()
        table = pilot.app.query_one(TenantTable)
        assert table.order == ["e1", "e2", "e3", "e4", "e5", "e6"]
        assert table.get_cell("e3", "state").plain == "paused"


async def test_the_table_shows_the_last_staleness_of_an_off_policy_tenant_and_a_dash_for_the_others():
    async with recorded_app().run_test(size=(200, 50)) as pilot:
        await pilot.pause()
        table = pilot.app.query_one(TenantTable)
        assert table.get_cell("e2", "off").plain == "1"  # e2 samples one step ahead (rollout.off_policy_steps = 1)
        assert {table.get_cell(t, "off").plain for t in ("e1", "e3", "e4", "e5", "e6")} == {"–"}


async def test_the_timing_tab_shows_the_selected_tenants_staleness():
    async with recorded_app().run_test(size=(120, 36)) as pilot:
        await pilot.press("down", "2")
        await pilot.pause()
        assert "staleness 1 (sampled 1 update back)" in str(pilot.app.query_one(TimingBreakdown).render())
        await pilot.press("up")
        await pilot.pause()
        assert "staleness 0 (on-policy)" in str(pilot.app.query_one(TimingBreakdown).render())


async def test_the_spec_tab_shows_the_priority_and_the_off_policy_setting():
    async with recorded_app().run_test(size=(120, 36)) as pilot:
        await pilot.press("down", "4")
        await pilot.pause()
        spec = str(pilot.app.query_one(SpecView).query_one("#spec-text").render())
        assert "priority = 2.0" in spec and "off_policy_steps = 1" in spec


async def test_filter_keeps_only_matching_rows_and_escape_restores_them():
    async with recorded_app().run_test(size=(100, 30)) as pilot:
        await pilot.press("slash", *"sort")
        await pilot.pause()
        assert pilot.app.query_one(TenantTable).order == ["e3", "e6"]
        await pilot.press("escape")
        await pilot.pause()
        assert len(pilot.app.query_one(TenantTable).order) == 6


async def test_space_marks_tenants_and_two_marks_open_the_compare_tab():
    async with recorded_app().run_test(size=(100, 30)) as pilot:
        await pilot.press("space", "down", "space")
        await pilot.pause()
        assert pilot.app.marked == {"e1", "e2"}
        assert pilot.app.query_one("#detail").active == "tab-compare"


async def test_actions_on_a_recording_are_refused_with_a_reason():
    async with recorded_app().run_test(size=(100, 30)) as pilot:
        await pilot.press("p")
        await pilot.pause()
        assert pilot.app.model.tenants["e1"].pending is None
        assert any("recording" in str(n.message) for n in pilot.app._notifications)


async def test_theme_key_cycles_through_the_shipped_themes():
    async with recorded_app().run_test(size=(100, 30)) as pilot:
        seen = [pilot.app.theme]
        for _ in range(3):
            await pilot.press("t")
            seen.append(pilot.app.theme)
        assert seen == ["clora-dark", "clora-light", "clora-high-contrast", "clora-dark"]


async def test_form_refuses_an_invalid_field_and_names_it():
    async with recorded_app().run_test(size=(80, 24)) as pilot:
        await pilot.press("n")
        await pilot.pause()
        form = pilot.app.screen
        assert isinstance(form, NewExperimentScreen)
        form.query_one(f"#{field_id('rollout.temperature')}").value = "-1"
        await pilot.press("ctrl+s")
        await pilot.pause()
        assert pilot.app.screen is form
        assert "rollout.temperature" in str(form.query_one("#form-error").render())


async def test_form_loads_a_toml_file(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('name = "from-file"\ntask = "sort"\nsteps = 7\n[lora]\nrank = 4\n')
    async with recorded_app().run_test(size=(80, 24)) as pilot:
        await pilot.press("n")
        await pilot.pause()
        form = pilot.app.screen
        form.query_one("#toml-path").value = str(path)
        form.query_one("#toml-path").focus()
        await pilot.press("enter")
        await pilot.pause()
        spec = form.validated()
        assert (spec["name"], spec["task"], spec["steps"], spec["lora"]["rank"]) == ("from-file", "sort", 7, 4)


def test_clone_overrides_are_typed():
    assert parse_overrides("optim.lr=1e-3 lora.rank=16 name=x-2") == {"optim.lr": 1e-3, "lora.rank": 16, "name": "x-2"}
    with pytest.raises(ValueError):
        parse_overrides("rank16")


def test_a_state_event_confirms_a_pending_pause():
    model = FleetModel()
    model.load_snapshot(recording()["snapshot"], seq=100)
    model.set_pending("e1", "pause")
    model.apply({"seq": 101, "kind": "phase", "tenant": "e1", "data": {"phase": "sync"}})
    assert model.tenants["e1"].pending == "pause"
    model.apply({"seq": 102, "kind": "state", "tenant": "e1", "data": {"state": "paused", "reason": "paused by request"}})
    assert model.tenants["e1"].pending is None and model.tenants["e1"].state == "paused"


def test_steps_redone_after_a_crash_replace_the_rolled_back_ones():
    model = FleetModel()
    model.load_snapshot(recording()["snapshot"], seq=100)
    model.apply({"seq": 101, "kind": "step", "tenant": "e1", "data": {"step": 16, "reward_mean": 0.9}})
    steps = [r["step"] for r in model.tenants["e1"].history]
    assert steps == list(range(1, 17)) and model.tenants["e1"].history[-1]["reward_mean"] == 0.9


def test_events_already_in_the_snapshot_are_ignored():
    model = FleetModel()
    model.load_snapshot(recording()["snapshot"], seq=100)
    changes = model.apply({"seq": 100, "kind": "step", "tenant": "e1", "data": {"step": 19}})
    assert not changes and model.tenants["e1"].summary["step"] == 18


async def test_the_chosen_theme_is_remembered_in_clora_home(tmp_path):
    from clora_tui.source import EngineSource

    home = tmp_path / "home"
    app = CloraApp(source=EngineSource(home, autostart=False))  # no engine here: it keeps trying, harmlessly
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("t")
        await pilot.pause()
    assert '"light"' in (home / "ui.json").read_text()
    again = CloraApp(source=EngineSource(home, autostart=False))
    assert again.theme == "clora-light"
