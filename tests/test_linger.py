"""``Lingering``: refused connections are closed after the linger time, and once more than ``limit`` of
them wait, the oldest answered ones close early (each keeps what its client sent in the kernel's socket
buffers until then)."""

from __future__ import annotations

import asyncio
import socket
import sys
import time

import pytest

from optimizer.linger import Lingering, unacknowledged


class FakeTransport(asyncio.BaseTransport):
    """No socket: ``Lingering`` falls back on the answer having been written and ``min_age``."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        super().__init__({"socket": sock} if sock is not None else None)
        self.closes = 0
        self.closed_by_peer = False

    def close(self) -> None:
        self.closes += 1

    def is_closing(self) -> bool:
        return self.closes > 0 or self.closed_by_peer

    def get_write_buffer_size(self) -> int:
        return 0


class ClosedTlsTransport(FakeTransport):
    """What asyncio's TLS transport becomes once closed twice (Python 3.11-3.13): asking it raises."""

    def is_closing(self) -> bool:
        return True

    def get_extra_info(self, name: str, default: object = None) -> object:
        raise AttributeError("'NoneType' object has no attribute '_get_extra_info'")


class FakeWriter:
    """Stands for the request's ``AbstractStreamWriter``: only its output size is read."""

    output_size = 0


async def wait_empty(lingering: Lingering) -> None:
    async with asyncio.timeout(10):
        while len(lingering):  # noqa: ASYNC110 - timers close them; there is no event to await
            await asyncio.sleep(0.01)


async def test_connections_close_after_the_linger_time() -> None:
    lingering = Lingering(0.05, limit=4)
    transports = [FakeTransport() for _ in range(3)]
    for transport in transports:
        lingering.add(transport)
    assert len(lingering) == 3
    assert all(t.closes == 0 for t in transports)
    await wait_empty(lingering)
    assert [t.closes for t in transports] == [1, 1, 1]


async def test_the_oldest_closes_early_when_the_limit_is_reached() -> None:
    lingering = Lingering(60.0, limit=2, min_age=0.0)
    first, second, third, fourth = (FakeTransport() for _ in range(4))
    lingering.add(first)
    lingering.add(second)
    assert (first.closes, second.closes) == (0, 0)
    lingering.add(third)
    assert (first.closes, second.closes, third.closes) == (1, 0, 0)
    lingering.add(fourth)
    assert (second.closes, third.closes, fourth.closes) == (1, 0, 0)
    assert len(lingering) == 2


async def test_a_connection_closed_early_is_not_closed_again_by_its_timer() -> None:
    lingering = Lingering(0.05, limit=1, min_age=0.0)
    first, second = FakeTransport(), FakeTransport()
    lingering.add(first)
    lingering.add(second)  # closes ``first`` early
    assert first.closes == 1
    await wait_empty(lingering)
    await asyncio.sleep(0.1)  # past the time ``first``'s own timer was set for
    assert (first.closes, second.closes) == (1, 1)


async def test_young_connections_are_not_closed_early() -> None:
    # A burst of refusals: none is closed before it has lingered ``min_age``, whatever the limit.
    lingering = Lingering(60.0, limit=2, min_age=60.0)
    transports = [FakeTransport() for _ in range(5)]
    for transport in transports:
        lingering.add(transport)
    assert len(lingering) == 5
    assert all(t.closes == 0 for t in transports)


async def test_a_connection_whose_answer_is_not_written_yet_is_not_closed_early() -> None:
    # An embedding application may await between the handler and the write: the answer comes first.
    lingering = Lingering(60.0, limit=1, min_age=0.0)
    unanswered, answered = FakeTransport(), FakeTransport()
    writer = FakeWriter()
    lingering.add(unanswered, writer)  # type: ignore[arg-type]
    lingering.add(answered)
    lingering.add(FakeTransport())
    assert (unanswered.closes, answered.closes) == (0, 1)
    writer.output_size = 120  # the 503 has been handed to the transport
    lingering.add(FakeTransport())
    assert unanswered.closes == 1


async def test_a_connection_added_twice_lingers_once() -> None:
    lingering = Lingering(60.0, limit=2, min_age=0.0)
    transport = FakeTransport()
    lingering.add(transport)
    lingering.add(transport)
    assert len(lingering) == 1
    lingering.add(FakeTransport())
    assert transport.closes == 0


def test_the_limit_is_at_least_one() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Lingering(1.0, limit=0)


@pytest.mark.skipif(sys.platform != "linux", reason="SIOCOUTQ is asked on Linux only")
def test_unacknowledged_output_is_read_from_the_kernel() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        sender = socket.create_connection(server.getsockname())
        receiver, _ = server.accept()
        with sender, receiver:
            sender.sendall(b"HTTP/1.1 503 Service Unavailable\r\n\r\n")
            receiver.recv(100)  # arrived; its acknowledgement follows at once on loopback
            for _ in range(200):  # a bounded poll, not a timing assertion
                if unacknowledged(FakeTransport(sender)) == 0:
                    break
                time.sleep(0.01)
            assert unacknowledged(FakeTransport(sender)) == 0
            # The receiver stops reading: what does not fit its window stays unacknowledged.
            sender.setblocking(False)
            try:
                while True:
                    sender.send(bytes(1 << 20))
            except BlockingIOError:
                pass
            pending = unacknowledged(FakeTransport(sender))
            assert pending is not None and pending > 0
    assert unacknowledged(FakeTransport()) is None


async def test_connections_closed_meanwhile_are_forgotten_not_closed_again() -> None:
    # A client that reset, or a host that closed the connection: it makes room without a close() call,
    # even where asking the transport anything would raise.
    lingering = Lingering(60.0, limit=2, min_age=60.0)
    gone, tls_gone, waiting = FakeTransport(), ClosedTlsTransport(), FakeTransport()
    lingering.add(gone)
    lingering.add(tls_gone)
    gone.closed_by_peer = True
    lingering.add(waiting)
    assert (gone.closes, waiting.closes) == (0, 0)
    lingering.add(FakeTransport())
    assert tls_gone.closes == 0
    assert len(lingering) == 2
    assert unacknowledged(tls_gone) is None


async def test_clients_that_never_acknowledge_do_not_switch_the_bound_off() -> None:
    # The connections looked at first but not ready go to the back: the ones behind them still close.
    lingering = Lingering(60.0, limit=4, min_age=0.0)
    stuck = [FakeTransport() for _ in range(20)]
    writer = FakeWriter()  # never writes: these answers never leave
    for transport in stuck:
        lingering.add(transport, writer)  # type: ignore[arg-type]
    ready = [FakeTransport() for _ in range(200)]
    for transport in ready:
        lingering.add(transport)
    assert all(t.closes == 0 for t in stuck)
    assert sum(t.closes for t in ready) >= 190
    assert len(lingering) <= 20 + 10


async def test_the_fallback_age_counts_from_the_answer() -> None:
    # Where the kernel cannot be asked, a connection closes early only ``min_age`` after its answer
    # was first seen written, not after the refusal.
    lingering = Lingering(60.0, limit=1, min_age=0.2)
    writer = FakeWriter()
    first = FakeTransport()
    lingering.add(first, writer)  # type: ignore[arg-type]
    await asyncio.sleep(0.3)  # older than min_age, but not answered
    lingering.add(FakeTransport())
    assert first.closes == 0
    writer.output_size = 120
    lingering.add(FakeTransport())  # answered now: the age starts here
    assert first.closes == 0
    await asyncio.sleep(0.3)
    lingering.add(FakeTransport())
    assert first.closes == 1


@pytest.mark.skipif(sys.platform != "linux", reason="SIOCOUTQ is asked on Linux only")
def test_a_unix_socket_is_not_asked() -> None:
    # SIOCOUTQ on a Unix socket counts what the peer has not read, not what it has not acknowledged.
    left, right = socket.socketpair()
    with left, right:
        assert unacknowledged(FakeTransport(left)) is None
