"""The notebook's logging setup follows a ``%%task`` cell both ways, as in one kernel.

Each cell runs in a real kernel, once locally and once as ``%%task --wait`` on a worker,
and what each prints is compared: the same lines, in the same formats.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from typing import Any

import pytest
from helpers import kernel_env, kernel_runner

from nbtask import Settings
from nbtask.notebook.logging_state import cell_logging

#: A cell logging at every level through a named logger, a quiet one and the root logger.
_LOGS = """\
import logging
log = logging.getLogger('train')
log.debug('step 1')
log.info('epoch 1: loss 0.5')
log.warning('learning rate is high')
logging.getLogger('noisy.lib').warning('chatter')
logging.info('root info')
"""


def test_a_notebooks_basic_config_formats_and_levels_apply_to_a_cell_as_locally(
    run_in_kernel: Callable[[str], str],
) -> None:
    # Before, the worker's setup applied: a cell showed warnings only, as unformatted text.
    run_in_kernel(
        "import logging\n"
        "logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')\n"
        "logging.getLogger('noisy').setLevel(logging.ERROR)"
    )
    local = run_in_kernel(_LOGS)
    assert local.splitlines() == [
        "INFO train: epoch 1: loss 0.5",
        "WARNING train: learning rate is high",
        "INFO root: root info",
    ], local
    assert run_in_kernel(f"%%task --wait\n{_LOGS}") == local


def test_a_logging_setup_a_cell_makes_stays_for_the_notebook_and_later_cells(
    run_in_kernel: Callable[[str], str],
) -> None:
    printed = run_in_kernel(
        "%%task --wait\nimport logging\n"
        "logging.basicConfig(level=logging.DEBUG, format='[%(name)s] %(message)s')\n"
        "logging.getLogger('train').debug('set up')"
    )
    assert printed == "[train] set up\n", printed
    # As locally, the kernel is set up so from then on: here and in the next cells.
    assert run_in_kernel("logging.getLogger('eval').debug('here')") == "[eval] here\n"
    assert run_in_kernel("%%task --wait\nlogging.getLogger('eval').info('there')") == (
        "[eval] there\n"
    )
    # A fresh kernel's last resort, in a cell that sets nothing up: the message alone.
    assert run_in_kernel("%%task --wait\nlogging.getLogger('x').propagate = False") == ""
    said = run_in_kernel("%%task --wait\nlogging.getLogger('x').warning('alone')")
    assert said == run_in_kernel("logging.getLogger('x').warning('alone')") == "alone\n"


def test_nbtasks_own_records_stay_out_of_a_cell_whatever_the_notebooks_level(
    run_in_kernel: Callable[[str], str],
) -> None:
    run_in_kernel("import logging\nlogging.basicConfig(level=logging.DEBUG)")
    printed = run_in_kernel(
        "%%task --wait\nimport logging\n"
        "logging.getLogger('nbtask.worker').warning('from nbtask itself')\nprint('done')"
    )
    assert printed == "done\n", printed


def test_what_one_notebooks_cell_sets_up_reaches_no_other_notebooks_cell(
    settings: Settings, start_worker: Any, kernel: Any
) -> None:
    # One worker process serves both kernels. Before, the first's level on 'lib' and its
    # handler on 'leak' stayed there, and the second's cell logged through them.
    start_worker(concurrency=1)
    first = kernel_runner(kernel(kernel_env(settings))[1])
    second = kernel_runner(kernel(kernel_env(settings))[1])
    first(
        "%%task --wait\nimport logging, sys\n"
        "logging.getLogger('lib').setLevel(logging.ERROR)\n"
        "leak = logging.getLogger('leak')\n"
        "leak.addHandler(logging.StreamHandler(sys.stdout))\nleak.propagate = False\n"
        "logging.getLogger('off').disabled = True\nlogging.disable(logging.ERROR)"
    )
    cell = (
        "import logging\n"
        "logging.getLogger('lib').warning('lib')\nlogging.getLogger('leak').warning('leak')\n"
        "logging.getLogger('off').warning('off')"
    )
    assert second(f"%%task --wait\n{cell}") == second(cell) == "lib\nleak\noff\n"


def test_a_handler_subclass_and_a_formatter_of_its_own_write_to_a_cell_as_locally(
    run_in_kernel: Callable[[str], str],
) -> None:
    # Before, a StreamHandler subclass's lines were lost, and a formatter class's own
    # format became its format string.
    run_in_kernel(
        "import json, logging, sys\n"
        "class Handler(logging.StreamHandler):\n    pass\n"
        "class AsJson(logging.Formatter):\n"
        "    def format(self, record):\n"
        "        return json.dumps({'level': record.levelname, 'msg': record.getMessage()})\n"
        "handler = Handler(sys.stdout)\nhandler.setFormatter(AsJson())\n"
        "app = logging.getLogger('app')\napp.setLevel(logging.INFO)\napp.addHandler(handler)\n"
        "app.propagate = False"
    )
    local = run_in_kernel("app.info('started')")
    assert local == '{"level": "INFO", "msg": "started"}\n', local
    assert run_in_kernel("%%task --wait\napp.info('started')") == local


def test_loggers_the_notebook_turned_off_stay_off_in_a_cell_as_locally(
    run_in_kernel: Callable[[str], str],
) -> None:
    # Before, a cell logged through them: 'noisy: chatter' and 'train: hidden' showed.
    run_in_kernel(
        "import logging\n"
        "logging.basicConfig(level=logging.INFO, format='%(name)s: %(message)s')\n"
        "logging.getLogger('noisy').disabled = True\nlogging.disable(logging.INFO)"
    )
    cell = (
        "import logging\nlogging.getLogger('noisy').error('chatter')\n"
        "logging.getLogger('train').info('hidden')\nlogging.getLogger('train').warning('shown')"
    )
    local = run_in_kernel(cell)
    assert local == "train: shown\n", local
    assert run_in_kernel(f"%%task --wait\n{cell}") == local


def test_logging_a_cell_turns_off_stays_off_for_the_notebook_and_back_on(
    run_in_kernel: Callable[[str], str],
) -> None:
    state = "import logging\nprint(logging.root.manager.disable, logging.getLogger('lib').disabled)"
    run_in_kernel(
        "%%task --wait\nimport logging\n"
        "logging.disable(logging.WARNING)\nlogging.getLogger('lib').disabled = True"
    )
    assert run_in_kernel(state) == "30 True\n"  # before: '0 False'
    run_in_kernel(
        "%%task --wait\nlogging.disable(logging.NOTSET)\nlogging.getLogger('lib').disabled = False"
    )
    assert run_in_kernel(state) == "0 False\n"


def test_nbtasks_own_warnings_in_the_kernel_are_one_line_saying_they_are_nbtasks(
    run_in_kernel: Callable[[str], str],
) -> None:
    # Before, logging's last resort showed them bare ('event channel readable again after
    # 6.5 s'), an error with a traceback of nbtask's frames.
    listener = "import logging\nlog = logging.getLogger('nbtask.client.listener')\n"
    said = run_in_kernel(f"{listener}log.warning('event channel readable again after 6.5 s')")
    assert said == "nbtask: event channel readable again after 6.5 s\n", said
    said = run_in_kernel(
        "try:\n    {}['gone']\nexcept KeyError:\n"
        "    log.exception('error reading the event channel; retrying until it reads')"
    )
    assert said == (
        "nbtask: error reading the event channel; retrying until it reads (KeyError: 'gone')\n"
    ), said
    # A notebook that set up logging gets them through its own handlers, once.
    run_in_kernel("logging.basicConfig(format='%(levelname)s %(name)s: %(message)s')")
    said = run_in_kernel("log.warning('event channel unreachable (refused)')")
    assert said == "WARNING nbtask.client.listener: event channel unreachable (refused)\n", said


def test_a_kernel_setup_that_cannot_be_made_leaves_the_workers_loggers_as_they_were() -> None:
    # A handler whose format this Python refuses: the cell's logging fails to be set up,
    # and the worker's own loggers (a level, a handler) are put back all the same.
    lib = logging.getLogger("nbtask_test_lib")
    lib.setLevel(logging.ERROR)
    handler = logging.StreamHandler(io.StringIO())
    lib.addHandler(handler)
    broken = {"": (logging.INFO, True, (("stderr", 0, "%(message", None, "%", b""),), False)}
    try:
        with (
            pytest.raises(ValueError, match="Invalid format"),
            cell_logging({"logging": broken}).running(),
        ):
            pass
        assert (lib.level, lib.handlers) == (logging.ERROR, [handler])
    finally:
        lib.setLevel(logging.NOTSET)
        lib.removeHandler(handler)
