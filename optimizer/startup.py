"""How the process says it stopped: its exit codes, and the one error line for an address it cannot
listen on. Shared by the server, the command line and the ``--processes`` supervisor (which imports
neither aiohttp nor Pillow, so neither does this module).

The supervisor reads them from its children: a child that exits with a code that says it cannot start is
not restarted, since a restart would fail the same way (a port already taken, bad settings, a broken
install), and the operator is better served by one clear error and an exit than by a restart loop.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

# Stopped by a signal, and all admitted work finished.
EXIT_OK = 0
# Stopped by a signal, but the drain deadline cut off admitted work (answered 503 shutdown_deadline).
EXIT_ABANDONED = 1
# An unexpected error stopped the server (logged with its traceback).
EXIT_FAILED = 1
# The settings (flags, environment) are invalid: the message names each one.
EXIT_BAD_SETTINGS = 2
# The service cannot start here: it cannot listen on its address, or the installation is broken.
EXIT_CANNOT_START = 3
# ``--processes``: children kept dying soon after being started, so the supervisor gave up.
EXIT_CRASH_LOOP = 4

# Set in a ``--processes`` supervisor's children: they read the same environment, and leave it to the
# supervisor to say what is wrong with it.
SUPERVISED = "_OPTIMIZER_SUPERVISED"

# Codes a restart would not change.
CANNOT_START = frozenset({EXIT_BAD_SETTINGS, EXIT_CANNOT_START})


def report_listen_failure(log: logging.Logger, host: str, port: int, exc: OSError) -> int:
    """Log why ``host``:``port`` cannot be listened on, in one line; the exit code to leave with."""
    log.error(
        "cannot listen on %s port %d: %s",
        host,
        port,
        exc,
        extra={"fields": {"event": "listen_failed", "host": host, "port": port}},
    )
    return EXIT_CANNOT_START


# The signals that stop a server (SIGHUP: from its supervisor, or the terminal closing).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# Stop signals that came before the server could act on them (``hold_stop_signals``), in order.
_held: list[int] = []


def hold_stop_signals() -> None:
    """Remember a stop signal instead of dying of it, until the server's own handlers replace these and
    act on what was held (``held_stop_signals``). Between the start of ``main`` and those handlers lie
    the imports, the pool and the runner's setup (~0.3 s): a signal there used to end the process with
    128 + N and no log line, and a ``--processes`` child stopped while starting made its supervisor exit
    129. (What comes before ``main``, an interpreter start or two, stays the default action's.)"""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _hold)


def _hold(signum: int, _frame: FrameType | None) -> None:
    _held.append(signum)


def held_stop_signals() -> list[int]:
    """The signals held so far, each given once: the caller acts on them now."""
    held = list(_held)
    _held.clear()
    return held
