"""Themes: the .tcss files shipped in the `themes` package, turned into Textual `Theme`s.

A theme file declares Textual CSS variables (`$primary: #4e9fff;`). Those that name a
`Theme` field set it; the rest (`$state-running`, ...) become the theme's custom
variables. The chosen theme is remembered in CLORA_HOME/ui.json.
"""

from __future__ import annotations

import json
import re
from dataclasses import fields
from importlib import resources
from pathlib import Path

from textual.theme import Theme

THEME_ORDER = ("dark", "light", "high-contrast")
DEFAULT_THEME = "dark"
VARIABLE_RE = re.compile(r"^\s*\$([A-Za-z0-9_-]+)\s*:\s*([^;]+);", re.MULTILINE)
CUSTOM_DEFAULTS = {
    "state-queued": "#8a94a6", "state-warming": "#f2d03b", "state-running": "#3ddc84",
    "state-paused": "#4e9fff", "state-done": "#b48cff", "state-killed": "#ff8c42",
    "state-failed": "#ff5c5c", "pending": "#f2d03b",
}


def theme_from_tcss(name: str, text: str) -> Theme:
    known = {f.name for f in fields(Theme)} - {"name", "variables"}
    kwargs: dict = {}
    variables: dict[str, str] = {}
    for key, value in VARIABLE_RE.findall(text):
        value = value.strip()
        attr = key.replace("-", "_")
        if attr == "dark":
            kwargs["dark"] = value.lower() == "true"
        elif attr in known:
            kwargs[attr] = value
        else:
            variables[key] = value
    return Theme(name=f"clora-{name}", variables={**CUSTOM_DEFAULTS, **variables}, **kwargs)


def shipped_themes() -> dict[str, Theme]:
    """Every themes/*.tcss except base.tcss, by short name, in THEME_ORDER first."""
    found: dict[str, Theme] = {}
    root = resources.files("themes")
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".tcss") and entry.name != "base.tcss":
            short = entry.name[: -len(".tcss")]
            found[short] = theme_from_tcss(short, entry.read_text(encoding="utf-8"))
    ordered = {n: found[n] for n in THEME_ORDER if n in found}
    ordered.update({n: t for n, t in found.items() if n not in ordered})
    return ordered


def base_css_path() -> str:
    return str(resources.files("themes").joinpath("base.tcss"))


def ui_settings_path(home: Path) -> Path:
    return Path(home) / "ui.json"


def load_ui_settings(home: Path | None) -> dict:
    if home is None:
        return {}
    try:
        data = json.loads(ui_settings_path(home).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def save_ui_settings(home: Path | None, **updates) -> None:
    if home is None:
        return
    data = load_ui_settings(home)
    data.update(updates)
    try:
        Path(home).mkdir(parents=True, exist_ok=True)
        ui_settings_path(home).write_text(json.dumps(data, indent=2) + "\n")
    except OSError:
        pass  # a read-only home only loses the preference
