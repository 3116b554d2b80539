"""What nbtask's canvas refuses, and what to do instead: every canvas error's words.

nbtask's chains and groups take signatures. Celery's nested canvases (a group inside a
chain, a chain or a group inside a group) and its chords are refused here, each saying
what nbtask does instead, so that code written for Celery is told how to carry on.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, NoReturn

from nbtask.errors import ConfigurationError

__all__ = ["NO_CHORD", "chord", "not_a_signature"]

#: Why ``group(...) | sig`` and ``chord(...)`` are refused, and what to do instead.
NO_CHORD = (
    "a group followed by a task (group([...]) | task.s(), chain(group([...]), task.s()), "
    "chord([...])(task.s())) is Celery's chord, which nbtask does not have. Send the group, "
    "and the task with the group's results once they are in: "
    "task.delay(group([...]).delay().get())"
)
_GROUP_AFTER_A_STEP = (
    "a group after a chain's step (chain(task.s(), group([...])), task.s() | group([...])) "
    "is not something nbtask's chains run: they take signatures. Send the step, then the "
    "group with its result, which each of the group's tasks gets first: "
    "group([...]).delay(task.delay().get())"
)
_CHAIN_IN_A_GROUP = (
    "a chain in a group (group(a.s() | b.s(), c.s() | d.s())) is not something nbtask's "
    "groups run: they take signatures. Send each chain, handles = [(a.s() | b.s()).delay(), "
    "(c.s() | d.s()).delay()], and wait on each handle (its get() is the chain's last result)"
)
_GROUP_IN_A_GROUP = (
    "a group in a group is not something nbtask's groups run: they take signatures. Put "
    "the signatures in one group: group([*first.tasks, *second.tasks])"
)


def not_a_signature(
    where: Literal["chain", "group"], item: object, *, first: bool = False
) -> ConfigurationError:
    """The error for ``item`` given to a chain or a group, where a signature goes.

    ``first``: it would be the chain's first step. A chain or a group (told by its
    ``canvas_kind``) gets what nbtask does instead; anything else, how to make a signature.
    """
    kind = getattr(type(item), "canvas_kind", "")
    if where == "chain" and kind == "group":
        return ConfigurationError(NO_CHORD if first else _GROUP_AFTER_A_STEP)
    if where == "group" and kind == "chain":
        return ConfigurationError(_CHAIN_IN_A_GROUP)
    if where == "group" and kind == "group":
        return ConfigurationError(_GROUP_IN_A_GROUP)
    if where == "chain":
        return ConfigurationError(
            f"only signatures can be chained, got {item!r}; make one with task.s(...)"
        )
    return ConfigurationError(f"group() takes signatures (task.s(...)), got {item!r}")


def chord(header: Iterable[object], body: object = None) -> NoReturn:
    """Celery's chord: refused with what to do instead (nbtask has no chords).

    Parameters
    ----------
    header, body
        The group's signatures, and the task Celery would send with their results.

    Raises
    ------
    ConfigurationError
        Always: send the group, then the task with its results,
        ``task.delay(group([...]).delay().get())``.
    """
    raise ConfigurationError(NO_CHORD)
