"""A ``%%task`` cell shows and binds what the same cell would locally: a last expression
whose ``__repr__`` raises (through a real kernel), a class the cell defines anew under a
name the notebook already has."""

from __future__ import annotations

import re
from typing import Any

import pytest
from helpers import cell_run as run
from helpers import execute, kernel_env, stream_text, wait_until
from IPython.core.interactiveshell import InteractiveShell

from nbtask import Settings
from nbtask.notebook.session import Session


@pytest.fixture
def kc(settings: Settings, start_worker: Any, kernel: Any) -> Any:
    start_worker()
    return kernel(kernel_env(settings))[1]


def shown_text(msgs: list[dict[str, Any]]) -> str:
    """All a cell showed: its streams, errors and displays, as text."""
    parts = []
    for m in msgs:
        content = m["content"]
        if m["msg_type"] == "stream":
            parts.append(content["text"])
        elif m["msg_type"] == "error":
            parts.append("\n".join(content["traceback"]))
        elif m["msg_type"] in ("execute_result", "display_data"):
            parts.append(str(content["data"].get("text/plain", "")))
    return re.sub(r"\x1b\[[0-9;]*m", "", "".join(parts))  # without colours


def test_a_last_expression_whose_repr_raises_shows_the_users_exception_once(kc: Any) -> None:
    """Locally the kernel shows the ``__repr__``'s own traceback once, and the cell succeeds."""
    execute(kc, "%load_ext nbtask")
    cell = "class P:\n    def __repr__(self):\n        raise ValueError('bad repr')\nP()"
    _, local, local_reply = execute(kc, cell)
    _, remote, reply = execute(kc, f"%%task --wait\n{cell}")
    assert reply["content"]["status"] == local_reply["content"]["status"]
    for msgs in (local, remote):
        text = shown_text(msgs)
        assert text.count("ValueError: bad repr") == 1, text
        assert "__repr__" in text, text
    assert "catch_format_error" not in shown_text(remote)


def test_a_value_that_cannot_come_back_shows_the_workers_repr_failure_once(kc: Any) -> None:
    """Where the value cannot come back, the worker's own failure to show it is shown."""
    execute(kc, "%load_ext nbtask")
    cell = (
        "class Q:\n    def __reduce__(self):\n        raise TypeError('not here')\n"
        "    def __repr__(self):\n        raise ValueError('bad repr')\nQ()"
    )
    _, remote, reply = execute(kc, f"%%task --wait\n{cell}")
    assert reply["content"]["status"] == "ok", reply["content"]
    text = shown_text(remote)
    assert text.count("ValueError: bad repr") == 1 and "__repr__" in text, text
    assert "did not come back from the worker" in text, text


@pytest.mark.parametrize(
    "cell",
    [
        "class P:\n    kind = 'new'\n    def again(self):\n        return P()\n"
        "p = P()\nmade = {'p': p.again()}\nP()",
        "base = P.kind\nclass P:\n    kind = 'new'\nold.__class__.kind = 'changed'\np = P()",
        "old.registry.append(1)\nclass P:\n    kind = 'new'\n    registry = []\np = P()",
        "class P(P):\n    kind = 'sub'\np = P()\nP.__bases__[0].kind = 'base changed'",
    ],
)
def test_a_class_defined_anew_leaves_the_notebooks_old_class_as_locally(
    ip: InteractiveShell, nb: Session, cell: str
) -> None:
    """The notebook's ``P`` becomes the cell's; the old class, and its instances, are
    changed only as the cell changed them, as locally."""
    setup = "class P:\n    kind = 'old'\n    registry = []\nold = P()\nOldP = P"
    look = (
        "(P is OldP, OldP.kind, OldP.registry, P.kind, vars(P).get('registry'), "
        "type(p) is P, isinstance(old, P), type(_) is P)"
    )
    seen = []
    for prefix in ("", "%%task --wait\n"):
        run(ip, setup)
        ip.user_ns["_"] = None  # what the cell shows, if anything, is ``_`` after it
        result = ip.run_cell(prefix + cell, store_history=True)
        assert result.error_in_exec is None, result
        seen.append(run(ip, look))
    local, remote = seen
    assert remote == local


def test_app_handle_of_a_cell_gives_the_cells_values(ip: InteractiveShell, nb: Session) -> None:
    """``app.handle(id)`` of a cell's task gives what its ``--out`` handle gives."""
    run(ip, "base = 40")
    ip.run_cell_magic("task", "--out h", "m = base + 2")
    task_id = ip.user_ns["h"].id
    assert nb.app.handle(task_id).get(timeout=30) == {"m": 42}
    assert ip.user_ns["m"] == 42


def test_a_cell_that_ends_across_a_restart_is_written_back_on_reattach(
    settings: Settings, start_worker: Any, kernel: Any
) -> None:
    """Re-attached (``%tasks --all``), its values come into the restarted kernel once it
    ends, as they would have into the kernel that sent it; not over a name it binds."""
    start_worker()
    km, kc = kernel(kernel_env(settings))
    execute(kc, "%load_ext nbtask")
    execute(kc, "%%task --out h\nimport time\ntime.sleep(8)\nacross = 42\nmine = 'the cell'")
    _, msgs, _ = execute(kc, "print(h.id)")
    task_id = stream_text(msgs).strip()
    km.restart_kernel(now=True)
    kc.wait_for_ready(timeout=30)
    execute(kc, "%load_ext nbtask")
    execute(kc, "mine = 'the notebook'")
    _, msgs, reply = execute(kc, "%tasks --all")
    assert reply["content"]["status"] == "ok", reply["content"]
    # Each cell looks for what ended before it runs, as a notebook's next cell would.
    wait_until(
        lambda: stream_text(execute(kc, "print('across' in dir())")[1]) == "True\n",
        40,
        "the re-attached cell's values",
    )
    _, msgs, _ = execute(kc, "print(across, mine)")
    assert stream_text(msgs) == "42 the notebook\n"
    asked = f"import nbtask\nprint(nbtask.app().handle({task_id!r}).get(timeout=10)['across'])"
    assert stream_text(execute(kc, asked)[1]) == "42\n"


def test_the_cells_streams_are_files_with_a_descriptor_and_an_encoding(
    ip: InteractiveShell, nb: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    """As a kernel's: a subprocess may be handed ``sys.stdout`` and ``sys.stderr`` (what it
    writes shows in the cell, as ``os.system``'s does), and ``sys.stdout.encoding`` names
    one."""
    run(
        ip,
        "%%task --wait\nimport subprocess, sys\n"
        "command = ['sh', '-c', 'echo handed; echo also >&2']\n"
        "code = subprocess.run(command, stdout=sys.stdout, stderr=sys.stderr).returncode\n"
        "encodings = (sys.stdout.encoding.lower(), sys.stderr.encoding.lower())",
    )
    assert ip.user_ns["code"] == 0
    assert ip.user_ns["encodings"] == ("utf-8", "utf-8")
    assert capsys.readouterr()[:] == ("handed\n", "also\n")
