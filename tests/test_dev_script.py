"""``scripts/dev.py``, the README's quick start: ``serve`` is the server itself, signals included."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys

import pytest

from tests.conftest import ROOT

STAMP = ROOT / ".venv" / ".optimizer-installed"


def test_dev_serve_drains_on_sigterm_as_the_server_does() -> None:
    """Before, dev.py ran the server as a child: a SIGTERM to dev.py left the server running, and Ctrl-C
    killed it 0.25 s into its drain."""
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if not STAMP.exists() or STAMP.read_text() != wanted:
        pytest.skip(".venv is not set up by scripts/dev.py here (the quick start's test command sets it up)")
    with subprocess.Popen(
        [sys.executable, "scripts/dev.py", "serve", "--host", "127.0.0.1", "--port", "0"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    ) as server:
        try:
            assert server.stderr is not None
            for line in server.stderr:
                if '"listening"' in line:
                    break
            else:
                pytest.fail("the server never said it was listening")
            server.send_signal(signal.SIGTERM)  # to dev.py's pid: the server's own, since dev.py became it
            _out, rest = server.communicate(timeout=30)
        finally:
            if server.poll() is None:
                server.kill()
    assert server.returncode == 0
    events = [json.loads(line).get("event") for line in rest.splitlines() if line.startswith("{")]
    assert "stopped" in events
