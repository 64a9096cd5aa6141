"""MemoryBudget on its own: reserve, wait, refuse; and the service answering through it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from optimizer.budget import UPLOAD_SHARE, MemoryBudget
from optimizer.errors import Overloaded, OverMemoryBudget
from optimizer.settings import default_memory_budget, memory_limit
from tests.conftest import image_bytes, multipart

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]
MIB = 1024 * 1024


def test_uploads_have_an_allowance_beside_the_decodes_room() -> None:
    """Apart, decodes never wait on uploads (a request holds its upload while it waits for decode room:
    two uploads each waited for room only the other could give back, found in review)."""
    budget = MemoryBudget(100)
    assert budget.upload_allowance == int(100 * UPLOAD_SHARE) == 50
    upload = budget.try_reserve_upload(50)
    assert upload is not None and (budget.in_use, budget.uploads) == (0, 50)
    assert budget.try_reserve_upload(1) is None  # the allowance is full
    decode = budget.try_reserve(100)  # the decodes' room is whole beside it
    assert decode is not None and budget.in_use == 100 and budget.peak == 100
    upload.release()
    decode.release()
    assert (budget.in_use, budget.uploads) == (0, 0)


def test_an_upload_grows_its_reservation_as_it_arrives() -> None:
    budget = MemoryBudget(100)
    other = budget.try_reserve_upload(20)
    held = budget.try_reserve_upload(10)
    assert held is not None and other is not None
    grown = budget.try_reserve_upload(15, held)
    assert grown is held and held.nbytes == 25 and budget.uploads == 45
    assert budget.try_reserve_upload(10, held) is None  # 20 + 35 over the allowance of 50
    held.release()
    other.release()
    assert (budget.in_use, budget.uploads) == (0, 0)


def test_an_upload_is_refused_from_its_declared_length() -> None:
    budget = MemoryBudget(100)
    with pytest.raises(OverMemoryBudget, match="the upload is"):
        budget.refuse_upload(51)  # never fits the allowance: 413
    held = budget.try_reserve_upload(30)
    with pytest.raises(Overloaded):
        budget.refuse_upload(21)  # does not fit beside the others now: 503
    budget.refuse_upload(20)
    assert held is not None
    held.release()
    with pytest.raises(OverMemoryBudget, match="the upload is"):
        budget.try_reserve_upload(51)
    assert budget.uploads == 0


async def test_reserve_and_release() -> None:
    budget = MemoryBudget(100)
    first = await budget.reserve(60, wait=0)
    second = await budget.reserve(40, wait=0)
    assert budget.in_use == 100
    first.release()
    first.release()  # twice is harmless
    assert budget.in_use == 40
    second.release()
    assert budget.in_use == 0
    assert budget.peak == 100


def test_try_reserve_holds_only_what_fits_now() -> None:
    # The job's fast path: no waiting, so no event loop is needed at all.
    budget = MemoryBudget(100)
    held = budget.try_reserve(70)
    assert held is not None and budget.in_use == 70
    assert budget.try_reserve(31) is None  # no room now: the caller waits with reserve()
    assert budget.in_use == 70
    with pytest.raises(OverMemoryBudget):
        budget.try_reserve(101)  # never fits: 413 at once, as reserve() does
    held.release()
    assert budget.in_use == 0


async def test_workers_claiming_while_the_loop_reserves_and_releases_never_overcommit() -> None:
    # Workers claim with try_reserve in their own threads; the loop waits with reserve() and releases.
    budget = MemoryBudget(1000)
    loop = asyncio.get_running_loop()
    stop = threading.Event()
    over: list[int] = []

    def worker() -> None:
        while not stop.is_set():
            held = budget.try_reserve(7)
            if held is not None:
                if budget.in_use > budget.total:
                    over.append(budget.in_use)
                loop.call_soon_threadsafe(held.release)  # releases happen on the loop

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(200):
            held = await budget.reserve(300, wait=5)
            await asyncio.sleep(0)
            held.release()
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    await until_released(budget)
    assert not over and budget.peak <= budget.total


async def until_released(budget: MemoryBudget) -> None:
    async with asyncio.timeout(5):
        while budget.in_use:  # noqa: ASYNC110 - the releases are queued on this loop
            await asyncio.sleep(0.01)


async def test_what_can_never_fit_is_413() -> None:
    with pytest.raises(OverMemoryBudget) as caught:
        await MemoryBudget(100).reserve(101, wait=10)
    assert caught.value.status == 413


async def test_full_budget_times_out_with_503() -> None:
    budget = MemoryBudget(100)
    held = await budget.reserve(80, wait=0)
    with pytest.raises(Overloaded) as caught:
        await budget.reserve(30, wait=0.05)
    assert caught.value.status == 503
    assert int(caught.value.headers["Retry-After"]) >= 1
    held.release()


async def test_waiter_proceeds_when_room_is_given_back() -> None:
    budget = MemoryBudget(100)
    held = await budget.reserve(80, wait=0)
    waiting = asyncio.ensure_future(budget.reserve(50, wait=10))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    held.release()
    reservation = await asyncio.wait_for(waiting, 5)
    assert budget.in_use == 50
    reservation.release()


async def test_small_requests_pass_a_waiting_large_one() -> None:
    budget = MemoryBudget(100)
    held = await budget.reserve(60, wait=0)
    large = asyncio.ensure_future(budget.reserve(70, wait=10))
    await asyncio.sleep(0.01)
    small = await asyncio.wait_for(budget.reserve(30, wait=0), 1)  # fits now: not queued behind
    assert not large.done()
    small.release()
    held.release()
    (await asyncio.wait_for(large, 5)).release()
    assert budget.in_use == 0


def test_default_budget_is_half_the_memory_limit() -> None:
    assert default_memory_budget() == memory_limit() // 2
    assert memory_limit() > 64 * MIB


async def test_image_over_the_whole_budget_is_413(make_client: MakeClient) -> None:
    client = await make_client(memory_budget=16 * MIB)
    # 2000 x 2000 RGBA PNG: 16 MB decoded plus the resize's copies, over a 16 MiB budget
    response = await client.post("/optimize", data=multipart(image_bytes((2000, 2000), "RGBA", fmt="PNG")))
    assert response.status == 413
    body = await response.json(content_type=None)
    assert body["code"] == "over_memory_budget"
    assert client.app is not None
    from optimizer.state import STATE

    assert client.app[STATE].budget.in_use == 0
    assert client.app[STATE].gate.in_flight == 0
    # small images still go through
    assert (await client.post("/optimize", data=multipart(image_bytes((40, 40))))).status == 200


@pytest.mark.parametrize(("asked", "told"), [(0, "1"), (7, "7"), (86400, "60")])
def test_retry_after_is_whole_seconds_from_1_to_a_minute(asked: int, told: str) -> None:
    """A memory wait of a day is a valid setting, but no client should be told to come back in a day."""
    refused = Overloaded("busy", retry_after=asked)
    assert refused.headers["Retry-After"] == told
    assert refused.retry_after == int(told)


async def test_a_memory_wait_that_runs_out_tells_at_most_a_minute() -> None:
    budget = MemoryBudget(100)
    held = budget.try_reserve(100)
    assert held is not None
    with pytest.raises(Overloaded) as refused:
        await budget.reserve(50, 0.01)
    assert refused.value.headers["Retry-After"] == "1"
    held.release()
