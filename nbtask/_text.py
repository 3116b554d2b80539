"""Showing text: URLs without secrets, unsigned text without control codes, readable counts."""

from __future__ import annotations

import math

__all__ = ["count_text", "printable", "redact_url", "value_text"]

#: Significant digits of a progress count that is not a whole number.
_COUNT_DIGITS = 4


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (the user name is kept)."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def printable(text: str) -> str:
    """``text`` with control characters (tabs aside) shown as ``?``.

    For unsigned text from the broker (registry entries, records, journals): it must not
    move a terminal's cursor or recolour what follows.
    """
    return "".join(ch if ch.isprintable() or ch == "\t" else "?" for ch in text)


def value_text(value: object) -> str:
    """``repr(value)`` for an error message, an integer of hundreds of digits cut short.

    ``1000000000000... (401 digits)``: the message stays one readable line.
    """
    text = repr(value)
    if isinstance(value, int) and len(text) > 24:
        return f"{text[:13]}... ({len(text.lstrip('-'))} digits)"
    return text


def count_text(done: float, total: float | None = None) -> str:
    """``1,288,990/10,000,000``: a task's progress (``done`` alone without a ``total``).

    Whole numbers (``1e7`` included) in full, with thousands separators; others with
    :data:`_COUNT_DIGITS` significant digits (``0.3333``, ``12.35``), never in exponent
    notation, which ``%g`` switches to from a million on.
    """
    shown = _number(done)
    return f"{shown}/{_number(total)}" if total else shown


def _number(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if value == int(value):
        return f"{int(value):,}"
    decimals = max(0, _COUNT_DIGITS - 1 - math.floor(math.log10(abs(value))))
    text = f"{value:,.{min(decimals, 9)}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text
