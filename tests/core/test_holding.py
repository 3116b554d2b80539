"""A worker process's holding: least recently used out past the budget, by size."""

from __future__ import annotations

from nbtask.core.holding import HeldValue, Holding, holder_queue, is_holder_queue
from nbtask.core.refs import ValueRef
from nbtask.wire.blobs import Part


def held(name: str, size: int) -> HeldValue:
    return HeldValue(object(), name, size, "Cell In[1]")


def test_past_the_budget_the_least_recently_used_value_goes() -> None:
    announced: list[list[str]] = []
    holding = Holding(100, "held.w-0", lambda values: announced.append([v.name for v in values]))
    holding.hold("a", held("a", 40))
    holding.hold("b", held("b", 40))
    assert holding.get("a") is not None  # a is now the most recently used
    holding.hold("c", held("c", 40))
    assert [v.name for v in holding.values()] == ["a", "c"]
    assert holding.total == 80
    assert announced[-1] == ["a", "c"]


def test_a_value_larger_than_the_budget_is_not_held() -> None:
    holding = Holding(100)
    holding.hold("big", held("big", 101))
    assert holding.get("big") is None and not holding.ever_held


def test_dropping_says_whether_it_was_held() -> None:
    holding = Holding(100)
    holding.hold("a", held("a", 1))
    assert holding.drop("a") is True
    assert holding.drop("a") is False
    assert holding.ever_held  # references naming this process may still exist


def test_a_process_queue_is_told_from_shared_queues() -> None:
    assert is_holder_queue(holder_queue("host-1-abc-0"))
    assert not is_holder_queue("default") and not is_holder_queue("data.iris")


def test_only_values_no_live_session_names_and_no_work_used_for_the_window_go() -> None:
    holding = Holding(100)
    for name in ("killed", "live", "reattached", "old"):
        holding.hold(name, held(name, 1))
    values = {v.name: v for v in holding.values()}
    values["killed"].namers = {"s:killed", "k:1"}
    values["live"].namers = {"s:live", "k:2"}
    values["reattached"].namers = {"s:killed", "k:3"}  # a later session marks its keeper
    # "old": held for a reference made before namers existed: never dropped for them.
    now = values["old"].used + 10
    assert holding.idle_namers(10, now) == {"s:killed", "k:1", "s:live", "k:2", "k:3"}
    assert holding.idle_namers(11, now) == set()  # not idle for that long yet
    assert holding.drop_unnamed({"s:live", "k:3"}, 11, now) == []
    # Unmarked at looks spanning 1.5 naming intervals (2.5 s for a 10 s window): three.
    for look in (now, now + 2.5):
        assert holding.drop_unnamed({"s:live", "k:3"}, 10, look) == []
    dropped = holding.drop_unnamed({"s:live", "k:3"}, 10, now + 5)
    assert [v.name for v in dropped] == ["killed"]
    assert sorted(v.name for v in holding.values()) == ["live", "old", "reattached"]


def test_a_mark_missing_at_one_look_and_back_at_the_next_drops_nothing() -> None:
    # A store that lost its keys (restarted empty, a mark deleted) while the session
    # lives: its marks are back within an interval. Before, one look without them dropped
    # the value, whose store copy had expired: the only copy was lost.
    holding = Holding(100)
    holding.hold("x", held("x", 1))
    (value,) = holding.values()
    value.namers = {"s:live"}
    now = value.used + 10
    for look, alive in ((now, set()), (now + 2.5, {"s:live"}), (now + 5, set())):
        assert holding.drop_unnamed(alive, 10, look) == [], look
    assert holding.drop_unnamed(set(), 10, now + 7.5) == []  # two looks in a row only
    assert [v.name for v in holding.drop_unnamed(set(), 10, now + 10)] == ["x"]


def test_a_value_used_since_the_look_began_stays_and_names_its_user() -> None:
    holding = Holding(100)
    holding.hold("x", held("x", 1))
    (value,) = holding.values()
    value.namers = {"s:killed"}
    now = value.used + 10
    assert holding.idle_namers(10, now) == {"s:killed"}
    assert holding.get("x", {"s:new", "k:1"}) is value  # a cell of another session uses it
    assert value.namers == {"s:killed", "s:new", "k:1"}
    assert holding.drop_unnamed(set(), 10, now) == []


def test_the_same_bytes_kept_again_are_named_by_both() -> None:
    holding = Holding(100)
    first, second = held("a", 1), held("b", 1)
    first.namers, second.namers = {"k:1"}, {"k:2"}
    holding.hold("key", first)
    holding.hold("key", second)
    assert [v.namers for v in holding.values()] == [{"k:1", "k:2"}]


def reference(keeper: str) -> ValueRef:
    value = ValueRef("x", [Part(100, "d1")], b"inline")
    value.keeper = keeper
    return value


def test_two_kept_values_with_the_same_bytes_are_held_under_two_keys() -> None:
    # Held by content, two values equal when kept were one object on their holder:
    # changing one changed the other.
    assert reference("k1").key != reference("k2").key
    assert reference("k1").key == reference("k1").key  # one value, however many names
    assert reference("k1").content_key == reference("k2").content_key
    assert reference("").key == reference("").content_key  # a reference without a keeper
