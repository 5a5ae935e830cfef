"""One line about the selected tenant: its state, the phase it is in and for how long."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from clora_tui.format import secs
from clora_tui.model import ACTIVE_STATES, TenantView, tenant_colour


class PhaseLine(Static):
    DEFAULT_CSS = """
    PhaseLine { height: 1; padding: 0 1; background: $panel; }
    """

    shown: tuple = ()

    def put(self, text: Text) -> None:
        sig = (text.plain, tuple((s.start, s.end, str(s.style)) for s in text.spans))
        if sig != self.shown:  # unchanged text: no refresh, no layout
            self.shown = sig
            self.update(text)

    def show(self, view: TenantView | None, now: float, colours: dict[str, str]) -> None:
        if view is None:
            self.put(Text("No tenant selected — press n to start an experiment", style="dim"))
            return
        s = view.summary
        text = Text()
        text.append("● ", style=tenant_colour(view.id))
        text.append(f"{view.name} ", style="bold")
        text.append(f"({view.id}) ", style="dim")
        text.append(view.state, style=colours.get(f"state-{view.state}", ""))
        phase, since = s.get("phase"), s.get("phase_since")
        if view.state in ACTIVE_STATES and phase:
            text.append(" · phase ")
            text.append(str(phase), style="bold")
            if since:
                text.append(f" for {secs(max(0.0, now - since))}")
        text.append(f" · step {s.get('step', 0)}/{s.get('steps', '?')}")
        if s.get("task"):
            text.append(f" · {s['task']}")
        if s.get("error"):
            text.append(f" · {s['error']}", style=colours.get("state-failed", "red"))
        elif s.get("reason"):
            text.append(f" · {s['reason']}", style="dim")
        self.put(text)
