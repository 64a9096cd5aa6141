"""The memory budget in a real server process: 20 concurrent large progressive JPEGs stay within
budget + a fixed overhead of peak RSS, and small images keep being served meanwhile.

Without the budget, four workers would each hold ~130 MB of libjpeg coefficients at once for these
photos; with a 300 MB budget only two decode at a time and the others wait, holding no thread.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import image_bytes
from tests.test_observability import sample
from tests.test_server_process import (  # noqa: F401 - launch is a fixture
    Launch,
    Reply,
    launch,
    seed_photo,
    upload,
    wait_in_flight,
)

MIB = 1024 * 1024
BUDGET = 300 * MIB
# Interpreter heap growth, uploads in flight (20 x 2.5 MB, held twice while being joined), response
# buffers and allocator slack: what the server may use beyond its idle RSS and the budget.
FIXED_OVERHEAD = 120 * MIB


def proc_status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"{field} not in /proc/{pid}/status")


@pytest.mark.slow
async def test_budget_bounds_peak_rss_while_small_images_flow(launch: Launch) -> None:  # noqa: F811
    server = launch(
        "--threads",
        "4",
        "--queue",
        "30",
        "--memory-budget",
        str(BUDGET),
        "--memory-wait",
        "120",
        "--read-timeout",
        "60",
    )
    pid = server.proc.pid
    large = seed_photo()
    small = image_bytes((400, 300))
    async with aiohttp.ClientSession() as session:
        assert (await upload(session, server.url, small)).status == 200  # warm up
        idle = proc_status(pid, "VmRSS")

        large_done: list[float] = []
        hold = asyncio.Event()

        async def one_large() -> Reply:
            reply = await upload(session, server.url, large, hold)
            large_done.append(time.monotonic())
            return reply

        # All 20 admitted with their bodies all but complete, then released at once: every one of
        # them reaches the decode together, the worst case for memory.
        large_tasks = [asyncio.ensure_future(one_large()) for _ in range(20)]
        await wait_in_flight(session, server.url, 20)
        hold.set()
        await asyncio.sleep(0.2)
        small_done: list[float] = []
        for _ in range(8):
            reply = await upload(session, server.url, small)
            assert reply.status == 200
            small_done.append(time.monotonic())
        replies = await asyncio.gather(*large_tasks)

        metrics = await (await session.get(f"{server.url}/metrics")).text()
    assert [reply.status for reply in replies] == [200] * 20
    reserved_peak = sample(metrics, "optimizer_memory_reserved_peak_bytes")
    assert reserved_peak is not None and 0 < reserved_peak <= BUDGET
    # Small images were served while large ones were still waiting for room, not after all of them.
    assert min(small_done) < max(large_done)
    peak = proc_status(pid, "VmHWM")
    print(
        f"idle {idle / MIB:.0f} MiB, peak {peak / MIB:.0f} MiB, budget {BUDGET / MIB:.0f} MiB,"
        f" reserved at most {reserved_peak / MIB:.0f} MiB"
    )
    assert peak <= idle + BUDGET + FIXED_OVERHEAD, (
        f"peak RSS {peak / MIB:.0f} MiB > idle {idle / MIB:.0f} + budget {BUDGET / MIB:.0f}"
        f" + {FIXED_OVERHEAD / MIB:.0f} MiB"
    )
