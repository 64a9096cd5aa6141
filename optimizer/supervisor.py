"""``--processes N``: N server processes on one port, each with its own event loop, gate and pool.

One process with N threads shares one event loop and one GIL: past a few cores, the loop thread (HTTP
parsing, reading uploads) becomes the bottleneck and steals the GIL from the workers. N processes on
one port (SO_REUSEPORT: the kernel spreads new connections across the listening sockets) scale the
loop too, at the price of N interpreters' memory.

The parent only supervises: it reserves the port, starts the children (``python -m optimizer`` with the
same flags plus ``--processes 1 --reuse-port 1 --port P``), forwards SIGTERM and SIGINT to every child,
so that each drains its own admitted work (as SIGHUP: see ``FORWARDED_STOP``; a second signal kills
them), restarts a child that dies unexpectedly, and exits with the worst of the children's exit codes.

A child that cannot start (its exit code says so: ``optimizer.startup``) is not restarted, nor are
children that keep dying soon after they start: their restarts back off (1, 2, 4 ... seconds), and after
``MAX_RECENT_EXITS`` such deaths (each within ``QUICK_EXIT_SECONDS`` of its start) in
``RECENT_EXIT_SECONDS`` the supervisor stops the others and exits, so that an orchestrator shows the
failure (and restarts the whole with its own backoff) instead of a supervisor that looks alive while its
children crash.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from optimizer.settings import Settings, default_memory_budget, effective_cpu_count, memory_limit
from optimizer.startup import (
    CANNOT_START,
    EXIT_CRASH_LOOP,
    SUPERVISED,
    held_stop_signals,
    report_listen_failure,
)

log = logging.getLogger("optimizer.supervisor")

RESTART_DELAY = 1.0  # seconds before restarting a child that died on its own, doubled per recent exit
MAX_RESTART_DELAY = 16.0
# This many quick exits (a child dead within QUICK_EXIT_SECONDS of its start) within this many seconds,
# and the supervisor gives up (EXIT_CRASH_LOOP). A child that served for longer first (then was killed by
# the OOM killer, say) is restarted after RESTART_DELAY and not counted.
MAX_RECENT_EXITS = 5
RECENT_EXIT_SECONDS = 60.0
QUICK_EXIT_SECONDS = 30.0
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
# What a child gets when the supervisor dies: SIGHUP, which a server drains on and never takes as a
# "second signal" (a forwarded SIGTERM may already be draining when the supervisor is killed).
DEATH_SIGNAL = signal.SIGHUP
# How the supervisor tells its children to stop: SIGHUP drains and never escalates, so a child that also
# gets the operator's SIGTERM itself still drains (systemd signals every process of a service's cgroup,
# and two SIGTERMs would make a child exit at once). A second signal to the supervisor stops them at once.
FORWARDED_STOP = signal.SIGHUP


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound (not listening) SO_REUSEPORT socket: it fixes the port, even when 0 was asked for, so
    that every child binds the same one. Kept open until the children listen.

    A port some other server already listens on is refused (``OSError``, EADDRINUSE): with SO_REUSEPORT
    alone the bind would succeed for any process of the same user, and the kernel would quietly split
    the connections between that server and this one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if port:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # SO_REUSEADDR as asyncio's listeners set it: connections of an earlier run still in
            # TIME_WAIT do not count as the port being in use; a listener does.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def child_shares(settings: Settings, argv: Sequence[str], environ: dict[str, str]) -> dict[str, Any]:
    """What each child is told beyond the parent's own flags: unless set explicitly, the threads and the
    memory budget are divided among the processes, so that ``--processes N`` alone does not multiply
    what the machine is asked to carry."""

    def explicit(flag: str, env: str) -> bool:
        return env in environ or any(arg == flag or arg.startswith(flag + "=") for arg in argv)

    shares: dict[str, Any] = {}  # Settings fields, for dataclasses.replace
    if not explicit("--threads", "OPTIMIZER_THREADS"):
        shares["threads"] = max(1, effective_cpu_count() // settings.processes)
    if not explicit("--memory-budget", "OPTIMIZER_MEMORY_BUDGET"):
        shares["memory_budget"] = max(16 * 1024 * 1024, default_memory_budget() // settings.processes)
    return shares


def child_flags(settings: Settings, argv: Sequence[str], environ: dict[str, str], port: int) -> list[str]:
    """The children's command line: the parent's flags, then the overrides (a later flag wins)."""
    flags = [*argv, "--processes", "1", "--reuse-port", "1", "--port", str(port)]
    for attr, value in child_shares(settings, argv, environ).items():
        flags += ["--" + attr.replace("_", "-"), str(value)]
    return flags


def _death_signal_setter() -> Callable[[int, int], int] | None:
    """``prctl(option, value)`` where the kernel has it and lets this process call it (a seccomp policy
    may not), checked once here, so that a child never fails to start over it; ``None`` elsewhere."""
    if sys.platform != "linux":
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # loaded before any fork: children only call it
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int

    def set_option(option: int, value: int) -> int:
        return int(prctl(option, value, 0, 0, 0))

    if set_option(_PR_SET_PDEATHSIG, 0) != 0:  # the supervisor's own setting: none, as it already is
        log.warning(
            "prctl(PR_SET_PDEATHSIG) is refused here (errno %d): children of a killed supervisor will "
            "not be stopped",
            ctypes.get_errno(),
        )
        return None
    return set_option


class Supervisor:
    def __init__(self, settings: Settings, argv: Sequence[str]) -> None:
        self.settings = settings
        self.argv = list(argv)
        self.children: list[subprocess.Popen[bytes]] = []
        self.signals_received = 0  # the operator's stop signals
        self.give_up_code: int | None = None  # set when the supervisor stops the children itself
        self._started: dict[int, float] = {}  # each child's start, by pid (monotonic)
        self._pid = os.getpid()
        self._prctl = _death_signal_setter()

    def _die_with_parent(self) -> None:
        """In the child, between fork and exec: ``DEATH_SIGNAL`` when the supervisor dies, however it dies.

        Forwarded signals stop the children when the supervisor is told to stop; a supervisor that is
        killed outright (SIGKILL, the OOM killer) forwards nothing, and its children, in sessions of their
        own, would go on serving the port unsupervised. The setting survives exec (not of a set-user-ID
        program), so the allocator's restart keeps it.
        """
        assert self._prctl is not None
        self._prctl(_PR_SET_PDEATHSIG, DEATH_SIGNAL)
        if os.getppid() != self._pid:  # the supervisor died before the line above: no signal will come
            os._exit(1)

    def _start_child(self, flags: list[str]) -> subprocess.Popen[bytes]:
        # A session of its own: a terminal's Ctrl-C reaches the whole foreground process group, and a
        # child that got it both from the terminal and forwarded would take it as the second signal
        # (exit at once). Only the supervisor's forwarding reaches the children.
        return subprocess.Popen(
            [sys.executable, "-m", "optimizer", *flags],
            env={**os.environ, SUPERVISED: "1"},
            start_new_session=True,
            # The supervisor runs no threads, so a callback between fork and exec is safe here.
            preexec_fn=self._die_with_parent if self._prctl is not None else None,  # noqa: PLW1509
        )

    @property
    def stopping(self) -> bool:
        return self.signals_received > 0 or self.give_up_code is not None

    def _on_signal(self, _signum: int, _frame: FrameType | None) -> None:
        self.signals_received += 1
        self._stop_children()

    def _stop_children(self) -> None:
        for child in self.children:
            if child.poll() is None:
                self._tell_to_stop(child)

    def _tell_to_stop(self, child: subprocess.Popen[bytes]) -> None:
        """Drain (``FORWARDED_STOP``), or stop now from the operator's second signal on."""
        if self.signals_received <= 1:
            child.send_signal(FORWARDED_STOP)
        else:
            child.kill()

    def _spawn(self, flags: list[str]) -> subprocess.Popen[bytes]:
        """Start a child and list it at once, so a signal arriving from now on reaches it; one that
        arrived while it was being started is passed on to it straight away."""
        child = self._start_child(flags)
        self.children.append(child)
        self._started[child.pid] = time.monotonic()
        if self.stopping and child.poll() is None:
            self._tell_to_stop(child)
        return child

    def run(self) -> int:
        settings = self.settings
        try:
            reserved = reserve_port(settings.host, settings.port)
        except OSError as exc:
            return report_listen_failure(log, settings.host, settings.port, exc)
        port = reserved.getsockname()[1]
        flags = child_flags(settings, self.argv, dict(os.environ), port)
        # Each child checks its own settings against the machine, but only here are they seen together.
        each = dataclasses.replace(settings, **child_shares(settings, self.argv, dict(os.environ)))
        for conflict in each.conflicts(effective_cpu_count(), memory_limit()):
            log.warning(conflict, extra={"fields": {"event": "settings_conflict"}})
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        # A hang-up ends the supervisor as it always has (its children then get SIGHUP from the kernel).
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        for held in held_stop_signals():  # came while it was starting: as if they came now
            if held == signal.SIGHUP:
                signal.raise_signal(held)
            self._on_signal(held, None)
        for _ in range(settings.processes):
            if self.signals_received:
                break  # stopped while starting: no more children
            self._spawn(flags)
        log.info(
            "supervising %d processes on port %d",
            settings.processes,
            port,
            extra={"fields": {"event": "supervising", "processes": settings.processes, "port": port}},
        )
        try:
            return self._watch(flags)
        finally:
            reserved.close()

    def _watch(self, flags: list[str]) -> int:
        worst = 0
        recent: deque[float] = deque()  # quick exits (see QUICK_EXIT_SECONDS), within RECENT_EXIT_SECONDS
        told = 0  # the signals logged so far (the handler itself does not log: it may interrupt a write)
        while True:
            if self.signals_received > told:
                told = self.signals_received
                if told == 1:
                    log.info("stopping: the processes drain", extra={"fields": {"event": "stopping"}})
                else:
                    log.warning(
                        "second signal: processes stopped at once", extra={"fields": {"event": "killed"}}
                    )
            running = False
            for child in list(self.children):
                code = child.poll()
                if code is None:
                    running = True
                    continue
                if self.stopping:
                    # Dead of the stop it was sent: it had no handler yet, so it was still starting and
                    # had admitted nothing. A clean stop, not the 129 it would otherwise count as.
                    if code == -FORWARDED_STOP:
                        code = 0
                    worst = max(worst, code if code >= 0 else 128 - code)
                    continue
                now = time.monotonic()
                quick = now - self._started.pop(child.pid, now) < QUICK_EXIT_SECONDS
                if quick:
                    recent.append(now)
                while recent and recent[0] < now - RECENT_EXIT_SECONDS:
                    recent.popleft()
                reason = self._not_restarting(code, len(recent))
                if reason is not None:
                    log.error(
                        "process %d exited on its own with code %d; %s: stopping the others",
                        child.pid,
                        code,
                        reason,
                        extra={"fields": {"event": "giving_up", "child": child.pid, "code": code}},
                    )
                    self.give_up_code = code if code in CANNOT_START else EXIT_CRASH_LOOP
                    self.children.remove(child)
                    self._stop_children()  # the others drain and stop
                    continue
                delay = (
                    min(MAX_RESTART_DELAY, RESTART_DELAY * 2 ** (len(recent) - 1)) if quick else RESTART_DELAY
                )
                log.error(
                    "process %d exited on its own with code %d; restarting it in %g s",
                    child.pid,
                    code,
                    delay,
                    extra={"fields": {"event": "child_exited", "child": child.pid, "code": code}},
                )
                self._pause(delay)
                if self.stopping:
                    continue  # stopping: do not replace it
                self.children.remove(child)
                self._spawn(flags)
                running = True
            if not running:
                # The reason the supervisor stopped them says more than the codes they stopped with.
                return self.give_up_code if self.give_up_code is not None else worst
            time.sleep(0.1)

    @staticmethod
    def _not_restarting(code: int, recent_exits: int) -> str | None:
        """Why a child that exited with ``code`` is not restarted, or ``None`` to restart it."""
        if code in CANNOT_START:
            return "it cannot start here, and a restart would fail the same way"
        if recent_exits >= MAX_RECENT_EXITS:
            return (
                f"{recent_exits} exits, each within {QUICK_EXIT_SECONDS:g} s of its start, "
                f"in {RECENT_EXIT_SECONDS:g} s"
            )
        return None

    def _pause(self, seconds: float) -> None:
        """Sleep, but return as soon as a signal has come (a stop must not wait out a restart delay)."""
        deadline = time.monotonic() + seconds
        while not self.stopping and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(0.1, left))
