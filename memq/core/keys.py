"""Every Redis key memq writes lives under one prefix, with a format version in it.

| key                                       | what                                            | written by   |
|-------------------------------------------|-------------------------------------------------|--------------|
| ``memq:v1:ver:<tenant digest>:<type>``    | a tenant's data version per memory type (INCR)  | store/forget |
| ``memq:v1:chg:<tenant digest>:<type>``    | the change log beside that version: one JSON    | store/forget |
|                                           | entry per bump, the stored ``_id`` s it touched |              |
|                                           | or all (bounded list, TTL)                      |              |
| ``memq:v1:res:<fingerprint>:<versions>``  | a cached retrieval result (JSON envelope, TTL)  | merge        |
| ``memq:v1:lock:<fingerprint>:<versions>`` | the single-flight lock of that result (PX)      | the client   |
| ``memq:v1:emb:<digest of model, text>``   | a cached embedding (format byte + float32, TTL) | embed tasks  |
| ``memq:v1:dims:<digest of model>``        | the model's dimension (no TTL)                  | embed worker |
| ``memq:v1:dead``                          | dead-lettered messages (JSON, newest first)     | workers      |
| ``memq:v1:dead:msg:<letter id>``          | a dead letter's whole message (TTL)             | workers      |
| ``memq:v1:started:<task id>``             | redeliveries of a message that started running  | workers      |
|                                           | and never finished (1 day TTL)                  |              |

``<fingerprint>`` is ``sha256`` of the request's identity (see ``memq.client.edge.cache_identity``) and
``<versions>`` the requested types' data versions joined by ``.``: a write bumps a version, so the
entries written before it can no longer be named (nothing is scanned or deleted; they expire by TTL).
Bump ``PREFIX`` when a key's layout changes; the values carry their own format version too. A stored memory's
MongoDB ``_id`` (``memory_object_id``) is data, not a Redis key, with its own ``OBJECT_ID_FORMAT`` (README, "Stored
ids and their migration").
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

PREFIX = "memq:v1"
RESULT_PREFIX = f"{PREFIX}:res:"
LOCK_PREFIX = f"{PREFIX}:lock:"
FINGERPRINT_CHARS = 40


DEAD_LETTERS = f"{PREFIX}:dead"


def started_count(task_id: str) -> str:
    return f"{PREFIX}:started:{_digest(task_id)}"


def dead_message(letter_id: str) -> str:
    return f"{DEAD_LETTERS}:msg:{letter_id}"


def tenant_version(memory_id: str, memory_type: str) -> str:
    return f"{PREFIX}:ver:{_digest(memory_id)}:{memory_type}"


def change_log(memory_id: str, memory_type: str) -> str:
    """The change log of ``tenant_version(memory_id, memory_type)``, written with it in one step."""
    return f"{PREFIX}:chg:{_digest(memory_id)}:{memory_type}"


def result_cache(suffix: str) -> str:
    """``suffix``: ``<fingerprint>:<versions>``."""
    return f"{RESULT_PREFIX}{suffix}"


def result_key(fingerprint: str, versions: list[int]) -> str:
    """The result cache key of a request fingerprint and the data versions it was answered at."""
    return result_cache(f"{fingerprint}:{'.'.join(str(version) for version in versions)}")


def lock_of(result_key: str) -> str:
    """The single-flight lock that guards ``result_key``."""
    return LOCK_PREFIX + result_key.removeprefix(RESULT_PREFIX)


def fingerprint(identity: Mapping[str, Any]) -> str:
    """A stable digest of a JSON-safe mapping (key order and float formatting cannot change it)."""
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()[:FINGERPRINT_CHARS]


def embedding_cache(model: str, text: str) -> str:
    return f"{PREFIX}:emb:{_digest(model + chr(0) + text)}"


def model_dimensions(model: str) -> str:
    return f"{PREFIX}:dims:{_digest(model)}"


OBJECT_ID_FORMAT = 2


def memory_object_id(memory_id: str, key: str) -> str:
    """The stored ``_id`` (format ``OBJECT_ID_FORMAT``): a digest of the JSON-encoded pair ``[memory_id, key]``,
    an unambiguous encoding, so no two (tenant, key) pairs share an ``_id`` whatever characters they hold."""
    pair = json.dumps([memory_id, key], ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(pair.encode("ascii")).hexdigest()[:32]


def content_key(content: str) -> str:
    return hashlib.sha256(content.encode("utf-8")).hexdigest()[:24]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
