"""The C allocator, tuned for image-sized buffers: for the server process only, never in create_app().

Everything here is process-wide, so only the server (``optimizer.server``) and the benchmark's ceiling
(``scripts/bench.py``, to measure the same pipeline under the same conditions) call it; an application
that embeds the service keeps its own allocator as it is.

**Thresholds.** glibc keeps memory freed by the worker threads in its arenas, and by default serves even
Pillow's 16 MiB image blocks from them once one has been freed (its mmap threshold rises on the fly):
after two passes of the corpus the process stayed at idle + 115 MB. Measured on S2 and the corpus
(docs/benchmarks.md)::

    default allocator                 22.6 images/s   RSS after the corpus idle + 115 MB
    M_MMAP_THRESHOLD 16 MiB           21.6 images/s   idle + 7 MB   <- this default: memory comes back
    ... and M_TRIM_THRESHOLD 256 MiB  23.2 images/s   idle + 86 MB  (MALLOC_TRIM_THRESHOLD_, for speed)
    M_MMAP_THRESHOLD 128 KiB          17.8 images/s   (every decode faults in fresh zeroed pages)

With 16 MiB only image-sized buffers get their own mappings, returned when freed; the small and medium
ones stay in the arenas. Setting the mmap threshold also pins the trim threshold at glibc's 128 KiB,
though, so each 4 MB upload freed at the top of the heap was handed back to the kernel and the next one
faulted its pages in again: M_TRIM_THRESHOLD 16 MiB as well took S2 from 22.4 to 24.1 images/s with the
same peak RSS (back to back, twice). An operator's own MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_
win. ``malloc_trim`` once idle returns what the arenas hold after a burst.

**Huge pages.** Those image-sized mappings are made afresh for every image and the kernel faults them in
4 KiB at a time: a progressive 22 Mpx JPEG (S1) keeps ~133 MB of coefficients per decode, and 75 of its
245 ms of CPU went to those faults. glibc's ``glibc.malloc.hugetlb=1`` tunable has malloc ask for
transparent huge pages (2 MiB) with madvise, which the kernel's "madvise" THP mode needs ("always" uses
them anyway, "never" not at all): S1's pipeline then spends 19 ms in the kernel per image and runs 8.0 ->
10.7 images/s on 2 threads at the same peak RSS. Keeping the buffers in the heap instead (an mmap
threshold of 256 MiB) gave 9.2-9.4 images/s for +86 MB of peak RSS. glibc reads tunables only when a
process starts, so the program restarts itself once with the tunable set (``restart_with_tunables``).
An operator's own GLIBC_TUNABLES, even empty, is left alone; musl (the Alpine image) has no such tunable.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

log = logging.getLogger("optimizer")

GLIBC_TUNABLES = "glibc.malloc.hugetlb=1"
# Set by the restart for the restarted process: it must never restart again (glibc drops GLIBC_TUNABLES
# itself for a setuid or file-capability interpreter, which would otherwise restart forever), and it
# carries the process name to put back (a console script's process is named after the script).
RESTARTED = "_OPTIMIZER_RESTARTED_AS"

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 16 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 16 * 1024 * 1024
_PR_SET_NAME = 15

_restart_failure: str | None = None


def _libc() -> ctypes.CDLL | None:
    """glibc, or None: only glibc has mallopt and malloc_trim (musl returns large blocks by itself)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def is_glibc() -> bool:
    try:
        return sys.platform == "linux" and os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError):  # the name is unknown outside glibc
        return False


def tune() -> None:
    """The thresholds above, unless the operator set them."""
    libc = _libc()
    if libc is None:
        return
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)


def malloc_trim() -> Callable[[], object] | None:
    """A call that hands the arenas' free memory back to the system, or None where there is none."""
    libc = _libc()
    if libc is None:
        return None
    trim: Callable[[int], object] = libc.malloc_trim
    return lambda: trim(0)


def start_environment(environ: Mapping[str, str]) -> dict[str, str] | None:
    """The environment to restart with, or None to run as is: not glibc, the operator chose the
    tunables, or this process is the restart already."""
    if RESTARTED in environ or "GLIBC_TUNABLES" in environ or not is_glibc():
        return None
    return {**environ, "GLIBC_TUNABLES": GLIBC_TUNABLES}


def restart_with_tunables() -> None:
    """Replace this process with itself under ``start_environment`` (same pid, arguments and name).

    Only for a program's entry point: it re-runs the interpreter's command line (``sys.orig_argv``)."""
    global _restart_failure  # noqa: PLW0603 - reported once logging is configured
    if RESTARTED in os.environ:
        _set_process_name(os.environ.pop(RESTARTED))
        return
    environ = start_environment(os.environ)
    if environ is None:
        return
    environ[RESTARTED] = _process_name()
    try:
        os.execve(sys.executable, sys.orig_argv, environ)
    except OSError as exc:  # the service still works, with slower page faults
        _restart_failure = str(exc)


def report_restart() -> None:
    """Log, once logging is set up, a restart that failed."""
    if _restart_failure is not None:
        log.warning(
            "could not restart with %s (%s): large image buffers use 4 KiB pages",
            GLIBC_TUNABLES,
            _restart_failure,
            extra={"fields": {"event": "allocator_restart_failed"}},
        )


def _process_name() -> str:
    try:
        return Path("/proc/self/comm").read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""


def _set_process_name(name: str) -> None:
    """Put back the name ps, top and pgrep show (execve names the process after the interpreter)."""
    libc = _libc()
    if libc is None or not name or name == _process_name():
        return
    libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
