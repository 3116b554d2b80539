"""Cell analysis and the pre-send check (no broker needed)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from nbtask.notebook.shipping import CellError, analyze, prepare
from nbtask.wire.blobs import split_value


def test_reads_assigned_and_mutated() -> None:
    found = analyze(
        "df['c'] = df.a * 2\nx = y + 1\nfor i in range(n):\n    acc.append(i)\n"
        "def f(q):\n    return q + z + x\nimport numpy as np\n[k * m for k in ks]\nw += 1\n"
    )
    assert found.reads == ("df", "y", "range", "n", "acc", "ks", "m", "w", "z")
    assert found.assigned == ("x", "i", "f", "np", "w")
    assert found.mutated == ("df", "acc")


def test_names_assigned_before_reading_are_not_shipped() -> None:
    found = analyze("a = 1\nb = a + 1\nclass C:\n    v = b\n    def m(self):\n        return a\n")
    assert found.reads == ()
    assert found.assigned == ("a", "b", "C")


def test_annotations_are_shipped_but_never_refused() -> None:
    # Evaluated when the function is defined, unless postponed by a __future__ import.
    found = analyze("def f(ws: List[str], *a: Num) -> Dict[str, int]:\n    return {}\nv: Row = 1")
    assert found.reads == ("List", "str", "Num", "Dict", "int", "Row")
    assert set(found.late) == set(found.reads)
    cell = "def f(x: Missing, y: Known) -> None:\n    pass"
    spec, _, _ = prepare(cell, cell, {"Known": int}, filename="c")
    assert spec.names == ("Known",)


def test_unpicklable_and_undefined_inputs() -> None:
    ns = {"lock": threading.Lock(), "ok": 1, "big": b"x" * 5000}
    with pytest.raises(CellError, match=r"variable 'lock' \(_thread.lock\) cannot be pickled"):
        prepare("print(lock, ok)", "print(lock, ok)", ns, filename="c")
    with pytest.raises(CellError, match="'ghost' is not defined"):
        prepare("ghost + 1", "ghost + 1", ns, filename="c")
    spec, blob, _ = prepare("y = ok + 1", "y = ok + 1", ns, filename="c")
    assert spec.names == ("ok",) and spec.assigned == ("y",) and blob.load() == {"ok": 1}


@pytest.mark.parametrize(
    "cell",
    [
        "try:\n    ghost\nexcept NameError as e:\n    print(e)",
        "import builtins\ntry:\n    y = ghost\nexcept (KeyError, builtins.NameError):\n    pass",
        "try:\n    ghost()\nexcept Exception:\n    pass",
        "try:\n    ghost\nexcept BaseException:\n    pass\nfinally:\n    ok",
        "try:\n    ghost\nexcept:\n    pass",
        "if 'ghost' in globals():\n    print(ghost)",
        "if 'ghost' not in dir():\n    pass\nelse:\n    print(ghost)",
        "v = ghost if 'ghost' in locals() else ok",
    ],
)
def test_a_name_the_cell_guards_is_shipped_if_defined_and_never_refused(cell: str) -> None:
    spec, _, found = prepare(cell, cell, {"ok": 1}, filename="c")
    assert "ghost" in found.guarded and "ghost" not in spec.names
    spec, blob, _ = prepare(cell, cell, {"ok": 1, "ghost": 2}, filename="c")
    assert "ghost" in spec.names and blob.load()["ghost"] == 2


@pytest.mark.parametrize(
    "cell",
    [
        "try:\n    ghost\nexcept ValueError:\n    pass",
        "try:\n    pass\nexcept NameError:\n    ghost",
        "try:\n    ghost\nexcept NameError:\n    pass\nghost",
        "if 'ghost' in globals():\n    pass\nelse:\n    ghost",
        "if 'other' in globals():\n    ghost",
    ],
)
def test_an_unguarded_read_of_an_undefined_name_is_still_refused(cell: str) -> None:
    with pytest.raises(CellError, match="'ghost' is not defined"):
        prepare(cell, cell, {"ok": 1}, filename="c")


def test_large_inputs_are_packed_uncopied_to_travel_out_of_band() -> None:
    """No size ceiling on a cell's inputs: an array's buffer leaves the pickle uncopied."""
    big = np.ones(2_000_000)  # 16 MB
    spec, blob, _ = prepare("t = big.sum()", "t = big.sum()", {"big": big}, filename="c")
    assert len(blob.stream) < 1024 and [memoryview(b).nbytes for b in blob.buffers] == [big.nbytes]
    sent = split_value(((spec, blob), {}), threshold=4 * 1024 * 1024)
    (only,) = sent.blobs.values()
    assert memoryview(only).nbytes == big.nbytes
    assert np.array_equal(blob.load()["big"], big)


def test_analysis_is_kept_by_the_cells_text() -> None:
    first = analyze("b = a + 1\n")
    assert analyze("b = a + 1\n") is first  # the same text: analysed once
    changed = analyze("b = c + 1\n")
    assert changed is not first and changed.reads == ("c",)
    with pytest.raises(SyntaxError):
        analyze("b = (\n")
    with pytest.raises(SyntaxError):  # a failure is not kept as an answer
        analyze("b = (\n")


def test_a_transformer_registered_after_a_cell_ran_applies_to_its_next_run() -> None:
    from IPython.testing import globalipapp

    from nbtask.notebook.shipping import transformed

    # The process's test shell: started here, or by another test earlier in this process
    # (a second start_ipython() returns None).
    globalipapp.start_ipython()
    shell = globalipapp.get_ipython()
    assert shell is not None
    cell = "x = 'a'\n"
    assert transformed(shell, cell) == cell
    assert transformed(shell, "%time x = 1\n") == str(shell.transform_cell("%time x = 1\n"))

    def upper(lines: list[str]) -> list[str]:
        return [line.upper() for line in lines]

    shell.input_transformers_post.append(upper)
    try:
        assert transformed(shell, cell) == "X = 'A'\n"
    finally:
        shell.input_transformers_post.remove(upper)
    assert transformed(shell, cell) == cell
