"""A real ``python -m optimizer`` subprocess for tests that need one (signals, RSS, slow clients).

``running_server(*flags, **env)`` starts the server on 127.0.0.1 and a free port, waits for the JSON
``listening`` line on stderr, and kills the process on exit if it is still running. Its stderr is read
line by line on a background thread, so a test can wait for a log event or read the exit code.

Nothing here is a pytest fixture or asserts timings: waits are bounded, and a wait that runs out raises
``ServerError`` with the server's stderr so far.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
STARTUP_TIMEOUT = 30.0
LOG_TIMEOUT = 15.0


class ServerError(AssertionError):
    """The server did not do what a test waited for (start, log an event, exit) in time."""


def server_env(**variables: str | None) -> dict[str, str]:
    """This process's environment without any ``OPTIMIZER_*`` setting, plus ``variables`` (None removes
    one)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("OPTIMIZER_")}
    for name, value in variables.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def _json_record(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def read_rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (``VmRSS`` from ``/proc/PID/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ServerError(f"no VmRSS for process {pid}")


class RealServer:
    """A running server process; ``start()`` returns once it listens."""

    def __init__(self, flags: list[str], env: dict[str, str], *, max_files: int | None = None) -> None:
        def limit_files() -> None:  # in the child, before it runs Python
            if max_files is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files))

        self.proc: subprocess.Popen[str] = subprocess.Popen(
            [sys.executable, "-m", "optimizer", "--host", HOST, "--port", "0", *flags],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=limit_files if max_files is not None else None,  # noqa: PLW1509 - no threads fork here
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        self.lines: list[str] = []
        self.port = 0
        self.capacity = 0
        self._eof = False
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read_stderr, name="realserver-stderr", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def rss(self) -> int:
        return read_rss(self.pid)

    def _read_stderr(self) -> None:
        stream = self.proc.stderr
        assert stream is not None
        for line in stream:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def stderr_text(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def records(self) -> list[dict[str, Any]]:
        """The stderr lines that are JSON log records."""
        with self._changed:
            lines = list(self.lines)
        return [record for line in lines if (record := _json_record(line)) is not None]

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], what: str, timeout: float = LOG_TIMEOUT
    ) -> dict[str, Any]:
        """The first log record matching ``predicate``; raises on timeout or if stderr ends first."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    record = _json_record(line)
                    if record is not None and predicate(record):
                        return record
                seen = len(self.lines)
                if self._eof:
                    raise ServerError(f"the server's stderr ended before {what}:\n{self.stderr_text()}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ServerError(f"no {what} within {timeout:g} s; stderr:\n{self.stderr_text()}")
                self._changed.wait(remaining)

    def wait_for_event(self, event: str, timeout: float = LOG_TIMEOUT) -> dict[str, Any]:
        return self.wait_for(lambda record: record.get("event") == event, f"'{event}' event", timeout)

    def wait_for_drain(self, timeout: float = LOG_TIMEOUT) -> dict[str, Any]:
        """The drain has begun: the listener is closed and the gate refuses newcomers."""
        return self.wait_for(
            lambda record: str(record.get("message", "")).startswith("draining "), "drain log line", timeout
        )

    def start(self) -> None:
        record = self.wait_for_event("listening", STARTUP_TIMEOUT)
        self.port = int(record["port"])
        self.capacity = int(record["capacity"])

    def send(self, signum: signal.Signals) -> None:
        self.proc.send_signal(signum)

    def wait_exit(self, timeout: float) -> int:
        """The exit code; raises if the process is still running after ``timeout`` seconds."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise ServerError(
                f"the server did not exit within {timeout:g} s; stderr:\n{self.stderr_text()}"
            ) from None
        self._reader.join(LOG_TIMEOUT)
        return code

    async def exit_code(self, within: float) -> int:
        """``wait_exit`` without blocking the event loop."""
        return await asyncio.to_thread(self.wait_exit, within)

    def stop(self) -> None:
        """Kill the process if it still runs, and release the pipe and the reader thread."""
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(LOG_TIMEOUT)
        self._reader.join(LOG_TIMEOUT)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@contextlib.contextmanager
def running_server(*flags: str, **env: str) -> Iterator[RealServer]:
    """A listening server with these flags and ``OPTIMIZER_*`` variables; killed on exit if still up."""
    server = RealServer(list(flags), server_env(**env))
    try:
        server.start()
        yield server
    finally:
        server.stop()
