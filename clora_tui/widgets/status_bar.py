"""The top line: connection, engine identity, tenants by state, adapter slots."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.widgets import Static

from clora_tui.model import STATE_ORDER

CONNECTION_STYLES = {"attached": "bold green", "recorded": "bold cyan", "lost": "bold red", "connecting": "bold yellow",
                     "stopped": "bold red"}


class StatusBar(Static):
    DEFAULT_CSS = """
    StatusBar { height: 1; background: $primary 30%; padding: 0 1; }
    """

    def show(self, connection: str, detail: str, status: dict, counts: dict[str, int], slots: tuple,
             colours: dict[str, str]) -> None:
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append("clora-tui ", style="bold")
        text.append(f"● {connection}", style=CONNECTION_STYLES.get(connection.split()[0], "bold"))
        if detail:
            text.append(f" {detail}", style="dim")
        if status.get("model"):
            text.append(f" │ {Path(str(status['model'])).name} · {status.get('backend', '?')} · {status.get('device', '?')}")
        total, used = slots
        if total:
            text.append(f" │ slots {used}/{total}")
        if counts:
            text.append(" │")
            for state in STATE_ORDER:
                if counts.get(state):
                    text.append(f" {state} {counts[state]}", style=colours.get(f"state-{state}", ""))
        self.update(text)
