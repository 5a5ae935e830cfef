"""The keys, what they do, and how the app behaves with the engine."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

HELP = """[b]clora-tui[/b] — watch and steer concurrent LoRA RL experiments

[b]Keys[/b]
  n        new experiment (form; or load a TOML file)
  p        pause / resume the selected experiment
  k        kill the selected experiment (asks first)
  c        clone the selected experiment with changes (key=value ...)
  e        export the selected adapter as a PEFT directory
  space    mark / unmark for the overlaid reward comparison
  s        compare: smoothing off / 0.6 / 0.9
  /        filter the table (name, id, state, task); escape clears
  tab      switch between the table and the detail tabs
  1-6      detail tabs: curves, timing, compare, spec, engine, log
  t        next theme (remembered in CLORA_HOME/ui.json)
  ?        this help
  q        quit: the engine and its experiments keep running
  S        stop the engine (asks first; tenants are checkpointed)
  ctrl+p   command palette: every action by name

[b]States[/b]  queued → warming → running ⇄ paused → done | killed | failed
An action shows at once in italics (pausing…, killing…); the engine's own
event confirms it. A refused action shows the engine's reason.
If the engine dies the last data stays on screen and the app reconnects
when an engine is back.
"""


class HelpScreen(ModalScreen):
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen VerticalScroll { width: 80; max-width: 100%; height: auto; max-height: 100%;
                                border: round $primary; padding: 0 1; background: $surface; }
    """
    BINDINGS = [Binding("escape,question_mark,q", "close", "Close", id="help-close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(HELP)

    def action_close(self) -> None:
        self.dismiss(None)
