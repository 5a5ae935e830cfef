"""The new-experiment form: the spec's main fields with defaults, checked locally before sending.

Validation uses the engine's own `parse_spec`, so what the form accepts is exactly what
`clora-tui submit` accepts; the engine still has the last word (rank limit, module names).
A TOML file can be loaded to fill the form; fields the form does not show are kept.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, Static

from engine.config import LOSS_TYPES, ExperimentSpec, SpecError, parse_spec
from engine.tasks import BUILTIN_TASKS

# (dotted key, label, kind); defaults come from ExperimentSpec itself.
FIELDS = (
    ("name", "name", "str"),
    ("task", "task", "task"),
    ("steps", "steps", "int"),
    ("rollout.prompts_per_step", "prompts / step", "int"),
    ("rollout.num_generations", "generations", "int"),
    ("rollout.max_tokens", "max tokens", "int"),
    ("rollout.temperature", "temperature", "float"),
    ("lora.rank", "LoRA rank", "int"),
    ("lora.alpha", "LoRA alpha", "float"),
    ("optim.lr", "learning rate", "float"),
    ("grpo.loss_type", "loss", "loss"),
    ("grpo.beta", "KL beta", "float"),
    ("eval_every", "eval every", "int"),
    ("checkpoint_every", "checkpoint every", "int"),
    ("seed", "seed", "int"),
)


def field_id(key: str) -> str:
    return "f-" + key.replace(".", "-").replace("_", "-")


def get_dotted(data: dict, key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def set_dotted(data: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        data = data.setdefault(part, {})
    data[leaf] = value


def default_spec(name: str) -> dict:
    return ExperimentSpec(name=name).to_dict()


class NewExperimentScreen(ModalScreen[dict | None]):
    """Dismisses with a validated spec dict (as the engine's `start` takes it), or None."""

    DEFAULT_CSS = """
    NewExperimentScreen { align: center middle; }
    NewExperimentScreen #form-box { width: 78; max-width: 100%; height: auto; max-height: 100%;
                                    border: round $primary; background: $surface; padding: 0 1; }
    NewExperimentScreen #form-title { text-style: bold; }
    NewExperimentScreen #form-fields { height: auto; max-height: 15; }
    NewExperimentScreen .form-row { height: 1; }
    NewExperimentScreen .form-row Label { width: 18; color: $text-muted; }
    NewExperimentScreen .form-row Input, NewExperimentScreen .form-row Select { width: 1fr; }
    NewExperimentScreen #toml-row { height: 1; margin-top: 1; }
    NewExperimentScreen #toml-row Label { width: 18; color: $text-muted; }
    NewExperimentScreen #toml-path { width: 1fr; }
    NewExperimentScreen #form-error { color: $error; height: auto; }
    NewExperimentScreen #form-buttons { height: 1; align-horizontal: right; }
    NewExperimentScreen #form-buttons Button { margin-left: 2; }
    """
    BINDINGS = [Binding("escape", "cancel", "Cancel", id="form-cancel"),
                Binding("ctrl+s", "submit", "Start", id="form-submit")]

    def __init__(self, name: str = "exp-1", base: dict | None = None):
        super().__init__()
        self.base = copy.deepcopy(base) if base else default_spec(name)
        self.base.setdefault("name", name)

    def compose(self) -> ComposeResult:
        with Vertical(id="form-box"):
            yield Static("New experiment — enter or ctrl+s starts it, escape cancels", id="form-title")
            with VerticalScroll(id="form-fields"):
                for key, label, kind in FIELDS:
                    value = get_dotted(self.base, key)
                    with Horizontal(classes="form-row"):
                        yield Label(label)
                        if kind == "task":
                            options = [(t, t) for t in sorted(BUILTIN_TASKS)]
                            if value not in BUILTIN_TASKS:
                                options.append((str(value), str(value)))
                            yield Select(options, value=value, allow_blank=False, compact=True, id=field_id(key))
                        elif kind == "loss":
                            yield Select([(t, t) for t in LOSS_TYPES], value=value, allow_blank=False,
                                         compact=True, id=field_id(key))
                        else:
                            yield Input("" if value is None else str(value), compact=True, id=field_id(key),
                                        type={"int": "integer", "float": "text"}.get(kind, "text"))
            with Horizontal(id="toml-row"):
                yield Label("or load TOML")
                yield Input(placeholder="path/to/experiment.toml, then enter", compact=True, id="toml-path")
            yield Static("", id="form-error")
            with Horizontal(id="form-buttons"):
                yield Button("Start", variant="primary", id="form-start", compact=True)
                yield Button("Cancel", id="form-cancel-button", compact=True)

    def on_mount(self) -> None:
        self.query_one(f"#{field_id('name')}", Input).focus()

    # -- reading and checking -------------------------------------------------------------
    def spec_dict(self) -> dict:
        """The form's values over the base spec, typed; raises SpecError naming a bad field."""
        data = copy.deepcopy(self.base)
        for key, _label, kind in FIELDS:
            widget = self.query_one(f"#{field_id(key)}")
            raw = widget.value
            if kind in ("task", "loss"):
                set_dotted(data, key, str(raw))
                continue
            text = str(raw).strip()
            try:
                if kind == "int":
                    value: Any = int(text)
                elif kind == "float":
                    value = float(text)
                else:
                    value = text
            except ValueError:
                raise SpecError(f"{key}: expected {'an integer' if kind == 'int' else 'a number'}, got {text!r}") from None
            set_dotted(data, key, value)
        return data

    def validated(self) -> dict | None:
        try:
            data = self.spec_dict()
            return parse_spec(data).to_dict()
        except SpecError as exc:
            self.show_error(str(exc))
            return None

    def show_error(self, message: str) -> None:
        self.query_one("#form-error", Static).update(message)

    def load_toml(self, path_text: str) -> None:
        path = Path(path_text).expanduser()
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
            spec = parse_spec(data).to_dict()
        except FileNotFoundError:
            self.show_error(f"{path}: no such file")
            return
        except (OSError, tomllib.TOMLDecodeError) as exc:
            self.show_error(f"{path}: cannot read: {exc}")
            return
        except SpecError as exc:
            self.show_error(f"{path}: {exc}")
            return
        self.base = spec
        for key, _label, kind in FIELDS:
            widget = self.query_one(f"#{field_id(key)}")
            value = get_dotted(spec, key)
            if kind == "task" and value not in BUILTIN_TASKS:
                widget.set_options([(t, t) for t in sorted(BUILTIN_TASKS)] + [(str(value), str(value))])
            widget.value = value if kind in ("task", "loss") else ("" if value is None else str(value))
        self.show_error("")
        self.notify(f"loaded {path.name}; check the fields and press Start", timeout=3)

    # -- events ---------------------------------------------------------------------------
    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        if event.input.id == "toml-path":
            if event.value.strip():
                self.load_toml(event.value.strip())
            return
        self.action_submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "form-start":
            self.action_submit()
        else:
            self.action_cancel()

    def action_submit(self) -> None:
        spec = self.validated()
        if spec is not None:
            self.dismiss(spec)

    def action_cancel(self) -> None:
        self.dismiss(None)
