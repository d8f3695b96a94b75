"""Bulk import of any size (issue #18): ``memq remember --file`` and ``remember_many`` against the real fleet.

With batches of ``memq.core.field_rules.MAX_BATCH_ITEMS`` (1,000), a 2,500-line file is three batches. 100,000 lines are
measured by ``bench/ingest_bench.py``, not here (too slow for the suite on two cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from faultkit import count_stored

from memq.client.api import IngestProgress, remember_many
from memq.errors import IngestStopped, InvalidItem

pytestmark = pytest.mark.usefixtures("fleet")

LINES = 2500


def memq(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "memq.ops.cli", *args], capture_output=True, text=True, timeout=600, env=os.environ
    )


def memory(n: int) -> dict[str, Any]:
    return {"content": f"note {n}: the user mentioned item {n} of the import"}


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def stored(mongo_db: Any, tenant: str) -> int:
    return int(count_stored(mongo_db["long_term_memory"], {"memory_id": tenant}))


def remember_file(tenant: str, path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return memq("remember", "--memory-id", tenant, "--type", "semantic", "--file", str(path), "--json", *extra)


def test_a_file_of_2500_lines_lands_whole_in_three_batches_and_exactly_once_when_imported_twice(
    tenant: str, tmp_path: Path, mongo_db: Any
) -> None:
    path = write_jsonl(tmp_path / "history.jsonl", [json.dumps(memory(n)) for n in range(1, LINES + 1)])

    first = remember_file(tenant, path)
    second = remember_file(tenant, path)

    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert (summary["items"], summary["batches"], summary["stored_through"]) == (LINES, 3, LINES)
    assert (summary["inserted"], summary["updated"]) == (LINES, 0)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["inserted"] == 0 and json.loads(second.stdout)["updated"] == LINES
    assert stored(mongo_db, tenant) == LINES


def test_a_bad_line_in_the_middle_stops_the_import_names_the_line_and_skip_resumes_to_completion(
    tenant: str, tmp_path: Path, mongo_db: Any
) -> None:
    lines = [json.dumps(memory(n)) for n in range(1, LINES + 1)]
    lines[1499] = '{"content": "a line cut short'  # line 1500: in the second batch (lines 1001..2000)
    path = write_jsonl(tmp_path / "history.jsonl", lines)

    stopped = remember_file(tenant, path)

    assert stopped.returncode == 2 and "Traceback" not in stopped.stderr
    error = json.loads(stopped.stdout)
    assert error["field"] == "file" and error["message"].startswith("line 1500: not JSON")
    assert error["stored_through"] == 1000  # the first batch; nothing of the bad line's batch was sent
    assert stored(mongo_db, tenant) == 1000

    lines[1499] = json.dumps(memory(1500))
    write_jsonl(path, lines)
    resumed = remember_file(tenant, path, "--skip", str(error["stored_through"]))

    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert (summary["items"], summary["inserted"], summary["stored_through"]) == (LINES - 1000, LINES - 1000, LINES)
    assert stored(mongo_db, tenant) == LINES


def test_without_json_a_stopped_import_says_on_one_line_which_lines_are_stored_and_how_to_resume(
    tenant: str, tmp_path: Path
) -> None:
    lines = [json.dumps(memory(n)) for n in range(1, 1201)]
    lines[1100] = json.dumps({"content": "   "})  # line 1101: an item remember refuses
    path = write_jsonl(tmp_path / "history.jsonl", lines)

    shown = memq("remember", "--memory-id", tenant, "--type", "semantic", "--file", str(path))

    assert shown.returncode == 2
    assert shown.stderr.strip().splitlines() == [
        "memq: error: items[1100].content: line 1101: must be a non-empty string; "
        "lines 1..1000 are stored; rerun with --skip 1000 to resume"
    ]


def numbered_memories(count: int, seen: list[int]) -> Iterator[dict[str, Any]]:
    """A generator, as a caller streaming a chat history would pass one; records how far it was read."""
    for n in range(1, count + 1):
        seen.append(n)
        yield memory(n)


def test_remember_many_stores_a_generator_in_batches_reporting_progress_after_each(tenant: str, mongo_db: Any) -> None:
    seen: list[int] = []
    progress: list[IngestProgress] = []

    summary = remember_many(
        tenant,
        "semantic",
        numbered_memories(LINES, seen),
        batch_items=400,
        max_in_flight=2,
        on_progress=progress.append,
    )

    assert summary == {
        "memory_id": tenant,
        "type": "long_term_memory",
        "stored_through": LINES,
        "items": LINES,
        "batches": 7,
        "inserted": LINES,
        "updated": 0,
    }
    assert [p.stored_through for p in progress] == [400, 800, 1200, 1600, 2000, 2400, 2500]
    assert seen == list(range(1, LINES + 1))
    assert stored(mongo_db, tenant) == LINES


def test_remember_many_refuses_a_bad_item_naming_it_and_resumes_with_skip(tenant: str, mongo_db: Any) -> None:
    items: list[Any] = [memory(n) for n in range(1, 1001)]
    items[650] = {"content": "fine", "importance": 7}  # item 651, in the third batch of 300

    with pytest.raises(InvalidItem) as caught:
        remember_many(tenant, "semantic", iter(items), batch_items=300)

    assert caught.value.field == "items[650].importance" and caught.value.reason.startswith("item 651: ")
    assert caught.value.stored_through == 600 and stored(mongo_db, tenant) == 600
    assert isinstance(caught.value, IngestStopped)

    items[650] = memory(651)
    summary = remember_many(tenant, "semantic", iter(items), batch_items=300, skip=caught.value.stored_through)

    assert (summary["items"], summary["stored_through"]) == (400, 1000)
    assert stored(mongo_db, tenant) == 1000


def test_remember_many_reads_ahead_of_what_is_stored_by_at_most_its_batches_in_flight_and_the_one_it_reads(
    tenant: str,
) -> None:
    stored_through = 0
    leads: list[int] = []  # for each item, when it is read: how far it lies beyond the last item stored

    def items() -> Iterator[dict[str, Any]]:
        for n in range(1, 201):
            leads.append(n - stored_through)
            yield memory(n)

    def on_progress(progress: IngestProgress) -> None:
        nonlocal stored_through
        stored_through = progress.stored_through

    summary = remember_many(tenant, "semantic", items(), batch_items=10, max_in_flight=2, on_progress=on_progress)

    assert summary["items"] == 200
    assert max(leads) == (2 + 1) * 10  # two batches sent and unsettled while the third is read: never more
