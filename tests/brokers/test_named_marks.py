"""A live notebook session's marks that it names kept values (:mod:`nbtask.core.holding`).

The real Redis, under the test's own prefix: a mark lapses after its seconds, and any key
at a mark's name counts as one (a planted key can keep a value held, never drop one).
"""

from __future__ import annotations

import redis
from helpers import wait_until

from nbtask import App


def test_a_mark_lasts_its_seconds(app: App) -> None:
    app.store.mark_named(["s:client", "k:1"], 1)
    assert app.store.named(["s:client", "k:1", "k:2"]) == {"s:client", "k:1"}
    wait_until(lambda: not app.store.named(["s:client", "k:1"]), 10, "the marks to lapse")
    assert app.store.named([]) == set()


def test_a_key_of_another_type_at_a_marks_name_counts_as_a_mark(app: App, r: redis.Redis) -> None:
    r.hset(f"{app.settings.key_prefix}:named:k:1", "planted", 1)
    assert app.store.named(["k:1"]) == {"k:1"}
    app.store.mark_named(["k:1"], 5)  # replaced by the mark
    assert r.type(f"{app.settings.key_prefix}:named:k:1") == b"string"
