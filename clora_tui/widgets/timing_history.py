"""Stacked bars of each step's time split into queue, rollout, reward, train, sync, checkpoint."""

from __future__ import annotations

from textual_plotext import PlotextPlot

from engine.protocol import TIMING_PARTS, TOTAL_S
from clora_tui.widgets.metric_plot import rgb

PART_COLOURS = ("#8a94a6", "#4e9fff", "#f2d03b", "#ff8c42", "#3ddc84", "#b48cff")


class TimingHistory(PlotextPlot):
    """The last `window` steps of one tenant as stacked bars (seconds)."""

    DEFAULT_CSS = """
    TimingHistory { height: 1fr; min-height: 6; }
    """

    def __init__(self, window: int = 30, **kwargs):
        super().__init__(**kwargs)
        self.window = window
        self.rows: list[dict] = []
        self.signature: tuple = ()

    def show(self, history: list[dict]) -> None:
        rows = history[-self.window:]
        sig = tuple((r.get("step"), r.get(TOTAL_S)) for r in rows)
        if sig == self.signature:
            return
        self.signature, self.rows = sig, rows
        self.refresh()

    def render(self):
        plt = self.plt
        plt.clear_figure()
        if not self.rows:
            plt.title("Step time — no steps yet")
            plt.xticks([]); plt.yticks([])
            return super().render()
        plt.title("Step time by phase (s)")
        labels = [str(r.get("step")) for r in self.rows]
        parts = [[float(r.get(p) or 0.0) for r in self.rows] for p in TIMING_PARTS]
        plt.stacked_bar(labels, parts, labels=[p[:-2] for p in TIMING_PARTS],
                        color=[rgb(c) for c in PART_COLOURS])
        # plotext thins crowded category labels unpredictably; choose them here instead
        stride = max(1, -(-len(labels) * 4 // max(8, self.size.width - 8)))
        picks = list(range(0, len(labels), stride))
        plt.xticks([i + 1 for i in picks], [labels[i] for i in picks])
        return super().render()
