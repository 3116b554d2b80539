"""What ``@app.task`` makes of a function: a :class:`~nbtask.Task` subclass of its own."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from nbtask.core.options import check_task_function
from nbtask.core.task import Task
from nbtask.errors import ConfigurationError

__all__ = ["task_class"]


def task_class(
    func: Callable[..., Any], options: Mapping[str, Any], default_base: type[Task]
) -> type[Task]:
    """The task class for ``func`` with checked ``options`` (see ``validate_options``).

    Raises
    ------
    ConfigurationError
        ``func`` cannot be a task, or ``base=`` is not a Task class.
    """
    check_task_function(func, options.get("requires", ()))
    base = options.get("base", default_base)
    if not (isinstance(base, type) and issubclass(base, Task)):
        raise ConfigurationError(f"base={base!r} is not a Task class (use app.Task)")
    bind = bool(options.get("bind", False))
    run = func if bind else staticmethod(func)
    # Code run without a ``__name__`` (exec'd strings, some shells) has no module: it is
    # the notebook's own, as ``__main__`` is.
    module = func.__module__ or "__main__"
    attrs: dict[str, Any] = {
        "run": run,
        "name": options.get("name") or f"{module}.{func.__qualname__}",
        "abstract": False,
        "bind": bind,
        "__module__": module,
        "__qualname__": func.__qualname__,
        "__doc__": func.__doc__,
        "__wrapped__": func,
    }
    attrs.update({k: v for k, v in options.items() if k not in ("name", "bind", "base")})
    return type(func.__name__, (base,), attrs)
