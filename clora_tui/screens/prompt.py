"""One line of input with a title, a hint and local validation (clone overrides, export path)."""

from __future__ import annotations

from typing import Callable

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Static


class PromptScreen(ModalScreen[str | None]):
    DEFAULT_CSS = """
    PromptScreen { align: center middle; }
    PromptScreen #prompt-box { width: 90%; max-width: 100; height: auto; border: round $primary; padding: 0 1;
                               background: $surface; }
    PromptScreen #prompt-title { text-style: bold; }
    PromptScreen #prompt-hint { color: $text-muted; }
    PromptScreen #prompt-error { color: $error; height: auto; }
    """
    BINDINGS = [Binding("escape", "cancel", "Cancel", id="prompt-cancel")]

    def __init__(self, title: str, value: str = "", hint: str = "",
                 validate: Callable[[str], str | None] | None = None):
        super().__init__()
        self.title_text, self.value, self.hint = title, value, hint
        self.check = validate

    def compose(self) -> ComposeResult:
        with Vertical(id="prompt-box"):
            yield Static(self.title_text, id="prompt-title")
            yield Input(self.value, id="prompt-input")
            yield Static(self.hint + "  (enter: send, escape: cancel)", id="prompt-hint")
            yield Static("", id="prompt-error")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        problem = self.check(event.value) if self.check else None
        if problem:
            self.query_one("#prompt-error", Static).update(problem)
            return
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)
