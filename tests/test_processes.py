"""``--processes N``: N servers on one port, every one of them drains on SIGTERM."""

from __future__ import annotations

import signal

import aiohttp
import pytest

from optimizer.settings import Settings
from optimizer.supervisor import child_flags
from tests.conftest import image_bytes
from tests.test_server_process import EXIT_GRACE, Launch, launch, upload  # noqa: F401 - fixture

pytestmark = pytest.mark.slow


async def test_processes_share_the_port_and_all_drain(launch: Launch) -> None:  # noqa: F811
    server = launch("--processes", "2", "--drain-seconds", "10")

    def both_listening(_record: dict[str, object]) -> bool:
        return len({r["pid"] for r in server.records() if r.get("event") == "listening"}) >= 2

    server.wait_for(both_listening, "two processes listening", 20)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        replies = [await upload(session, server.url, image_bytes((600, 400))) for _ in range(12)]
    assert [reply.status for reply in replies] == [200] * 12

    listening = {r["pid"] for r in server.records() if r.get("event") == "listening"}
    assert len(listening) == 2
    assert server.proc.pid not in listening  # the parent only supervises
    served = {r["pid"] for r in server.records() if r.get("logger") == "optimizer.access"}
    assert served <= listening
    assert len(served) == 2  # new connections were spread over both processes

    server.send(signal.SIGTERM)
    assert await server.exit_code(10 + EXIT_GRACE) == 0
    stopped = [r for r in server.records() if r.get("event") == "stopped"]
    assert {r["pid"] for r in stopped} == listening
    assert all(r["abandoned"] == 0 for r in stopped)


def test_children_share_threads_and_budget_unless_told() -> None:
    settings = Settings(processes=2)
    flags = child_flags(settings, ["--processes", "2"], {}, 8080)
    assert flags[:2] == ["--processes", "2"]
    assert flags[flags.index("--port") + 1] == "8080"
    assert flags[flags.index("--reuse-port") + 1] == "1"
    assert flags[flags.index("--processes", 2) + 1] == "1"  # the children do not supervise again
    assert "--threads" in flags
    assert "--memory-budget" in flags
    told = child_flags(settings, ["--processes", "2", "--threads=3"], {"OPTIMIZER_MEMORY_BUDGET": "1"}, 1)
    assert told.count("--threads") == 0
    assert "--memory-budget" not in told
