"""The notebook names a ``%%task`` cell reaches only inside magics and shell commands, or
through ``globals()``: shipped with it, and what it binds comes back, as locally."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import cell_run as run
from helpers import cell_task as task
from helpers import execute, kernel_env, stream_text
from IPython.core.interactiveshell import InteractiveShell

from nbtask import Settings
from nbtask.notebook.analysis import analyze
from nbtask.notebook.session import Session


def _said(ip: InteractiveShell, source: str, line: str = "--wait --out h") -> str:
    """Run ``source`` as a ``%%task`` cell; what it printed, on both streams."""
    task(ip, source, line)
    handle = ip.user_ns.pop("h")
    return str(handle.stdout) + str(handle.stderr)


def test_names_read_only_inside_a_code_magic_are_shipped_and_what_it_binds_comes_back(
    ip: InteractiveShell, nb: Session
) -> None:
    run(ip, "import numpy as np\ndata = [1, 2, 3]\nx = 4\narr = np.arange(3)\nk = 2")
    said = _said(ip, "%%time\ntotal = sum(data)")
    assert "NameError" not in said and ip.user_ns["total"] == 6, said
    said = _said(ip, "%time y = x ** 2")
    assert "NameError" not in said and ip.user_ns["y"] == 16, said
    said = _said(ip, "%timeit -n 3 -r 1 arr.sum()")
    assert "NameError" not in said and "3 loops each" in said, said
    said = _said(ip, "%%timeit -n 1 -r 1 base = k\nbase * arr")
    assert "NameError" not in said, said
    said = _said(ip, "%prun -q z = x + k")
    assert "NameError" not in said and ip.user_ns["z"] == 6, said
    said = _said(ip, "%%capture out\nw = x + 1\nprint(w)")
    assert ip.user_ns["w"] == 5 and ip.user_ns["out"].stdout == "5\n", said


def test_in_a_kernel_a_cell_magic_and_a_shell_command_read_the_notebooks_names(
    settings: Settings, start_worker: Any, kernel: Any
) -> None:
    start_worker()
    kc = kernel(kernel_env(settings))[1]
    execute(kc, "%load_ext nbtask\ndata = [1, 2, 3]\nx = 'hello'")
    _, msgs, reply = execute(kc, "%%task -w\n%%time\ntotal = sum(data)")
    assert reply["content"]["status"] == "ok" and "Wall time" in stream_text(msgs)
    assert "NameError" not in stream_text(msgs), stream_text(msgs)
    _, msgs, _ = execute(kc, "%%task -w\n!echo $x\nv = !echo {x}")
    assert stream_text(msgs).split() == ["hello"]
    _, msgs, _ = execute(kc, "print(total, v)")
    assert stream_text(msgs) == "6 ['hello']\n"


def test_names_a_shell_command_expands_are_shipped(ip: InteractiveShell, nb: Session) -> None:
    run(ip, "x = 'hello'\nfolder = 'tmp'\nn = 3")
    said = _said(ip, "v = !echo {x}\nprint(v)")
    assert ip.user_ns["v"] == ["hello"], said
    assert _said(ip, "!echo $x-{n + 1}").strip() == "hello-4"
    assert _said(ip, "%env MY_FOLDER=$folder\nimport os\nprint(os.environ['MY_FOLDER'])") == (
        "env: MY_FOLDER=tmp\ntmp\n"
    )
    # A name the notebook does not define is left as typed, as IPython leaves it.
    assert _said(ip, "!echo {undefined_here}").strip() == "{undefined_here}"


def test_a_background_cells_magic_bindings_are_waited_for_by_a_later_cell(
    ip: InteractiveShell, nb: Session
) -> None:
    run(ip, "x = 5")
    task(ip, "import time\ntime.sleep(1)\n%time y = x * 2", "")
    assert run(ip, "y + 1") == 11  # waits for the cell that binds y, as locally


def test_a_cell_writing_through_globals_runs_and_its_names_come_back(
    ip: InteractiveShell, nb: Session
) -> None:
    said = _said(ip, "globals()['gx'] = 42\nprint(gx)")
    assert said == "42\n" and ip.user_ns["gx"] == 42
    said = _said(ip, "vars().update(vy=1)\nlocals()['vz'] = vy + 1\nprint(vz)")
    assert said == "2\n" and (ip.user_ns["vy"], ip.user_ns["vz"]) == (1, 2)
    # A name read through globals() is shipped; one bound so is waited for, as any other.
    assert _said(ip, "print(globals()['gx'] + 1)") == "43\n"
    task(ip, "import time\ntime.sleep(1)\nglobals()['gw'] = gx * 2", "")
    assert run(ip, "gw") == 84


@pytest.mark.parametrize(
    ("cell", "reads", "assigned"),
    [
        ("%time y = x ** 2", {"x"}, {"y"}),
        ("%%time\ntotal = sum(data)\n", {"data"}, {"total"}),
        ("%timeit -n 3 -r 1 arr.sum()", {"arr"}, set()),
        ("%%timeit -n2 s = a\nt = s + b", {"a", "b"}, set()),
        ("%prun -s cumulative -q f(x)", {"f", "x"}, set()),
        ("%%prun -q\nr = g(x)", {"g", "x"}, {"r"}),
        ("%%capture out --no-stderr\nz = q + 1", {"q"}, {"out", "z"}),
        ("%%time\n!echo $w\n%time k = m", {"w", "m"}, {"k"}),
        ("v = !echo {x}", {"x"}, {"v"}),
        ("!echo $x $$HOME", {"x"}, set()),
        ("%env V=$x", {"x"}, set()),
        ("x = 1\n%time x", set(), {"x"}),
        ("%timeit -x", {"x"}, set()),  # not an option of %timeit: the statement
        ("%store x y > out.txt", {"x", "y"}, set()),  # the values it saves
        ("%store -r x", set(), set()),
    ],
)
def test_the_analysis_reads_the_code_and_expansions_inside_magics(
    ip: InteractiveShell, cell: str, reads: set[str], assigned: set[str]
) -> None:
    found = analyze(ip.transform_cell(cell))
    assert set(found.reads) - {"get_ipython", "sum", "print"} == reads
    assert set(found.assigned) == assigned


def test_a_name_test_on_globals_still_refuses_an_unguarded_read() -> None:
    found = analyze("if 'ghost' in globals():\n    pass\nghost")
    assert not found.namespace and "ghost" not in found.guarded
    found = analyze("globals()['gx'] = 1\nprint(globals()['gy'])")
    assert found.namespace and found.assigned == ("gx",) and found.guarded == ("gy",)
    assert not analyze("def f():\n    return locals()").namespace  # the function's own


def test_names_a_script_run_in_the_namespace_reads_are_shipped(
    ip: InteractiveShell, nb: Session, tmp_path: Path
) -> None:
    """``%run -i script.py`` reads the notebook's names, as locally; a plain ``%run`` none."""
    script = tmp_path / "scale.py"
    script.write_text("def scaled():\n    return factor * 10\nz = x * 10 + scaled()\n")
    run(ip, "x = 5\nfactor = 2")
    said = _said(ip, f"%run -i {script}")
    assert "NameError" not in said and ip.user_ns["z"] == 70, said
    assert analyze(f"get_ipython().run_line_magic('run', '-i -t {script} a b')").scripts == (
        str(script),
    )
    assert analyze(f"get_ipython().run_line_magic('run', '{script}')").scripts == ()


def test_a_name_reached_by_code_the_cell_builds_is_asked_for_in_one_line(
    ip: InteractiveShell, nb: Session
) -> None:
    """``exec(code)`` reads names no analysis can see: the error says how to send them."""
    run(ip, "x = 5\ncode = 'y = x + 1'")
    with pytest.raises(NameError, match=r"name 'x' is not defined on the worker.*a line `x`"):
        task(ip, "exec(code)")
    task(ip, "x\nexec(code)")  # as the error says
    assert ip.user_ns["y"] == 6
    with pytest.raises(NameError, match=r"^name 'nowhere' is not defined$"):
        task(ip, "exec('nowhere')")  # defined nowhere: Python's own error, as locally


def test_a_comment_after_the_options_of_a_task_line_is_a_comment(
    ip: InteractiveShell, nb: Session
) -> None:
    """``%%task --wait  # on the big box``: as a comment on any line of Python."""
    ip.run_cell_magic("task", "--wait  # on the big box", "y = 2")
    ip.run_cell_magic("task", "named --wait #no space after it", "z = 3")
    assert (ip.user_ns["y"], ip.user_ns["z"]) == (2, 3)
    assert "named" in nb.app.cells
