"""The tenants table: one row per tenant, updated in place, only changed cells written."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable

from clora_tui.format import num, nbytes, pct, secs, sparkline
from clora_tui.model import FleetModel, TenantView, tenant_colour
from engine.protocol import FAILED, TINKER_TASK, TOTAL_S

COLUMNS = (
    ("name", "Name", 20), ("state", "State", 10), ("step", "Step", 7), ("reward", "Reward", 6),
    ("smooth", "Smooth", 6), ("acc", "Acc", 5), ("trend", "Reward trend", 12), ("step_s", "Step", 6),
    ("queue", "Queue", 5), ("warmup", "Warm-up", 7), ("rank", "Rank", 4), ("mem", "Adapter", 9),
    ("off", "Off", 3),  # last: a 120-column terminal still shows every column before it
)
PENDING_WORDS = {"pause": "pausing…", "resume": "resuming…", "kill": "killing…", "start": "starting…"}


def staleness_text(view: TenantView) -> str:
    """The last step's staleness for a tenant that may sample ahead of its updates; "–" for an
    on-policy one (when its spec is not loaded yet, a staleness of 0 says nothing either way)."""
    staleness, off_policy = view.staleness(), view.off_policy()
    if staleness is None or off_policy is False or (off_policy is None and not staleness):
        return "–"
    return str(staleness)


def matches(view: TenantView, needle: str) -> bool:
    if not needle:
        return True
    hay = " ".join(str(x) for x in (view.id, view.name, view.state, view.summary.get("task", ""))).lower()
    return all(part in hay for part in needle.lower().split())


class TenantTable(DataTable):
    """Tenants as rows keyed by tenant id. `sync` brings it in line with the model."""

    DEFAULT_CSS = """
    TenantTable { height: 1fr; }
    """

    def __init__(self, **kwargs):
        super().__init__(cursor_type="row", zebra_stripes=False, **kwargs)
        self.rendered: dict[str, dict[str, tuple[str, str]]] = {}
        self.order: list[str] = []

    def on_mount(self) -> None:
        for key, label, width in COLUMNS:
            self.add_column(label, key=key, width=width)

    # -- public -----------------------------------------------------------------------
    def selected_id(self) -> str | None:
        if not self.order or self.cursor_row < 0 or self.cursor_row >= len(self.order):
            return None
        return self.order[self.cursor_row]

    def sync(self, model: FleetModel, colours: dict[str, str], marked: set[str], needle: str = "",
             changed: set[str] | None = None) -> None:
        """Rows for the visible tenants; rewrite only cells whose text or style changed."""
        visible = [t for t in model.ordered() if matches(t, needle)]
        ids = [t.id for t in visible]
        if ids != self.order:
            self._reshape(ids, {t.id: self.cells(t, colours, t.id in marked) for t in visible})
            return
        for view in visible:
            if changed is not None and view.id not in changed:
                continue
            self._update_row(view.id, self.cells(view, colours, view.id in marked))

    def forget_rendered(self) -> None:
        """Make the next `sync` rewrite every cell (the theme, and so the styles, changed)."""
        self.rendered.clear()
        for tid in self.order:
            self.rendered[tid] = {}

    # -- internals --------------------------------------------------------------------
    def _reshape(self, ids: list[str], cells: dict[str, dict[str, Text]]) -> None:
        keep = self.selected_id()
        if self.order and ids[: len(self.order)] == self.order:
            for tid in ids[len(self.order):]:  # only new rows at the end: append them
                self._add(tid, cells[tid])
        else:
            self.clear()
            self.rendered.clear()
            self.order = []
            for tid in ids:
                self._add(tid, cells[tid])
        for tid in ids:
            self._update_row(tid, cells[tid])
        if keep in self.order:
            self.move_cursor(row=self.order.index(keep), animate=False)

    def _add(self, tid: str, cells: dict[str, Text]) -> None:
        self.add_row(*(cells[key] for key, _, _ in COLUMNS), key=tid)
        self.rendered[tid] = {key: (cells[key].plain, str(cells[key].style)) for key, _, _ in COLUMNS}
        self.order.append(tid)

    def _update_row(self, tid: str, cells: dict[str, Text]) -> None:
        done = self.rendered.setdefault(tid, {})
        for key, text in cells.items():
            sig = (text.plain, str(text.style) + "".join(str(s.style) for s in text.spans))
            if done.get(key) != sig:
                done[key] = sig
                self.update_cell(tid, key, text, update_width=False)

    @staticmethod
    def cells(view: TenantView, colours: dict[str, str], marked: bool) -> dict[str, Text]:
        s = view.summary
        colour = tenant_colour(view.id)
        name = Text()
        name.append("◉ " if marked else "● ", style=colour)
        tinker = s.get("task") == TINKER_TASK
        if tinker:  # driven by a Tinker client: its steps are the client's optim_steps, no budget
            name.append("TNK ", style=f"bold {colours.get('badge', 'magenta')}")
        name.append(view.name, style="bold" if marked else "")
        if view.pending:
            state = Text(PENDING_WORDS.get(view.pending, view.pending + "…"), style=f"italic {colours.get('pending', 'yellow')}")
        else:
            st = view.state
            state = Text(st, style=("bold " if st == FAILED else "") + colours.get(f"state-{st}", ""))
        step = s.get("step") or 0
        history = view.history
        rewards = view.rewards()
        reward = s.get("reward") if s.get("reward") is not None else (rewards[-1] if rewards else None)
        rank = s.get("rank")
        return {
            "name": name,
            "state": state,
            "step": Text(str(step) if tinker else f"{step}/{s.get('steps', '?')}", justify="right"),
            "reward": Text(num(reward, 2), justify="right"),
            "smooth": Text(num(view.smoothed_reward(), 2), justify="right"),
            "acc": Text(pct(s.get("accuracy")), justify="right"),
            "trend": Text(sparkline(rewards, 12), style=colour),
            "step_s": Text(secs(s.get("step_s") or (history[-1].get(TOTAL_S) if history else None)), justify="right"),
            "queue": Text(pct(view.queue_share()), justify="right"),
            "off": Text(staleness_text(view), justify="right"),
            "warmup": Text(secs(s.get("warmup_s")), justify="right"),
            "rank": Text(str(rank) if rank is not None else "–", justify="right"),
            "mem": Text(nbytes(s.get("adapter_bytes")), justify="right"),
        }
