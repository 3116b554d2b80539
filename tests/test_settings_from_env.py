"""``Settings.from_env``: every ``NBTASK_*`` variable read, the secret file, flags, and a
value that cannot be parsed named by its variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from nbtask import ConfigurationError, Settings
from nbtask.settings import MAX_SECONDS, is_finite_number, read_secret_file


def test_from_env_empty_is_the_defaults() -> None:
    assert Settings.from_env({}) == Settings()


def test_from_env_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in __import__("os").environ if n.startswith("NBTASK_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("NBTASK_KEY_PREFIX", "fromenv")
    assert Settings.from_env().key_prefix == "fromenv"


def test_from_env_every_variable(tmp_path: Path) -> None:
    env = {
        "NBTASK_BROKER": "redis://broker.example:6380/2",
        "NBTASK_SECRET": "s3cret",
        "NBTASK_INSECURE": "1",
        "NBTASK_KEY_PREFIX": "proj",
        "NBTASK_RESULT_TTL": "3600",
        "NBTASK_VISIBILITY_TIMEOUT": "45.5",
        "NBTASK_HEARTBEAT_INTERVAL": "2.5",
        "NBTASK_MAX_MESSAGE_BYTES": "1048576",
        "NBTASK_WORKERS": "3",
        "NBTASK_MOVE_BYTES": "0",
        "UNRELATED": "ignored",
    }
    s = Settings.from_env(env)
    assert s.broker_url == "redis://broker.example:6380/2"
    assert s.secret == "s3cret"
    assert s.insecure is True
    assert s.key_prefix == "proj"
    assert s.result_ttl == 3600.0
    assert s.visibility_timeout == 45.5
    assert s.heartbeat_interval == 2.5
    assert s.max_message_bytes == 1048576
    assert isinstance(s.max_message_bytes, int)
    assert s.embedded_workers == 3
    assert s.move_bytes == 0


def test_from_env_secret_file(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("  from-a-file\n")
    assert Settings.from_env({"NBTASK_SECRET_FILE": str(path)}).secret == "from-a-file"


def test_a_secret_file_under_home_may_be_named_with_a_tilde(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".nbtask-secret").write_text("from-home\n")
    env = {"NBTASK_SECRET_FILE": "~/.nbtask-secret"}  # quoted in the shell: not expanded
    assert Settings.from_env(env).secret == "from-home"
    assert read_secret_file("~/.nbtask-secret") == "from-home"
    with pytest.raises(ConfigurationError, match="~nbtask-no-such-user/s: no such user"):
        read_secret_file("~nbtask-no-such-user/s")


def test_from_env_secret_wins_over_secret_file(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("from-a-file")
    env = {"NBTASK_SECRET": "direct", "NBTASK_SECRET_FILE": str(path)}
    assert Settings.from_env(env).secret == "direct"


def test_from_env_missing_secret_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "nope"
    with pytest.raises(ConfigurationError, match="nope"):
        Settings.from_env({"NBTASK_SECRET_FILE": str(path)})


def test_from_env_empty_secret_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "blank"
    path.write_text("  \n")
    with pytest.raises(ConfigurationError, match=r"blank.*empty|empty.*blank"):
        Settings.from_env({"NBTASK_SECRET_FILE": str(path)})


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes", "Yes"])
def test_from_env_insecure_true(value: str) -> None:
    assert Settings.from_env({"NBTASK_INSECURE": value}).insecure is True


@pytest.mark.parametrize("value", ["", "0", "false", "no"])
def test_from_env_insecure_false(value: str) -> None:
    assert Settings.from_env({"NBTASK_INSECURE": value}).insecure is False


def test_from_env_empty_values_are_unset() -> None:
    env = {"NBTASK_BROKER": "", "NBTASK_SECRET": "", "NBTASK_RESULT_TTL": ""}
    assert Settings.from_env(env) == Settings()


def test_from_env_overrides_win() -> None:
    s = Settings.from_env({"NBTASK_KEY_PREFIX": "env"}, key_prefix="arg", secret="x")
    assert (s.key_prefix, s.secret) == ("arg", "x")


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("NBTASK_RESULT_TTL", "one day"),
        ("NBTASK_VISIBILITY_TIMEOUT", "30s"),
        ("NBTASK_HEARTBEAT_INTERVAL", "fast"),
        ("NBTASK_MAX_MESSAGE_BYTES", "1.5"),
        ("NBTASK_MAX_MESSAGE_BYTES", "10MB"),
        ("NBTASK_WORKERS", "two"),
        ("NBTASK_WORKERS", "2.0"),
    ],
)
def test_from_env_unparsable_value_names_the_variable(var: str, value: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({var: value})
    assert var in str(info.value)
    assert repr(value) in str(info.value) or value in str(info.value)


@pytest.mark.parametrize(
    ("var", "value", "field"),
    [
        ("NBTASK_RESULT_TTL", "0", "result_ttl"),
        ("NBTASK_RESULT_TTL", "-5", "result_ttl"),
        ("NBTASK_VISIBILITY_TIMEOUT", "-1", "visibility_timeout"),
        ("NBTASK_HEARTBEAT_INTERVAL", "0", "heartbeat_interval"),
        ("NBTASK_HEARTBEAT_INTERVAL", "20", "visibility_timeout"),
        ("NBTASK_MAX_MESSAGE_BYTES", "100", "max_message_bytes"),
        ("NBTASK_WORKERS", "0", "embedded_workers"),
        ("NBTASK_MOVE_BYTES", "-1", "move_bytes"),
        ("NBTASK_KEY_PREFIX", "has space", "key_prefix"),
        ("NBTASK_BROKER", "http://example.com", "redis://"),
    ],
)
def test_from_env_invalid_value_names_the_setting(var: str, value: str, field: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({var: value})
    text = str(info.value)
    assert var in text or field in text, text


@pytest.mark.parametrize("value", [10**400, 1e300, float("inf")], ids=["10**400", "1e300", "inf"])
def test_a_duration_no_float_holds_is_refused_naming_the_setting(value: float) -> None:
    """Before, an integer too large for a float raised OverflowError, naming nothing."""
    assert not is_finite_number(value) or value > MAX_SECONDS
    with pytest.raises(ConfigurationError, match=r"result_ttl .*at most 1e\+09"):
        Settings(result_ttl=value)


def test_from_env_nan_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match=r"RESULT_TTL|result_ttl"):
        Settings.from_env({"NBTASK_RESULT_TTL": "nan"})
