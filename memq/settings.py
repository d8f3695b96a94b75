"""Typed settings, read from the environment (prefix ``MEMQ_``) once per process.

Every field is documented in the README's configuration table; keep the two in step
(``tests/test_units.py`` checks that each field appears there).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from memq.errors import ConfigError
from memq.sharding import MAX_SHARDS
from memq.validation import MAX_CACHE_TTL_S, MAX_CANDIDATES, MAX_LIMIT, MAX_OVERSAMPLE

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
SEARCH_STRATEGIES = ("auto", "exact", "vector_search")


@dataclass(frozen=True)
class Settings:
    broker_url: str = DEFAULT_REDIS_URL
    result_backend: str = DEFAULT_REDIS_URL
    redis_url: str = ""  # cache and tenant versions; empty means "the broker's Redis"
    mongodb_uri: str = "mongodb://127.0.0.1:27017"
    mongodb_db: str = "memq"
    mongodb_pool_size: int = 16
    mongodb_timeout_ms: int = 3000
    embed_model: str = "all-MiniLM-L6-v2"
    embed_device: str = "auto"
    embed_dimensions: int = 384  # the model's output; store and index creation check vectors against it
    embed_batch_size: int = 64
    search_strategy: str = "auto"
    vector_index: str = "memq_vector"
    text_index: str = "memq_text"  # the Atlas Search index hybrid and lexical search use on Atlas
    num_candidates_factor: int = 20
    candidate_oversample: int = 3
    exact_cache_max_vectors: int = 2_000_000  # a second bound beside exact_cache_max_bytes (the one to size by)
    exact_cache_max_bytes: int = 2 * 1024**3  # vectors, items and BM25 indexes held by each search process
    exact_load_timeout_s: float = 120.0  # how long a search without a deadline waits for a shared tenant load
    recency_half_life_s: float = 7 * 24 * 3600.0
    retrieve_timeout_s: float = 10.0
    max_query_chars: int = 4096
    max_content_chars: int = 32768
    max_batch_items: int = 1000
    max_result_bytes: int = 8 * 1024 * 1024  # one retrieval's items' content + metadata (merge drops past it)
    result_cache_ttl_s: int = 300
    embedding_cache_ttl_s: int = 86400
    single_flight_lock_s: float = 10.0  # how long identical concurrent misses wait on one chord at most
    result_expires_s: int = 600
    visibility_timeout_s: int = 300
    search_max_retries: int = 3
    search_shards: int = 1  # tenant-affinity shards of the search pool (memq.sharding); 1: the shared queue
    max_deliveries: int = 5  # a message redelivered more often is dead-lettered instead of run again
    dead_letter_max: int = 10_000  # dead letters kept (newest first)
    dead_letter_max_bytes: int = 1_048_576  # a dead letter's whole message is kept (for --replay) up to this size
    dead_letter_ttl_s: int = 7 * 24 * 3600  # how long a dead letter's whole message is kept
    remote_control: str = ""  # control commands workers obey beyond the read-only ones (memq.workers.control)
    flower_basic_auth: str = field(default="", repr=False)
    metrics_port: int = 0

    @property
    def cache_redis_url(self) -> str:
        return self.redis_url or self.broker_url

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(f"MEMQ_{f.name.upper()}")
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.name, raw, f.type)
        settings = cls(**values)  # type: ignore[arg-type]
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.search_strategy not in SEARCH_STRATEGIES:
            raise ConfigError(
                f"MEMQ_SEARCH_STRATEGY must be one of {', '.join(SEARCH_STRATEGIES)}, got {self.search_strategy!r}"
            )
        if not 1 <= self.candidate_oversample <= MAX_OVERSAMPLE:
            raise ConfigError(
                f"MEMQ_CANDIDATE_OVERSAMPLE must be in 1..{MAX_OVERSAMPLE}, got {self.candidate_oversample}: "
                f"a limit of {MAX_LIMIT} times it must fit in the {MAX_CANDIDATES} candidates one search returns"
            )
        for name in (
            "mongodb_pool_size",
            "embed_batch_size",
            "embed_dimensions",
            "num_candidates_factor",
            "max_deliveries",
            "dead_letter_max",
            "dead_letter_max_bytes",
            "dead_letter_ttl_s",
            "search_shards",
            "max_result_bytes",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"MEMQ_{name.upper()} must be >= 1")
        if self.search_shards > MAX_SHARDS:
            raise ConfigError(f"MEMQ_SEARCH_SHARDS must be in 1..{MAX_SHARDS}, got {self.search_shards}")
        if self.recency_half_life_s <= 0:
            raise ConfigError("MEMQ_RECENCY_HALF_LIFE_S must be > 0")
        for name in ("result_cache_ttl_s", "embedding_cache_ttl_s"):
            if not 0 <= getattr(self, name) <= MAX_CACHE_TTL_S:
                raise ConfigError(f"MEMQ_{name.upper()} must be in 0..{MAX_CACHE_TTL_S} (0 disables the cache)")
        if self.exact_load_timeout_s <= 0:
            raise ConfigError("MEMQ_EXACT_LOAD_TIMEOUT_S must be > 0")
        if self.single_flight_lock_s <= 0:
            raise ConfigError("MEMQ_SINGLE_FLIGHT_LOCK_S must be > 0")


def _parse(name: str, raw: str, type_name: object) -> object:
    kind = str(type_name)
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ConfigError(f"MEMQ_{name.upper()} must be a number, got {raw!r}") from None
    return raw


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment on first use."""
    return Settings.from_env()
