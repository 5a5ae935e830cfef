"""What the user can do from the dashboard: the app's `action_*` methods and their dialogs.

`DashboardActions` is mixed into `CloraApp` (its key bindings and palette commands name these
actions). An action checks what it can locally (a tenant selected, not final, attached to a
live engine), asks in a dialog where it must, marks the table at once (pending) and sends the
request through the engine link; the engine's answer arrives as a message to the app.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clora_tui import theming
from clora_tui.model import TenantView
from clora_tui.screens.confirm import ConfirmScreen
from clora_tui.screens.help import HelpScreen
from clora_tui.screens.new_experiment import NewExperimentScreen
from clora_tui.screens.prompt import PromptScreen
from engine.config import parse_literal
from engine.protocol import FINAL_STATES, PAUSED, RUNNING

SMOOTHING = (0.0, 0.6, 0.9)


def parse_overrides(text: str) -> dict[str, Any]:
    """`optim.lr=1e-3 lora.rank=16 name=x` -> typed values (TOML literals, else strings)."""
    overrides: dict[str, Any] = {}
    for part in text.replace(",", " ").split():
        if "=" not in part:
            raise ValueError(f"{part!r}: write key=value (e.g. optim.lr=1e-3)")
        key, raw = part.split("=", 1)
        overrides[key.strip()] = parse_literal(raw)
    return overrides


class DashboardActions:
    """The actions of `CloraApp`: a mixin that uses the app's model, link, views and dialogs."""

    # -- guards ---------------------------------------------------------------------------
    def selected_view(self, action: str) -> TenantView | None:
        view = self.model.tenants.get(self.selected_id() or "")
        if view is None:
            self.notify(f"{action}: select a tenant first (n starts one)", severity="warning")
            return None
        if view.id.startswith("…"):
            self.notify(f"{action}: {view.name} is still being started", severity="warning")
            return None
        return view

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
        self.link.send(op, tenant_id, id=tenant_id)

    # -- tenants --------------------------------------------------------------------------
    def action_pause_resume(self) -> None:
        view = self.selected_view("pause")
        if view is None:
            return
        if view.state in FINAL_STATES:
            self.notify(f"{view.name} is {view.state}; nothing to pause", severity="warning")
            return
        op = "resume" if view.state == PAUSED else "pause"
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
            self.link.send("start", placeholder, spec=spec)

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
            self.link.send("clone", placeholder, id=view.id, overrides=overrides)

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
                self.link.send("export", view.id, id=view.id, path=str(Path(text.strip()).expanduser().resolve()))

        self.push_screen(PromptScreen(f"Export the adapter of {view.name} ({view.id})", str(default),
                                      "a new or empty directory; a PEFT adapter is written there", check), answer)

    # -- views ----------------------------------------------------------------------------
    def action_mark(self) -> None:
        tid = self.selected_id()
        if tid is None:
            return
        self.marked ^= {tid}
        self.sync_table({tid})
        self.dirty_plots = True
        self.refresh_slow()
        if len(self.marked) >= 2:
            self.dashboard.open_tab("compare")

    def action_smoothing(self) -> None:
        self.smoothing_index = (self.smoothing_index + 1) % len(SMOOTHING)
        self.refresh_compare()

    def action_tab(self, name: str) -> None:
        self.dashboard.open_tab(name)

    def action_filter(self) -> None:
        self.dashboard.open_filter()

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

    # -- the engine and the app -----------------------------------------------------------
    def action_stop_engine(self) -> None:
        if not self.live_or_warn("stop engine"):
            return

        def answer(yes: bool | None) -> None:
            if yes:
                self.link.stopped_by_user = True
                self.link.send("shutdown")
                self.notify("stopping the engine; its tenants are checkpointed", timeout=5)

        running = self.model.state_counts().get(RUNNING, 0)
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
