"""The frozen Settings dataclass: defaults, NBTASK_* parsing, validation."""

from __future__ import annotations

import ast
import dataclasses
import math
import re
from pathlib import Path

import pytest

from nbtask import App, ConfigurationError, Settings
from nbtask.settings import ENVIRONMENT, MAX_SECONDS, is_finite_number, read_secret_file

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


# from_env -------------------------------------------------------------------------------------
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


# Careless values: each refused with one error naming the setting ------------------------------
@pytest.mark.parametrize("name", ["insecure", "task_ignore_result", "worker_disable_rate_limits"])
@pytest.mark.parametrize("value", ["False", "yes", 2, None])
def test_flags_must_be_booleans(name: str, value: object) -> None:
    # insecure="False" would be truthy: it must not quietly mean True.
    with pytest.raises(ConfigurationError, match=name):
        Settings(**{name: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "name"),
    [
        ({"result_ttl": "3600"}, "result_ttl"),
        ({"max_message_bytes": "10MB"}, "max_message_bytes"),
        ({"worker_concurrency": 2.5}, "worker_concurrency"),
        ({"embedded_workers": True}, "embedded_workers"),
        ({"max_redeliveries": 1.5}, "max_redeliveries"),
        ({"key_prefix": 5}, "key_prefix"),
        ({"key_prefix": None}, "key_prefix"),
        ({"broker_url": 6379}, "broker_url"),
        ({"secret": 123}, "secret"),
        ({"old_secrets": None}, "old_secrets"),
        ({"old_secrets": ["ok", ""]}, "old_secrets"),
        ({"default_queue": ""}, "default_queue"),
        ({"default_queue": " near-data"}, "default_queue"),
        ({"default_queue": None}, "default_queue"),
        ({"key_prefix": "a\tb"}, "key_prefix"),
        ({"blob_dir": ""}, "blob_dir"),
        ({"blob_dir": 5}, "blob_dir"),
    ],
)
def test_wrong_types_and_words_are_one_clear_error(changes: dict[str, object], name: str) -> None:
    with pytest.raises(ConfigurationError, match=name):
        Settings(**changes)  # type: ignore[arg-type]


def test_sizes_written_as_whole_floats_become_ints() -> None:
    settings = Settings(max_message_bytes=64e6, embedded_workers=3.0)  # type: ignore[arg-type]
    assert settings.max_message_bytes == 64_000_000
    assert isinstance(settings.max_message_bytes, int)
    assert isinstance(settings.embedded_workers, int)


@pytest.mark.parametrize("name", DURATIONS)
@pytest.mark.parametrize("value", [math.inf, 1e30, True])
def test_durations_must_be_finite_and_not_huge(name: str, value: float) -> None:
    with pytest.raises(ConfigurationError, match=name):
        Settings(**{name: value})


def test_result_ttl_under_a_second_is_refused() -> None:
    # Redis keeps keys for whole seconds: 0.5 would expire every record at once.
    with pytest.raises(ConfigurationError, match=r"result_ttl.*1 second"):
        Settings(result_ttl=0.5)
    assert Settings(result_ttl=1.0).result_ttl == 1.0


@pytest.mark.parametrize("value", ["on", "ON", " yes "])
def test_from_env_flag_on(value: str) -> None:
    assert Settings.from_env({"NBTASK_INSECURE": value}).insecure is True


@pytest.mark.parametrize("value", ["off", "False", "NO"])
def test_from_env_flag_off(value: str) -> None:
    assert Settings.from_env({"NBTASK_TASK_IGNORE_RESULT": value}).task_ignore_result is False


@pytest.mark.parametrize("value", ["2", "enabled", "y", "-1"])
def test_from_env_unknown_flag_word_is_refused(value: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({"NBTASK_WORKER_DISABLE_RATE_LIMITS": value})
    assert "NBTASK_WORKER_DISABLE_RATE_LIMITS" in str(info.value)
    assert "true" in str(info.value) and "false" in str(info.value)


@pytest.mark.parametrize(
    ("celery", "nbtask"),
    [
        ("backend", "result_url"),
        ("result_expires", "result_ttl"),
        ("task_serializer", "@app.task(serializer=...)"),
        ("include", "nbtask worker -A module"),
        # Before, these were unknown settings with no advice.
        ("task_always_eager", "task.apply(args) to run a task here"),
        ("task_track_started", "nothing: every task reports STARTED"),
        ("task_reject_on_worker_lost", "@app.task(reject_on_worker_lost=...)"),
        ("beat_schedule", "nothing: nbtask has no periodic scheduler (no beat); run a loop"),
        ("broker_transport_options", "visibility_timeout=... (seconds)"),
        ("timezone", "nothing: nbtask's times are instants, epoch seconds or aware"),
        ("enable_utc", "nothing: nbtask's times are instants"),
    ],
)
def test_a_celery_setting_names_nbtasks_own_not_a_lookalike(celery: str, nbtask: str) -> None:
    # result_expires resembles result_url in spelling, and means result_ttl.
    with pytest.raises(ConfigurationError) as info:
        App("proj", settings=Settings(), **{celery: "x"})
    assert f"{celery} (Celery's; here use {nbtask}" in str(info.value)


@pytest.mark.parametrize(
    ("var", "meant"),
    [
        ("NBTASK_BROKER_URL", "NBTASK_BROKER"),
        ("NBTASK_CONCURENCY", "NBTASK_CONCURRENCY"),
        ("NBTASK_KEYPREFIX", "NBTASK_KEY_PREFIX"),
        ("NBTASK_RESULTS_TTL", "NBTASK_RESULT_TTL"),
    ],
)
def test_from_env_misspelt_variable_names_the_real_one(var: str, meant: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({var: "1"})
    assert var in str(info.value)
    assert f"did you mean {meant}?" in str(info.value)


def test_from_env_leaves_unrelated_nbtask_variables_alone() -> None:
    env = {"NBTASK_WIDGETS": "0", "NBTASK_TEST_REDIS": "x", "NBTASK_SECRET_FILE": ""}
    assert Settings.from_env(env) == Settings()


def test_a_bad_widgets_flag_is_refused_as_any_flag() -> None:
    with pytest.raises(ConfigurationError, match=r"NBTASK_WIDGETS='maybe' is not a valid flag"):
        Settings.from_env({"NBTASK_WIDGETS": "maybe"})
    assert Settings.from_env({"NBTASK_WIDGETS": "off"}) == Settings()


def test_unknown_setting_names_the_one_it_resembles() -> None:
    with pytest.raises(ConfigurationError, match=r"result_tll \(did you mean result_ttl\?\)"):
        App(settings=Settings(), result_tll=5)
    with pytest.raises(ConfigurationError, match=r"brokr_url \(did you mean broker_url\?\)"):
        Settings.from_mapping({"brokr_url": REDIS})


@pytest.mark.parametrize(
    ("url", "word"),
    [
        ("redis://127.0.0.1:abc/0", "port"),
        ("redis://127.0.0.1:70000/0", "port"),
        ("amqp://guest:guest@127.0.0.1:x//", "port"),
        ("redis://127.0.0.1:6379/db0", "database number"),
        ("redis://127.0.0.1:6379/0/1", "database number"),
    ],
)
def test_malformed_broker_url_is_refused_at_once(url: str, word: str) -> None:
    # redis-py would fail later with a traceback (a port) or use database 0 (a path).
    with pytest.raises(ConfigurationError, match=word):
        Settings(broker_url=url)


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("NBTASK_CONCURRENCY", "0"),
        ("NBTASK_KEY_PREFIX", "my app"),
        ("NBTASK_RESULT_TTL", "inf"),
        ("NBTASK_MAX_REDELIVERIES", "-1"),
    ],
)
def test_from_env_out_of_range_value_names_its_variable(var: str, value: str) -> None:
    # Parsed, then refused: the error still names the variable the user set.
    with pytest.raises(ConfigurationError, match=var):
        Settings.from_env({var: value})


@pytest.mark.parametrize(
    "changes",
    [
        {"secret": "s3cret-value "},
        {"secret": "s3cret-value\n"},
        {"secret": "   "},
        {"old_secrets": ["s3cret-value", " s3cret-value"]},
    ],
)
def test_secret_with_spaces_around_is_refused_without_showing_it(
    changes: dict[str, object],
) -> None:
    # A worker reading the same secret from a file (stripped) would refuse every message.
    with pytest.raises(ConfigurationError, match="spaces or a line break") as info:
        Settings(**changes)  # type: ignore[arg-type]
    assert "s3cret-value" not in str(info.value)


def test_from_env_secret_with_a_trailing_space_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="NBTASK_SECRET"):
        Settings.from_env({"NBTASK_SECRET": "pasted-with-a-space "})


@pytest.mark.parametrize("changes", [{"secret": 987654321}, {"old_secrets": ["ok", 987654321]}])
def test_a_secret_of_the_wrong_type_is_not_shown(changes: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings(**changes)  # type: ignore[arg-type]
    assert "987654321" not in str(info.value)


def test_from_env_old_secrets_naming_none_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="NBTASK_OLD_SECRETS"):
        Settings.from_env({"NBTASK_OLD_SECRETS": " , "})


@pytest.mark.parametrize(
    "url",
    [
        "ftp://alice:hunter2@example.org/0",
        "redis://alice:hunter2@example.org:99999/0",
        "redis://alice:hunter2@example.org:6379/notanumber",
        "redis://alice:hunter2@/0",
    ],
)
def test_a_refused_broker_url_is_named_without_its_password(url: str) -> None:
    with pytest.raises(ConfigurationError) as refused:
        Settings(broker_url=url)
    assert "hunter2" not in str(refused.value) and "alice:***@" in str(refused.value)


def test_readme_settings_table_lists_every_variable_with_its_default() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| `(NBTASK_\w+)` \| `([^`]*)` \|", readme, re.MULTILINE)
    assert [(field, var) for field, var, _ in rows] == list(ENVIRONMENT.items())
    defaults = Settings()
    for field, _, default in rows:
        assert ast.literal_eval(default) == getattr(defaults, field), field
