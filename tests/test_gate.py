"""The admission gate's turns: Retry-After from the refused clients waiting, and when a slot is theirs."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from optimizer.gate import MAX_WAITING_RETRY_AFTER, RETURN_SURPLUS, RETURNS_FOR_A_TURN, AdmissionGate, Slot
from optimizer.state import STATE
from tests.conftest import image_bytes, multipart

MakeClient = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(time, "monotonic", clock)
    return clock


def served_gate(
    service_seconds: float, *, capacity: int = 6, workers: int = 2, inside: int = 0
) -> AdmissionGate:
    """A gate whose service-time estimate is ``service_seconds``, with ``inside`` requests in flight,
    their uploads received."""
    gate = AdmissionGate(capacity, workers=workers)
    slot = gate.try_enter()
    assert slot is not None
    slot.release(service_seconds)
    for _ in range(inside):
        inside_slot = gate.try_enter()
        assert inside_slot is not None
        inside_slot.received()
    return gate


def test_retry_after_grows_with_the_clients_waiting_and_is_capped(clock: Clock) -> None:
    gate = served_gate(0.2)  # 2 workers: 10 slots free up per second
    answers = [gate.refuse() for _ in range(400)]
    assert answers[0] == 1
    assert answers == sorted(answers)  # more waiting, never a shorter wait
    # Together the waiting clients return RETURN_SURPLUS times as fast as slots free up.
    index = 20 * RETURN_SURPLUS  # below the cap
    assert answers[index] == -(-(index + 1) // (RETURN_SURPLUS * 10))
    assert max(answers) == MAX_WAITING_RETRY_AFTER


def test_clients_due_back_no_longer_count_as_waiting(clock: Clock) -> None:
    gate = served_gate(0.2)
    for _ in range(100):
        gate.refuse()
    assert gate.refuse() > 1
    assert gate.waiting() == 101
    clock.now += MAX_WAITING_RETRY_AFTER + 1  # every one of them is due back by now
    assert gate.waiting() == 0
    assert gate.refuse() == 1


def test_without_a_service_time_the_answer_is_one_second(clock: Clock) -> None:
    gate = AdmissionGate(6, workers=2)
    assert [gate.refuse() for _ in range(50)] == [1] * 50
    assert not gate.turn_owed()


def test_a_turn_is_owed_only_to_clients_due_back_before_the_queue_runs_out(clock: Clock) -> None:
    # 6 inside, 2 workers, 1 s per image: the 4 queued requests keep both workers busy for 2 s.
    gate = served_gate(1.0, capacity=8, inside=6)
    for _ in range(RETURNS_FOR_A_TURN):
        assert gate.refuse() == 3  # the slot estimate: 6 inside / 2 workers x 1 s
    assert not gate.turn_owed()  # due back in 3 s: the workers would run dry first
    clock.now += 1.5
    assert gate.turn_owed()  # due back in 1.5 s, within the 2 s of queued work
    clock.now += 2
    assert not gate.turn_owed()  # due back already: they are no longer waiting


def test_a_short_queue_owes_a_turn_to_fewer_returns(clock: Clock) -> None:
    """About as many refused clients fall due within the queued work as the queue has slots: a
    one-worker server's 2 would rarely make the 3 a longer queue asks for, and never take turns."""
    assert served_gate(1.0, capacity=6, workers=2).turns_need == RETURNS_FOR_A_TURN  # two CPUs' defaults
    assert served_gate(1.0, capacity=12, workers=4).turns_need == RETURNS_FOR_A_TURN
    assert served_gate(1.0, capacity=2, workers=1).turns_need == 1  # the queue of one
    # One worker, queue 2 (one CPU's defaults), 1 s per image: the 2 queued keep it busy for 2 s.
    gate = served_gate(1.0, capacity=3, workers=1, inside=3)
    assert gate.turns_need == 1
    assert gate.refuse() == 3  # the slot estimate: 3 inside / 1 worker x 1 s
    assert not gate.turn_owed()  # due back in 3 s: the worker would run dry first
    clock.now += 1.5
    assert gate.turn_owed()  # one due back within the queued work is enough here


def test_uploads_still_arriving_are_no_queued_work_for_a_turn(clock: Clock) -> None:
    # All three inside are still receiving (as under the read-ahead): nothing would keep the workers
    # busy while a slot waits for a refused client, so the client just served keeps its turn.
    gate = gate_with_times(read_seconds=0.5, service_seconds=0.1)
    enter(gate, 3)
    for _ in range(RETURNS_FOR_A_TURN):
        gate.refuse()
    clock.now += 0.99
    assert not gate.turn_owed()


def test_no_turn_is_owed_with_no_queued_work(clock: Clock) -> None:
    gate = served_gate(1.0, inside=2)  # both workers busy, nothing queued
    for _ in range(10):
        gate.refuse()
    clock.now += 0.99
    assert not gate.turn_owed()


async def test_a_connection_just_served_gives_its_turn_to_waiting_clients(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await make_client()
    state = client.app[STATE]
    owed = False
    monkeypatch.setattr(state.gate, "turn_owed", lambda: owed)

    assert (await client.post("/optimize", data=multipart(image_bytes()))).status == 200
    owed = True
    again = await client.post("/optimize", data=multipart(image_bytes()))  # the same connection
    assert again.status == 503
    body = await again.json(content_type="application/problem+json")
    assert body["code"] == "overloaded"
    assert "waiting their turn" in body["detail"]
    assert int(again.headers["Retry-After"]) >= 1

    # A client on another connection (one coming back after its Retry-After) takes the slot.
    async with aiohttp.ClientSession() as other:
        response = await other.post(client.make_url("/optimize"), data=multipart(image_bytes()))
        assert response.status == 200
    owed = False
    assert (await client.post("/optimize", data=multipart(image_bytes()))).status == 200
    metrics = await (await client.get("/metrics")).text()
    assert "optimizer_turns_given_total 1.0" in metrics.splitlines()
    # The gauge is there (its value, the refusal above until it is due back, depends on timing).
    assert any(line.startswith("optimizer_waiting_clients ") for line in metrics.splitlines())


async def test_only_an_image_marks_the_connection_and_not_behind_a_proxy(
    make_client: MakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await make_client()
    monkeypatch.setattr(client.app[STATE].gate, "turn_owed", lambda: True)
    # A failed request (422) does not make its connection's next request wait its turn.
    assert (await client.post("/optimize", data=multipart(b"\xff\xd8\xff" + bytes(100)))).status == 422
    assert (await client.post("/optimize", data=multipart(image_bytes()))).status == 200
    # Behind a proxy the connection is not one client: no turns.
    proxied = {"X-Forwarded-For": "203.0.113.7"}
    assert (await client.post("/optimize", data=multipart(image_bytes()), headers=proxied)).status == 200
    assert (await client.post("/optimize", data=multipart(image_bytes()), headers=proxied)).status == 200
    assert (await client.post("/optimize", data=multipart(image_bytes()))).status == 503


# ------------------------------------------------------------------------------------------ read-ahead


def gate_with_times(read_seconds: float, service_seconds: float) -> AdmissionGate:
    """Capacity 3 and 1 worker (a read-ahead of 1), with these moving averages already learnt."""
    gate = AdmissionGate(3, workers=1)
    slot = gate.try_enter()
    assert slot is not None
    slot.received(read_seconds)
    slot.release(service_seconds)
    return gate


def enter(gate: AdmissionGate, count: int) -> list[Slot]:
    slots = [gate.try_enter() for _ in range(count)]
    assert all(slot is not None for slot in slots)
    return [slot for slot in slots if slot is not None]


def test_slow_uploads_that_leave_the_workers_idle_admit_up_to_the_read_ahead() -> None:
    # Uploads take 0.5 s to arrive and a job 0.1 s: the queued requests are all still receiving, so
    # a worker that finishes would find nothing to do. One more per worker is let in meanwhile.
    gate = gate_with_times(read_seconds=0.5, service_seconds=0.1)
    assert gate.read_ahead == 1
    slots = enter(gate, 3)
    assert gate.in_flight == gate.capacity
    slots += enter(gate, 1)
    assert gate.full and gate.try_enter() is None
    assert gate.in_flight == gate.capacity + gate.read_ahead
    for slot in slots:
        slot.release()
    assert gate.in_flight == 0


def test_once_an_upload_is_in_the_gate_is_full_at_its_capacity_again() -> None:
    gate = gate_with_times(read_seconds=0.5, service_seconds=0.1)
    first, *_ = enter(gate, 3)
    first.received(0.5)  # a job is ready for the worker: no reason to receive more at once
    assert gate.full and gate.try_enter() is None


def test_the_read_ahead_is_one_per_worker_and_never_more_than_the_queue() -> None:
    assert AdmissionGate(6, workers=2).read_ahead == 2
    assert AdmissionGate(3, workers=2).read_ahead == 1
    assert AdmissionGate(2, workers=2).read_ahead == 0  # no queue: no read-ahead either


@pytest.mark.parametrize(
    ("read_seconds", "service_seconds"), [(0.01, 0.1), (0.0, 0.0)], ids=["fast uploads", "nothing learnt yet"]
)
def test_no_read_ahead_when_uploads_arrive_quickly_or_before_any_job(
    read_seconds: float, service_seconds: float
) -> None:
    # A burst at start-up, or uploads that arrive faster than the workers finish jobs, stay within
    # the capacity: admitting more would hold more uploads in memory for no gain.
    gate = (
        AdmissionGate(3, workers=1)
        if service_seconds == 0
        else gate_with_times(read_seconds, service_seconds)
    )
    enter(gate, 3)
    assert gate.full and gate.try_enter() is None


def test_a_slot_released_before_its_upload_arrived_no_longer_counts_as_receiving() -> None:
    gate = gate_with_times(read_seconds=0.5, service_seconds=0.1)
    for slot in enter(gate, 4):
        slot.release()  # the clients went away mid-upload: received() was never called
    slots = enter(gate, 3)
    for slot in slots:
        slot.received(0.5)
    # Had the released slots stayed counted as receiving, the gate would see a starved worker here.
    assert gate.full and gate.try_enter() is None


def test_a_failed_read_does_not_count_as_a_slow_upload() -> None:
    # The handler reports a read that failed (408, 413, a client gone) without its duration.
    gate = gate_with_times(read_seconds=0.01, service_seconds=0.1)
    failed = gate.try_enter()
    assert failed is not None
    failed.received()
    failed.release()
    enter(gate, 3)
    assert gate.full and gate.try_enter() is None
