"""A line plot of named series (textual-plotext); redrawn only when given new series."""

from __future__ import annotations

from textual_plotext import PlotextPlot

from clora_tui.model import Series

__all__ = ["MetricPlot", "Series", "rgb"]


def rgb(colour: str) -> tuple[int, int, int]:
    colour = colour.lstrip("#")
    return int(colour[0:2], 16), int(colour[2:4], 16), int(colour[4:6], 16)


class MetricPlot(PlotextPlot):
    """Curves over steps with a title; `empty` is shown when there is nothing to draw."""

    DEFAULT_CSS = """
    MetricPlot { height: 1fr; min-height: 6; }
    """

    def __init__(self, title: str, empty: str = "no steps yet", ylim: tuple[float, float] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.title = title
        self.empty = empty
        self.ylim = ylim
        self.series: list[Series] = []
        self.signature: tuple = ()

    def show(self, series: list[Series], title: str | None = None) -> None:
        sig = (title or self.title,) + tuple((s.label, tuple(s.xs), tuple(s.ys), s.colour, s.scatter) for s in series)
        if sig == self.signature:
            return
        self.signature = sig
        if title:
            self.title = title
        self.series = series
        self.refresh()

    def render(self):
        plt = self.plt
        plt.clear_figure()
        drawn = [s for s in self.series if s.xs]
        plt.title(self.title if drawn else f"{self.title} — {self.empty}")
        for s in drawn:
            draw = plt.scatter if s.scatter else plt.plot
            draw(s.xs, s.ys, label=s.label if len(drawn) > 1 else None, color=rgb(s.colour), marker=s.marker)
        if self.ylim:
            plt.ylim(*self.ylim)
        if not drawn:
            plt.xticks([]); plt.yticks([])
        return super().render()
