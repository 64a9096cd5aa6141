"""``Lingering``: refused connections are closed after the linger time, and never more than ``limit``
of them wait (each keeps what its client sent in the kernel's socket buffers until then)."""

from __future__ import annotations

import asyncio

import pytest

from optimizer.linger import Lingering


class FakeTransport(asyncio.BaseTransport):
    def __init__(self) -> None:
        super().__init__()
        self.closes = 0

    def close(self) -> None:
        self.closes += 1


async def test_connections_close_after_the_linger_time() -> None:
    lingering = Lingering(0.05, limit=4)
    transports = [FakeTransport() for _ in range(3)]
    for transport in transports:
        lingering.add(transport)
    assert len(lingering) == 3
    assert all(t.closes == 0 for t in transports)
    async with asyncio.timeout(10):
        while len(lingering):  # noqa: ASYNC110 - timers close them; there is no event to await
            await asyncio.sleep(0.01)
    assert [t.closes for t in transports] == [1, 1, 1]


async def test_the_oldest_closes_early_when_the_limit_is_reached() -> None:
    lingering = Lingering(60.0, limit=2)
    first, second, third, fourth = (FakeTransport() for _ in range(4))
    lingering.add(first)
    lingering.add(second)
    assert (first.closes, second.closes) == (0, 0)
    lingering.add(third)
    assert (first.closes, second.closes, third.closes) == (1, 0, 0)
    lingering.add(fourth)
    assert (second.closes, third.closes, fourth.closes) == (1, 0, 0)
    assert len(lingering) == 2
    # closed early means closed once: the cancelled timer does not close it again later
    lingering.seconds = 0.0
    lingering.add(FakeTransport())
    lingering.add(FakeTransport())
    await asyncio.sleep(0.05)
    assert (first.closes, second.closes, third.closes, fourth.closes) == (1, 1, 1, 1)


async def test_a_connection_added_twice_lingers_once() -> None:
    lingering = Lingering(60.0, limit=2)
    transport = FakeTransport()
    lingering.add(transport)
    lingering.add(transport)
    assert len(lingering) == 1
    lingering.add(FakeTransport())
    assert transport.closes == 0


def test_the_limit_is_at_least_one() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Lingering(1.0, limit=0)
