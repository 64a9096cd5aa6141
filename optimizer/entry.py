"""The program's entry point (the ``optimizer`` command, ``python -m optimizer``).

It restarts the process once for the allocator's start-up tunables (``optimizer.allocator``) before
anything heavy is imported: aiohttp and Pillow then load only in the process that stays, and the restart
costs an interpreter start (~0.03 s) instead of a second full import (~0.25 s).
"""

from __future__ import annotations

from optimizer import allocator
from optimizer.startup import hold_stop_signals


def run() -> int:
    """``optimizer.cli.main`` in a process that has restarted itself with the allocator's tunables."""
    allocator.restart_with_tunables()
    # In the process that stays (a signal held before the restart would be lost with the old image):
    # from here a stop signal waits for the server's or supervisor's handlers instead of killing it.
    hold_stop_signals()
    from optimizer.cli import main  # noqa: PLC0415 - after the restart, see above

    return main()
