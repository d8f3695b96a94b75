"""memq as a web app imports it: one public package, nothing of the worker side, no generic names claimed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from memq.ops import services

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "sentence_transformers", "pymongo")


def run_python(code: str, cwd: Path | str = ROOT, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=timeout_s, env=os.environ
    )


def test_importing_memq_and_its_client_api_loads_no_model_driver_or_worker_module() -> None:
    code = textwrap.dedent(
        f"""
        import sys, json
        import memq
        from memq import retrieve, aretrieve, remember, forget
        from memq.errors import InvalidInput, RetrievalTimeout, TransientError
        loaded = [m for m in sys.modules if m in {HEAVY!r} or m.startswith(("memq.workers", "memq.tasks"))]
        print(json.dumps(loaded))
        """
    )
    proc = run_python(code, cwd="/")

    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """memq as ``pip install`` lays it out in a web app's site-packages."""
    target = tmp_path_factory.mktemp("installed") / "site-packages"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", target, ROOT],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    return target


def test_an_installed_memq_claims_no_generic_top_level_package(installed: Path) -> None:
    target = installed
    importable = {entry.name for entry in target.iterdir() if (entry / "__init__.py").is_file()}
    importable |= {entry.stem for entry in target.glob("*.py")}
    assert importable == {"memq"}
    assert not {"config", "tasks", "workers"} & {entry.name for entry in target.iterdir()}
    for folder in ("config", "tasks", "workers"):
        assert (target / "memq" / folder / "__init__.py").is_file()


def test_an_installed_memq_is_marked_typed_for_a_web_apps_type_checker(installed: Path) -> None:
    assert (installed / "memq" / "py.typed").is_file()


def test_a_django_project_with_its_own_config_package_and_tasks_module_retrieves_through_memq(
    fleet: services.Fleet, tenant: str, tmp_path: Path
) -> None:
    project = tmp_path / "webapp"
    (project / "config").mkdir(parents=True)
    (project / "config" / "__init__.py").write_text("")
    (project / "config" / "settings.py").write_text("DEBUG = True\n")
    (project / "tasks.py").write_text("def send_welcome_email():\n    return 'sent'\n")
    code = textwrap.dedent(
        f"""
        import json
        import config.settings, tasks
        from memq import remember, retrieve
        remember({tenant!r}, "semantic", ["enjoys hiking in the Alps", "is allergic to peanuts"])
        result = retrieve("outdoor hobbies", {tenant!r}, {{"semantic": 1}})
        print(json.dumps({{
            "own_config": config.settings.__file__, "own_tasks": tasks.send_welcome_email(),
            "found": [item["content"] for item in result["results"]["long_term_memory"]],
        }}))
        """
    )
    proc = run_python(code, cwd=project)

    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["own_config"] == str(project / "config" / "settings.py")
    assert out["own_tasks"] == "sent"
    assert out["found"] == ["enjoys hiking in the Alps"]


def test_memq_worker_embed_with_gpus_starts_one_worker_per_device_and_stops_them_together(
    app: Any, fleet: services.Fleet
) -> None:
    """On a machine without CUDA each child falls back to the CPU; what is tested is the launcher: one worker per
    named device, each named after it, all stopped by one signal."""
    launcher = subprocess.Popen(
        [sys.executable, "-m", "memq.ops.cli", "worker", "embed", "--gpus", "0,1", "--loglevel", "WARNING"],
        env=os.environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        seen: set[str] = set()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and len(seen) < 2:
            assert launcher.poll() is None, launcher.stderr.read().decode() if launcher.stderr else ""
            replies = app.control.ping(timeout=0.5) or []
            seen = {host.split("@")[0] for reply in replies for host in reply if host.startswith("embed-gpu")}
            time.sleep(0.5)
        assert seen == {"embed-gpu0", "embed-gpu1"}
    finally:
        launcher.send_signal(signal.SIGTERM)
        code = launcher.wait(timeout=60)
    assert code == 0


@pytest.mark.parametrize("argv", [["--gpus", "0,0"], ["--gpus", "x"], ["--gpus", "0", "--device", "cuda:1"]])
def test_memq_worker_embed_refuses_a_bad_gpu_list_in_one_line(argv: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "memq.ops.cli", "worker", "embed", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ,
    )

    assert proc.returncode == 2
    assert proc.stderr.startswith("memq: error:") and proc.stderr.count("\n") == 1
