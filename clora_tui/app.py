"""The Textual app: attach to (or start) the engine, watch every tenant live, steer them.

Data flow: the engine link (`engine_link.py`) follows the engine's event stream into its
`inbox` and posts connection changes and request answers as messages; a 10 Hz timer folds
the inbox into the `FleetModel` (`model.py`) and rewrites only the table cells that
changed; a slower timer (~1.7 Hz) redraws the plots and panels that were marked dirty.
The dashboard screen (`screens/dashboard.py`) lays the views out; the actions and their
dialogs are in `actions.py`. No key press ever waits on the engine, and the app knows the
engine only through its socket (`source.py`) and `engine.protocol`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Iterable

from textual import on
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.screen import Screen

from clora_tui import theming
from clora_tui.actions import SMOOTHING, DashboardActions, parse_overrides
from clora_tui.engine_link import EngineLink
from clora_tui.model import FleetModel, accuracy_series, compare_series, reward_series
from clora_tui.screens.dashboard import TABS, Dashboard
from clora_tui.screens.warmup import WarmupScreen
from clora_tui.source import EngineSource, RecordedSource

__all__ = ["CloraApp", "parse_overrides", "run_app"]


def from_the_link(handler):
    """A handler of the engine link's messages. A message can still arrive while the app shuts
    down, after its screens are gone (or while they are being removed); there is nothing left
    to show it on then, so it is dropped."""
    @functools.wraps(handler)
    def guarded(self, message):
        if not self.screen_stack:
            return None
        try:
            return handler(self, message)
        except NoMatches:  # as in `while_mounted`: only while the dashboard's widgets are removed
            return None
    return guarded


class CloraApp(DashboardActions, App):
    """The dashboard of one engine's tenants."""

    TITLE = "clora-tui"
    CSS_PATH = theming.base_css_path()
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (140, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (36, "-tall")]
    BINDINGS = [
        Binding("n", "new_experiment", "New", id="new-experiment"),
        Binding("p", "pause_resume", "Pause/Resume", id="pause-resume"),
        Binding("k", "kill", "Kill", id="kill"),
        Binding("c", "clone", "Clone", id="clone"),
        Binding("e", "export", "Export", id="export"),
        Binding("space", "mark", "Mark", id="mark"),
        Binding("slash", "filter", "Filter", id="filter"),
        Binding("t", "next_theme", "Theme", id="next-theme"),
        Binding("question_mark", "help", "Help", id="help"),
        Binding("q", "quit", "Quit", id="quit"),
        Binding("S", "stop_engine", "Stop engine", id="stop-engine", show=False),
        Binding("s", "smoothing", "Smoothing", id="smoothing", show=False),
        *(Binding(str(i + 1), f"tab('{name}')", name.title(), id=f"tab-{name}", show=False) for i, name in enumerate(TABS)),
    ]

    def __init__(self, source: EngineSource | RecordedSource | None = None, home: str | Path | None = None,
                 theme: str | None = None, autostart: bool = True, engine_args: dict | None = None,
                 remember_theme: bool = True):
        super().__init__()
        self.source = source or EngineSource(home, autostart=autostart, engine_args=engine_args)
        self.link = EngineLink(self, self.source)
        self.home = Path(self.source.home) if self.source.live else None
        self.model = FleetModel(clock=self.source.clock)
        self.marked: set[str] = set()
        self.needle = ""
        self.smoothing_index = 1
        self.connection = "connecting"
        self.connection_detail = ""
        self.dirty_plots = True
        self.dirty_panels = True
        self.shown_tenant: str | None = None
        self.remember_theme = remember_theme and self.source.live
        self.themes = theming.shipped_themes()
        for t in self.themes.values():
            self.register_theme(t)
        settings = theming.load_ui_settings(self.home)
        chosen = theme or settings.get("theme") or theming.DEFAULT_THEME
        if chosen not in self.themes:
            self.notify_later = f"unknown theme {chosen!r}; themes: {', '.join(self.themes)}"
            chosen = theming.DEFAULT_THEME
        else:
            self.notify_later = ""
        self.theme = self.themes[chosen].name
        if theme and self.remember_theme:
            theming.save_ui_settings(self.home, theme=chosen)

    # -- screens ------------------------------------------------------------------------------
    def get_default_screen(self) -> Dashboard:
        return Dashboard(id="_default")

    @property
    def dashboard(self) -> Dashboard:
        """The base screen. Timers and actions reach its widgets through this, so they keep
        working while a dialog (new experiment, confirm, help) is the active screen."""
        return self.screen_stack[0] if self.screen_stack else self.screen

    def compose(self) -> ComposeResult:
        yield from Dashboard.widgets()

    def on_mount(self) -> None:
        self.theme_changed_signal.subscribe(self, lambda _theme: self.redraw_all())
        if self.notify_later:
            self.notify(self.notify_later, severity="warning")
        self.dashboard.focus_table()
        if not self.source.live:
            self.connection = "recorded"
            self.apply_snapshot(self.source.open())
        else:
            self.link.follow()
        self.set_interval(0.1, self.while_mounted(self.drain_events))
        self.set_interval(0.6, self.while_mounted(self.refresh_slow))
        self.refresh_status()

    def while_mounted(self, tick):
        """A timer callback that skips ticks while the dashboard is being torn down."""
        def guarded() -> None:
            try:
                tick()
            except NoMatches:  # only while the base screen's widgets are being removed
                pass
        return guarded

    def get_theme_variable_defaults(self) -> dict[str, str]:
        return dict(theming.CUSTOM_DEFAULTS)

    # -- the engine link's messages -------------------------------------------------------------
    @on(EngineLink.ConnectionChanged)
    @from_the_link
    def connection_changed(self, message: EngineLink.ConnectionChanged) -> None:
        self.set_connection(message.state, message.detail)

    @on(EngineLink.Starting)
    @from_the_link
    def engine_starting(self, _message: EngineLink.Starting) -> None:
        self.show_warmup("starting")

    @on(EngineLink.StartFailed)
    @from_the_link
    def engine_start_failed(self, message: EngineLink.StartFailed) -> None:
        warmup = self.warmup_screen()
        if warmup is not None:
            warmup.show_error(message.reason)
        self.notify(message.reason, title="engine did not start", severity="error", timeout=10)

    @on(EngineLink.Attached)
    @from_the_link
    def engine_attached(self, message: EngineLink.Attached) -> None:
        self.apply_snapshot(message.answer)

    @on(EngineLink.Lost)
    @from_the_link
    def engine_lost(self, message: EngineLink.Lost) -> None:
        if self.link.stopped_by_user:
            self.set_connection("stopped", "— waiting for an engine")
            return
        self.set_connection("lost", "— reconnecting")
        self.notify(f"the engine went away ({message.reason}); showing the last data and reconnecting",
                    title="engine lost", severity="error", timeout=8)

    @on(EngineLink.RequestDone)
    @from_the_link
    def request_done(self, message: EngineLink.RequestDone) -> None:
        op, tenant, result = message.op, message.tenant, message.result
        if op in ("start", "clone"):
            if tenant:
                self.model.drop(tenant)
            if isinstance(result, dict) and result.get("id"):
                if result["id"] not in self.model.tenants:
                    self.model.upsert(result)
                self.link.fetch_tenant(result["id"])
                self.notify(f"started {result.get('name')} as {result['id']}", timeout=3)
            self.sync_table(None)
            self.refresh_status()
        elif op == "export":
            self.notify(f"adapter of {result.get('id')} at step {result.get('step')} written to {result.get('path')}",
                        title="exported", timeout=8)
        elif op == "shutdown":
            self.notify("the engine is stopping", timeout=4)
        # pause/resume/kill: the pending mark stays until the engine's state event confirms it

    @on(EngineLink.RequestRefused)
    @from_the_link
    def request_refused(self, message: EngineLink.RequestRefused) -> None:
        op, tenant = message.op, message.tenant
        if tenant and tenant.startswith("…"):
            self.model.drop(tenant)
            self.sync_table(None)
        elif tenant:
            self.model.set_pending(tenant, None)
            self.sync_table({tenant})
        if op == "shutdown" and self.link.stopped_by_user:
            self.link.stopped_by_user = False
        self.notify(message.reason, title=f"{op} refused", severity="error", timeout=8)

    @on(EngineLink.TenantFetched)
    @from_the_link
    def tenant_fetched(self, message: EngineLink.TenantFetched) -> None:
        self.model.upsert(message.detail)
        self.sync_table({message.detail["id"]})
        self.dirty_plots = True

    @on(EngineLink.StatusFetched)
    @from_the_link
    def status_fetched(self, message: EngineLink.StatusFetched) -> None:
        self.model.status.update(message.status)
        self.model.system = dict(message.status.get("system") or self.model.system)
        self.dirty_panels = True
        self.refresh_status()

    # -- connection and warm-up ---------------------------------------------------------------
    def set_connection(self, state: str, detail: str = "") -> None:
        changed = (state, detail) != (self.connection, self.connection_detail)
        self.connection, self.connection_detail = state, detail
        if changed:
            self.dirty_panels = True
            self.refresh_status()
        warmup = self.warmup_screen()
        if warmup is not None and state == "connecting" and detail:
            warmup.show_stage(warmup.stage, None)

    def warmup_screen(self) -> WarmupScreen | None:
        for screen in self.screen_stack:
            if isinstance(screen, WarmupScreen):
                return screen
        return None

    def show_warmup(self, origin: str) -> None:
        if self.warmup_screen() is None:
            self.push_screen(WarmupScreen(str(self.source.home), origin=origin))

    def hide_warmup(self) -> None:
        screen = self.warmup_screen()
        if screen is None:
            return
        if self.screen is screen:
            self.pop_screen()
            self.dashboard.focus_table()
        else:  # a dialog (help) is open above it: try again once that is closed
            self.set_timer(0.5, self.hide_warmup)

    def show_engine_stage(self, status: dict) -> None:
        """The warm-up screen while the engine is not ready (or failed), none once it is."""
        if status.get("failed"):
            self.show_warmup("warming")
            self.warmup_screen().show_error(f"the engine failed to start: {status['failed']}")
        elif status.get("ready") is False or status.get("stage") not in (None, "ready"):
            self.show_warmup("warming")
            self.warmup_screen().show_stage(status.get("stage", ""), status.get("warmup_elapsed_s"))
        else:
            self.hide_warmup()

    # -- snapshot and events -> model -> views --------------------------------------------------
    def apply_snapshot(self, answer: dict) -> None:
        snapshot = answer.get("snapshot") or {}
        changes = self.model.load_snapshot(snapshot, answer.get("seq", 0))
        self.link.snapshot_applied()
        was_lost = self.connection in ("lost", "stopped")
        if self.source.live:
            self.set_connection("attached", str(self.source.home))
        self.show_engine_stage(self.model.status)
        for view in self.model.tenants.values():
            if not view.loaded and self.source.live:
                self.link.fetch_tenant(view.id)
        self.dashboard.add_log(changes.log, replace=True)
        self.redraw_all()
        if was_lost:
            self.notify("reattached to the engine", severity="information")

    def drain_events(self) -> None:
        if not self.link.inbox or self.link.awaiting_snapshot:
            return
        total = self.model.fold(self.link.take_events())
        if not total:
            return
        if total.stage:
            warmup = self.warmup_screen()
            if total.stage == "ready":
                self.hide_warmup()
                self.link.fetch_status()
            elif warmup is not None:
                warmup.show_stage(total.stage, self.model.status.get("warmup_elapsed_s"))
        for tid in total.added:
            if self.source.live and not tid.startswith("…"):
                self.link.fetch_tenant(tid)
        self.sync_table(total.tenants | total.added)
        if total.log:
            self.dashboard.add_log(total.log)
        selected = self.selected_id()
        if selected in total.histories or (self.marked & total.histories) or selected in total.tenants:
            self.dirty_plots = True
        if total.histories and not self.marked:
            self.dirty_plots = True  # the compare view shows every tenant when none is marked
        if total.status or total.system or total.tenants:
            self.dirty_panels = True
        if total.status or total.tenants:
            self.refresh_status()

    def colours(self) -> dict[str, str]:
        variables = self.theme_variables
        return {k: variables.get(k, v) for k, v in theming.CUSTOM_DEFAULTS.items()}

    def sync_table(self, changed: set[str] | None = None) -> None:
        with self.batch_update():
            self.dashboard.show_tenants(self.model, self.colours(), self.marked, self.needle, changed)
        if self.selected_id() != self.shown_tenant:
            self.dirty_plots = True
            self.refresh_detail()

    def redraw_all(self) -> None:
        self.dashboard.forget_table()
        self.sync_table(None)
        self.dirty_plots = self.dirty_panels = True
        self.refresh_status()
        self.refresh_slow()

    def refresh_status(self) -> None:
        self.dashboard.show_status(self.connection, self.connection_detail, self.model, self.colours())

    def refresh_slow(self) -> None:
        """Plots and panels at ~1.7 Hz, and only what changed; the phase clock every time."""
        view = self.model.tenants.get(self.selected_id() or "")
        self.dashboard.show_phase(view, self.model.clock(), self.colours())
        if self.dirty_plots:
            self.dirty_plots = False
            self.refresh_detail()
        if self.dirty_panels:
            self.dirty_panels = False
            connection = f"{self.connection} {self.connection_detail}".strip()
            self.dashboard.show_engine(connection, self.model, self.colours())

    def refresh_detail(self) -> None:
        tid = self.selected_id()
        self.shown_tenant = tid
        view = self.model.tenants.get(tid or "")
        self.dashboard.show_detail(view, reward_series(view), accuracy_series(view))
        self.refresh_compare()

    def refresh_compare(self) -> None:
        weight = SMOOTHING[self.smoothing_index]
        which = "marked" if self.marked else "all"
        smooth = f"smoothing {weight}" if weight else "no smoothing"
        self.dashboard.show_compare(compare_series(self.model, self.marked, weight),
                                    f"Reward, {which} ({smooth}; s toggles)")

    # -- the dashboard's messages ---------------------------------------------------------------
    def selected_id(self) -> str | None:
        return self.dashboard.selected_id()

    @on(Dashboard.TenantHighlighted)
    def tenant_highlighted(self, _message: Dashboard.TenantHighlighted) -> None:
        if self.selected_id() != self.shown_tenant:
            self.dirty_plots = True
            self.refresh_slow()

    @on(Dashboard.FilterChanged)
    def filter_changed(self, message: Dashboard.FilterChanged) -> None:
        self.needle = message.needle
        self.sync_table(None)

    # -- command palette ----------------------------------------------------------------------
    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("New experiment", "Open the form for a new experiment (n)", self.action_new_experiment)
        yield SystemCommand("Pause / resume", "Pause or resume the selected experiment (p)", self.action_pause_resume)
        yield SystemCommand("Kill", "Kill the selected experiment, after confirming (k)", self.action_kill)
        yield SystemCommand("Clone with changes", "Start a copy of the selected experiment (c)", self.action_clone)
        yield SystemCommand("Export adapter", "Write the selected adapter as a PEFT directory (e)", self.action_export)
        yield SystemCommand("Mark for comparison", "Overlay the selected tenant's rewards (space)", self.action_mark)
        yield SystemCommand("Filter tenants", "Filter the table (/)", self.action_filter)
        yield SystemCommand("Next theme", "Cycle dark / light / high-contrast (t)", self.action_next_theme)
        yield SystemCommand("Help", "Keys and behaviour (?)", self.action_help)
        yield SystemCommand("Stop engine", "Shut the engine down, checkpointing tenants (S)", self.action_stop_engine)
        yield SystemCommand("Quit (engine keeps running)", "Leave the app; the engine keeps going (q)",
                            self.action_quit)

    def on_unmount(self) -> None:
        self.link.close()


def run_app(args=None) -> int:
    """Entry point of the bare `clora-tui`: attach to (or start) the engine and open the app."""
    import os

    home = getattr(args, "home", None)
    theme = getattr(args, "theme", None) or os.environ.get("CLORA_THEME") or None
    replay = getattr(args, "replay", None)
    if replay:
        app = CloraApp(source=RecordedSource.from_file(replay), theme=theme)
    else:
        engine_args = {k: getattr(args, k) for k in ("model", "backend", "max_loras", "max_lora_rank")
                       if getattr(args, k, None) is not None}
        app = CloraApp(home=home, theme=theme, engine_args=engine_args)
    app.run()
    return int(app.return_code or 0)


if __name__ == "__main__":  # `python -m clora_tui.app [--replay FILE]`
    import argparse
    import os

    parser = argparse.ArgumentParser(prog="clora-tui-app")
    parser.add_argument("--home", default=os.environ.get("CLORA_HOME"))
    parser.add_argument("--theme", default=os.environ.get("CLORA_THEME"))
    parser.add_argument("--replay", default=None, help="a recording (JSON) instead of a live engine")
    raise SystemExit(run_app(parser.parse_args()))
