"""Prometheus metrics, one registry per application instance.

Each ``create_app()`` gets its own ``CollectorRegistry`` (never the process-global default one), so two
embedded instances do not clash over metric names and each ``/metrics`` speaks only for its own app.
Labels are bounded: the route pattern (not the raw path), the status code, the problem code, the stage.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from optimizer.budget import MemoryBudget
from optimizer.gate import AdmissionGate
from optimizer.linger import Lingering

# Seconds. Requests span a 1 ms refusal to a multi-second decode of a large photo.
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServiceMetrics:
    """The service's metrics and the few calls that record them."""

    def __init__(self, gate: AdmissionGate, budget: MemoryBudget, lingering: Lingering) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter(
            "optimizer_requests",
            "HTTP requests answered, by route pattern and status code.",
            ("route", "status"),
            registry=registry,
        )
        self.latency = Histogram(
            "optimizer_request_duration_seconds",
            "Time from the request's arrival to its answer, by route pattern.",
            ("route",),
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.stages = Histogram(
            "optimizer_stage_duration_seconds",
            "Time in each stage of an image request: read (upload), queue (waiting for a worker), "
            "budget (waiting for memory), decode, resize, encode.",
            ("stage",),
            buckets=_STAGE_BUCKETS,
            registry=registry,
        )
        self.refusals = Counter(
            "optimizer_refusals",
            "Requests answered with an error, by problem code (overloaded, draining, body_too_large, ...).",
            ("reason",),
            registry=registry,
        )
        self.turns = Counter(
            "optimizer_turns_given",
            "Requests refused (503 overloaded) on a connection just served, so that refused clients due "
            "back could take the slot.",
            registry=registry,
        )
        waiting = Gauge(
            "optimizer_waiting_clients",
            "Refused clients told to come back later than now (counted per refusal).",
            registry=registry,
        )
        waiting.set_function(gate.waiting)
        self.bytes_in = Counter("optimizer_received_bytes", "Request body bytes received.", registry=registry)
        self.bytes_out = Counter("optimizer_sent_bytes", "Response body bytes sent.", registry=registry)
        in_flight = Gauge(
            "optimizer_in_flight",
            "Admitted requests: reading their upload, queued for a worker or being processed.",
            registry=registry,
        )
        in_flight.set_function(lambda: gate.in_flight)
        capacity = Gauge("optimizer_capacity", "Admission slots (worker threads + queue).", registry=registry)
        capacity.set_function(lambda: gate.capacity)
        # Each holds what its client sent in the kernel's socket buffers, outside the RSS (optimizer.linger).
        lingering_gauge = Gauge(
            "optimizer_lingering_connections",
            "Refused connections waiting to be closed, the rest of their uploads unread.",
            registry=registry,
        )
        lingering_gauge.set_function(lambda: len(lingering))
        budget_total = Gauge(
            "optimizer_memory_budget_bytes",
            "Decode memory the workers (and unsent answers) may hold; uploads have half as much beside it.",
            registry=registry,
        )
        budget_total.set_function(lambda: budget.total)
        reserved = Gauge(
            "optimizer_memory_reserved_bytes",
            "Decode memory reserved by images being processed, and image answers not yet sent, now.",
            registry=registry,
        )
        reserved.set_function(lambda: budget.in_use)
        uploads = Gauge(
            "optimizer_memory_uploads_bytes",
            "Uploads held in memory now, within their allowance of half the memory budget.",
            registry=registry,
        )
        uploads.set_function(lambda: budget.uploads)
        reserved_peak = Gauge(
            "optimizer_memory_reserved_peak_bytes",
            "The most memory ever reserved at once since the start (decodes and unsent answers).",
            registry=registry,
        )
        reserved_peak.set_function(lambda: budget.peak)

    def observe_request(
        self, route: str, status: int, *, seconds: float | None, bytes_in: int, bytes_out: int, code: str
    ) -> None:
        """``seconds`` None: an answer with no arrival time worth a latency sample (a request aiohttp's
        parser refused, optimizer.badrequests), counted with the others all the same."""
        self.requests.labels(route, str(status)).inc()
        if seconds is not None:
            self.latency.labels(route).observe(seconds)
        if code and status >= 400:
            self.refusals.labels(code).inc()
        self.bytes_in.inc(bytes_in)
        self.bytes_out.inc(bytes_out)

    def observe_stages(self, seconds: Mapping[str, float]) -> None:
        for stage, value in seconds.items():
            self.stages.labels(stage).observe(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
