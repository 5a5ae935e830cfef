"""The last step's time split into its phases, as proportional bars."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from clora_tui.format import bar, secs
from engine.protocol import STALENESS, TIMING_PARTS, TOTAL_S
from clora_tui.widgets.timing_history import PART_COLOURS


class TimingBreakdown(Static):
    """queue / rollout / reward / train / sync / checkpoint of one step, and its staleness."""

    DEFAULT_CSS = """
    TimingBreakdown { width: 38; height: auto; padding: 0 1; }
    """

    def show(self, row: dict | None) -> None:
        text = Text()
        if not row:
            text.append("Last step: none yet", style="dim")
            self.update(text)
            return
        total = float(row.get(TOTAL_S) or 0.0) or sum(float(row.get(p) or 0.0) for p in TIMING_PARTS)
        text.append(f"Step {row.get('step')}: {secs(total)} total\n", style="bold")
        for part, colour in zip(TIMING_PARTS, PART_COLOURS):
            value = float(row.get(part) or 0.0)
            share = value / total if total else 0.0
            text.append(f"{part[:-2]:<10}", style="")
            text.append(bar(share, 12), style=colour)
            text.append(f" {secs(value):>6} {share * 100:3.0f}%\n")
        staleness = row.get(STALENESS)
        if staleness is not None:  # engines before off-policy sampling did not record it
            text.append(f"{'staleness':<10}")
            if staleness:
                text.append(f"{staleness} (sampled {staleness} update{'s' if staleness > 1 else ''} back)\n",
                            style="bold")
            else:
                text.append("0 (on-policy)\n")
        extra = []
        for key, label in (("loss", "loss"), ("kl", "kl"), ("grad_norm", "grad"), ("entropy", "entropy")):
            if row.get(key) is not None:
                extra.append(f"{label} {row[key]:.3g}")
        if row.get("completion_tokens") is not None:
            extra.append(f"tokens {row['completion_tokens']}")
        text.append("  ".join(extra), style="dim")
        self.update(text)
