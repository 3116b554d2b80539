"""A worker process's holding: least recently used out past the budget, by size."""

from __future__ import annotations

from nbtask.core.holding import HeldValue, Holding, holder_queue, is_holder_queue


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
