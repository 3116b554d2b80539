"""A value a cell changes in place stays the notebook's object: every alias sees the change.

Locally, ``model["coef"] = 2`` changes the one object that ``models["lr"]`` also holds. A
``%%task`` cell's value comes back unpickled; changed in place, not rebound, it is written
into the notebook's object, which keeps its identity. Where it cannot be (an array whose
shape changed), it is bound anew and one line says which variables still hold the old one.
A real IPython shell against the real Redis and worker processes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import cell_run as run
from helpers import cell_task as task
from IPython.core.interactiveshell import InteractiveShell

from nbtask.notebook.session import Session


def test_a_dict_changed_in_place_is_seen_through_its_aliases(
    ip: InteractiveShell, nb: Session
) -> None:
    run(ip, "model = {'coef': 1}\nmodels = {'lr': model}")
    task(ip, "model['coef'] = 2")
    assert ip.user_ns["models"]["lr"] is ip.user_ns["model"]
    assert ip.user_ns["models"]["lr"] == {"coef": 2}


def test_a_list_changed_in_place_is_seen_through_its_aliases(
    ip: InteractiveShell, nb: Session
) -> None:
    run(ip, "scores = [1]\nhistory = [scores]\nlookup = {'s': scores}")
    task(ip, "scores.append(2)\nscores.sort(reverse=True)")
    assert ip.user_ns["history"][0] is ip.user_ns["scores"] is ip.user_ns["lookup"]["s"]
    assert ip.user_ns["history"][0] == [2, 1]


def test_an_array_changed_in_place_is_seen_through_its_aliases_and_views(
    ip: InteractiveShell, nb: Session
) -> None:
    run(ip, "import numpy as np\narr = np.zeros(4)\narrays = [arr]\ntail = arr[2:]")
    task(ip, "arr[1:] += 5")
    assert ip.user_ns["arrays"][0] is ip.user_ns["arr"]
    np.testing.assert_array_equal(ip.user_ns["arrays"][0], [0.0, 5.0, 5.0, 5.0])
    np.testing.assert_array_equal(ip.user_ns["tail"], [5.0, 5.0])  # a view, as locally


def test_a_memory_mapped_array_changed_in_place_stays_mapped_to_its_file(
    ip: InteractiveShell, nb: Session, tmp_path: Path
) -> None:
    """An ``np.memmap`` is written into, as an array is: it stays the notebook's own,
    mapped to its file, which then holds what the cell wrote."""
    path = tmp_path / "x.dat"
    run(
        ip,
        f"import numpy as np\nmm = np.memmap({str(path)!r}, dtype=float, mode='w+', shape=(4,))",
    )
    mapped = ip.user_ns["mm"]
    task(ip, "mm[:] = 3.0\nmm.flush()")
    assert ip.user_ns["mm"] is mapped and mapped.filename == str(path)
    np.testing.assert_array_equal(np.fromfile(path), [3.0, 3.0, 3.0, 3.0])


def test_what_an_objects_class_leaves_out_of_its_pickled_state_stays_the_notebooks(
    ip: InteractiveShell, nb: Session
) -> None:
    """A class that pickles all but a live resource (its own ``__getstate__``) and makes
    it anew when unpickled (``__setstate__``): the cell's change is written in, and the
    notebook's resource (its in-memory database) stays, as locally."""
    run(
        ip,
        "import sqlite3\n"
        "class Store:\n"
        "    def __init__(self):\n"
        "        self.conn, self.queries = sqlite3.connect(':memory:'), 0\n"
        "    def __getstate__(self):\n"
        "        return {k: v for k, v in self.__dict__.items() if k != 'conn'}\n"
        "    def __setstate__(self, state):\n"
        "        self.__dict__.update(state, conn=sqlite3.connect(':memory:'))\n"
        "store = Store()\nstore.conn.execute('create table t (x int)')\n"
        "conn = store.conn",
    )
    task(ip, "store.queries += 1")
    store = ip.user_ns["store"]
    assert store.queries == 1 and store.conn is ip.user_ns["conn"]
    assert store.conn.execute("select count(*) from t").fetchone() == (0,)


def test_what_a_class_rebuilds_from_its_pickled_state_comes_back_as_the_cell_left_it(
    ip: InteractiveShell, nb: Session
) -> None:
    """An index ``__setstate__`` rebuilds from the rows it pickles: the cell's new row is in
    both, as locally."""
    run(
        ip,
        "class Index:\n"
        "    def __init__(self, rows):\n"
        "        self.rows = list(rows)\n"
        "        self.by_key = {r: i for i, r in enumerate(self.rows)}\n"
        "    def add(self, r):\n"
        "        self.rows.append(r)\n"
        "        self.by_key[r] = len(self.rows) - 1\n"
        "    def __getstate__(self):\n"
        "        return {'rows': self.rows}\n"
        "    def __setstate__(self, state):\n"
        "        self.rows = state['rows']\n"
        "        self.by_key = {r: i for i, r in enumerate(self.rows)}\n"
        "idx = Index(['a', 'b'])\nsame = idx",
    )
    task(ip, "idx.add('c')")
    idx = ip.user_ns["idx"]
    assert idx is ip.user_ns["same"]
    assert (idx.rows, idx.by_key) == (["a", "b", "c"], {"a": 0, "b": 1, "c": 2})


def test_an_object_changed_in_place_is_seen_through_an_attribute_holding_it(
    ip: InteractiveShell, nb: Session
) -> None:
    run(
        ip,
        "class Model:\n    def __init__(self):\n        self.coef = None\n"
        "    def fit(self, x):\n        self.coef = x\n        self.fitted = True\n"
        "class Pipeline:\n    pass\n"
        "model = Model()\npipeline = Pipeline()\npipeline.model = model",
    )
    task(ip, "model.fit(3)")
    assert ip.user_ns["pipeline"].model is ip.user_ns["model"]
    assert vars(ip.user_ns["model"]) == {"coef": 3, "fitted": True}
    assert isinstance(ip.user_ns["model"], ip.user_ns["Model"])


def test_a_fitted_estimator_is_seen_through_the_dict_holding_it(
    ip: InteractiveShell, nb: Session
) -> None:
    run(
        ip,
        "import numpy as np\nfrom sklearn.linear_model import LinearRegression\n"
        "lr = LinearRegression()\nmodels = {'lr': lr}\n"
        "x = np.arange(6.0).reshape(-1, 1)\ny = 2 * x.ravel() + 1",
    )
    task(ip, "lr.fit(x, y)")
    assert ip.user_ns["models"]["lr"] is ip.user_ns["lr"]
    prediction = ip.user_ns["models"]["lr"].predict([[10.0]])
    np.testing.assert_allclose(prediction, [21.0])


def test_a_frame_changed_in_place_is_seen_through_its_aliases(
    ip: InteractiveShell, nb: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    run(
        ip,
        "import pandas as pd\ndf = pd.DataFrame({'a': [1, 2], 'b': [0.5, 1.5]})\n"
        "frames = {'train': df}",
    )
    task(ip, "df.loc[0, 'a'] = 9\ndf['b'] = df['b'].astype(str)")
    assert ip.user_ns["frames"]["train"] is ip.user_ns["df"]
    assert ip.user_ns["df"]["a"].tolist() == [9, 2]
    assert ip.user_ns["df"]["b"].tolist() == ["0.5", "1.5"]
    assert capsys.readouterr().err == ""
    # A column added: pandas has no public way to rewrite a frame whole in place.
    task(ip, "df['c'] = 1")
    assert ip.user_ns["df"].columns.tolist() == ["a", "b", "c"]
    assert ip.user_ns["frames"]["train"].columns.tolist() == ["a", "b"]
    said = capsys.readouterr().err
    assert "nbtask: df came back as a new object (its rows or columns changed in number): " in said
    assert "frames['train'] still holds the old one" in said


def test_an_array_whose_shape_changed_comes_back_new_and_says_who_holds_the_old_one(
    ip: InteractiveShell, nb: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    run(ip, "import numpy as np\narr = np.zeros(3)\narrays = [arr]\nsolo = np.zeros(3)")
    task(ip, "arr.shape = (1, 3)\nsolo.shape = (3, 1)")
    assert ip.user_ns["arr"].shape == (1, 3) and ip.user_ns["solo"].shape == (3, 1)
    assert ip.user_ns["arrays"][0].shape == (3,)  # locally (1, 3): it cannot be written in place
    said = capsys.readouterr().err.splitlines()
    assert said == [
        "nbtask: arr came back as a new object (its shape or dtype changed): arrays[0] still "
        "holds the old one, as it was before the cell"
    ]  # solo: nothing else held it, nothing to say


def test_a_rebound_name_leaves_its_aliases_with_the_old_object_as_locally(
    ip: InteractiveShell, nb: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    run(ip, "model = {'coef': 1}\nmodels = {'lr': model}")
    task(ip, "model = {'coef': 2}")
    assert ip.user_ns["model"] == {"coef": 2}
    assert ip.user_ns["models"]["lr"] == {"coef": 1}
    assert ip.user_ns["models"]["lr"] is not ip.user_ns["model"]
    assert capsys.readouterr().err == ""


def test_names_a_cell_binds_to_a_value_it_changed_in_place_are_the_notebooks_object(
    ip: InteractiveShell, nb: Session
) -> None:
    run(ip, "log = []\nheld = [log]")
    task(ip, "log.append(1)\nsame = log\nfresh = other = {}")
    assert ip.user_ns["same"] is ip.user_ns["log"] is ip.user_ns["held"][0]
    assert ip.user_ns["log"] == [1]
    assert ip.user_ns["fresh"] is ip.user_ns["other"]


def test_a_value_and_its_container_both_changed_stay_one_object(
    ip: InteractiveShell, nb: Session
) -> None:
    run(ip, "model = {'coef': 1}\nmodels = {'lr': model}\nboth = (model, models)")
    task(ip, "model['coef'] = 2\nmodels['rf'] = {'coef': 3}")
    model, models = ip.user_ns["both"]
    assert ip.user_ns["model"] is model and ip.user_ns["models"] is models
    assert models["lr"] is model
    assert models == {"lr": {"coef": 2}, "rf": {"coef": 3}}


def test_a_value_a_background_cell_changed_in_place_is_seen_through_its_aliases(
    ip: InteractiveShell, nb: Session
) -> None:
    run(ip, "model = {'coef': 1}\nmodels = {'lr': model}")
    task(ip, "model['coef'] = 2", "--out h")
    ip.user_ns["h"].get(timeout=60)
    run(ip, "coef = models['lr']['coef']")  # delivered before this cell runs
    assert ip.user_ns["coef"] == 2
    assert ip.user_ns["models"]["lr"] is ip.user_ns["model"]


def test_a_value_changed_in_place_is_the_notebooks_object_deep_in_the_cells_values(
    ip: InteractiveShell, nb: Session
) -> None:
    """Held further down by another value that came back, or by its own parts."""
    run(
        ip,
        "model = {'coef': 1}\nmodels = {'group': {'lr': model}}\n"
        "class Node:\n    pass\n"
        "tree = Node()\ntree.children = [Node()]\ntree.children[0].parent = tree\n"
        "held = [model, tree]",
    )
    task(ip, "model['coef'] = 2\nsize = len(models)\ntree.value = 3")
    assert ip.user_ns["models"]["group"]["lr"] is ip.user_ns["model"]
    assert ip.user_ns["model"] == {"coef": 2}
    tree = ip.user_ns["tree"]
    assert tree.value == 3 and tree.children[0].parent is tree
    assert ip.user_ns["held"] == [ip.user_ns["model"], tree]
    assert ip.user_ns["held"][0] is ip.user_ns["model"] and ip.user_ns["held"][1] is tree


def test_a_partial_of_a_notebook_method_loses_none_of_the_cells_other_values(
    ip: InteractiveShell, nb: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    # ``partial``'s members are read-only and in C: what it calls is written into instead.
    run(ip, "import functools\nl2 = []\nl3 = [0]\npart = functools.partial(l2.insert, 0)")
    run(ip, "parts = [part]")
    task(ip, "z = 5\nl3.append(2)\npart(-1)")
    assert ip.user_ns["z"] == 5 and ip.user_ns["l3"] == [0, 2] and ip.user_ns["l2"] == [-1]
    assert ip.user_ns["parts"][0] is ip.user_ns["part"]
    assert ip.user_ns["part"].func.__self__ is ip.user_ns["l2"]
    assert capsys.readouterr().err == ""
