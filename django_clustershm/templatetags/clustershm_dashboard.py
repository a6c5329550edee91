"""Filters of the dashboard's templates: durations, fractions, counts and sizes that read at a glance."""

from __future__ import annotations

from django import template
from django.template.defaultfilters import filesizeformat

register = template.Library()

DASH = "\u2013"  # what a figure the engine does not give shows


@register.filter
def duration(seconds) -> str:
    """45s, 3m 12s, 2h 05m, 3d 4h; 0.25s under ten seconds."""
    if seconds is None:
        return DASH
    seconds = float(seconds)
    if seconds < 0:
        return DASH
    if seconds < 10:
        return f"{seconds:.2f}s" if seconds < 1 else f"{seconds:.1f}s"
    whole = int(seconds)
    minutes, secs = divmod(whole, 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


@register.filter
def ago(then, now) -> str:
    """How long before ``now`` (both Unix times) ``then`` was."""
    if then is None or now is None:
        return DASH
    return duration(float(now) - float(then))


@register.filter
def percent(fraction) -> str:
    if fraction is None:
        return DASH
    value = float(fraction) * 100
    return f"{value:.0f}%" if value >= 10 or value == 0 else f"{value:.1f}%"


@register.filter
def width(fraction) -> str:
    """A fraction as a CSS width, at least a sliver when it is not zero."""
    if not fraction:
        return "0%"
    return f"{max(float(fraction) * 100, 0.5):.1f}%"


@register.filter
def num(value) -> str:
    """12 345 (thin spaces: no comma or dot that a locale reads the other way)."""
    if value is None:
        return DASH
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}".replace(",", "\u2009")
    return f"{int(value):,}".replace(",", "\u2009")


@register.filter
def size(value) -> str:
    if value is None:
        return DASH
    return filesizeformat(value)


@register.filter
def label(name) -> str:
    """A capability's name as words."""
    return str(name).replace("_", " ")


@register.filter
def guarantee(value) -> str:
    """A capability's value: yes or no for a flag, else its own words."""
    if value is True:
        return "yes"
    if value is False:
        return "no"
    return DASH if value is None else str(value)
