"""Bytes anyone with broker access can write: sealed messages flipped, cut and re-signed.

Shared by the tests that feed forged, tampered and truncated messages to a worker and to a
client (DESIGN §4, §9).
"""

from __future__ import annotations

import hashlib
import hmac

import cloudpickle
from helpers import SECRET

MARKER_TASK = "tests.sample_tasks.slow_marker"
ADD_TASK = "tests.sample_tasks.add"
MAC_SIZE = 32


def pickled(value: object) -> bytes:
    data: bytes = cloudpickle.dumps(value, protocol=5)
    return data


def flip(raw: bytes, index: int) -> bytes:
    return raw[:index] + bytes((raw[index] ^ 0x01,)) + raw[index + 1 :]


def header_span(raw: bytes) -> tuple[int, int]:
    """``(start, end)`` of the JSON header inside a sealed message."""
    length = int.from_bytes(raw[4:8], "big")
    return 8, 8 + length


def resign(raw_unsigned: bytes, key: str = SECRET) -> bytes:
    return raw_unsigned + hmac.new(key.encode(), raw_unsigned, hashlib.sha256).digest()
