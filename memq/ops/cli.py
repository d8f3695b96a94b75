"""The ``memq`` command line. ``--json`` prints machine-readable output."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from memq.core import broker, names
from memq.core.letters import printable
from memq.errors import ConfigError, InvalidInput, MemqError

WORKER_DEFAULTS: dict[str, list[str]] = {
    # One process, threads share the model; never forks after CUDA is initialised.
    "embed": ["--pool", "threads", "--concurrency", "4"],
    # I/O-bound Mongo queries and numpy (releases the GIL); threads share one Mongo pool and matrix cache.
    # Prefetch 1: a merge's message holds every type's results (MBs at k=100 over long memories); at Celery's default
    # of 4 a busy worker held 32 of them, decoded (README, "Memory under the heaviest retrievals").
    "search": ["--pool", "threads", "--concurrency", "8", "--prefetch-multiplier", "1"],
    "ingest": ["--pool", "threads", "--concurrency", "2"],
}
GUARDED_REDIS_TRANSPORT = "memq.workers.plumbing.poison_guard:GuardedRedisTransport"
GUARDED_AMQP_TRANSPORT = "memq.workers.plumbing.amqp_poison_guard:GuardedAmqpTransport"
WORKER_USAGE = "usage: memq worker embed|search|ingest [--device cuda:N | --gpus 0,1] [celery worker args...]"
MAX_JSONL_DEPTH = 32  # levels of nesting in one JSONL line; the line's object is level 1
MAX_JSONL_LINE_BYTES = 16 * 1024 * 1024  # one line is read whole; a file is never read whole
Numbered = Iterator[tuple[int, dict[str, Any]]]  # (line number, the object on that line)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:
        return run_worker(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except InvalidInput as exc:
        return _fail(args, "invalid_input", str(exc), field=exc.field)
    except MemqError as exc:
        return _fail(args, type(exc).__name__, str(exc))


def _fail(args: argparse.Namespace, kind: str, message: str, **extra: str) -> int:
    if not getattr(args, "json", False):
        return _error(message)
    print(json.dumps({"error": kind, "message": message, **extra}))
    return 2


def _error(message: object) -> int:
    """One line on stderr, no traceback; exit status 2."""
    print(f"memq: error: {message}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memq", description="Celery retrieval workers for agent memory.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("worker", help="start a worker: memq worker embed|search|ingest [celery worker args]")
    printing: list[argparse.ArgumentParser] = []  # the commands with --json (added last, as their help lists it)

    def command(name: str, handler: Any, help: str, json: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.set_defaults(handler=handler)
        if json:
            printing.append(p)
        return p

    p = command("remember", cmd_remember, "embed and store memories")
    p.add_argument("--memory-id", required=True)
    p.add_argument("--type", required=True, dest="memory_type")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text")
    source.add_argument(
        "--file", type=Path, help="JSONL, any size: one object per line with 'content' (and optional fields)"
    )
    p.add_argument(
        "--skip", type=int, default=0, metavar="N", help="with --file: resume after line N (skip lines 1..N)"
    )

    p = command("retrieve", cmd_retrieve, "retrieve ranked memories")
    p.add_argument("query")
    p.add_argument("--memory-id", required=True)
    p.add_argument("--limit", action="append", required=True, metavar="TYPE=K")
    p.add_argument("--weights", metavar="relevance=1,recency=0,importance=0")
    p.add_argument("--timeout-s", type=float, default=None)
    p.add_argument("--mode", help="hybrid (default), vector or lexical")
    p.add_argument("--tag", action="append", dest="tags", metavar="TAG", help="only memories with this tag (repeat)")
    p.add_argument("--all-tags", action="store_true", help="with --tag: memories with every tag, not any")
    p.add_argument("--after", help="only memories created at or after this time (ISO-8601 or Unix seconds)")
    p.add_argument("--before", help="only memories created at or before this time (ISO-8601 or Unix seconds)")
    p.add_argument("--role", help="only memories of this role (e.g. user, assistant)")

    p = command("forget", cmd_forget, "delete a tenant's memories")
    p.add_argument("--memory-id", required=True)
    p.add_argument("--type", dest="memory_type")
    p.add_argument("--id", action="append", dest="ids", metavar="ID")

    p = command("indexes", cmd_indexes, "create indexes (idempotent) and print the Atlas vector index")
    p.add_argument("--dimensions", type=int, default=None, help="default: the embed model's")

    p = command("demo", cmd_demo, "start everything locally, ingest samples, retrieve, stop")
    p.add_argument(
        "--join",
        action="store_true",
        help="where workers already answer on the broker, run through them (namespaced tenants) instead of refusing",
    )

    p = command("status", cmd_status, "workers per queue, queue depths, Redis/MongoDB reachability, models")
    p.add_argument("--timeout-s", type=float, default=1.0, help="how long to wait for worker replies")

    p = command("dead-letters", cmd_dead_letters, "messages the workers quarantined instead of running (newest first)")
    p.add_argument("--limit", type=int, default=100)
    act = p.add_mutually_exclusive_group()
    act.add_argument("--purge", action="store_true", help="remove exactly the letters shown (after showing them)")
    act.add_argument("--purge-all", action="store_true", help="remove every letter; prints how many")
    act.add_argument("--replay", nargs="+", metavar="ID", help="republish these letters' messages to their queues")
    act.add_argument("--replay-all", action="store_true", help="republish every replayable letter's message")

    p = command(
        "broker", cmd_broker, "RabbitMQ: declare memq's topology (idempotent) or print it as definitions", False
    )
    action = p.add_subparsers(dest="broker_command", required=True)
    setup = action.add_parser("setup", help="declare exchanges, quorum queues, dead letters; apply the policy")
    setup.add_argument("--delivery-limit", type=int, default=None, help="the broker's backstop (default 20)")
    setup.add_argument(
        "--management-url", help="apply the policy through the management API: http://user:pw@host:15672"
    )
    setup.add_argument("--rabbitmqctl", metavar="PATH", help="apply the policy with this rabbitmqctl (on a node)")
    printing.append(setup)
    definitions = action.add_parser("definitions", help="print the topology in RabbitMQ's definitions format")
    definitions.add_argument("--vhost", default="/")
    definitions.add_argument("--delivery-limit", type=int, default=None)
    permissions = action.add_parser("permissions", help="print each role's permissions as rabbitmqctl commands")
    permissions.add_argument("--vhost", default="memq")

    p = command("flower", cmd_flower, "Flower for this app; basic auth from MEMQ_FLOWER_BASIC_AUTH", False)
    p.add_argument("--port", type=int, default=5555)
    p.add_argument("--address", default="0.0.0.0")

    p = command("exporter", cmd_exporter, "Prometheus: messages waiting per queue and the oldest one's age", False)
    p.add_argument("--port", type=int, default=9808)
    p.add_argument("--address", default="0.0.0.0")
    p.add_argument("--interval-s", type=float, default=5.0, help="seconds between two reads of the broker")
    for p in printing:
        p.add_argument("--json", action="store_true")
    return parser


def run_worker(argv: list[str]) -> int:
    if not argv or argv[0] not in WORKER_DEFAULTS:
        print(WORKER_USAGE, file=sys.stderr)
        return 2
    kind, extra = argv[0], argv[1:]
    if kind == "embed" and any(arg == "--gpus" or arg.startswith("--gpus=") for arg in extra):
        from memq.workers.embedding.gpu_launcher import run_from_argv

        # Each child gets --device cuda:N; every setting is checked here, before any child starts.
        if settings_error({**os.environ, "MEMQ_EMBED_DEVICE": "cuda"}):
            return 2
        return int(run_from_argv(extra) or 0)  # one pinned embed worker per GPU, supervised together
    device, extra = worker_device(extra)
    if device is not None:
        os.environ["MEMQ_EMBED_DEVICE"] = device
    if settings_error(os.environ):
        return 2
    from memq.core.settings import get_settings

    queues = [kind]
    if kind == "search":  # the memory guard's allocator, before any thread starts
        from memq.workers.search.rss_budget import configure_allocator

        configure_allocator()
        try:
            queues = search_worker_queues(extra, get_settings().search_shards)
        except ValueError as exc:
            return _error(exc)
    from memq.workers import startup

    startup.set_kind(kind)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from memq.client.app import app

    # Worker processes only: envelopes the transport cannot decode are dead-lettered (poison_guard, amqp_poison_guard).
    if str(app.conf.broker_url).startswith(("redis://", "rediss://", "unix://")):
        app.conf.broker_transport = GUARDED_REDIS_TRANSPORT
    elif broker.is_amqp(str(app.conf.broker_url)):
        app.conf.broker_transport = GUARDED_AMQP_TRANSPORT
    from memq.config.celery import worker_overrides

    app.conf.update(worker_overrides(get_settings()))
    args = ["worker", "-Q", ",".join(queues), *WORKER_DEFAULTS[kind]]
    if not any(a in ("-n", "--hostname") or a.startswith("--hostname=") for a in extra):
        args += ["-n", f"{kind}@%h"]
    app.worker_main([*args, *extra])
    return 0


def worker_device(extra: list[str]) -> tuple[str | None, list[str]]:
    """``--device X`` (or ``--device=X``) taken out of a worker's arguments; a missing value is a usage error (exit
    status 2, argparse's one line)."""
    parser = argparse.ArgumentParser(prog="memq worker", add_help=False, allow_abbrev=False)
    parser.add_argument("--device", help="the embed worker's device: cpu, cuda, cuda:N or mps")
    known, rest = parser.parse_known_args(extra)
    return known.device, rest


def settings_error(env: Mapping[str, str]) -> bool:
    """Whether a worker must refuse to start: a bad ``MEMQ_*`` value, or a ``MEMQ_REMOTE_CONTROL`` naming a command the
    worker lacks (a misspelled list must not leave its remote control open); said in one line naming the variable."""
    from memq.core.settings import Settings
    from memq.workers.plumbing.remote_control import check_remote_control

    try:
        check_remote_control(Settings.from_env(env).remote_control)
    except ConfigError as exc:
        _error(exc)
        return True
    return False


def search_worker_queues(extra: list[str], search_shards: int) -> list[str]:
    """``--shards 0,2`` or ``--shards=0,2`` (taken out of ``extra``): the shard queues this search worker serves
    with ``search_shards`` shards, beside the shared ``search`` queue every search worker serves (merge runs there;
    so do all searches without shards)."""
    from memq.core import sharding

    given = [at for at, arg in enumerate(extra) if arg == "--shards" or arg.startswith("--shards=")]
    if not given:
        return [names.SEARCH_QUEUE]
    if len(given) > 1:
        raise ValueError("--shards is given more than once; list every shard once, e.g. --shards 0,2")
    at = given[0]
    if extra[at] == "--shards":
        if at + 1 >= len(extra):
            raise ValueError("--shards needs a value, e.g. --shards 0,2")
        spec, taken = extra[at + 1], 2
    else:
        spec, taken = extra[at].partition("=")[2], 1
    chosen = sharding.parse_shards(spec, search_shards)
    del extra[at : at + taken]
    return [names.SEARCH_QUEUE, *(sharding.shard_queue(s) for s in chosen)]


def parse_pairs(values: Sequence[str], field: str, number: type) -> dict[str, Any]:
    pairs: dict[str, Any] = {}
    for value in values:
        for part in value.split(","):
            name, sep, raw = part.partition("=")
            if not sep or not name.strip():
                raise InvalidInput(field, f"expected NAME=VALUE, got {part!r}")
            try:
                pairs[name.strip()] = number(raw)
            except ValueError:
                raise InvalidInput(field, f"{name.strip()}: {raw!r} is not a number") from None
    return pairs


def filters_from(args: argparse.Namespace) -> dict[str, Any] | None:
    """The retrieve command's filter flags as ``retrieve``'s ``filters`` (checked there, like any caller's)."""
    filters = {
        "tags": args.tags,
        "tags_match": "all" if args.all_tags else None,
        "created_after": _seconds_or_text(args.after),
        "created_before": _seconds_or_text(args.before),
        "role": args.role,
    }
    return {name: value for name, value in filters.items() if value is not None} or None


def _seconds_or_text(flag: str | None) -> float | str | None:
    try:
        return None if flag is None else float(flag)
    except ValueError:  # an ISO-8601 time
        return flag


def json_depth(value: Any) -> int:
    """How deeply parsed JSON nests: a scalar is 0, ``{}`` and ``[]`` are 1, ``[[1]]`` is 2 (no recursion)."""
    deepest = 0
    pending = [(value, 1)]
    while pending:
        node, depth = pending.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, depth)
            pending.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def iter_jsonl(path: Path, after_line: int = 0) -> Numbered:
    """``(line number, object)`` for each non-blank line after ``after_line``, read lazily (lines up to
    ``after_line`` are read, not parsed); a line that is not UTF-8 JSON, not an object, nested deeper than
    ``MAX_JSONL_DEPTH`` or longer than ``MAX_JSONL_LINE_BYTES`` is ``InvalidInput`` naming the line."""
    try:
        with path.open("rb") as handle:
            number = 0
            while raw := handle.readline(MAX_JSONL_LINE_BYTES + 1):
                number += 1
                if len(raw) > MAX_JSONL_LINE_BYTES:
                    raise InvalidInput("file", f"line {number}: longer than {MAX_JSONL_LINE_BYTES} bytes")
                if number > after_line and raw.strip():
                    yield number, parse_jsonl_line(raw, number)
    except OSError as exc:
        raise InvalidInput("file", f"cannot read {path}: {exc}") from None


def parse_jsonl_line(raw: bytes, number: int) -> dict[str, Any]:
    too_deep = f"nested deeper than {MAX_JSONL_DEPTH} levels"
    try:
        item = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        why = "not UTF-8 text"
    except json.JSONDecodeError as exc:
        why = f"not JSON ({exc.msg})"
    except ValueError:  # e.g. an integer of more digits than Python converts
        why = "not JSON memq can read"
    except RecursionError:  # json.loads of a line nested thousands deep
        why = too_deep
    else:
        depth = json_depth(item)
        if depth <= MAX_JSONL_DEPTH and isinstance(item, dict):
            return item
        why = too_deep if depth > MAX_JSONL_DEPTH else "expected an object with 'content'"
    raise InvalidInput("file", f"line {number}: {why}")


def count_lines(path: Path) -> int:
    """The file's lines, counted in one pass of 1 MiB reads (for ``--skip`` and the progress line's total)."""
    lines, last = 0, b"\n"
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                lines += chunk.count(b"\n")
                last = chunk[-1:]
    except OSError as exc:
        raise InvalidInput("file", f"cannot read {path}: {exc}") from None
    return lines + (last != b"\n")


class ProgressLine:
    """One ``\\r``-rewritten line on stderr (only when stderr is a terminal): lines stored, rate, time left."""

    def __init__(self, total_lines: int, first_line: int) -> None:
        self.total, self.first, self.started, self.shown = total_lines, first_line, time.monotonic(), False

    def show(self, progress: Any) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        text = f"memq: line {progress.stored_through:,}"
        if self.total:
            done = (progress.stored_through - self.first) / max(self.total - self.first, 1)
            left = (self.total - progress.stored_through) * elapsed / max(progress.stored_through - self.first, 1)
            text += f"/{self.total:,} ({100 * done:.0f}%), about {left:.0f} s left"
        sys.stderr.write(f"\r{text}, {progress.items / elapsed:,.0f} memories/s   ")
        sys.stderr.flush()
        self.shown = True

    def end(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            self.shown = False


def cmd_remember(args: argparse.Namespace) -> int:
    if args.file is not None:
        return remember_file(args)
    if args.skip:
        raise InvalidInput("skip", "only with --file")
    items = [{"content": args.text}]
    check_before_the_client_loads("remember", args.memory_id, args.memory_type, items)
    from memq.client.api import remember

    result = remember(args.memory_id, args.memory_type, items)
    failed = result.get("failed") or []
    print(json.dumps(result) if args.json else stored_line(len(result["ids"]) - len(failed), result))
    for entry in [] if args.json else failed:
        print(f"memq: not written: item {entry['index']} ({entry['reason']})", file=sys.stderr)
    return 1 if failed else 0


def remember_file(args: argparse.Namespace) -> int:
    """Streams the file through ``remember_numbered`` (batches of ``field_rules.MAX_BATCH_ITEMS``, a few in
    flight). The first batch's lines are read and checked before the client (Celery, numpy) is imported: a file
    refused there costs no client start."""
    from memq.errors import IngestStopped

    if args.skip < 0:
        raise InvalidInput("skip", f"must be a line number >= 0, got {args.skip}")
    lines = count_lines(args.file)
    if args.skip > lines:
        raise InvalidInput("skip", f"past the end: {args.file} has {lines} line(s), --skip {args.skip}")
    bar = None
    try:
        numbered = first_batch_checked(args, iter_jsonl(args.file, args.skip))
        from memq.client.api import remember_numbered

        bar = ProgressLine(lines, args.skip) if sys.stderr.isatty() and not args.json else None
        on_progress = bar.show if bar else None
        summary = remember_numbered(
            args.memory_id, args.memory_type, numbered, stored_through=args.skip, unit="line", on_progress=on_progress
        )
    except IngestStopped as exc:
        return stopped_import(args, exc, bar)
    if bar:
        bar.end()
    if summary["items"] == 0 and args.skip == 0:
        raise InvalidInput("file", f"{args.file} holds no memories")
    batches = f"in {summary['batches']} batch(es) through line {summary['stored_through']}"
    print(json.dumps(summary) if args.json else f"{stored_line(summary['items'], summary)}, {batches}")
    return 0


def stored_line(items: int, result: dict[str, Any]) -> str:
    counts = f"({result['inserted']} new, {result['updated']} updated)"
    return f"stored {items} memories in {result['type']} {counts} for {result['memory_id']}"


def first_batch_checked(args: argparse.Namespace, numbered: Numbered) -> Numbered:
    """``numbered`` unchanged, once its first batch has been read and checked item by item as ``remember_numbered``
    checks it (a bad line: ``InvalidItem``, nothing stored after ``--skip``)."""
    from memq.client import bulk_items
    from memq.core.field_rules import MAX_BATCH_ITEMS

    progress = bulk_items.progress_before(args.memory_id, args.memory_type, args.skip)
    head = []
    try:
        for position, item in itertools.islice(numbered, MAX_BATCH_ITEMS):
            bulk_items.checked_item(position, item, "line")
            head.append((position, item))
    except InvalidInput as exc:
        raise bulk_items.invalid_item(exc, progress) from None
    return itertools.chain(head, numbered)


def stopped_import(args: argparse.Namespace, exc: Any, bar: ProgressLine | None = None) -> int:
    """One line: the error, what is stored (every line up to ``stored_through``) and the ``--skip`` that resumes.
    Exit 2 for a line memq refuses (``InvalidItem``), else 1."""
    if bar:
        bar.end()
    through = exc.stored_through
    stored = f"lines 1..{through} are stored; rerun with --skip {through} to resume" if through else "nothing is stored"
    refused = isinstance(exc, InvalidInput)
    if args.json:
        error = {"error": "invalid_input", "field": exc.field} if refused else {"error": "stopped"}
        print(json.dumps({**error, "message": exc.reason, "stored_through": through, "summary": exc.summary}))
    else:
        where = f"{exc.field}: " if refused else ""
        print(f"memq: error: {where}{exc.reason}; {stored}", file=sys.stderr)
    return 2 if refused else 1


def cmd_retrieve(args: argparse.Namespace) -> int:
    limits = parse_pairs(args.limit, "limit", int)
    weights = parse_pairs([args.weights], "weights", float) if args.weights else None
    filters = filters_from(args)
    check_before_the_client_loads(
        "retrieve", args.query, args.memory_id, limits, weights, args.timeout_s, None, args.mode, filters
    )
    from memq.client.api import retrieve

    result = retrieve(
        args.query, args.memory_id, limits, weights=weights, timeout_s=args.timeout_s, mode=args.mode, filters=filters
    )
    print(json.dumps(result) if args.json else format_result(result))
    return 0


def format_result(result: dict[str, Any]) -> str:
    """A retrieval for a person (``memq retrieve`` and the demo): each type's items, best first, then errors and
    timings."""
    lines = [f"query: {result['query']!r}  memory_id: {result['memory_id']}  cached: {result.get('cached')}"]
    for memory_type, items in result["results"].items():
        lines.append(f"  {memory_type} ({len(items)})")
        for item in items:
            scores = item.get("scores", {})
            parts = [f"{name}={scores[name]:.3f}" for name in ("vector", "lexical") if scores.get(name) is not None]
            lines.append(f"    {item['memory_signal']:.3f}  {' '.join(parts)}  {item['content'][:80]}")
    for memory_type, message in result.get("errors", {}).items():
        lines.append(f"  {memory_type}: ERROR {message}")
    if timings := result.get("timings_ms", {}):
        lines.append("  timings_ms: " + json.dumps(_rounded(timings)))
    return "\n".join(lines)


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 2)
    return {k: _rounded(v) for k, v in value.items()} if isinstance(value, dict) else value


def cmd_forget(args: argparse.Namespace) -> int:
    check_before_the_client_loads("forget", args.memory_id, args.memory_type, args.ids)
    from memq.client.api import forget

    result = forget(args.memory_id, args.memory_type, args.ids)
    deleted = f"deleted {sum(result['deleted'].values())} memories of {result['memory_id']}"
    print(json.dumps(result) if args.json else deleted)
    return 0


def check_before_the_client_loads(command: str, *arguments: Any) -> None:
    """Reads the arguments as the client will (``memq.client.edge``, ``InvalidInput`` naming the field) without
    importing the client (Celery, its Redis client): bad input exits 2 without paying for their start-up."""
    from memq.client import edge
    from memq.core.settings import get_settings

    if command == "retrieve":
        edge.retrieval_request(get_settings(), *arguments)
    elif command == "remember":
        edge.remember_request(get_settings(), *arguments)
    else:
        edge.forget_request(*arguments)


def cmd_indexes(args: argparse.Namespace) -> int:
    from memq.client.api import create_indexes

    result = create_indexes(args.dimensions)
    if args.json:
        print(json.dumps(result))
        return 0
    for memory_type, created in result["indexes"].items():
        vector, text = result["vector_indexes"].get(memory_type), result["text_indexes"].get(memory_type)
        print(f"{memory_type}: {', '.join(created)}; vector index: {vector}; search index: {text}")
    vector_index, text_index = (json.dumps(result[f"{kind}_index_definition"], indent=2) for kind in ("vector", "text"))
    print(f"Atlas Vector Search index definition:\n{vector_index}")
    print(f"Atlas Search index definition (hybrid and lexical modes):\n{text_index}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from memq.ops.demo import run_demo

    return run_demo(as_json=args.json, join=args.join)


def cmd_status(args: argparse.Namespace) -> int:
    from memq.ops.status import collect_status, format_status

    status = collect_status(timeout_s=args.timeout_s)
    print(json.dumps(status) if args.json else format_status(status))
    return 0 if status["ok"] else 1


def cmd_dead_letters(args: argparse.Namespace) -> int:
    """Every failure is one line (exit status 2), never a traceback."""
    import amqp.exceptions
    import kombu.exceptions
    import redis

    try:
        return dead_letters_command(args)
    except (OSError, redis.RedisError, kombu.exceptions.OperationalError, amqp.exceptions.AMQPError) as exc:
        return _fail(args, "unavailable", f"dead letters unavailable: {type(exc).__name__}: {exc}"[:300])


def dead_letters_command(args: argparse.Namespace) -> int:
    from memq.ops import dead_letters

    show = printable  # the listing's columns, below
    if args.replay is not None or args.replay_all:
        replayed = dead_letters.replay(None if args.replay_all else args.replay)
        if args.json:
            print(json.dumps({"replayed": [vars(r) for r in replayed]}))
        for outcome in [] if args.json else replayed:
            print(replay_line(outcome))
        return 0 if all(r.outcome == "replayed" for r in replayed) else 1
    if args.purge_all:
        purged = dead_letters.purge_all()
        print(json.dumps({"purged": purged}) if args.json else f"purged all {purged} dead letter(s)")
        return 0
    letters = dead_letters.listed(limit=args.limit)
    purged = dead_letters.purge(letters) if args.purge else None
    if args.json:
        print(json.dumps({"dead_letters": [letter.fields for letter in letters], "purged": purged}))
        return 0
    for fields in (letter.fields for letter in letters):
        replay_note = show(fields.get("replay"), 120) if fields.get("replay") else "preview only"
        print(
            f"{float(fields.get('at') or 0):.3f}  {show(fields.get('id', ''), 32)}  {show(fields.get('queue'), 8):<8} "
            f"{show(fields.get('reason'), 24):<20} {show(fields.get('detail'), 200)}  [{replay_note}]"
        )
        print(f"    headers: {show(fields.get('headers'))}\n    body:    {show(fields.get('body'))}")
    print(f"{len(letters)} dead letter(s) shown" + (f"; purged those {purged}" if purged is not None else ""))
    return 0


def replay_line(outcome: Any) -> str:
    line = f"{printable(outcome.id, 40)}  {outcome.outcome}"
    if outcome.outcome == "replayed":
        line += f" -> {outcome.queue} (task {printable(outcome.task_id, 40)})"
    return line + (f": {printable(outcome.detail, 300)}" if outcome.detail else "")


def cmd_broker(args: argparse.Namespace) -> int:
    from memq.core.settings import get_settings

    if args.broker_command == "permissions":
        print("\n".join(broker.permission_commands(args.vhost)))
        return 0
    limit = broker.DEFAULT_DELIVERY_LIMIT if args.delivery_limit is None else args.delivery_limit
    if args.broker_command == "definitions":
        print(json.dumps(broker.definitions(args.vhost, get_settings().search_shards, limit), indent=2))
        return 0
    from memq.ops.broker_setup import setup

    report = setup(get_settings(), limit, args.management_url, args.rabbitmqctl)
    if args.json:
        print(json.dumps(vars(report)))
        return 0
    print(f"vhost {report.vhost}: exchanges {', '.join(report.exchanges)}; quorum queues {', '.join(report.queues)}")
    if report.policy_applied_by:
        print(f"policy {report.policy['name']} applied ({report.policy_applied_by}): {report.policy['definition']}")
    else:
        print(
            f"policy {report.policy['name']} NOT applied (give --management-url or --rabbitmqctl); apply: "
            f"{json.dumps(report.policy)}"
        )
        return 1
    return 0


def cmd_flower(args: argparse.Namespace) -> int:
    """Flower on memq's app until SIGTERM/SIGINT, like ``celery -A memq.client.app flower --basic-auth=...``; the
    credentials reach it through its own ``FLOWER_BASIC_AUTH`` variable, never its command line (``ps``)."""
    from memq.core.settings import get_settings

    credentials = get_settings().flower_basic_auth
    if not all(user and password for user, _, password in (pair.partition(":") for pair in credentials.split(","))):
        raise ConfigError("MEMQ_FLOWER_BASIC_AUTH must be set to user:password (comma-separated for several)")
    os.environ["FLOWER_BASIC_AUTH"] = credentials
    from memq.client.app import app

    return int(app.start(["flower", f"--port={args.port}", f"--address={args.address}"]) or 0)


def cmd_exporter(args: argparse.Namespace) -> int:
    from memq.ops.exporter import run_exporter

    return run_exporter(args.port, args.address, args.interval_s)


if __name__ == "__main__":
    sys.exit(main())
