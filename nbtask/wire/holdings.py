"""What a worker process holds, as it announces it for ``nbtask status``.

Like the worker registry, this is unsigned bookkeeping anyone with broker access could
overwrite: it is parsed defensively here, never raises, and is only ever shown (as
printable text), never acted on.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from nbtask._text import printable
from nbtask.wire.records import WorkerInfo, json_object

__all__ = ["Held", "Holdings", "holdings_lines"]

_MAX_BYTES = 256 * 1024
_MAX_ITEMS = 1000
_MAX_SIZE = 2**63  # no process holds more; JSON integers have no bound (float() overflows)


@dataclasses.dataclass(frozen=True)
class Held:
    """One thing a process holds: a kept value (``made_by`` the cell) or a dataset."""

    name: str
    size: int
    made_by: str = ""


@dataclasses.dataclass(frozen=True)
class Holdings:
    """The kept values and loaded datasets one worker process holds in memory."""

    values: tuple[Held, ...] = ()
    datasets: tuple[Held, ...] = ()

    @property
    def total(self) -> int:
        """Bytes held, values and datasets together."""
        return sum(h.size for h in (*self.values, *self.datasets))

    def to_json(self) -> str:
        """The announcement's text."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def parse(cls, raw: object) -> Holdings | None:
        """An announcement read from the store; ``None`` for anything that is not one."""
        value = json_object(raw, _MAX_BYTES)
        if value is None:
            return None
        values, datasets = _items(value.get("values")), _items(value.get("datasets"))
        if values is None or datasets is None:
            return None
        return cls(values, datasets)


def _items(raw: Any) -> tuple[Held, ...] | None:
    if not isinstance(raw, list) or len(raw) > _MAX_ITEMS:
        return None
    found = []
    for item in raw:
        if not isinstance(item, Mapping):
            return None
        name, size, made_by = item.get("name"), item.get("size"), item.get("made_by", "")
        if (
            not isinstance(name, str)
            or not isinstance(made_by, str)
            or not isinstance(size, int)
            or isinstance(size, bool)
            or not 0 <= size < _MAX_SIZE
        ):
            return None
        found.append(Held(name, size, made_by))
    return tuple(found)


def holdings_lines(
    info: WorkerInfo, holdings: Mapping[str, Holdings], indent: str = "  "
) -> list[str]:
    """What each process of a worker holds, with sizes: lines for ``status``, printable.

    Parameters
    ----------
    info
        The worker's registry entry (its processes are its ``consumers``).
    holdings
        ``{consumer: Holdings}`` as read from the store.
    """
    lines = []
    for slot, consumer in enumerate(info.consumers):
        held = holdings.get(consumer)
        if held is None or not (held.values or held.datasets):
            continue
        pid = info.pids[slot] if slot < len(info.pids) else 0
        lines.append(f"{indent}process {slot} (pid {pid}) holds {_size(held.total)}:")
        for value in held.values:
            made_by = f" from {value.made_by}" if value.made_by else ""
            lines.append(printable(f"{indent}  {value.name}  {_size(value.size)}{made_by}"))
        for dataset in held.datasets:
            lines.append(printable(f"{indent}  dataset {dataset.name}  {_size(dataset.size)}"))
    return lines


def _size(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"
