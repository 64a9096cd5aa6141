#!/usr/bin/env python3
"""Set up a virtual environment in .venv and run the service, the tests or the linters in it.

Needs nothing but python3 (3.11+): the first run creates .venv and installs the project with its test
and lint tools from the package registry; later runs reuse it, reinstalling only when pyproject.toml
has changed.

    python3 scripts/dev.py serve [optimizer flags...]   run the service on the defaults (port 8080)
    python3 scripts/dev.py test [pytest args...]        run the whole test suite
    python3 scripts/dev.py lint                         ruff (lint + format check) and mypy --strict
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".optimizer-installed"


def ensure_venv() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - this script may be started by an older python3
        sys.exit(f"optimizer needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
    if not _has_pip():
        # Also a .venv left half made (no pip in it) by an earlier run that failed: made again.
        print("dev: creating .venv", file=sys.stderr)
        try:
            venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
        except subprocess.CalledProcessError:
            sys.exit(
                "dev: python3 could not install pip into .venv (ensurepip failed). On Debian and "
                "Ubuntu, install the python3-venv package, then run this again."
            )
    print("dev: installing optimizer with its test and lint tools into .venv", file=sys.stderr)
    pip = [str(BIN / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "install", "-e", f"{ROOT}[dev]"], check=True)
    STAMP.write_text(wanted)


def _has_pip() -> bool:
    python = BIN / "python"
    if not python.exists():
        return False
    found = subprocess.run([str(python), "-m", "pip", "--version"], capture_output=True, check=False)
    return found.returncode == 0


def run(*command: str) -> int:
    return subprocess.run(command, cwd=ROOT, check=False).returncode


def become(*command: str) -> NoReturn:
    """Replace this process with ``command``: signals (Ctrl-C, a SIGTERM) then reach it directly, and a
    server drains on them as it would started by hand, instead of being killed along with this script."""
    os.chdir(ROOT)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], list(command))


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("serve", "test", "lint"):
        print(__doc__, file=sys.stderr)
        return 2
    ensure_venv()
    command, rest = argv[0], argv[1:]
    if command == "serve":
        become(str(BIN / "optimizer"), *rest)
    if command == "test":
        become(str(BIN / "python"), "-m", "pytest", *rest)
    ruff = str(BIN / "ruff")
    checks = (
        [ruff, "check", "."],
        [ruff, "format", "--check", "."],
        [str(BIN / "mypy")],
    )
    return max(run(*check) for check in checks)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
