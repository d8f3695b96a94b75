"""``memq status``: the fleet at a glance, from the outside (docs/operations.md, "Health: `memq status`"): services,
queue depths, every worker's ``memq_info`` reply, and stale shards (``search.<s>`` outside ``MEMQ_SEARCH_SHARDS``
holding messages or served). ``ok``: every service answers, every queue has a worker, no stale shard holds messages
without one. Imports no torch; pymongo only to ping MongoDB.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import redis
from kombu import Connection
from kombu.utils.url import maybe_sanitize_url

from memq.core import broker, names, sharding
from memq.core.settings import Settings, get_settings
from memq.ops import dead_letters

STATUS_TIMEOUT_S = 1.0


def collect_status(settings: Settings | None = None, timeout_s: float = STATUS_TIMEOUT_S) -> dict[str, Any]:
    settings = settings or get_settings()
    amqp = broker.is_amqp(settings.broker_url)
    redis_url = settings.cache_redis_url if amqp else settings.broker_url
    redis_state = reachability(redis_url, lambda: broker_redis(redis_url, timeout_s).ping())
    broker_state = (
        reachability(settings.broker_url, lambda: amqp_ping(settings.broker_url, timeout_s)) if amqp else redis_state
    )
    mongo_state = reachability(settings.mongodb_uri, lambda: mongo_ping(settings, int(timeout_s * 1000)))
    workers: dict[str, dict[str, Any]] = {}
    all_queues = fleet_queues(settings.search_shards)
    depths: dict[str, int | None] = dict.fromkeys(all_queues)
    stale: list[str] = []
    if broker_state["reachable"]:  # never block on a broker that is down
        from memq.client.app import app

        workers = worker_infos(app, timeout_s)
        if not amqp:
            served = {queue for info in workers.values() for queue in info["queues"]}
            with broker_redis(settings.broker_url, timeout_s) as client:
                stale = stale_shard_queues(client, all_queues, served)
        depths = queue_depths(app, [*all_queues, *stale])
    queues = {
        queue: {
            "depth": depths[queue],
            "workers": sorted(host for host, info in workers.items() if queue in info["queues"]),
            "stale": queue in stale,
        }
        for queue in (*all_queues, *stale)
    }
    unserved = [
        queue for queue, state in queues.items() if not state["workers"] and (not state["stale"] or state["depth"])
    ]
    reachable = broker_state["reachable"] and redis_state["reachable"]
    return {
        "ok": reachable and mongo_state["reachable"] and not unserved,
        "broker": broker_state,
        "redis": redis_state,
        "mongodb": mongo_state,
        "queues": queues,
        "workers": workers,
        "unserved_queues": unserved,
        "dead_letters": dead_letters.count() if reachable else None,
    }


def fleet_queues(search_shards: int) -> tuple[str, ...]:
    """The queues a healthy fleet serves: embed, search (merge), ingest, and each search shard."""
    shards = sharding.search_queues(search_shards) if search_shards > 1 else []
    return (*names.QUEUES, *shards)


def stale_shard_queues(client: redis.Redis, current: Sequence[str], served: Iterable[str] = ()) -> list[str]:
    """Shard queues outside ``current`` that hold messages (their Redis list exists) or that a worker in ``served``
    takes: what a change of ``MEMQ_SEARCH_SHARDS`` leaves behind. One round trip of EXISTS over every possible
    shard queue (``sharding.MAX_SHARDS``), whatever else the broker's database holds."""
    candidates = [queue for queue in sharding.search_queues(sharding.MAX_SHARDS) if queue not in set(current)]
    pipe = client.pipeline(transaction=False)
    for queue in candidates:
        pipe.exists(queue)
    holding = {queue for queue, exists in zip(candidates, pipe.execute(), strict=True) if exists}
    found = holding | (set(served) & set(candidates))
    return sorted(found, key=lambda queue: int(queue.rpartition(".")[2]))


def broker_redis(url: str, timeout_s: float) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)


def reachability(url: str, ping: Callable[[], Any]) -> dict[str, Any]:
    """``url`` (without its password), whether ``ping`` returned, and if not its error's first line; ``ping``'s
    dictionary, if it returns one, is added."""
    state: dict[str, Any] = {"url": maybe_sanitize_url(url), "reachable": False, "error": None}
    try:
        answer = ping()
    except Exception as exc:  # any failure of any client library: the service is unreachable, with the reason
        state["error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
        return state
    return {**state, "reachable": True, **(answer if isinstance(answer, dict) else {})}


def amqp_ping(url: str, timeout_s: float) -> None:
    with Connection(url, connect_timeout=timeout_s) as connection:
        connection.ensure_connection(max_retries=1, timeout=timeout_s)


def mongo_ping(settings: Settings, timeout_ms: int) -> dict[str, Any]:
    import pymongo

    client: pymongo.MongoClient = pymongo.MongoClient(
        settings.mongodb_uri, serverSelectionTimeoutMS=timeout_ms, connectTimeoutMS=timeout_ms, appname="memq-status"
    )
    try:
        client.admin.command("ping")
        return {"search_indexes": search_index_states(client[settings.mongodb_db], settings)}
    finally:
        client.close()


def search_index_states(database: Any, settings: Settings) -> dict[str, Any]:
    """Per memory type collection that exists: the state of memq's vector and search index (ready, building,
    missing, failed), or ``unknown`` where the server lists no search indexes (mongod, nx-27017)."""
    from pymongo.errors import OperationFailure

    from memq.core.memory_types import MemoryType
    from memq.workers.search.index_readiness import state_from_documents

    existing = set(database.list_collection_names())
    states: dict[str, Any] = {}
    for collection in (memory_type.value for memory_type in MemoryType if memory_type.value in existing):
        try:
            documents = list(database[collection].list_search_indexes())
        except OperationFailure:
            states[collection] = "unknown"
        else:
            states[collection] = {
                name: state_from_documents(documents, name) for name in (settings.vector_index, settings.text_index)
            }
    return states


def queue_depths(app: Any, queues: tuple[str, ...] | list[str]) -> dict[str, int | None]:
    """Messages waiting per queue. A Redis queue with nothing waiting has no key: that reads as 0."""
    from kombu.exceptions import ChannelError

    depths: dict[str, int | None] = {}
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        for queue in queues:
            try:
                depths[queue] = int(channel.queue_declare(queue=queue, passive=True).message_count)
            except ChannelError:  # Redis: no key; RabbitMQ: no such queue (and the channel is closed)
                depths[queue] = 0
                channel = connection.channel()
    return depths


def worker_infos(app: Any, timeout_s: float) -> dict[str, dict[str, Any]]:
    """Each worker's ``memq_info`` reply by hostname; a worker without the command still shows up."""
    replies = app.control.broadcast(names.INFO_COMMAND, reply=True, timeout=timeout_s) or []
    infos = {hostname: info for reply in replies for hostname, info in reply.items()}
    return {hostname: normalised_info(hostname, infos[hostname]) for hostname in sorted(infos)}


def normalised_info(hostname: str, info: Any) -> dict[str, Any]:
    if not isinstance(info, dict) or "error" in info:
        error = info.get("error") if isinstance(info, dict) else repr(info)
        return {"kind": hostname.split("@", 1)[0], "queues": [], "error": str(error)}
    return info


def format_status(status: dict[str, Any]) -> str:
    lines = [f"memq status: {'ok' if status['ok'] else 'NOT OK'}"]
    if status.get("unserved_queues"):
        lines.append(f"  no worker serves: {', '.join(status['unserved_queues'])}")
    stale = [queue for queue, state in status["queues"].items() if state["stale"]]
    if stale:
        lines.append(f"  stale shards (outside MEMQ_SEARCH_SHARDS): {', '.join(stale)}")
    shown = ("redis", "mongodb") if status["broker"] is status["redis"] else ("broker", "redis", "mongodb")
    for name in shown:
        service = status[name]
        state = "reachable" if service["reachable"] else f"UNREACHABLE ({service['error']})"
        lines.append(f"  {name:<8} {service['url']}  {state}")
    for collection, indexes in (status["mongodb"].get("search_indexes") or {}).items():
        shown = indexes if isinstance(indexes, str) else ", ".join(f"{n} {s}" for n, s in indexes.items())
        lines.append(f"    search indexes on {collection}: {shown}")
    lines.append("")
    lines += _table(
        ["QUEUE", "DEPTH", "WORKERS"],
        [
            [queue + (" (stale)" if q["stale"] else ""), _text(q["depth"]), ", ".join(q["workers"]) or "NONE"]
            for queue, q in status["queues"].items()
        ],
    )
    lines.append("")
    lines += _table(
        ["WORKER", "KIND", "QUEUES", "POOL", "ACTIVE", "RSS MiB", "MODEL", "DEVICE", "DIM"],
        [_worker_row(hostname, info) for hostname, info in status["workers"].items()] or [["(none)"] + [""] * 8],
    )
    lines += ["", f"  dead letters: {_text(status.get('dead_letters'))} (memq dead-letters lists them)"]
    return "\n".join(lines)


def _worker_row(hostname: str, info: dict[str, Any]) -> list[str]:
    if "error" in info:
        return [hostname, info["kind"], "", "", "", "", f"error: {info['error']}", "", ""]
    pool = info.get("pool") or {}
    model = info.get("model") or {}
    return [
        hostname,
        info["kind"] or "?",
        ",".join(info["queues"]),
        f"{pool.get('implementation', '?')} x{pool.get('concurrency', '?')}",
        _text(info.get("active_tasks")),
        resident_text(info),
        *([_text(model.get(key)) for key in ("name", "device", "dimensions")] if model else ["-"] * 3),
    ]


def resident_text(info: dict[str, Any]) -> str:
    """A worker's resident memory in MiB, and a search worker's budget (``MEMQ_SEARCH_MAX_RSS_BYTES``) beside it."""
    rss = info.get("rss_bytes")
    budget = (info.get("memory_guard") or {}).get("max_rss_bytes")
    shown = "?" if rss is None else f"{rss / 2**20:,.0f}"
    return f"{shown} / {budget / 2**20:,.0f}" if budget else shown


def _text(value: Any) -> str:
    return "?" if value is None else str(value)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
