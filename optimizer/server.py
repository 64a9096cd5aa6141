"""Run the service in this process: the listener, signals, graceful exit (``optimizer.cli`` has read the
settings and set up logging first).

This module and ``optimizer.cli`` are the only ones that read ``os.environ``, configure logging or
install signal handlers; an application that embeds ``create_app()`` keeps all three for itself.

Shutdown on SIGTERM, SIGINT or SIGHUP (which a ``--processes`` child gets when its supervisor dies), in
order:
  1. ``/readyz`` answers 503 at once, while the listener stays open for ``shutdown_delay`` seconds, so a
     load balancer notices and stops sending before connections are refused;
  2. the listener closes and the app drains: new requests on open connections get 503 ``draining``,
     admitted ones get up to ``drain_seconds`` to finish;
  3. what is left after the deadline is answered 503 and the pool is shut down.
The exit code is 0 when everything admitted was finished, 1 when work had to be abandoned. A second
SIGTERM or SIGINT exits at once; SIGHUP never does.
"""

from __future__ import annotations

import asyncio
import asyncio.selector_events
import logging
import os
import signal
import sys
import threading

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from optimizer import allocator, vips
from optimizer.app import create_app, drain
from optimizer.badrequests import PROBLEM_CODE
from optimizer.listener import PacedSite
from optimizer.settings import Settings, effective_cpu_count, memory_limit
from optimizer.startup import (
    EXIT_ABANDONED,
    EXIT_OK,
    STOP_SIGNALS,
    held_stop_signals,
    report_listen_failure,
)
from optimizer.state import STATE

log = logging.getLogger("optimizer")

# After the drain, how long aiohttp waits for handlers that are still reading an upload before it
# cancels them. The drain deadline is the real budget; this only mops up.
HANDLER_GRACE_SECONDS = 2.0


FIRST_READ_BYTES = 64 * 1024


class ClientErrorsAsWarnings(logging.Filter):
    """aiohttp logs every request its parser refuses (a header line over 8 KiB, a Content-Encoding it
    cannot decode, bytes that are not HTTP) at ERROR, with a traceback: the client's mistake reads as the
    server's, and any client can fill the log with them. Those become one WARNING line with the reason
    (event ``bad_request``), or one DEBUG line where aiohttp logged at debug (bytes that are not HTTP, as
    a connection's first request); errors of the server's own stay as they are."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError) and 400 <= error.code < 500:
            reason = " ".join(str(error.message).split()) or type(error).__name__
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg = "refused a malformed request from %s: %s"
            record.args = (remote, reason)
            # aiohttp logs bytes that are not HTTP, as a connection's first request, at debug level on
            # purpose (scanners, TLS sent to the HTTP port): those stay at debug.
            level = min(record.levelno, logging.WARNING)
            record.levelno, record.levelname = level, logging.getLevelName(level)
            record.exc_info = record.exc_text = None
            record.fields = {"event": "bad_request", "status": error.code}
            # The logger let it through at its own level: one set above the new level leaves it out.
            return logging.getLogger(record.name).isEnabledFor(level)
        return True


# The standalone server's HTTP layer logs here (aiohttp's default is "aiohttp.server"), through the filter.
http_log = logging.getLogger("optimizer.http")
http_log.addFilter(ClientErrorsAsWarnings())


def small_first_reads() -> None:
    """Process-wide, for the server only: asyncio's first read on a new connection takes at most 64 KiB.

    asyncio reads up to 256 KiB per recv(), and in one turn of the loop it reads every connection that
    has data before any handler runs: under a burst of uploads that will mostly be refused, each one held
    a quarter megabyte first. With 200 users on S1, peak RSS 386 MB, against 361 MB with 64 KiB first
    reads (and goodput 6.6 -> 6.9 images/s: less read per refusal). An admitted upload is read in steps
    of up to 4 MiB (``optimizer.intake.read_upload``), so large uploads cost no more reads.
    """
    transport = getattr(asyncio.selector_events, "_SelectorSocketTransport", None)
    if transport is not None and isinstance(getattr(transport, "max_size", None), int):
        transport.max_size = FIRST_READ_BYTES


def lower_loop_priority(increment: int) -> None:
    """Add ``increment`` to this thread's nice value: called on the event loop once the workers run.

    A nice value is per thread on Linux, and a thread inherits its creator's: the workers, started
    before this call, keep the start-up priority. When the cores are contended, the kernel then gives
    the image work its time first and the loop what is left. A flood of clients that retry a 503 at once
    would otherwise take an equal share of the CPU per runnable thread, and the loop with it: measured
    on 2 cores, flood goodput went from 3.6 to 5.7 images/s (polite clients: 7.5), for 1.5 % less on S2
    when nothing floods (docs/benchmarks.md).
    Raising a nice value needs no privilege; lowering it again would, so this is done once.
    """
    if not increment:
        return
    if sys.platform != "linux":
        log.debug("OPTIMIZER_LOOP_NICE is ignored here: per-thread nice values are a Linux feature")
        return
    thread = threading.get_native_id()
    try:
        nice = min(19, os.getpriority(os.PRIO_PROCESS, thread) + increment)
        os.setpriority(os.PRIO_PROCESS, thread, nice)
    except OSError as exc:
        log.warning("could not lower the event loop thread's priority: %s", exc)


TRIM_CHECK_SECONDS = 1.0


async def trim_memory_when_idle(app: web.Application) -> None:
    """Runs for the server's lifetime: after work, once nothing is in flight, trim the allocator."""
    trim = allocator.malloc_trim()
    if trim is None:
        return
    gate = app[STATE].gate
    trimmed_at = gate.admitted_total
    while True:
        await asyncio.sleep(TRIM_CHECK_SECONDS)
        if gate.in_flight == 0 and gate.admitted_total != trimmed_at:
            trimmed_at = gate.admitted_total
            # In a worker, not asyncio's default executor: a thread started now would inherit the loop's
            # lowered priority and could hold the allocator's locks while workers wait for them.
            await asyncio.get_running_loop().run_in_executor(app[STATE].pool, trim)


def run(settings: Settings) -> int:
    """Serve until a signal, in this process (``optimizer.cli`` has read the settings and set up logging)."""
    allocator.tune()
    small_first_reads()
    if settings.resizer == "vips":
        vips.configure_process()  # this process is the service's alone
    return asyncio.run(serve(settings))


async def serve(settings: Settings) -> int:
    """Serve until SIGTERM, SIGINT or SIGHUP, then shut down gracefully; returns the exit code."""
    app = create_app(settings)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,  # the app writes its own structured line per request
        shutdown_timeout=HANDLER_GRACE_SECONDS,
        handler_cancellation=True,  # a client that leaves cancels its queued work
        logger=http_log,
    )
    await runner.setup()  # starts the worker threads
    lower_loop_priority(settings.loop_nice)
    stop = asyncio.Event()
    _install_signal_handlers(stop)
    try:
        gate, metrics = app[STATE].gate, app[STATE].metrics
        site = PacedSite(
            runner,
            settings.host,
            settings.port,
            reuse_port=settings.reuse_port,
            full=lambda: gate.full,
            # No route, no arrival time: counted with the other answers, so that an alert on 4xx sees it.
            refused=lambda problem: metrics.observe_request(
                "unparsed",
                problem.status,
                seconds=None,
                bytes_in=0,
                bytes_out=problem.content_length or 0,
                code=problem.get(PROBLEM_CODE, "bad_request"),
            ),
            head_timeout=settings.read_timeout,
        )
        try:
            await site.start()
        except OSError as exc:  # the port is taken, the address is not this machine's, the name unknown
            return report_listen_failure(log, settings.host, settings.port, exc)
        cpus, memory = effective_cpu_count(), memory_limit()
        for conflict in settings.conflicts(cpus, memory):
            log.warning(conflict, extra={"fields": {"event": "settings_conflict"}})
        for address in runner.addresses:
            host, port = address[0], address[1]
            log.info(
                "listening on http://%s",
                f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
                extra={
                    "fields": {
                        "event": "listening",
                        "host": host,
                        "port": port,
                        "threads": settings.threads,
                        "capacity": settings.capacity,
                        "cpus": cpus,
                        "memory_limit": memory,
                        "memory_budget": app[STATE].budget.total,
                        "max_body_bytes": settings.max_body_bytes,
                        "drain_seconds": settings.drain_seconds,
                        "loop_nice": settings.loop_nice,
                        "resizer": settings.resizer,
                    }
                },
            )
        trimmer = asyncio.create_task(trim_memory_when_idle(app))
        await stop.wait()
        trimmer.cancel()
        state = app[STATE]
        state.ready = False
        log.info(
            "shutdown requested: readiness off, draining in %.1f s",
            settings.shutdown_delay,
            extra={"fields": {"event": "shutdown", "in_flight": state.gate.in_flight}},
        )
        if settings.shutdown_delay:
            await asyncio.sleep(settings.shutdown_delay)
        # Close the listener and drain *before* the runner's cleanup: from its first step aiohttp stops
        # reading request bodies, so an upload still arriving then could never finish.
        for listener in list(runner.sites):
            await listener.stop()
        await drain(app)
    finally:
        await runner.cleanup()
        _ignore_stop_signals()
    abandoned = app[STATE].abandoned + app[STATE].answers.cut
    log.info(
        "stopped",
        extra={"fields": {"event": "stopped", "abandoned": abandoned}},
    )
    return EXIT_ABANDONED if abandoned else EXIT_OK


def _ignore_stop_signals() -> None:
    """Once stopped: a stop signal arriving now (the supervisor's SIGHUP after the operator's own SIGTERM
    has drained this process) would find the loop's handlers gone, kill the process by its default
    action, and a clean exit would read as a death by signal. It is leaving anyway. (Removed here, the
    handlers are not put back to the defaults when the loop closes, long after: only for the moment
    between the two calls below.)"""
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.remove_signal_handler(signum)
        signal.signal(signum, signal.SIG_IGN)


def _install_signal_handlers(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT drain; a second of them exits at once. SIGHUP drains and never escalates: a
    ``--processes`` child gets it from its supervisor, which may come on top of the operator's own
    SIGTERM (systemd signals the whole cgroup), and when the supervisor dies; neither may cut the drain
    short."""
    loop = asyncio.get_running_loop()
    asked = False  # by SIGTERM or SIGINT

    def on_signal(signum: int) -> None:
        nonlocal asked
        if signum == signal.SIGHUP:
            log.info(
                "hang-up (the supervisor stops or is gone, or the terminal closed): %s",
                "the drain goes on" if stop.is_set() else "draining",
                extra={"fields": {"event": "hangup", "draining": stop.is_set()}},
            )
            stop.set()
            return
        if asked:
            log.warning("second %s: exiting at once", signal.Signals(signum).name)
            logging.shutdown()
            os._exit(128 + signum)
        asked = True
        stop.set()

    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)
    for held in held_stop_signals():  # came while the server was starting: as if they came now
        on_signal(held)
