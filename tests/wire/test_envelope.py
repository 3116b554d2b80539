"""The signed wire format (DESIGN §4): pure, fast, no broker."""

from __future__ import annotations

import hashlib
import hmac
import json
import warnings
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nbtask
from nbtask.errors import ConfigurationError, SignatureError, TooLarge
from nbtask.wire.envelope import FORMAT_VERSION, MAGIC, Envelope, Signer, dumps

KEY = "k" * 32
MAC_SIZE = 32
HEADER = {"kind": "task", "id": "abc", "name": "mod.fn", "created": 1.5, "eta": None}


class Touch:
    """Unpickles to ``None`` after creating ``path``: proof that something was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.path),))


def sealed(body: bytes = b"\x80\x05body-bytes.", key: str = KEY) -> bytes:
    return Signer(key).seal(HEADER, body)


def flip(raw: bytes, index: int) -> bytes:
    return raw[:index] + bytes((raw[index] ^ 0x40,)) + raw[index + 1 :]


def header_end(raw: bytes) -> int:
    return 8 + int.from_bytes(raw[4:8], "big")


def resign(unsigned: bytes, key: str = KEY) -> bytes:
    return unsigned + hmac.new(key.encode(), unsigned, hashlib.sha256).digest()


# Round trip -------------------------------------------------------------------------------
def test_round_trip() -> None:
    body = dumps({"x": [1, 2, 3]})
    env = Signer(KEY).open(Signer(KEY).seal(HEADER, body))
    assert isinstance(env, Envelope)
    assert dict(env.header) == HEADER
    assert env.body == body
    assert env.load_body() == {"x": [1, 2, 3]}


def test_round_trip_empty_body_loads_as_none() -> None:
    env = Signer(KEY).open(Signer(KEY).seal({"kind": "event"}))
    assert env.body == b""
    assert env.load_body() is None


def test_bytes_and_str_secrets_are_the_same_key() -> None:
    assert Signer(KEY.encode()).open(sealed()).header["id"] == "abc"


def test_layout_is_magic_version_length_header_body_mac() -> None:
    raw = sealed(b"BODY")
    assert raw[:3] == MAGIC == b"NBT"
    assert raw[3] == FORMAT_VERSION
    assert json.loads(raw[8 : header_end(raw)]) == HEADER
    assert raw[header_end(raw) : -MAC_SIZE] == b"BODY"
    assert raw[-MAC_SIZE:] == hmac.new(KEY.encode(), raw[:-MAC_SIZE], hashlib.sha256).digest()


@pytest.mark.parametrize("key", [b"k", b"k" * 63, b"k" * 64, b"k" * 65, bytes(range(200))])
@pytest.mark.parametrize(
    "body", [b"", b"BODY", b"b" * (200 * 1024)], ids=["empty", "small", "large"]
)
def test_the_mac_is_hmac_sha256_of_everything_before_it(key: bytes, body: bytes) -> None:
    signer = Signer(key)
    raw = signer.seal(HEADER, [body[:7], body[7:]])
    assert raw[-MAC_SIZE:] == hmac.digest(key, raw[:-MAC_SIZE], "sha256")
    assert signer.open(raw).body == body
    assert signer.tag(b"label") == hmac.digest(key, b"nbtask tag\x00label", "sha256")
    assert signer.check_tag(b"label", signer.tag(b"label"))
    assert not signer.check_tag(b"label", signer.tag(b"other"))


# Tampering --------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["magic", "version", "length", "header", "body", "mac"])
def test_any_tampered_byte_is_rejected(where: str) -> None:
    raw = sealed()
    index = {
        "magic": 0,
        "version": 3,
        "length": 7,
        "header": 8 + (header_end(raw) - 8) // 2,
        "body": header_end(raw) + 2,
        "mac": len(raw) - 5,
    }[where]
    with pytest.raises(SignatureError):
        Signer(KEY).open(flip(raw, index))


def test_every_single_byte_tamper_is_rejected() -> None:
    raw = sealed()
    for index in range(len(raw)):
        with pytest.raises(SignatureError):
            Signer(KEY).open(flip(raw, index))


def test_tampered_mac_message_says_what_to_check() -> None:
    raw = sealed()
    with pytest.raises(SignatureError, match="NBTASK_SECRET"):
        Signer(KEY).open(flip(raw, len(raw) - 1))


@pytest.mark.parametrize("length", [0, 1, 3, 4, 7, 8, 9, 20, 41, -MAC_SIZE, -1, "half"])
def test_truncated_is_rejected(length: int | str) -> None:
    raw = sealed()
    cut = raw[: len(raw) // 2] if length == "half" else raw[:length]
    with pytest.raises(SignatureError):
        Signer(KEY).open(cut)


def test_appended_bytes_are_rejected() -> None:
    with pytest.raises(SignatureError):
        Signer(KEY).open(sealed() + b"\x00")


def test_empty_is_rejected() -> None:
    with pytest.raises(SignatureError, match="not an nbtask message"):
        Signer(KEY).open(b"")


def test_wrong_magic_is_rejected() -> None:
    raw = sealed()
    # Re-MACed so that only the magic is wrong.
    with pytest.raises(SignatureError, match="not an nbtask message"):
        Signer(KEY).open(resign(b"XYZ" + raw[3:-MAC_SIZE]))


def test_raw_pickle_is_rejected(tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    with pytest.raises(SignatureError):
        Signer(KEY).open(cloudpickle.dumps(Touch(trace)))
    assert not trace.exists()


@pytest.mark.parametrize("version", [0, FORMAT_VERSION - 1, FORMAT_VERSION + 1, 255])
def test_wrong_format_version_is_rejected_with_a_clear_message(version: int) -> None:
    raw = sealed()
    # Correct MAC over the changed version: only the version check can reject it.
    forged = resign(raw[:3] + bytes((version,)) + raw[4:-MAC_SIZE])
    with pytest.raises(SignatureError, match=f"version {version}"):
        Signer(KEY).open(forged)


def test_wrong_key_is_rejected() -> None:
    with pytest.raises(SignatureError, match="NBTASK_SECRET"):
        Signer("another key").open(sealed())


def test_header_length_past_the_end_is_rejected_even_with_a_valid_mac() -> None:
    raw = sealed()
    unsigned = raw[:4] + (10**6).to_bytes(4, "big") + raw[8:-MAC_SIZE]
    with pytest.raises(SignatureError):
        Signer(KEY).open(resign(unsigned))


@pytest.mark.parametrize("head", [b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe{}"])
def test_bad_header_with_a_valid_mac_is_a_signature_error(head: bytes) -> None:
    unsigned = MAGIC + bytes((FORMAT_VERSION,)) + len(head).to_bytes(4, "big") + head + b"body"
    with pytest.raises(SignatureError):
        Signer(KEY).open(resign(unsigned))


# Size limits ------------------------------------------------------------------------------
def test_oversized_at_seal_raises_too_large_naming_the_limit() -> None:
    signer = Signer(KEY, max_bytes=4096)
    with pytest.raises(TooLarge) as info:
        signer.seal(HEADER, b"x" * 5000)
    text = str(info.value)
    assert "4,096" in text or "4096" in text
    assert "max_message_bytes" in text
    assert isinstance(info.value, nbtask.NbtaskError)


def test_exactly_at_the_limit_is_accepted() -> None:
    big = sealed(b"x" * 3000)
    assert Signer(KEY, max_bytes=len(big)).open(big).body == b"x" * 3000
    Signer(KEY, max_bytes=len(big)).seal(HEADER, b"x" * 3000)
    with pytest.raises(TooLarge):
        Signer(KEY, max_bytes=len(big) - 1).seal(HEADER, b"x" * 3000)


def test_oversized_at_open_raises_too_large_naming_the_limit() -> None:
    big = sealed(b"x" * 5000)
    with pytest.raises(TooLarge, match=r"4,096|4096"):
        Signer(KEY, max_bytes=4096).open(big)


def test_oversized_garbage_is_refused_before_anything_else() -> None:
    with pytest.raises(TooLarge):
        Signer(KEY, max_bytes=2048).open(b"\x80" * 10_000)


# Secrets ------------------------------------------------------------------------------------
def test_old_secret_still_verifies_and_the_new_one_signs() -> None:
    old_message = Signer("old").seal(HEADER, b"b")
    rotated = Signer("new", old_secrets=["old"])
    assert rotated.open(old_message).body == b"b"
    new_message = rotated.seal(HEADER, b"b")
    assert Signer("new").open(new_message).body == b"b"
    with pytest.raises(SignatureError):
        Signer("old").open(new_message)
    with pytest.raises(SignatureError):
        Signer("new").open(old_message)  # without old_secrets the old key is refused


def test_several_old_secrets_bytes_and_str() -> None:
    rotated = Signer("new", old_secrets=[b"older", "old"])
    assert rotated.open(Signer("older").seal(HEADER)).header == HEADER
    assert rotated.open(Signer(b"old").seal(HEADER)).header == HEADER
    with pytest.raises(SignatureError):
        rotated.open(Signer("unrelated").seal(HEADER))


@pytest.mark.parametrize("secret", [None, "", b""])
def test_no_secret_raises_configuration_error_naming_nbtask_secret(
    secret: str | bytes | None,
) -> None:
    with pytest.raises(ConfigurationError, match="NBTASK_SECRET"):
        Signer(secret)


def test_insecure_warns_and_still_signs() -> None:
    with pytest.warns(UserWarning, match="insecure"):
        signer = Signer(None, insecure=True)
    raw = signer.seal(HEADER, b"b")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(SignatureError):
            Signer(KEY).open(raw)  # a real secret does not accept the public key
    assert signer.open(raw).body == b"b"


def test_a_real_secret_with_insecure_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Signer(KEY, insecure=True)


# Property: open never does anything but return the original or raise NbtaskError ----------


@pytest.fixture(scope="module")
def trace_envelope(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Path]:
    """A valid envelope whose body, if ever unpickled, creates the trace file."""
    trace = tmp_path_factory.mktemp("trace") / "unpickled"
    body = cloudpickle.dumps(((Touch(trace),), {}))
    return Signer(KEY).seal(HEADER, body), trace


def _check_open(raw: bytes, original: bytes, trace: Path) -> None:
    try:
        env = Signer(KEY, max_bytes=64 * 1024).open(raw)
    except nbtask.NbtaskError:
        pass
    else:
        assert raw == original, "a modified message verified"
        assert dict(env.header) == HEADER
    assert not trace.exists(), "open() unpickled something"


# Bounded: a few seconds in all. The fixture is module-scoped, so sharing it is safe.
BOUNDED = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@settings(BOUNDED, max_examples=1000)
@given(raw=st.binary(max_size=512))
def test_property_arbitrary_bytes(trace_envelope: tuple[bytes, Path], raw: bytes) -> None:
    original, trace = trace_envelope
    _check_open(raw, original, trace)


@settings(BOUNDED, max_examples=1000)
@given(
    raw=st.binary(min_size=8, max_size=128).map(lambda b: MAGIC + bytes((FORMAT_VERSION,)) + b[4:])
)
def test_property_arbitrary_bytes_with_valid_prefix(
    trace_envelope: tuple[bytes, Path], raw: bytes
) -> None:
    original, trace = trace_envelope
    _check_open(raw, original, trace)


@st.composite
def mutations(draw: st.DrawFn, original: bytes) -> bytes:
    raw = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "append"]))
        at = draw(st.integers(0, max(len(raw) - 1, 0)))
        if op == "flip" and raw:
            raw[at] ^= draw(st.integers(1, 255))
        elif op == "set" and raw:
            raw[at] = draw(st.integers(0, 255))
        elif op == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and raw:
            del raw[at : at + draw(st.integers(1, 8))]
        elif op == "truncate":
            del raw[at:]
        elif op == "append":
            raw += draw(st.binary(min_size=1, max_size=8))
    return bytes(raw)


@settings(BOUNDED, max_examples=2500)
@given(data=st.data())
def test_property_mutated_envelope(trace_envelope: tuple[bytes, Path], data: st.DataObject) -> None:
    original, trace = trace_envelope
    raw = data.draw(mutations(original))
    _check_open(raw, original, trace)


def test_the_trace_body_really_leaves_a_trace(trace_envelope: tuple[bytes, Path]) -> None:
    """Control for the properties: loading the verified body does create the file."""
    original, trace = trace_envelope
    env = Signer(KEY).open(original)
    assert not trace.exists()
    env.load_body()
    assert trace.exists()
    trace.unlink()
