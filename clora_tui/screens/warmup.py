"""The engine's warm-up as it happens: stage, elapsed seconds, progress."""

from __future__ import annotations

import time

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Center, Vertical
from textual.screen import Screen
from textual.widgets import Footer, LoadingIndicator, ProgressBar, Static

STAGES = ("starting daemon", "created", "resolving model", "loading tokenizer", "loading base model",
          "starting vLLM engine", "restoring experiments", "ready")


class WarmupScreen(Screen):
    """Shown while the engine starts; the app pops it when the engine says `ready`."""

    DEFAULT_CSS = """
    WarmupScreen { align: center middle; }
    WarmupScreen #warmup-box { width: 64; height: auto; border: round $primary; padding: 1 2; }
    WarmupScreen #warmup-title { text-style: bold; margin-bottom: 1; }
    WarmupScreen #warmup-stage { color: $accent; }
    WarmupScreen LoadingIndicator { height: 1; margin: 1 0; }
    WarmupScreen ProgressBar { margin-bottom: 1; }
    WarmupScreen #warmup-hint { color: $text-muted; }
    """
    BINDINGS = [Binding("q", "app.quit", "Quit (engine keeps starting)", id="quit")]

    def __init__(self, home: str, origin: str = "starting"):
        super().__init__()
        self.home = home
        self.origin = origin
        self.started = time.monotonic()
        self.stage = "starting daemon"
        self.engine_elapsed: float | None = None
        self.last_error = ""

    def compose(self) -> ComposeResult:
        with Vertical(id="warmup-box"):
            title = "Starting the engine" if self.origin == "starting" else "The engine is warming up"
            yield Static(f"{title}\n[dim]{self.home}[/]", id="warmup-title")
            yield Static(self.stage, id="warmup-stage")
            yield LoadingIndicator()
            with Center():
                yield ProgressBar(total=len(STAGES) - 1, show_eta=False, id="warmup-progress")
            yield Static("", id="warmup-elapsed")
            yield Static("q quits this view; the engine keeps warming up and the next clora-tui attaches.",
                         id="warmup-hint")
        yield Footer()

    def on_mount(self) -> None:
        self.set_interval(0.25, self.tick)
        self.show_stage(self.stage, None)
        if self.last_error:
            self.show_error(self.last_error)

    def show_stage(self, stage: str, elapsed_s: float | None) -> None:
        """Show the engine's stage; before the screen is mounted, only remember it."""
        self.stage = stage or self.stage
        if elapsed_s is not None:
            self.engine_elapsed = elapsed_s
        if not self.is_mounted:
            return
        self.query_one("#warmup-stage", Static).update(f"stage: {self.stage}")
        position = STAGES.index(self.stage) if self.stage in STAGES else 1
        self.query_one(ProgressBar).update(progress=position)
        self.tick()

    def show_error(self, message: str) -> None:
        self.last_error = message
        if not self.is_mounted:
            return
        self.query_one("#warmup-stage", Static).update(f"[b red]{message}[/]")

    def tick(self) -> None:
        elapsed = time.monotonic() - self.started
        engine = f" · engine reports {self.engine_elapsed:.1f} s" if self.engine_elapsed is not None else ""
        self.query_one("#warmup-elapsed", Static).update(f"elapsed {elapsed:.1f} s{engine}")
