"""Prints pip's configured package sources as ``uv pip install`` arguments, one per line.

uv does not read pip's configuration (pip.conf, PIP_* variables). scripts/bootstrap.sh installs through uv, so that
a machine whose pip points at a mirror, local indexes, wheel folders or a constraints file installs from the same
sources with the same caps. Several indexes are treated as equally trusted (``unsafe-best-match``), as pip treats
them.
"""

from __future__ import annotations

import shlex
import subprocess
import sys

OPTIONS = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraint",
}


def pip_config() -> dict[str, list[str]]:
    """pip's settings that name sources, each with its values (later scopes override earlier ones)."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    ).stdout
    settings: dict[str, list[str]] = {}
    for line in listed.splitlines():
        key, _, quoted = line.partition("=")
        name = key.rsplit(".", 1)[-1]
        if name in OPTIONS and quoted:
            settings[name] = shlex.split(shlex.split(quoted)[0])
    return settings


def uv_arguments(settings: dict[str, list[str]]) -> list[str]:
    arguments = ["--index-strategy", "unsafe-best-match"]
    for name, option in OPTIONS.items():
        for value in settings.get(name, []):
            arguments += [option, value]
    return arguments


if __name__ == "__main__":
    print("\n".join(uv_arguments(pip_config())))
