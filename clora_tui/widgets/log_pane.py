"""The engine's log lines, newest last, tenants in their colours."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import RichLog

from clora_tui.format import clock_time
from clora_tui.model import tenant_colour

LEVEL_STYLES = {"error": "bold red", "warning": "yellow", "info": "", "debug": "dim"}


class LogPane(RichLog):
    DEFAULT_CSS = """
    LogPane { height: 1fr; }
    """

    def __init__(self, **kwargs):
        super().__init__(max_lines=1000, wrap=True, markup=False, highlight=False, auto_scroll=True, **kwargs)

    def add(self, entries: list[dict]) -> None:
        for entry in entries:
            line = Text(no_wrap=False)
            line.append(clock_time(entry.get("time")) + " ", style="dim")
            tenant = entry.get("tenant")
            if tenant:
                line.append(f"{tenant} ", style=tenant_colour(tenant))
            message = str(entry.get("message", "")).splitlines()
            if tenant and message and message[0].startswith(f"{tenant} "):
                message[0] = message[0][len(tenant) + 1:]  # the engine names the tenant; it is shown already
            line.append(message[0] if message else "", style=LEVEL_STYLES.get(entry.get("level", "info"), ""))
            self.write(line)
