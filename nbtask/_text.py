"""Showing text safely: broker URLs without their secrets, unsigned text without control codes."""

from __future__ import annotations

__all__ = ["printable", "redact_url"]


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
