"""The dashboard: the tenant table, the selected tenant's detail tabs, the engine sidebar.

The app's base screen. It composes the layout and is given data to show (`show_*`); what
the user does here goes up as messages (`TenantHighlighted`, `FilterChanged`). It keeps no
model of its own.
"""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Input, TabbedContent, TabPane

from clora_tui.model import FleetModel, Series, TenantView
from clora_tui.widgets.engine_panel import EnginePanel
from clora_tui.widgets.log_pane import LogPane
from clora_tui.widgets.metric_plot import MetricPlot
from clora_tui.widgets.phase_line import PhaseLine
from clora_tui.widgets.spec_view import SpecView
from clora_tui.widgets.status_bar import StatusBar
from clora_tui.widgets.tenant_table import TenantTable
from clora_tui.widgets.timing_breakdown import TimingBreakdown
from clora_tui.widgets.timing_history import TimingHistory

TABS = ("curves", "timing", "compare", "spec", "engine", "log")


class Dashboard(Screen):
    """Every tenant of one engine at a glance, and one of them in detail."""

    class TenantHighlighted(Message):
        """The table's cursor moved to another row."""

    class FilterChanged(Message):
        def __init__(self, needle: str) -> None:
            super().__init__()
            self.needle = needle

    @staticmethod
    def widgets() -> ComposeResult:
        """The layout. The app yields it from its own `compose`: Textual mounts those widgets on
        the default screen (this one) before the app's `on_mount` and before the first key
        press, which a screen's own `compose` would not guarantee."""
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

    # -- what the user does (up) -------------------------------------------------------------
    @on(DataTable.RowHighlighted, "#tenants")
    def row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        event.stop()
        self.post_message(self.TenantHighlighted())

    @on(Input.Changed, "#filter")
    def filter_changed(self, event: Input.Changed) -> None:
        event.stop()
        self.post_message(self.FilterChanged(event.value.strip()))

    @on(Input.Submitted, "#filter")
    def filter_done(self, event: Input.Submitted) -> None:
        event.stop()
        self.focus_table()

    def on_key(self, event) -> None:
        box = self.query_one("#filter", Input)
        if event.key == "escape" and box.has_focus:
            box.value = ""
            box.remove_class("-visible")
            self.focus_table()
            event.stop()

    # -- commands from the app (down) --------------------------------------------------------
    def selected_id(self) -> str | None:
        return self.query_one(TenantTable).selected_id()

    def focus_table(self) -> None:
        self.query_one(TenantTable).focus()

    def open_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.add_class("-visible")
        box.focus()

    def open_tab(self, name: str) -> None:
        self.query_one(TabbedContent).active = f"tab-{name}"

    def show_tenants(self, model: FleetModel, colours: dict[str, str], marked: set[str], needle: str,
                     changed: set[str] | None) -> None:
        self.query_one(TenantTable).sync(model, colours, marked, needle, changed)

    def forget_table(self) -> None:
        """Make the next `show_tenants` rewrite every cell (after a theme change)."""
        self.query_one(TenantTable).forget_rendered()

    def show_status(self, connection: str, detail: str, model: FleetModel, colours: dict[str, str]) -> None:
        self.query_one(StatusBar).show(connection, detail, model.status, model.state_counts(), model.slots(), colours)

    def show_engine(self, connection: str, model: FleetModel, colours: dict[str, str]) -> None:
        for panel in self.query(EnginePanel):
            panel.show(model.status, model.system, model.state_counts(), model.slots(), connection, colours)

    def show_phase(self, view: TenantView | None, now: float, colours: dict[str, str]) -> None:
        self.query_one(PhaseLine).show(view, now, colours)

    def show_detail(self, view: TenantView | None, reward: list[Series], accuracy: list[Series]) -> None:
        """The selected tenant's curves, last step, step times and spec."""
        history = view.history if view else []
        name = f" — {view.name}" if view else ""
        self.query_one("#reward-plot", MetricPlot).show(reward, title=f"Reward{name}")
        self.query_one("#accuracy-plot", MetricPlot).show(accuracy, title="Accuracy")
        self.query_one(TimingBreakdown).show(history[-1] if history else None)
        self.query_one(TimingHistory).show(history)
        self.query_one(SpecView).show(view.spec if view else None)

    def show_compare(self, series: list[Series], title: str) -> None:
        self.query_one("#compare-plot", MetricPlot).show(series, title=title)

    def add_log(self, entries: list[dict], replace: bool = False) -> None:
        for pane in self.query(LogPane):
            if replace:
                pane.clear()
            pane.add(entries)
