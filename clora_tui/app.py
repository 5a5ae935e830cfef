"""The Textual app: attach to (or start) the engine, watch every tenant live, steer them.

Data flow: a thread worker follows the engine's event stream into `inbox`; a 10 Hz
timer folds the inbox into the `FleetModel` and rewrites only the table cells that
changed; a slower timer (~1.7 Hz) redraws plots and panels that were marked dirty.
Requests (pause, kill, start, ...) run in thread workers too, so no key press ever
waits on the engine. The app knows the engine only through its socket (`source.py`).
"""

from __future__ import annotations

import collections
import threading
from pathlib import Path
from typing import Any, Iterable

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, TabbedContent, TabPane
from textual.worker import get_current_worker

from clora_tui import theming
from engine.config import parse_literal
from clora_tui.model import FINAL_STATES, FleetModel, ema, tenant_colour
from clora_tui.screens.confirm import ConfirmScreen
from clora_tui.screens.help import HelpScreen
from clora_tui.screens.new_experiment import NewExperimentScreen
from clora_tui.screens.prompt import PromptScreen
from clora_tui.screens.warmup import WarmupScreen
from clora_tui.source import EngineRefused, EngineSource, EngineUnavailable, RecordedSource
from clora_tui.widgets.engine_panel import EnginePanel
from clora_tui.widgets.log_pane import LogPane
from clora_tui.widgets.metric_plot import MetricPlot, Series
from clora_tui.widgets.phase_line import PhaseLine
from clora_tui.widgets.spec_view import SpecView
from clora_tui.widgets.status_bar import StatusBar
from clora_tui.widgets.tenant_table import TenantTable
from clora_tui.widgets.timing_breakdown import TimingBreakdown
from clora_tui.widgets.timing_history import TimingHistory

TABS = ("curves", "timing", "compare", "spec", "engine", "log")
SMOOTHING = (0.0, 0.6, 0.9)
SMOOTHED_COLOUR = "#c8c8c8"
EVAL_COLOUR = "#f2d03b"


def parse_overrides(text: str) -> dict[str, Any]:
    """`optim.lr=1e-3 lora.rank=16 name=x` -> typed values (TOML literals, else strings)."""
    overrides: dict[str, Any] = {}
    for part in text.replace(",", " ").split():
        if "=" not in part:
            raise ValueError(f"{part!r}: write key=value (e.g. optim.lr=1e-3)")
        key, raw = part.split("=", 1)
        overrides[key.strip()] = parse_literal(raw)
    return overrides


class CloraApp(App):
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
        self.home = Path(self.source.home) if self.source.live else None
        self.model = FleetModel(clock=self.source.clock)
        self.inbox: collections.deque = collections.deque()
        self.marked: set[str] = set()
        self.needle = ""
        self.smoothing_index = 1
        self.connection = "connecting"
        self.connection_detail = ""
        self.ever_connected = False
        self.stopped_by_user = False
        self.dirty_plots = True
        self.dirty_panels = True
        self.shown_tenant: str | None = None
        self.stop_event = threading.Event()
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

    # -- layout ---------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield StatusBar(id="status-bar")
        with Horizontal(id="body"):
            with Vertical(id="main"):
                yield Input(placeholder="filter: name, id, state or task (escape clears)", id="filter", compact=True)
                yield TenantTable(id="tenants")
                yield PhaseLine(id="phase-line")
                with TabbedContent(id="detail", initial="tab-curves"):
                    with TabPane("Curves", id="tab-curves"):
                        with Horizontal(id="curves"):
                            yield MetricPlot("Reward", id="reward-plot")
                            yield MetricPlot("Accuracy", ylim=(0.0, 1.0), id="accuracy-plot")
                    with TabPane("Timing", id="tab-timing"):
                        with Horizontal(id="timing"):
                            yield TimingBreakdown(id="timing-last")
                            yield TimingHistory(id="timing-history")
                    with TabPane("Compare", id="tab-compare"):
                        yield MetricPlot("Reward", empty="mark tenants with space", id="compare-plot")
                    with TabPane("Spec", id="tab-spec"):
                        yield SpecView(id="spec")
                    with TabPane("Engine", id="tab-engine"):
                        yield EnginePanel(id="engine-tab-panel")
                    with TabPane("Log", id="tab-log"):
                        yield LogPane(id="log-tab")
            with Vertical(id="sidebar"):
                yield EnginePanel(id="engine-side-panel")
                yield LogPane(id="log-side")
        yield Footer()

    @property
    def dashboard(self) -> Screen:
        """The base screen. Timers and actions query its widgets through this, so they keep
        working while a dialog (new experiment, confirm, help) is the active screen."""
        return self.screen_stack[0] if self.screen_stack else self.screen

    def on_mount(self) -> None:
        self.theme_changed_signal.subscribe(self, lambda _theme: self.redraw_all())
        if self.notify_later:
            self.notify(self.notify_later, severity="warning")
        self.dashboard.query_one(TenantTable).focus()
        if not self.source.live:
            self.connection = "recorded"
            self.apply_snapshot(self.source.open())
        else:
            self.follow_engine()
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

    # -- the engine connection (thread workers) ---------------------------------------------
    def ui(self, fn, *args) -> None:
        """Run fn on the UI thread, unless the app is going away."""
        if self.stop_event.is_set():
            return
        try:
            self.call_from_thread(fn, *args)
        except Exception:  # noqa: BLE001 - the app closed between the check and the call
            pass

    def wait(self, seconds: float) -> bool:
        """Sleep unless the app stops; True when it should stop."""
        return self.stop_event.wait(seconds) or get_current_worker().is_cancelled

    @work(thread=True, exclusive=True, group="follow", exit_on_error=False)
    def follow_engine(self) -> None:
        source = self.source
        tried_start = False
        while not self.stop_event.is_set():
            try:
                answer = source.open()
            except EngineUnavailable as exc:
                if not self.ever_connected and not tried_start and source.autostart:
                    tried_start = True
                    self.ui(self.show_warmup, "starting")
                    try:
                        source.start_engine()
                    except Exception as start_exc:  # noqa: BLE001 - DaemonError and friends
                        self.ui(self.engine_start_failed, str(start_exc))
                        if self.wait(2.0):
                            return
                    continue
                self.ui(self.set_connection, "stopped" if self.stopped_by_user else ("lost" if self.ever_connected else "connecting"),
                        "— reconnecting" if self.ever_connected else str(exc))
                if self.wait(1.0):
                    return
                continue
            except EngineRefused as exc:
                self.ui(self.set_connection, "connecting", f"refused: {exc}")
                if self.wait(2.0):
                    return
                continue
            self.ever_connected = True
            self.stopped_by_user = False
            self.ui(self.apply_snapshot, answer)
            try:
                while not self.stop_event.is_set() and not get_current_worker().is_cancelled:
                    event = source.next_event(0.5)
                    if event is not None:
                        self.inbox.append(event)
            except EngineUnavailable as exc:
                source.close_follower()
                self.ui(self.engine_lost, str(exc))
                if self.wait(1.0):
                    return

    @work(thread=True, group="requests", exit_on_error=False)
    def send(self, op: str, tenant: str | None = None, **args: Any) -> None:
        """One request; the answer (or the refusal) comes back to the UI thread."""
        try:
            result = self.source.call(op, **args)
        except EngineRefused as exc:
            self.ui(self.request_refused, op, tenant, str(exc))
        except EngineUnavailable as exc:
            self.ui(self.request_refused, op, tenant, f"no engine: {exc}")
        else:
            self.ui(self.request_done, op, tenant, result)

    @work(thread=True, group="fetch", exit_on_error=False)
    def fetch_tenant(self, tenant_id: str) -> None:
        try:
            detail = self.source.call("get", id=tenant_id)
        except (EngineRefused, EngineUnavailable):
            return
        self.ui(self.tenant_fetched, detail)

    @work(thread=True, group="fetch", exit_on_error=False)
    def fetch_status(self) -> None:
        try:
            status = self.source.call("status")
        except (EngineRefused, EngineUnavailable):
            return
        self.ui(self.status_fetched, status)

    # -- connection state (UI thread) -------------------------------------------------------
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
            self.dashboard.query_one(TenantTable).focus()
        else:  # a dialog (help) is open above it: try again once that is closed
            self.set_timer(0.5, self.hide_warmup)

    def engine_start_failed(self, message: str) -> None:
        warmup = self.warmup_screen()
        if warmup is not None:
            warmup.show_error(message)
        self.notify(message, title="engine did not start", severity="error", timeout=10)

    def apply_snapshot(self, answer: dict) -> None:
        snapshot = answer.get("snapshot") or {}
        changes = self.model.load_snapshot(snapshot, answer.get("seq", 0))
        was_lost = self.connection in ("lost", "stopped")
        if self.source.live:
            self.set_connection("attached", str(self.source.home))
        status = self.model.status
        if status.get("failed"):
            self.show_warmup("warming")
            self.warmup_screen().show_error(f"the engine failed to start: {status['failed']}")
        elif status.get("ready") is False or status.get("stage") not in (None, "ready"):
            self.show_warmup("warming")
            self.warmup_screen().show_stage(status.get("stage", ""), status.get("warmup_elapsed_s"))
        else:
            self.hide_warmup()
        for view in self.model.tenants.values():
            if not view.loaded and self.source.live:
                self.fetch_tenant(view.id)
        for pane in self.dashboard.query(LogPane):
            pane.clear()
            pane.add(changes.log)
        self.redraw_all()
        if was_lost:
            self.notify("reattached to the engine", severity="information")

    def engine_lost(self, message: str) -> None:
        if self.stopped_by_user:
            self.set_connection("stopped", "— waiting for an engine")
            return
        self.set_connection("lost", "— reconnecting")
        self.notify(f"the engine went away ({message}); showing the last data and reconnecting",
                    title="engine lost", severity="error", timeout=8)

    # -- events -> model -> views -----------------------------------------------------------
    def drain_events(self) -> None:
        if not self.inbox:
            return
        total = None
        while self.inbox:
            changes = self.model.apply(self.inbox.popleft())
            if total is None:
                total = changes
            else:
                total.merge(changes)
        if not total:
            return
        if total.stage:
            warmup = self.warmup_screen()
            if total.stage == "ready":
                self.hide_warmup()
                self.fetch_status()
            elif warmup is not None:
                warmup.show_stage(total.stage, self.model.status.get("warmup_elapsed_s"))
        for tid in total.added:
            if self.source.live and not tid.startswith("…"):
                self.fetch_tenant(tid)
        self.sync_table(total.tenants | total.added)
        if total.log:
            for pane in self.dashboard.query(LogPane):
                pane.add(total.log)
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
        table = self.dashboard.query_one(TenantTable)
        with self.batch_update():
            table.sync(self.model, self.colours(), self.marked, self.needle, changed)
        if self.selected_id() != self.shown_tenant:
            self.dirty_plots = True
            self.refresh_detail()

    def redraw_all(self) -> None:
        table = self.dashboard.query_one(TenantTable)
        table.rendered.clear()
        for tid in table.order:
            table.rendered[tid] = {}
        self.sync_table(None)
        self.dirty_plots = self.dirty_panels = True
        self.refresh_status()
        self.refresh_slow()

    def refresh_status(self) -> None:
        self.dashboard.query_one(StatusBar).show(self.connection, self.connection_detail, self.model.status,
                                       self.model.state_counts(), self.model.slots(), self.colours())

    def refresh_slow(self) -> None:
        """Plots and panels at ~1.7 Hz, and only what changed; the phase clock every time."""
        view = self.model.tenants.get(self.selected_id() or "")
        self.dashboard.query_one(PhaseLine).show(view, self.model.clock(), self.colours())
        if self.dirty_plots:
            self.dirty_plots = False
            self.refresh_detail()
        if self.dirty_panels:
            self.dirty_panels = False
            connection = f"{self.connection} {self.connection_detail}".strip()
            for panel in self.dashboard.query(EnginePanel):
                panel.show(self.model.status, self.model.system, self.model.state_counts(), self.model.slots(),
                           connection, self.colours())

    def refresh_detail(self) -> None:
        tid = self.selected_id()
        self.shown_tenant = tid
        view = self.model.tenants.get(tid or "")
        history = view.history if view else []
        steps = [float(r.get("step", i + 1)) for i, r in enumerate(history)]
        colour = tenant_colour(tid) if tid else "#888888"
        rewards = [r.get("reward_mean") for r in history]
        pairs = [(x, y) for x, y in zip(steps, rewards) if y is not None]
        smooth = [(x, y) for x, y in zip(steps, ema(rewards, 0.6)) if y is not None]
        name = f" — {view.name}" if view else ""
        self.dashboard.query_one("#reward-plot", MetricPlot).show([
            Series("reward", [p[0] for p in pairs], [p[1] for p in pairs], colour),
            Series("smoothed", [p[0] for p in smooth], [p[1] for p in smooth], SMOOTHED_COLOUR),
        ] if pairs else [], title=f"Reward{name}")
        acc = [(x, r.get("accuracy")) for x, r in zip(steps, history) if r.get("accuracy") is not None]
        evals = [(float(e["step"]), e["accuracy"]) for e in (view.evals if view else []) if e.get("accuracy") is not None]
        series = []
        if acc:
            series.append(Series("train", [a[0] for a in acc], [a[1] for a in acc], colour))
        if evals:
            series.append(Series("eval", [e[0] for e in evals], [e[1] for e in evals], EVAL_COLOUR, marker="dot", scatter=True))
        self.dashboard.query_one("#accuracy-plot", MetricPlot).show(series, title="Accuracy")
        self.dashboard.query_one(TimingBreakdown).show(history[-1] if history else None)
        self.dashboard.query_one(TimingHistory).show(history)
        self.dashboard.query_one(SpecView).show(view.spec if view else None)
        self.refresh_compare()

    def refresh_compare(self) -> None:
        weight = SMOOTHING[self.smoothing_index]
        chosen = [self.model.tenants[t] for t in sorted(self.marked) if t in self.model.tenants]
        if not chosen:
            chosen = [v for v in self.model.ordered() if v.history]
        series = []
        for view in chosen:
            xs = [float(r.get("step", i + 1)) for i, r in enumerate(view.history)]
            ys = ema(view.rewards(), weight) if weight else view.rewards()
            pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
            series.append(Series(view.name, [p[0] for p in pts], [p[1] for p in pts], tenant_colour(view.id)))
        which = "marked" if self.marked else "all"
        smooth = f"smoothing {weight}" if weight else "no smoothing"
        self.dashboard.query_one("#compare-plot", MetricPlot).show(series, title=f"Reward, {which} ({smooth}; s toggles)")

    # -- selection ----------------------------------------------------------------------------
    def selected_id(self) -> str | None:
        return self.dashboard.query_one(TenantTable).selected_id()

    def selected_view(self, action: str):
        view = self.model.tenants.get(self.selected_id() or "")
        if view is None:
            self.notify(f"{action}: select a tenant first (n starts one)", severity="warning")
            return None
        if view.id.startswith("…"):
            self.notify(f"{action}: {view.name} is still being started", severity="warning")
            return None
        return view

    @on(DataTable.RowHighlighted, "#tenants")
    def row_highlighted(self, _event: DataTable.RowHighlighted) -> None:
        if self.selected_id() != self.shown_tenant:
            self.dirty_plots = True
            self.refresh_slow()

    # -- actions ------------------------------------------------------------------------------
    def live_or_warn(self, action: str) -> bool:
        if not self.source.live:
            self.notify(f"{action}: this is a recording; no engine to send it to", severity="warning")
            return False
        if self.connection not in ("attached",):
            self.notify(f"{action}: not attached to an engine ({self.connection})", severity="warning")
            return False
        return True

    def send_pending(self, op: str, tenant_id: str) -> None:
        """Show the action in the table at once (pending), then send it; the engine's
        state event confirms it, or its refusal clears it."""
        self.model.set_pending(tenant_id, op)
        self.sync_table({tenant_id})
        self.send(op, tenant_id, id=tenant_id)

    def action_pause_resume(self) -> None:
        view = self.selected_view("pause")
        if view is None:
            return
        if view.state in FINAL_STATES:
            self.notify(f"{view.name} is {view.state}; nothing to pause", severity="warning")
            return
        op = "resume" if view.state == "paused" else "pause"
        if not self.live_or_warn(op):
            return
        self.send_pending(op, view.id)

    def action_kill(self) -> None:
        view = self.selected_view("kill")
        if view is None:
            return
        if view.state in FINAL_STATES:
            self.notify(f"{view.name} is already {view.state}", severity="warning")
            return

        def answer(yes: bool | None) -> None:
            if yes and self.live_or_warn("kill"):
                self.send_pending("kill", view.id)

        self.push_screen(ConfirmScreen(f"Kill [b]{view.name}[/b] ({view.id}) at step {view.summary.get('step', 0)}?\n"
                                       "Its adapter is released; the recorded history stays.", yes="Kill"), answer)

    def action_new_experiment(self) -> None:
        number = 1 + sum(1 for t in self.model.tenants.values() if not t.id.startswith("…"))

        def submitted(spec: dict | None) -> None:
            if spec is None or not self.live_or_warn("start"):
                return
            placeholder = self.model.add_placeholder(spec["name"])
            self.sync_table({placeholder})
            self.send("start", placeholder, spec=spec)

        self.push_screen(NewExperimentScreen(name=f"exp-{number}"), submitted)

    def action_clone(self) -> None:
        view = self.selected_view("clone")
        if view is None:
            return

        def check(text: str) -> str | None:
            try:
                overrides = parse_overrides(text)
                if view.spec:
                    from engine.config import SpecError, parse_spec

                    try:
                        parse_spec(view.spec).with_overrides(overrides)
                    except SpecError as exc:
                        return str(exc)
            except ValueError as exc:
                return str(exc)
            return None

        def answer(text: str | None) -> None:
            if text is None or not self.live_or_warn("clone"):
                return
            overrides = parse_overrides(text)
            placeholder = self.model.add_placeholder(str(overrides.get("name", f"{view.name}-clone")))
            self.sync_table({placeholder})
            self.send("clone", placeholder, id=view.id, overrides=overrides)

        self.push_screen(PromptScreen(f"Clone {view.name} ({view.id}) with changes", f"name={view.name}-clone ",
                                      "key=value pairs, e.g. optim.lr=1e-3 lora.rank=16 steps=80", check), answer)

    def action_export(self) -> None:
        view = self.selected_view("export")
        if view is None:
            return
        default = Path(str(self.source.home)) / "exports" / f"{view.name}-step{view.summary.get('step', 0)}"

        def check(text: str) -> str | None:
            path = Path(text.strip()).expanduser()
            if not text.strip():
                return "a directory path is needed"
            if path.exists() and any(path.iterdir()):
                return f"{path} exists and is not empty"
            return None

        def answer(text: str | None) -> None:
            if text and self.live_or_warn("export"):
                self.notify(f"exporting {view.name}…", timeout=2)
                self.send("export", view.id, id=view.id, path=str(Path(text.strip()).expanduser().resolve()))

        self.push_screen(PromptScreen(f"Export the adapter of {view.name} ({view.id})", str(default),
                                      "a new or empty directory; a PEFT adapter is written there", check), answer)

    def action_mark(self) -> None:
        tid = self.selected_id()
        if tid is None:
            return
        self.marked ^= {tid}
        self.sync_table({tid})
        self.dirty_plots = True
        self.refresh_slow()
        if len(self.marked) >= 2:
            self.dashboard.query_one(TabbedContent).active = "tab-compare"

    def action_smoothing(self) -> None:
        self.smoothing_index = (self.smoothing_index + 1) % len(SMOOTHING)
        self.refresh_compare()

    def action_tab(self, name: str) -> None:
        self.dashboard.query_one(TabbedContent).active = f"tab-{name}"

    def action_filter(self) -> None:
        box = self.dashboard.query_one("#filter", Input)
        box.add_class("-visible")
        box.focus()

    @on(Input.Changed, "#filter")
    def filter_changed(self, event: Input.Changed) -> None:
        self.needle = event.value.strip()
        self.sync_table(None)

    @on(Input.Submitted, "#filter")
    def filter_done(self, _event: Input.Submitted) -> None:
        self.dashboard.query_one(TenantTable).focus()

    def on_key(self, event) -> None:
        box = self.dashboard.query_one("#filter", Input)
        if event.key == "escape" and box.has_focus:
            box.value = ""
            box.remove_class("-visible")
            self.dashboard.query_one(TenantTable).focus()
            event.stop()

    def action_next_theme(self) -> None:
        names = list(self.themes)
        current = next((n for n, t in self.themes.items() if t.name == self.theme), names[0])
        chosen = names[(names.index(current) + 1) % len(names)]
        self.theme = self.themes[chosen].name
        if self.remember_theme:
            theming.save_ui_settings(self.home, theme=chosen)
        self.notify(f"theme: {chosen}", timeout=2)

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_stop_engine(self) -> None:
        if not self.live_or_warn("stop engine"):
            return

        def answer(yes: bool | None) -> None:
            if yes:
                self.stopped_by_user = True
                self.send("shutdown")
                self.notify("stopping the engine; its tenants are checkpointed", timeout=5)

        running = self.model.state_counts().get("running", 0)
        self.push_screen(ConfirmScreen(f"Stop the engine under {self.source.home}?\n{running} tenant(s) running are "
                                       "checkpointed and resume at the next engine start.", yes="Stop engine"), answer)

    async def action_quit(self) -> None:
        self.exit(message=self.goodbye())

    def goodbye(self) -> str:
        if not self.source.live:
            return ""
        pid = self.model.status.get("pid")
        if self.connection == "attached":
            return (f"clora-tui: the engine keeps running (pid {pid}, {self.source.home}) with its experiments; "
                    "reattach with `clora-tui`, stop it with `clora-tui engine stop`.")
        return f"clora-tui: no engine attached ({self.connection}) under {self.source.home}."

    # -- request results (UI thread) ----------------------------------------------------------
    def request_done(self, op: str, tenant: str | None, result: Any) -> None:
        if op in ("start", "clone"):
            if tenant:
                self.model.drop(tenant)
            if isinstance(result, dict) and result.get("id"):
                if result["id"] not in self.model.tenants:
                    self.model.upsert(result)
                self.fetch_tenant(result["id"])
                self.notify(f"started {result.get('name')} as {result['id']}", timeout=3)
            self.sync_table(None)
            self.refresh_status()
        elif op == "export":
            self.notify(f"adapter of {result.get('id')} at step {result.get('step')} written to {result.get('path')}",
                        title="exported", timeout=8)
        elif op == "shutdown":
            self.notify("the engine is stopping", timeout=4)
        # pause/resume/kill: the pending mark stays until the engine's state event confirms it

    def request_refused(self, op: str, tenant: str | None, message: str) -> None:
        if tenant and tenant.startswith("…"):
            self.model.drop(tenant)
            self.sync_table(None)
        elif tenant:
            self.model.set_pending(tenant, None)
            self.sync_table({tenant})
        if op == "shutdown" and self.stopped_by_user:
            self.stopped_by_user = False
        self.notify(message, title=f"{op} refused", severity="error", timeout=8)

    def tenant_fetched(self, detail: dict) -> None:
        self.model.upsert(detail)
        self.sync_table({detail["id"]})
        self.dirty_plots = True

    def status_fetched(self, status: dict) -> None:
        self.model.status.update(status)
        self.model.system = dict(status.get("system") or self.model.system)
        self.dirty_panels = True
        self.refresh_status()

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
        self.stop_event.set()
        self.source.close()


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
