"""The per-application state shared by the handlers, the middleware and the lifecycle hooks.

One ``ServiceState`` per ``create_app()`` call, stored under a typed ``AppKey``: two applications in one
process (say, two sub-apps with different settings) share nothing.
"""

from __future__ import annotations

import asyncio
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from aiohttp import StreamReader, web

from optimizer.budget import MemoryBudget
from optimizer.gate import AdmissionGate
from optimizer.intake import IntakeLimits
from optimizer.linger import Lingering
from optimizer.metrics import ServiceMetrics
from optimizer.pipeline import Limits
from optimizer.security import Cors
from optimizer.sending import AnswersOut
from optimizer.settings import Settings, default_memory_budget


@dataclass(eq=False)
class ServiceState:
    settings: Settings
    gate: AdmissionGate
    limits: Limits
    intake: IntakeLimits
    metrics: ServiceMetrics
    cors: Cors
    budget: MemoryBudget
    # Refused connections waiting to be closed, their uploads unread (bounded: see optimizer.linger).
    lingering: Lingering
    # Image answers being sent, which the drain waits for too (see optimizer.sending).
    answers: AnswersOut = field(default_factory=AnswersOut)
    pool: ThreadPoolExecutor | None = None
    # False from the moment shutdown begins: /readyz answers 503 so load balancers stop sending.
    ready: bool = True
    # Requests still unfinished when the drain deadline passed (the exit code reports them, with the
    # answers the shutdown cut off: ``answers.cut``).
    abandoned: int = 0
    # Loop time by which the drain must be over; set by the first begin_drain() (or drain()) call.
    drain_deadline: float | None = None
    drain_timer: asyncio.TimerHandle | None = field(default=None, repr=False)  # answers leftovers at it
    # Body streams of admitted requests still being read (see app._on_shutdown for why they are tracked).
    reading: set[StreamReader] = field(default_factory=set, repr=False)
    # When each connection's last image came back (the gate's "Taking turns"; a 4xx does not count);
    # weak, so that a closed connection's entry goes with it.
    served_at: weakref.WeakKeyDictionary[asyncio.BaseTransport, float] = field(
        default_factory=weakref.WeakKeyDictionary, repr=False
    )
    _abandon: asyncio.Future[None] | None = field(default=None, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> ServiceState:
        gate = AdmissionGate(settings.capacity, workers=settings.threads)
        budget = MemoryBudget(
            settings.memory_budget if settings.memory_budget is not None else default_memory_budget()
        )
        lingering = Lingering(settings.linger_seconds)
        return cls(
            settings=settings,
            gate=gate,
            metrics=ServiceMetrics(gate, budget, lingering),
            cors=Cors(settings.cors_origin_set),
            budget=budget,
            lingering=lingering,
            limits=pipeline_limits(settings),
            intake=IntakeLimits(
                max_bytes=settings.max_body_bytes,
                read_timeout=settings.read_timeout,
                min_rate=settings.min_upload_rate,
            ),
        )

    def abandon_signal(self) -> asyncio.Future[None]:
        """A future that completes when the drain deadline has passed and waiting work must give up."""
        if self._abandon is None:
            self._abandon = asyncio.get_running_loop().create_future()
        return self._abandon

    @property
    def abandoning(self) -> bool:
        """Whether the drain deadline has passed; readable from a worker thread."""
        return self._abandon is not None and self._abandon.done()

    def abandon_waiting_work(self) -> None:
        signal = self.abandon_signal()
        if not signal.done():
            signal.set_result(None)


def pipeline_limits(settings: Settings) -> Limits:
    """What the pipeline is told by the settings (the benchmark's ceiling builds it the same way)."""
    return Limits(
        max_pixels=settings.max_pixels,
        max_dimension=settings.max_dimension,
        input_formats=settings.input_formats,
        resizer=settings.resizer,
        jpeg_progressive=settings.jpeg_progressive,
    )


STATE = web.AppKey("optimizer_state", ServiceState)
