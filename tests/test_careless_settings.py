"""Settings given careless values (wrong types and words, flags that are not booleans,
misspelt variables, Celery's names, malformed URLs, secrets with spaces): each refused with
one error naming the setting or variable, and never showing a secret or a password."""

from __future__ import annotations

import pytest

from nbtask import App, ConfigurationError, Settings


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
