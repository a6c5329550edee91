"""The ops/s history as an inline SVG polyline: no script library, no network.

The page draws it on the server (the template fills in the points), so it
shows without JavaScript and the refresh swaps it with the rest of the page.
"""

from __future__ import annotations

#: The SVG's own coordinates; it is stretched to the width of its box.
WIDTH = 600
HEIGHT = 120


def _nice_ceiling(value: float) -> int:
    """The smallest of 1, 2, 5 x 10**n at least ``value`` (an axis that reads well)."""
    step = 1
    while True:
        for factor in (1, 2, 5):
            if step * factor >= value:
                return step * factor
        step *= 10


def ops_chart(history: dict | None, seconds: int = 300) -> dict | None:
    """Points for the last ``seconds`` of ``history`` (figures' "history"),
    right-aligned so that a young Manager's line starts part-way across."""
    if history is None:
        return None
    ops = history["ops"][-seconds:]
    top = _nice_ceiling(max(max(ops, default=0), 1))
    step = WIDTH / max(seconds - 1, 1)
    start = seconds - len(ops)
    points = " ".join(f"{(start + i) * step:.1f},{HEIGHT - HEIGHT * value / top:.1f}" for i, value in enumerate(ops))
    area = f"{start * step:.1f},{HEIGHT} {points} {WIDTH},{HEIGHT}" if ops else ""
    return {
        "width": WIDTH,
        "height": HEIGHT,
        "middle": HEIGHT / 2,
        "points": points,
        "area": area,
        "top": top,
        "half": top // 2 if top > 1 else None,
        "seconds": seconds,
        "minutes": seconds // 60,
        "last": ops[-1] if ops else None,
        "peak": max(ops, default=0),
        "mean": sum(ops) / len(ops) if ops else 0.0,
        "count": len(ops),
    }
