"""Short text forms of numbers for narrow table cells and panels."""

from __future__ import annotations

import time

SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float | None], width: int = 12) -> str:
    vals = [v for v in values if v is not None][-width:]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    if hi - lo < 1e-12:
        return SPARK[3] * len(vals)
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / (hi - lo) * (len(SPARK) - 1) + 0.5))] for v in vals)


def num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}f}"


def pct(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value * 100:.0f}%"


def secs(value: float | None) -> str:
    if value is None:
        return "–"
    if value >= 3600:
        return f"{value / 3600:.1f}h"
    if value >= 100:
        return f"{value / 60:.1f}m"
    if value >= 10:
        return f"{value:.0f}s"
    return f"{value:.2f}s" if value < 1 else f"{value:.1f}s"


def nbytes(value: float | None) -> str:
    if not value:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return "–"


def clock_time(epoch: float | None) -> str:
    if not epoch:
        return "--:--:--"
    return time.strftime("%H:%M:%S", time.localtime(epoch))


def bar(fraction: float, width: int) -> str:
    fraction = max(0.0, min(1.0, fraction))
    full = int(fraction * width)
    return "█" * full + "░" * (width - full)
