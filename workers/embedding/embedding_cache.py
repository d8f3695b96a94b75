"""The embedding cache: ``memq:v1:emb:<digest of (model, text)>`` → a format byte + float32 little-endian.

Read in one ``MGET``, written in one pipeline for ``settings.embedding_cache_ttl_s`` (0: off). A Redis error is a
miss (then the cache's breaker leaves Redis alone a while): the text is embedded as if there were no cache.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import redis

from memq.client.cache_redis import breaker, cache_redis
from memq.core import keys
from memq.core.settings import get_settings
from memq.workers.plumbing.metrics import CACHE_REQUESTS

log = logging.getLogger(__name__)

FORMAT_BYTE = b"\x01"  # bump when the stored encoding changes: entries of another format read as misses


def encode_vector(vector: np.ndarray) -> bytes:
    return FORMAT_BYTE + np.ascontiguousarray(vector, dtype="<f4").tobytes()


def decode_vector(raw: bytes | None) -> np.ndarray | None:
    if not raw or raw[:1] != FORMAT_BYTE or (len(raw) - 1) % 4 != 0 or len(raw) == 1:
        return None
    return np.frombuffer(raw, dtype="<f4", offset=1)


def lookup(model: str, texts: Sequence[str], client: redis.Redis | None = None) -> list[np.ndarray | None]:
    """One vector (or ``None``: compute it) per text, in order, from one MGET."""
    if not texts or not _usable():
        return [None] * len(texts)
    try:
        raw = (client or cache_redis.get()).mget([keys.embedding_cache(model, text) for text in texts])
    except (redis.RedisError, OSError) as exc:
        breaker.trip(exc)
        CACHE_REQUESTS.labels(cache="embedding", outcome="error").inc(len(texts))
        return [None] * len(texts)
    vectors = [decode_vector(value) for value in raw]
    hits = sum(vector is not None for vector in vectors)
    CACHE_REQUESTS.labels(cache="embedding", outcome="hit").inc(hits)
    CACHE_REQUESTS.labels(cache="embedding", outcome="miss").inc(len(texts) - hits)
    return vectors


def store(model: str, texts: Sequence[str], vectors: Sequence[np.ndarray], client: redis.Redis | None = None) -> bool:
    """Cache freshly computed vectors (one pipeline, one round trip); ``False`` when Redis failed."""
    ttl_s = get_settings().embedding_cache_ttl_s
    if not texts or not _usable():
        return False
    try:
        pipe = (client or cache_redis.get()).pipeline(transaction=False)
        for text, vector in zip(texts, vectors, strict=True):
            pipe.set(keys.embedding_cache(model, text), encode_vector(vector), ex=ttl_s)
        pipe.execute()
    except (redis.RedisError, OSError) as exc:
        breaker.trip(exc)
        return False
    return True


_known_dimensions: dict[str, int] = {}  # model -> its dimension, once an embed worker has published it


def publish_dimensions(model: str, dimensions: int) -> None:
    """Tell the fleet ``model``'s dimension (an embed worker that loaded it, at start): searches and stores check
    the vectors they receive against it. A Redis error is logged; those checks then wait for the next embed worker."""
    try:
        cache_redis.get().set(keys.model_dimensions(model), dimensions)
    except (redis.RedisError, OSError) as exc:
        log.warning("could not publish the dimension of %s (%s): searches check vectors once one is", model, exc)


def model_dimensions(model: str) -> int | None:
    """The dimension an embed worker published for ``model`` (kept in this process once read), or ``None`` while
    none has or Redis does not answer."""
    if model not in _known_dimensions and not breaker.is_open():
        try:
            raw = cache_redis.get().get(keys.model_dimensions(model))
        except (redis.RedisError, OSError) as exc:
            breaker.trip(exc)
            return None
        if raw is not None and raw.isdigit():
            _known_dimensions[model] = int(raw)
    return _known_dimensions.get(model)


def _usable() -> bool:
    return get_settings().embedding_cache_ttl_s > 0 and not breaker.is_open()
