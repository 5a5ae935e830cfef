"""The engine: model, backend, device, cold start, adapter slots, GPUs, process CPU and RSS."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from clora_tui.format import bar, nbytes, secs
from clora_tui.model import STATE_ORDER


class EnginePanel(Static):
    DEFAULT_CSS = """
    EnginePanel { height: auto; padding: 0 1; }
    """

    def show(self, status: dict, system: dict, counts: dict[str, int], slots: tuple[int | None, int],
             connection: str, colours: dict[str, str]) -> None:
        grid = Table.grid(padding=(0, 1))
        grid.add_column(style="dim", no_wrap=True)
        grid.add_column(no_wrap=True, overflow="ellipsis")
        model = status.get("model") or "?"
        grid.add_row("engine", Text(connection, style="bold"))
        grid.add_row("model", Path(str(model)).name or str(model))
        grid.add_row("backend", f"{status.get('backend', '?')} · {status.get('device', '?')} · {status.get('dtype', '?')}")
        stage = status.get("stage", "?")
        cold = status.get("cold_start_s")
        grid.add_row("stage", f"{stage}" + (f" · cold start {secs(cold)}" if cold else ""))
        total, used = slots
        if total:
            grid.add_row("slots", Text.assemble(bar(used / total if total else 0, 10), f" {used}/{total} used, {total - used} free"))
        if counts:
            states = Text()
            for state in STATE_ORDER:
                if counts.get(state):
                    states.append(f"{state} {counts[state]}  ", style=colours.get(f"state-{state}", ""))
            grid.add_row("tenants", states)
        gpus = system.get("gpus") or []
        if gpus:
            for gpu in gpus:
                if gpu.get("error"):
                    grid.add_row(f"gpu{gpu.get('index')}", Text(gpu["error"], style="red"))
                    continue
                used_b, total_b = gpu.get("memory_used") or 0, gpu.get("memory_total") or 1
                grid.add_row(f"gpu{gpu.get('index')}", Text.assemble(
                    bar(used_b / total_b, 8), f" {nbytes(used_b)}/{nbytes(total_b)} · util {gpu.get('util', 0)}%"))
        else:
            reason = system.get("gpu_error") or ("no NVIDIA GPU" if system else "")
            if reason:
                grid.add_row("gpu", Text(reason, style="dim"))
        process = system.get("process") or {}
        if process:
            grid.add_row("cpu", f"{process.get('cpu_percent', 0):.0f}% · {process.get('processes', 1)} proc")
            grid.add_row("rss", f"{nbytes(process.get('rss'))} (peak {nbytes(process.get('peak_rss'))})")
        adapters = system.get("adapter_bytes") or {}
        if adapters:
            grid.add_row("adapters", f"{len(adapters)} live · {nbytes(sum(adapters.values()))}")
        self.update(grid)
