"""A tenant's experiment spec, written as the TOML a user would submit."""

from __future__ import annotations

import json

from rich.text import Text
from textual.containers import VerticalScroll
from textual.widgets import Static


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if value is None:
        return '""  # unset'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return repr(value)


def spec_toml(spec: dict) -> str:
    lines = [f"{k} = {toml_value(v)}" for k, v in spec.items() if not isinstance(v, dict) or k == "task_args"]
    for key, value in spec.items():
        if isinstance(value, dict) and key != "task_args":
            lines += ["", f"[{key}]"] + [f"{k} = {toml_value(v)}" for k, v in value.items() if v is not None]
    return "\n".join(lines)


class SpecView(VerticalScroll):
    DEFAULT_CSS = """
    SpecView { height: 1fr; padding: 0 1; }
    SpecView > Static { width: auto; }
    """

    def compose(self):
        yield Static(id="spec-text")

    def show(self, spec: dict | None) -> None:
        text = Text(spec_toml(spec), style="") if spec else Text("spec not loaded yet", style="dim")
        self.query_one("#spec-text", Static).update(text)
