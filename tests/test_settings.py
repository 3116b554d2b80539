"""The frozen Settings dataclass: defaults, unknown fields, broker URLs, numeric checks.

``NBTASK_*`` parsing is in ``test_settings_from_env.py``, careless values in
``test_careless_settings.py``.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import re
from pathlib import Path

import pytest

from nbtask import App, ConfigurationError, Settings
from nbtask.settings import ENVIRONMENT

REDIS = "redis://127.0.0.1:6379/0"


# Defaults and immutability -------------------------------------------------------------------
def test_defaults() -> None:
    s = Settings()
    assert s.broker_url is None
    assert s.secret is None
    assert s.insecure is False
    assert s.key_prefix == "nbtask"
    assert s.default_queue == "default"
    assert s.result_ttl == 86400.0
    assert s.visibility_timeout > 3 * s.heartbeat_interval
    assert s.max_message_bytes >= 1024
    assert s.worker_concurrency is None
    assert s.embedded_workers >= 1


def test_frozen() -> None:
    s = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.key_prefix = "other"  # type: ignore[misc]


def test_replace_returns_a_validated_copy() -> None:
    s = Settings()
    t = s.replace(key_prefix="other")
    assert (s.key_prefix, t.key_prefix) == ("nbtask", "other")
    with pytest.raises(ConfigurationError):
        s.replace(heartbeat_interval=100.0)


def test_constructor_reads_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NBTASK_BROKER", REDIS)
    monkeypatch.setenv("NBTASK_KEY_PREFIX", "fromenv")
    assert Settings() == Settings.from_env({})


# Unknown fields ------------------------------------------------------------------------------
def test_unknown_field_in_mapping_is_rejected_with_the_known_names() -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_mapping({"brokr_url": REDIS})
    assert "brokr_url" in str(info.value)
    assert "broker_url" in str(info.value)


def test_unknown_override_in_from_env_and_from_url_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="visibilty_timeout"):
        Settings.from_env({}, visibilty_timeout=10.0)
    with pytest.raises(ConfigurationError, match="nope"):
        Settings.from_url(REDIS, nope=1)


def test_unknown_setting_passed_to_app_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="result_tll"):
        App(settings=Settings(), result_tll=5)


def test_unknown_field_in_replace_is_rejected() -> None:
    with pytest.raises((ConfigurationError, TypeError)):
        Settings().replace(nope=1)


def test_unknown_setting_names_the_one_it_resembles() -> None:
    with pytest.raises(ConfigurationError, match=r"result_tll \(did you mean result_ttl\?\)"):
        App(settings=Settings(), result_tll=5)
    with pytest.raises(ConfigurationError, match=r"brokr_url \(did you mean broker_url\?\)"):
        Settings.from_mapping({"brokr_url": REDIS})


# Broker URLs -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://:pw@host.example:6379/1",
        "rediss://host.example:6380/0",
        "unix:///tmp/redis.sock",
    ],
)
def test_good_broker_urls(url: str) -> None:
    assert Settings.from_url(url).broker_url == url


@pytest.mark.parametrize(
    "url",
    ["http://host:6379", "amqp-typo://guest@host//", "host:6379", "localhost", "ftp://x", ""],
)
def test_bad_broker_url_scheme_is_rejected_with_the_accepted_forms(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings(broker_url=url)
    text = str(info.value)
    assert "redis://" in text
    assert "unix://" in text


@pytest.mark.parametrize("url", ["redis://", "redis:///0", "unix://"])
def test_broker_url_without_host_or_path_is_rejected(url: str) -> None:
    with pytest.raises(ConfigurationError, match="names no"):
        Settings(broker_url=url)


# Numeric checks ----------------------------------------------------------------------------------
def test_visibility_timeout_must_exceed_three_heartbeats() -> None:
    with pytest.raises(ConfigurationError, match="visibility_timeout") as info:
        Settings(visibility_timeout=3.0, heartbeat_interval=1.0)
    assert "heartbeat" in str(info.value)
    with pytest.raises(ConfigurationError):
        Settings(visibility_timeout=2.0, heartbeat_interval=1.0)
    assert Settings(visibility_timeout=3.01, heartbeat_interval=1.0).visibility_timeout == 3.01
    assert Settings(visibility_timeout=2.0, heartbeat_interval=0.2).heartbeat_interval == 0.2


DURATIONS = ["result_ttl", "visibility_timeout", "heartbeat_interval", "max_age"]


@pytest.mark.parametrize("name", DURATIONS)
@pytest.mark.parametrize("value", [0, -1.0])
def test_durations_must_be_positive(name: str, value: float) -> None:
    with pytest.raises(ConfigurationError, match=name):
        Settings(**{name: value})


@pytest.mark.parametrize("name", DURATIONS)
@pytest.mark.parametrize("value", [math.inf, 1e30, True])
def test_durations_must_be_finite_and_not_huge(name: str, value: float) -> None:
    with pytest.raises(ConfigurationError, match=name):
        Settings(**{name: value})


@pytest.mark.parametrize(
    ("changes", "name"),
    [
        ({"max_message_bytes": 1023}, "max_message_bytes"),
        ({"worker_concurrency": 0}, "worker_concurrency"),
        ({"embedded_workers": 0}, "embedded_workers"),
        ({"key_prefix": ""}, "key_prefix"),
        ({"key_prefix": "a b"}, "key_prefix"),
        ({"key_prefix": "a{b}"}, "key_prefix"),
        ({"key_prefix": "a\nb"}, "key_prefix"),
        ({"key_prefix": "p" * 101}, "is 101 characters long: use at most 100"),
    ],
)
def test_other_checks(changes: dict[str, object], name: str) -> None:
    with pytest.raises(ConfigurationError, match=name):
        Settings(**changes)  # type: ignore[arg-type]


def test_configuration_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        Settings(max_message_bytes=1)


def test_old_secrets_from_env_and_signer_accepts_them() -> None:
    from nbtask.wire.envelope import Signer

    settings = Settings.from_env({"NBTASK_SECRET": "new", "NBTASK_OLD_SECRETS": "old, older"})
    assert settings.old_secrets == ("old", "older")
    assert Settings(secret="s", old_secrets="one").old_secrets == ("one",)
    sealed_with_old = Signer("old").seal({"kind": "x"})
    assert (
        Signer.for_settings(settings, settings.secret).open(sealed_with_old).header["kind"] == "x"
    )
    assert settings.to_env()["NBTASK_OLD_SECRETS"] == "old,older"


def test_readme_settings_table_lists_every_variable_with_its_default() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| `(NBTASK_\w+)` \| `([^`]*)` \|", readme, re.MULTILINE)
    assert [(field, var) for field, var, _ in rows] == list(ENVIRONMENT.items())
    defaults = Settings()
    for field, _, default in rows:
        assert ast.literal_eval(default) == getattr(defaults, field), field
