#!/usr/bin/env python3
"""Load-test the optimizer over HTTP and compare it with the pipeline's own ceiling on this machine.

    python scripts/bench.py --scenario s1 --json /tmp/bench-s1.json
    python scripts/bench.py --file photo.jpg --users 20 --duration 30s -- --threads 2 --queue 4
    python scripts/bench.py --scenario s1 --sweep-users 10,50,200 --duration 15 --json sweep.json
    python scripts/bench.py chart sweep.json sweep.png

A run has two parts, one after the other, on the same machine and in the same invocation:

1. the ceiling (``--ceiling``, on by default when the harness starts the server): the same image bytes
   and parameters through ``optimizer.pipeline.optimize`` on a thread pool as large as the server's,
   with no HTTP, for the same duration, in a child process whose peak RSS is measured;
2. the HTTP load: N virtual users in a closed loop (one keep-alive connection each), each uploading the
   file again as soon as its previous answer came back, at a constant count (``--users``/``--duration``)
   or following k6-like stages (``--stages 5s:20,10s:50,5s:0``). On a 503 a user sleeps the
   ``Retry-After`` seconds (``--on-503 retry-after``) or retries at once (``--on-503 immediate``, the
   original k6 test).

Without ``--url`` the harness starts ``python -m optimizer`` itself on 127.0.0.1 and a free port (flags
after ``--`` go to the server), samples its RSS every 100 ms and its CPU time, and stops it with SIGTERM
(SIGKILL after ``--stop-timeout``). Everything is bounded: the duration, a timeout on every request, a
grace period for the requests still in flight at the end.

With ``--peer ipx`` or ``--peer thumbor`` (installed beforehand into ``--peer-dir``; the error message
says how), each load is followed by the same plan against that server, started on 127.0.0.1 on a copy
of the file: it GETs the file from its own disk while ours receive it as an upload, which the report
says next to its figures.

Exit status: 0 when the run completed and some requests got a 2xx, 1 when none did or the server died,
2 for bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import concurrent.futures
import contextlib
import email.utils
import fcntl
import functools
import itertools
import json
import math
import mimetypes
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl, quote, urlsplit

import aiohttp
import PIL
from multidict import MultiDict
from PIL import Image, ImageDraw, ImageFont

from optimizer import allocator, vips
from optimizer.allocator import start_environment
from optimizer.cli import build_parser as server_parser
from optimizer.errors import OptimizerError
from optimizer.handlers import OPTIMIZE_DEFAULTS, UPLOAD_DEFAULTS
from optimizer.params import RouteDefaults, parse_params
from optimizer.pipeline import Params, optimize
from optimizer.settings import Settings, SettingsError, effective_cpu_count
from optimizer.sniff import PILLOW_FORMATS, sniff
from optimizer.state import pipeline_limits

# The optimizer modules this file imports: a --source checkout must have every one, or the ceiling's
# child (this file, importing from --source) cannot start. The oldest commit with all of them, and with
# the names imported from them, is e005eff (optimizer/cli.py); --resizer vips needs c0f1f66 (vips's
# configure_process).
SOURCE_MODULES = ("allocator", "cli", "errors", "handlers", "params", "pipeline", "settings", "state", "vips")

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
ROUTE_DEFAULTS: dict[str, RouteDefaults] = {"/upload": UPLOAD_DEFAULTS, "/optimize": OPTIMIZE_DEFAULTS}
RESULTS_VERSION = 2  # 2: each run has its own "ceiling" and "measured_at"; a ceiling after the loads
SAMPLE_INTERVAL = 0.1  # seconds between RSS samples of the server
CONTROL_INTERVAL = 0.1  # seconds between adjustments of the user count to the stage target
PROGRESS_INTERVAL = 1.0
CONNECTION_ERROR_PAUSE = 0.05  # a user that hit a connection error waits this long before retrying
STARTUP_TIMEOUT = 30.0
NOISY_CORES = 0.25  # other processes' CPU (in cores) above which a phase's figures are flagged
# The ceilings before and after a load disagreeing by more than this: the machine's speed moved under
# the load, and its ratio is uncertain by about as much.
BRACKET_DRIFT_WARNING = 0.03
MB = 1_000_000

WITHOUT_HARNESS = (
    "an upper-bound estimate, as with a load generator on cores of its own: goodput / ceiling times the "
    "machine time per 2xx over the machine time per 2xx minus the harness's CPU per 2xx"
)
# With --url the harness cannot know how the running server was configured.
URL_CEILING_NOTE = (
    "the server at --url was started elsewhere: the ceiling ran with the settings a server started here "
    "would have (the defaults and this environment's OPTIMIZER_* variables), not necessarily that server's "
    "(threads, resizer, limits); --ceiling-threads sets its pool"
)
SAME_MACHINE_NOTE = (
    "the ceiling and the HTTP load ran one after the other (not concurrently) on the same machine, "
    "in the same invocation"
)


@dataclass(frozen=True)
class Scenario:
    file: str  # relative to the corpus
    path: str
    query: str
    users: int
    duration: float
    on_503: str
    description: str


SCENARIOS: dict[str, Scenario] = {
    "s1": Scenario(
        file="photos/seed-loadtest-5760x3840.jpg",
        path="/upload",
        query="",
        users=50,
        duration=25.0,
        on_503="retry-after",
        description="the Go service's test: seed photo to POST /upload, 50 users, 25 s",
    ),
    "s2": Scenario(
        file="photos/kleiber-lukas-baubkus-6028x3391.jpg",
        path="/optimize",
        query="width=800&quality=80",
        users=16,
        duration=25.0,
        on_503="retry-after",
        description="kleiber photo to POST /optimize?width=800&quality=80, 16 users, 25 s",
    ),
    "flood": Scenario(
        file="photos/seed-loadtest-5760x3840.jpg",
        path="/upload",
        query="",
        users=50,
        duration=25.0,
        on_503="immediate",
        description="s1, but a 503 is retried at once (the original k6 behaviour)",
    ),
}


class BenchError(Exception):
    """A problem the user can fix (bad arguments, missing file, a server that does not start)."""


# --- load plan -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    seconds: float
    target: int


@dataclass(frozen=True)
class LoadPlan:
    """Users at t=0, then stages, each a linear ramp from the previous target to its own (as k6)."""

    start_users: int
    stages: tuple[Stage, ...]

    @classmethod
    def constant(cls, users: int, seconds: float) -> LoadPlan:
        return cls(start_users=users, stages=(Stage(seconds, users),))

    @property
    def seconds(self) -> float:
        return sum(stage.seconds for stage in self.stages)

    @property
    def max_users(self) -> int:
        return max([self.start_users, *(stage.target for stage in self.stages)])

    def target_at(self, t: float) -> int:
        """Users wanted ``t`` seconds into the run (rounded to the nearest whole user)."""
        previous = float(self.start_users)
        elapsed = 0.0
        for stage in self.stages:
            if t < elapsed + stage.seconds:
                fraction = (t - elapsed) / stage.seconds if stage.seconds > 0 else 1.0
                return round(previous + (stage.target - previous) * fraction)
            elapsed += stage.seconds
            previous = float(stage.target)
        return round(previous)

    def describe(self) -> str:
        if len(self.stages) == 1 and self.stages[0].target == self.start_users:
            return f"{self.start_users} users constant for {self.seconds:g} s"
        steps = ", ".join(f"{stage.seconds:g}s->{stage.target}" for stage in self.stages)
        return f"stages from {self.start_users} users: {steps} ({self.seconds:g} s)"


# The parsers below raise argparse.ArgumentTypeError: argparse prints its message as it is, where a
# ValueError's becomes "invalid parse_duration value".


def parse_duration(text: str) -> float:
    """``25``, ``25s``, ``500ms``, ``2m`` or ``1h`` as seconds."""
    value = text.strip().lower()
    for suffix, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if value.endswith(suffix):
            value, factor = value[: -len(suffix)], scale
            break
    else:
        factor = 1.0
    try:
        seconds = float(value) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 25, 25s, 500ms, 2m)") from None
    if not (math.isfinite(seconds) and seconds >= 0):
        raise argparse.ArgumentTypeError(f"not a duration: {text!r}")
    return seconds


def parse_stages(text: str) -> tuple[Stage, ...]:
    """``5s:20,10s:50,5s:0`` -> ramp to 20 users over 5 s, to 50 over the next 10 s, to 0 over 5 s."""
    stages: list[Stage] = []
    for part in text.split(","):
        if not part.strip():
            continue
        duration, sep, target = part.partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"stage {part!r}: expected DURATION:USERS, e.g. 10s:50")
        try:
            users = int(target)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"stage {part!r}: {target!r} is not a whole number of users"
            ) from None
        if users < 0:
            raise argparse.ArgumentTypeError(f"stage {part!r}: users must be 0 or more")
        stages.append(Stage(parse_duration(duration), users))
    if not stages or sum(stage.seconds for stage in stages) <= 0:
        raise argparse.ArgumentTypeError("needs at least one stage with a positive duration")
    return tuple(stages)


def parse_user_list(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected user counts like 10,50,200, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("user counts must be 1 or more")
    return counts


def positive_int(text: str) -> int:
    """A whole number of 1 or more (``--ceiling-threads``: 0 used to be taken as "not given")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not 1 or more")
    return value


def seconds_or_zero(text: str) -> float:
    """Seconds, 0 or more: ``--stop-timeout``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r}: seconds must be 0 or more")
    return value


# --- small helpers -------------------------------------------------------------------------------------


def percentile(ordered: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (``q`` in 0..1) of an already sorted sequence."""
    if not ordered:
        return None
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(values: Sequence[float]) -> dict[str, float | int | None]:
    ordered = sorted(values)
    return {
        "count": len(ordered),
        "min": ordered[0] if ordered else None,
        "p50": percentile(ordered, 0.50),
        "p95": percentile(ordered, 0.95),
        "p99": percentile(ordered, 0.99),
        "mean": sum(ordered) / len(ordered) if ordered else None,
        "max": ordered[-1] if ordered else None,
    }


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS/VmHWM (bytes) of a process from /proc; empty when it is gone."""
    values: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return values
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def process_tree(pid: int) -> list[int]:
    """``pid`` and its direct children: with --processes the server is a supervisor and its workers.

    The monitor asks ten times a second, so the children come from ``/proc/PID/task/*/children`` (one
    small file per thread) rather than from every process's ``stat``: that scan cost ~1.5 ms each time
    with 67 processes, 0.7 % of the two cores the harness shares with the server."""
    children: list[int] = []
    try:
        threads = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return [pid]
    for thread in threads:
        try:
            children.extend(int(child) for child in (thread / "children").read_text().split())
        except FileNotFoundError:
            if not thread.exists():
                continue  # the thread ended meanwhile
            return [pid, *children_by_scan(pid)]  # a kernel without CONFIG_PROC_CHILDREN
        except OSError:
            continue
    return [pid, *children]


def children_by_scan(pid: int) -> list[int]:
    """The direct children of ``pid``, from every process's ``/proc/N/stat``."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
            children.append(int(entry.name))
    return children


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, in seconds, from /proc/PID/stat."""
    return _stat_cpu_seconds(Path(f"/proc/{pid}/stat"))


def _stat_cpu_seconds(stat: Path) -> float | None:
    """utime + stime from a ``stat`` file of /proc (a process's or a thread's), in seconds."""
    try:
        text = stat.read_text()
        fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) ": state is fields[0]
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def main_thread_cpu_seconds(pid: int) -> float | None:
    """CPU seconds so far of a process's main thread: ``schedstat`` (nanoseconds) where the kernel keeps
    it, else ``stat`` (utime + stime, 10 ms ticks); ``None`` when the process is gone."""
    task = Path(f"/proc/{pid}/task/{pid}")
    try:
        return int((task / "schedstat").read_text().split()[0]) / 1e9
    except FileNotFoundError:  # the process is gone, or a kernel without CONFIG_SCHED_INFO
        return _stat_cpu_seconds(task / "stat")
    except (OSError, ValueError, IndexError):
        return None


CpuReadings = dict[int, tuple[float, float]]  # pid -> (CPU seconds of the process, of its main thread)


def cpu_readings(pids: Sequence[int]) -> CpuReadings:
    readings: CpuReadings = {}
    for pid in pids:
        total, main = proc_cpu_seconds(pid), main_thread_cpu_seconds(pid)
        if total is not None and main is not None:
            readings[pid] = (total, main)
    return readings


def split_by_thread(before: CpuReadings, after: CpuReadings) -> dict[str, float]:
    """CPU seconds between two ``cpu_readings``, on each process's main thread (the event loop of an
    asyncio server or of node, a supervisor's own) and on its other threads (the image work: a worker
    pool, libvips's threads). The others are the process's total less its main thread, so a thread that
    ended in between still counts; a process that started in between counts from zero, and one that
    ended in between is left out (its CPU then shows as other processes')."""
    main = other = 0.0
    for pid, (total, on_main) in after.items():
        total_before, main_before = before.get(pid, (0.0, 0.0))
        main_delta = max(0.0, on_main - main_before)
        main += main_delta
        other += max(0.0, total - total_before - main_delta)
    return {"main_threads_seconds": main, "other_threads_seconds": other}


def machine_cpu(
    cpus: Collection[int] | None = None, stat: str | None = None
) -> tuple[float, float, float] | None:
    """(busy, idle, steal) CPU seconds so far of the whole machine (the first line of /proc/stat), or of
    ``cpus`` only (their ``cpuN`` lines: ``--server-cpus``); from ``stat`` when given."""
    try:
        lines = (Path("/proc/stat").read_text() if stat is None else stat).splitlines()
        if cpus:
            wanted = {f"cpu{n}" for n in cpus}
            rows = [fields for fields in map(str.split, lines) if fields and fields[0] in wanted]
            if len(rows) != len(wanted):
                return None
        else:
            rows = [lines[0].split()]
        fields = [sum(int(row[i]) for row in rows) for i in range(1, 9)]
    except (OSError, ValueError, IndexError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq) / tick, (idle + iowait) / tick, steal / tick


def machine_cpu_delta(
    before: tuple[float, float, float] | None,
    ours: float | None,
    wall: float,
    cpus: Collection[int] | None = None,
) -> dict[str, float | None] | None:
    """How busy the machine (or ``cpus``) was since ``before``, and how much of it was not ours (``ours``
    CPU seconds): on a shared machine that is the noise the figures carry."""
    after = machine_cpu(cpus)
    if before is None or after is None or wall <= 0:
        return None
    busy, idle, steal = (a - b for a, b in zip(after, before, strict=True))
    others = None if ours is None else max(0.0, busy - ours)
    return {
        "busy_seconds": busy,
        "idle_seconds": idle,
        "steal_seconds": steal,
        "ours_seconds": ours,
        "others_seconds": others,
        "others_cores": None if others is None else others / wall,
    }


MAX_CPU = 65535  # a CPU number above this is a typo, not a machine: refused before a range is built


def parse_cpu_list(text: str) -> frozenset[int]:
    """``0``, ``0-1`` or ``0,2-3`` (as ``taskset -c`` takes them): the CPU numbers."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            low = int(first)
            high = int(last) if dash else low
        except ValueError:
            low, high = -1, -1
        if low < 0 or high < low or high > MAX_CPU:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a CPU list such as 0, 0-1 or 0,2-3 (CPU numbers up to {MAX_CPU})"
            )
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


def cpu_list(cpus: Collection[int]) -> str:
    return ",".join(str(n) for n in sorted(cpus))


@contextlib.contextmanager
def on_cpus(cpus: Collection[int] | None) -> Iterator[None]:
    """The calling thread runs on ``cpus`` meanwhile (with ``None``, where it was): the processes it
    starts inherit them (a fork copies the forking thread's CPU mask), and ``effective_cpu_count()``
    counts them, as the server started on them will."""
    if not cpus:
        yield
        return
    own = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as exc:  # a CPU taken offline, or out of this cpuset, since the flags were checked
        raise BenchError(f"cannot run on CPUs {cpu_list(cpus)}: {exc}") from None
    try:
        yield
    finally:
        os.sched_setaffinity(0, own)


def cpus_allowed(pid: int) -> str | None:
    """The CPUs a process may run on (``Cpus_allowed_list`` in /proc/PID/status), e.g. ``0-1``."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# Virtual machines that hand free memory back to their host (virtio-balloon free page reporting) make
# the first 20-30 s of work after an idle spell slower, the ceiling included: memory the host took back is
# faulted in again there (docs/benchmarks.md, "Running it"). The counter below is not in every kernel;
# where it is missing nothing is said.
PAGE_REPORTING = Path("/sys/module/page_reporting/parameters/reported_kib")
# A 1-minute load average below this at the start means the machine was mostly idle before the run.
IDLE_LOADAVG = 0.5


def host_reclaims_free_memory() -> bool:
    """Whether this machine has handed free memory to its host (a kernel-specific counter, above 0)."""
    try:
        return int(PAGE_REPORTING.read_text().strip() or 0) > 0
    except (OSError, ValueError):
        return False


def cold_start_warning(machine: dict[str, Any]) -> str | None:
    """A note when the run began on an idle machine that reports free memory to its host."""
    if not machine.get("host_reclaims_free_memory"):
        return None
    try:
        recent = float(str(machine.get("loadavg_at_start", "")).split()[0])
    except (IndexError, ValueError):
        return None
    if recent >= IDLE_LOADAVG:
        return None
    return (
        f"NOTE: the machine was idle before this run (load average {recent:.2f}) and hands free memory back "
        "to its host (virtio-balloon free page reporting): the first 20-30 s of work run slower, the "
        "ceiling included; run again and compare before trusting these figures"
    )


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    loadavg = ""
    with contextlib.suppress(OSError):
        loadavg = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return {
        "nproc": os.cpu_count(),
        "effective_cpu_count": effective_cpu_count(),
        "cpu_model": model,
        "loadavg_at_start": loadavg,
        "host_reclaims_free_memory": host_reclaims_free_memory(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "aiohttp": aiohttp.__version__,
        "pillow": PIL.__version__,
    }


def media_type(path: Path) -> str:
    guessed, _ = mimetypes.guess_type(path.name)
    return guessed or "application/octet-stream"


def fmt_seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def fmt_mb(value: float | None) -> str:
    return "-" if value is None else f"{value / MB:.0f} MB"


def count_detail(counts: dict[str, int]) -> str:
    return f" {counts}" if counts else ""


def fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}/s"


# --- settings and parameters, exactly as the server builds them ------------------------------------------


def server_settings(server_args: Sequence[str]) -> Settings:
    """The ``Settings`` the server will run with: its own flag parser plus this process's environment."""
    parsed = vars(server_parser().parse_args(list(server_args)))
    return Settings.from_env(os.environ, **parsed)


def total_threads(settings: Settings, server_args: Sequence[str]) -> int:
    """Worker threads of the whole server: with --processes N, N times each child's (which the supervisor
    divides among the children unless --threads or OPTIMIZER_THREADS says)."""
    if settings.processes == 1:
        return settings.threads
    explicit = "OPTIMIZER_THREADS" in os.environ or any(
        arg == "--threads" or arg.startswith("--threads=") for arg in server_args
    )
    per_child = settings.threads if explicit else max(1, effective_cpu_count() // settings.processes)
    return per_child * settings.processes


def request_params(path: str, query: str, settings: Settings) -> Params:
    defaults = ROUTE_DEFAULTS.get(path)
    if defaults is None:
        raise BenchError(f"--path {path}: the ceiling knows only {', '.join(ROUTE_DEFAULTS)}")
    try:
        return parse_params(MultiDict(parse_qsl(query, keep_blank_values=True)), settings, defaults)
    except OptimizerError as exc:
        raise BenchError(f"--query {query!r}: {exc}") from None


# --- the ceiling: the pipeline alone, in a child process -------------------------------------------------


def ceiling_child(spec: dict[str, Any]) -> int:
    """Runs in the child: ``optimize`` on a pool of the server's size until the deadline; prints JSON."""
    allocator.tune()  # the server's allocator settings: the same pipeline under the same conditions
    settings = server_settings(spec["server_args"])
    threads = int(spec["threads"])
    params = request_params(spec["path"], spec["query"], settings)
    limits = pipeline_limits(settings)
    if limits.resizer == "vips":
        # Before the clock starts, and set up as the server sets up its own process (no cache, one thread
        # per resize).
        vips.configure_process()
    data = Path(spec["file"]).read_bytes()
    seconds = float(spec["seconds"])
    outputs: list[int] = []
    # Children laid out as a --processes server start their clocks together, once all have imported.
    late = 0.0
    if spec.get("start_at") is not None:
        wait = float(spec["start_at"]) - time.time()
        if wait > 0:
            time.sleep(wait)
        late = max(0.0, -wait)

    def worker(deadline: float) -> list[float]:
        latencies: list[float] = []
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            out = optimize(data, params, limits)
            latencies.append(time.perf_counter() - started)
            if not outputs:
                outputs.append(len(out.data))
        return latencies

    cpu_before = self_cpu_seconds()
    started, started_monotonic = time.perf_counter(), time.monotonic()
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ceiling") as pool:
            futures = [pool.submit(worker, started + seconds) for _ in range(threads)]
            latencies = [value for future in futures for value in future.result()]
    except OptimizerError as exc:  # the file itself, not a bug: one line, not a traceback from a thread
        print(f"the pipeline refused {spec['file']}: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    cpu = self_cpu_seconds() - cpu_before
    status = proc_status(os.getpid())
    result = {
        "images": len(latencies),
        "seconds": elapsed,
        "images_per_s": len(latencies) / elapsed if elapsed > 0 else None,
        "threads": threads,
        "cpus": cpu_list(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "params": asdict(params),
        "output_bytes": outputs[0] if outputs else None,
        "image_seconds": summary(latencies),
        "latencies": latencies if spec.get("latencies") else None,  # for a caller that merges children
        "started_late_seconds": late,
        # The middle of the timed window, on the machine's monotonic clock (CLOCK_MONOTONIC, the same
        # in every process), to place this ceiling between the loads.
        "measured_at": started_monotonic + elapsed / 2,
        "cpu_seconds": cpu,
        "cpu_seconds_per_image": cpu / len(latencies) if latencies else None,
        "peak_rss_bytes": status.get("VmHWM"),
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    print(json.dumps(result))
    return 0


def source_env(source: Path) -> dict[str, str]:
    """The environment for a child that must import ``optimizer`` from ``source``, with the allocator
    tunables the server restarts itself with, so that the ceiling's pipeline runs under the same
    (``GLIBC_TUNABLES=`` set empty measures without them).

    ``source`` first on the path is not enough: an editable install of the project (``pip install -e``,
    as scripts/dev.py makes .venv) adds a finder that serves any ``optimizer`` module missing from
    ``source`` out of the installed tree, so an old checkout would run as a mix of old and current code.
    A ``sitecustomize`` ahead of it on the path (inherited by the child's own children: a supervisor's
    workers, the server's restart) makes such an import fail instead."""
    env = start_environment(os.environ) or dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [_source_guard(), str(source), env.get("PYTHONPATH", "")])
    )
    env[SOURCE_VARIABLE] = str(source.resolve())
    return env


SOURCE_VARIABLE = "BENCH_OPTIMIZER_SOURCE"
_SOURCE_GUARD = f"""\"""Written by scripts/bench.py: ``optimizer`` comes from ${SOURCE_VARIABLE} only.\"""
import importlib.machinery, importlib.util, os, sys

_SOURCE = os.environ.get("{SOURCE_VARIABLE}")
_ROOT = os.path.join(os.path.realpath(_SOURCE), "") if _SOURCE else None


class _FromSourceOnly:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if _ROOT is None or (name != "optimizer" and not name.startswith("optimizer.")):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        origin = getattr(spec, "origin", None)
        if origin is None or not os.path.realpath(origin).startswith(_ROOT):
            raise ModuleNotFoundError(f"No module named {{name!r}} in --source {{_ROOT}}", name=name)
        return spec


sys.meta_path.insert(0, _FromSourceOnly)

# A sitecustomize of the interpreter's own, which this one shadows, still runs.
_here = os.path.dirname(os.path.realpath(__file__))
_others = [entry for entry in sys.path if os.path.realpath(entry or ".") != _here]
_spec = importlib.machinery.PathFinder.find_spec("sitecustomize", _others)
if _spec is not None and _spec.loader is not None:
    _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
"""


# Each scratch folder of the harness holds OWNER_FILE, locked (flock) for as long as the harness runs: a
# harness killed outright runs no clean-up, and the next run removes the folders whose lock it can take
# (a review found them piling up in /tmp). A lock, not a pid in the name: a name can belong to anyone, and
# a pid seen from another PID namespace (a container sharing /tmp) is not the harness's (the next review).
OWNER_FILE = ".bench-owner"
_OWNED: dict[str, int] = {}  # folder -> the descriptor holding its lock (not inherited by children)


def make_scratch(kind: str) -> str:
    """A new folder in the temp dir, this harness's until ``remove_scratch`` or the process's end."""
    folder = tempfile.mkdtemp(prefix=f"{kind}-")
    descriptor = os.open(Path(folder, OWNER_FILE), os.O_CREAT | os.O_WRONLY, 0o600)
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    _OWNED[folder] = descriptor
    return folder


def remove_scratch(folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    if (descriptor := _OWNED.pop(folder, None)) is not None:
        os.close(descriptor)


@contextlib.contextmanager
def scratch(kind: str) -> Iterator[str]:
    folder = make_scratch(kind)
    try:
        yield folder
    finally:
        remove_scratch(folder)


def sweep_stale_scratch() -> None:
    """Remove the scratch folders whose harness has ended: those whose owner file's lock is free."""
    with contextlib.suppress(OSError):
        for entry in Path(tempfile.gettempdir()).iterdir():
            owner = entry / OWNER_FILE
            if not entry.name.startswith("bench-") or entry.is_symlink() or not owner.is_file():
                continue
            try:
                descriptor = os.open(owner, os.O_RDONLY | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # held: its harness is running
            finally:
                os.close(descriptor)
            shutil.rmtree(entry, ignore_errors=True)


@functools.cache
def _source_guard() -> str:
    """A folder holding the ``sitecustomize`` of ``source_env``, removed when this process ends."""
    folder = make_scratch("bench-source-guard")
    atexit.register(remove_scratch, folder)
    Path(folder, "sitecustomize.py").write_text(_SOURCE_GUARD)
    return folder


def check_source(source: Path, resizer: str) -> None:
    """Refuse a ``--source`` checkout the ceiling's child could not import this file's needs from."""
    folder = source / "optimizer"
    if not (folder / "__init__.py").is_file():
        raise BenchError(f"--source {source}: no optimizer package there")
    missing = [f"optimizer/{name}.py" for name in SOURCE_MODULES if not (folder / f"{name}.py").is_file()]
    if missing:
        raise BenchError(
            f"--source {source}: no {', '.join(missing)} there, which the harness imports: it needs a "
            "checkout of commit e005eff or later"
        )
    if resizer == "vips" and "def configure_process" not in (folder / "vips.py").read_text(errors="replace"):
        raise BenchError(
            f"--source {source}: its optimizer/vips.py has no configure_process(), which the ceiling calls "
            "for --resizer vips: it needs a checkout of commit c0f1f66 or later"
        )


def source_info(source: Path) -> dict[str, Any]:
    """Which code was measured: the folder, and its git commit and whether the tree differs from it."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(source), *args], capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain", "--", "optimizer")
    return {
        "root": str(source),
        "commit": git("rev-parse", "HEAD"),
        "optimizer_modified": bool(status) if status is not None else None,
    }


# Children of a multi-process ceiling start their clocks this long after they are started: enough for
# an interpreter to import the pipeline on a busy machine (~0.5 s here), so that their runs overlap.
CEILING_START_DELAY = 3.0


def run_ceiling(
    file: Path,
    *,
    path: str,
    query: str,
    server_args: Sequence[str],
    threads: int,
    seconds: float,
    source: Path,
    processes: int = 1,
    cpus: Collection[int] | None = None,
) -> dict[str, Any]:
    """The pipeline alone, laid out as the server is: ``processes`` children at once, sharing ``threads``,
    on the server's ``cpus`` (``--server-cpus``; the machine's time is then read on those only).

    A server with ``--processes N`` runs N interpreters: its workers never wait for each other's GIL,
    and it holds N interpreters' memory. One child of N threads is another layout, so the ratio and
    the RSS difference of a multi-process server would be measured against another floor.
    """
    processes = max(1, min(processes, threads))
    per_child = [threads // processes + (1 if i < threads % processes else 0) for i in range(processes)]
    start_at = time.time() + CEILING_START_DELAY if processes > 1 else None
    specs = [
        {
            "file": str(file),
            "path": path,
            "query": query,
            "server_args": list(server_args),
            "threads": n,
            "seconds": seconds,
            "latencies": processes > 1,
            "start_at": start_at,
        }
        for n in per_child
    ]
    machine_before, children_before = machine_cpu(cpus), children_cpu_seconds()
    wall_before = time.perf_counter()
    outputs = run_children(
        # Dying with the harness, as the server does: killed outright mid-ceiling, it would leave them
        # running (and loading the cores) for the ceiling's whole duration.
        [
            dying_with_us([sys.executable, str(Path(__file__).resolve()), "_ceiling", json.dumps(spec)])
            for spec in specs
        ],
        cwd=source,
        env=source_env(source),
        timeout=seconds + CEILING_START_DELAY + 120,
        cpus=cpus,
    )
    result = outputs[0] if processes == 1 else merge_ceilings(outputs)
    result.pop("latencies", None)
    result["processes"] = processes
    where = "in a child process" if processes == 1 else f"in {processes} child processes at once"
    result["note"] = f"optimize() on a ThreadPoolExecutor, no HTTP, {where}; " + SAME_MACHINE_NOTE
    # The whole children (start-up included) against the machine's CPU over the same interval: for the
    # noise warning only; the ceiling's own figures are timed inside the children.
    result["machine_cpu"] = machine_cpu_delta(
        machine_before, children_cpu_seconds() - children_before, time.perf_counter() - wall_before, cpus
    )
    return result


def bracket_ceiling(
    before: dict[str, Any], after: dict[str, Any] | None, at: float, *, loads: int = 1
) -> dict[str, Any]:
    """The ceiling for a load whose window's middle was at ``at`` (``time.monotonic()``), between
    ``before`` and ``after``, which have ``loads`` loads between them (more than one in a sweep).

    The machine's speed drifts by a few percent over minutes, so a ceiling measured only before a load
    is off by whatever drift followed; one measured on both sides and interpolated to the load's time
    cancels a steady drift and shows an unsteady one (``bracket.drift``). The rates, the image count,
    the CPU (in all and per image) and the peak RSS are interpolated, and a late start of either is
    kept; everything else (the per-image latencies among it) is ``before``'s.
    """
    if after is None:
        return before
    span = after["measured_at"] - before["measured_at"]
    weight = min(1.0, max(0.0, (at - before["measured_at"]) / span)) if span > 0 else 0.5

    def between(key: str) -> Any:
        first, second = before.get(key), after.get(key)
        if first is None or second is None:
            return first if second is None else second
        value = (1 - weight) * first + weight * second
        return round(value) if isinstance(first, int) and isinstance(second, int) else value

    rate_before, rate_after = before.get("images_per_s"), after.get("images_per_s")
    bracketed = {
        **before,
        "images_per_s": between("images_per_s"),
        "images": between("images"),
        "cpu_seconds": between("cpu_seconds"),
        "cpu_seconds_per_image": between("cpu_seconds_per_image"),
        "peak_rss_bytes": between("peak_rss_bytes"),
        "measured_at": at,
        "started_late_seconds": max(
            float(ceiling.get("started_late_seconds") or 0.0) for ceiling in (before, after)
        ),
        # The noisier of the two phases speaks for both.
        "machine_cpu": max(
            (part for part in (before.get("machine_cpu"), after.get("machine_cpu")) if part),
            key=lambda part: part.get("others_cores") or 0.0,
            default=None,
        ),
        "bracket": {
            "before_images_per_s": rate_before,
            "after_images_per_s": rate_after,
            "weight_of_after": weight,
            "drift": rate_after / rate_before - 1 if rate_before and rate_after else None,
            "loads_between": loads,
        },
    }
    return bracketed


def run_children(
    commands: Sequence[list[str]],
    *,
    cwd: Path,
    env: dict[str, str],
    timeout: float,
    cpus: Collection[int] | None = None,
) -> list[Any]:
    """Runs the commands at once (on ``cpus``); the JSON each prints last, in order. The first to fail
    (an exit code, no JSON, the timeout) stops all of them: the others' figures mean nothing alone."""
    with scratch("bench-ceiling") as folder:
        logs = [(Path(folder) / f"{i}.out", Path(folder) / f"{i}.err") for i in range(len(commands))]
        children: list[subprocess.Popen[bytes]] = []
        try:
            for command, (out, err) in zip(commands, logs, strict=True):
                # Files, not pipes: nothing has to read a child's output while the others run.
                with out.open("wb") as stdout, err.open("wb") as stderr, on_cpus(cpus):
                    children.append(
                        subprocess.Popen(
                            command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr
                        )
                    )
            deadline = time.monotonic() + timeout
            while (codes := [child.poll() for child in children]).count(0) < len(children):
                failed = next((i for i, code in enumerate(codes) if code not in (None, 0)), None)
                if failed is not None:
                    raise BenchError(
                        f"the ceiling process failed (exit {codes[failed]}):\n{_tail(logs[failed][1])}"
                    )
                if time.monotonic() > deadline:
                    raise BenchError(f"the ceiling process did not finish within {timeout:g} s")
                time.sleep(0.2)
            outputs = []
            for out, err in logs:
                lines = out.read_text(errors="replace").strip().splitlines()
                try:
                    outputs.append(json.loads(lines[-1]))
                except (IndexError, ValueError):
                    raise BenchError(f"the ceiling process printed no result:\n{_tail(err)}") from None
            return outputs
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
                child.wait()


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])


def merge_ceilings(children: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One ceiling from children that ran side by side: their rates, CPU and peak RSS add up (the RSS
    as a ``--processes`` server's is summed over its processes)."""
    images = sum(int(child["images"]) for child in children)
    cpu = sum(float(child["cpu_seconds"]) for child in children)
    latencies = [value for child in children for value in child["latencies"]]

    def total(key: str) -> int | None:
        values: list[int | None] = [child.get(key) for child in children]
        return None if None in values else sum(value or 0 for value in values)

    return {
        "images": images,
        "seconds": max(float(child["seconds"]) for child in children),
        # Each child's own rate: they ran over the same span, but each ends with its last image.
        "images_per_s": sum(child["images_per_s"] or 0.0 for child in children) or None,
        "threads": sum(int(child["threads"]) for child in children),
        "processes": len(children),
        "params": children[0]["params"],
        "output_bytes": children[0]["output_bytes"],
        "image_seconds": summary(latencies),
        "cpu_seconds": cpu,
        "cpu_seconds_per_image": cpu / images if images else None,
        "peak_rss_bytes": total("peak_rss_bytes"),
        "ru_maxrss_bytes": total("ru_maxrss_bytes"),
        # A child that started its clock late overlapped the others less: its rate adds too much.
        "started_late_seconds": max(float(child.get("started_late_seconds") or 0.0) for child in children),
        "cpus": children[0].get("cpus"),
        "measured_at": statistics.fmean(float(child["measured_at"]) for child in children),  # together
    }


# --- the server process ----------------------------------------------------------------------------------


# Prefixed to a child's command on Linux: the child asks for SIGTERM when the harness dies (however it
# dies: SIGKILL, a closed terminal), then becomes the command (exec keeps the setting). A server started
# in a session of its own would otherwise go on running, holding its port and CPU.
_DIE_WITH_PARENT = (
    "import ctypes, os, sys\n"
    "ctypes.CDLL(None).prctl(1, 15, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGTERM\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)  # the harness died before the line above\n"
    "try:\n"
    "    os.execvp(sys.argv[2], sys.argv[2:])\n"
    "except OSError as exc:\n"
    "    sys.exit(f'cannot start {sys.argv[2]}: {exc}')  # one line, as Popen's own error would be\n"
)


def dying_with_us(command: Sequence[str]) -> list[str]:
    """``command``, made to get SIGTERM when this process dies (Linux; elsewhere as it is)."""
    if not sys.platform.startswith("linux"):
        return list(command)
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *command]


class ChildServer:
    """A server process the harness started on 127.0.0.1, writing its output to a log file."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def exited(self) -> int | None:
        """The exit code (negative: the signal) if the process has ended, without reaping it: its
        ``/proc`` entry stays, so its CPU time can still be read (``proc.poll()`` would remove it)."""
        if self.proc.returncode is not None:
            return self.proc.returncode
        try:
            info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return self.proc.poll()
        if info is None:
            return None
        return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status

    def worker_deaths(self) -> list[dict[str, Any]]:
        """Processes of this server that died while it lived on (see ``ServerProcess``): none here."""
        return []

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _terminate(self, log: IO[bytes], timeout: float, *, group: bool) -> list[str]:
        """SIGTERM (to its whole process group with ``group``), SIGKILL after ``timeout`` seconds; then
        the log is closed. The signals sent, in order: none when the process had ended already (the
        report must not say it was stopped when it died by itself)."""
        sent: list[str] = []

        def send(signum: signal.Signals) -> None:
            sent.append(signum.name)
            with contextlib.suppress(ProcessLookupError):
                if group:
                    os.killpg(self.proc.pid, signum)
                else:
                    self.proc.send_signal(signum)

        try:
            if self.proc.poll() is None:
                send(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    send(signal.SIGKILL)
                    self.proc.wait(10)
        finally:
            log.close()
        return sent


class ServerProcess(ChildServer):
    """``python -m optimizer`` on 127.0.0.1 and a free port; its JSON log goes to a file.

    ``command`` replaces ``python -m optimizer`` with another program that takes the same flags and logs
    the same ``listening`` event (``scripts/transport_floor.py``'s servers)."""

    def __init__(
        self,
        server_args: Sequence[str],
        log_path: Path,
        source: Path = ROOT,
        command: Sequence[str] = (sys.executable, "-m", "optimizer"),
        cpus: Collection[int] | None = None,
    ) -> None:
        self.log_path = log_path
        self.args = [*server_args, "--host", HOST, "--port", "0"]
        self._log = log_path.open("wb")
        with on_cpus(cpus):  # the server counts these as its CPUs (its default thread count)
            self.proc = subprocess.Popen(
                dying_with_us([*command, *self.args]),
                cwd=source,
                env=source_env(source),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self._log,
                start_new_session=True,  # a Ctrl-C reaches the harness only; it stops the server itself
            )
        self.port = 0
        self.threads = 0
        self.capacity = 0
        self.exit_code: int | None = None
        self.signals_sent: list[str] | None = None  # by stop(); empty: it had exited by itself

    def wait_listening(self, timeout: float = STARTUP_TIMEOUT, *, processes: int = 1) -> None:
        """Until ``processes`` server processes (``--processes``: each logs its own event) listen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            listening = [entry for entry in self._log_entries() if entry.get("event") == "listening"]
            if len({entry.get("pid") for entry in listening}) >= processes:
                entry = listening[0]
                self.port = int(entry["port"])
                self.threads = int(entry.get("threads", 0))
                self.capacity = int(entry.get("capacity", 0))
                return
            if self.proc.poll() is not None:
                raise BenchError(
                    f"the server exited with code {self.proc.returncode} before listening:\n{self.log_tail()}"
                )
            time.sleep(0.05)
        pids = {entry.get("pid") for entry in self._log_entries() if entry.get("event") == "listening"}
        raise BenchError(
            f"{len(pids)} of {processes} server processes logged 'listening' within {timeout:g} s:\n"
            f"{self.log_tail()}"
        )

    def worker_deaths(self) -> list[dict[str, Any]]:
        """The processes of a ``--processes`` server that exited on their own (its supervisor's
        ``child_exited`` lines), in the log so far."""
        return [entry for entry in self._log_entries() if entry.get("event") == "child_exited"]

    def _log_entries(self) -> Iterator[dict[str, Any]]:
        with self.log_path.open("rb") as handle:
            for line in handle:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry, dict):
                    yield entry

    def stop(self, timeout: float) -> int:
        """SIGTERM (a --processes supervisor forwards it), SIGKILL after ``timeout`` s; the exit code."""
        self.signals_sent = self._terminate(self._log, timeout, group=False)
        self.exit_code = self.proc.returncode
        return self.exit_code

    def log_summary(self) -> dict[str, Any]:
        """What the server said about the run: statuses and problem codes it logged, its own durations
        for 2xx answers, the body bytes it read for refusals, and every warning or error."""
        statuses: Counter[str] = Counter()
        codes: Counter[str] = Counter()
        problems: Counter[str] = Counter()
        tracebacks: list[str] = []
        ok_ms: list[float] = []
        refused_bytes_in = 0
        for entry in self._log_entries():
            if entry.get("logger") == "optimizer.access":
                status = int(entry.get("status", 0))
                statuses[str(status)] += 1
                if entry.get("code"):
                    codes[f"{status} {entry['code']}"] += 1
                if 200 <= status < 300:
                    ok_ms.append(float(entry.get("duration_ms", 0.0)))
                elif status == 503:
                    refused_bytes_in += int(entry.get("bytes_in", 0))
            if entry.get("level") in ("warning", "error", "critical"):
                problems[f"{entry.get('level')}: {str(entry.get('message'))[:200]}"] += 1
            if "traceback" in entry and len(tracebacks) < 3:
                tracebacks.append(str(entry["traceback"])[-2000:])
        return {
            "statuses": dict(sorted(statuses.items())),
            "codes": dict(sorted(codes.items())),
            "ok_duration_ms": summary(ok_ms),
            "refused_bytes_in": refused_bytes_in,
            "warnings_and_errors": dict(problems.most_common(20)),
            "tracebacks": tracebacks,
            "exit_code": self.exit_code,
            "signals_sent": self.signals_sent,
        }


class ServerMonitor:
    """RSS every 100 ms (VmRSS, and VmHWM at the end) and CPU time of the server, also split between
    the main threads and the others: of its whole process tree, so that a --processes supervisor and
    its workers are measured together (RSS summed over the processes; the VmHWM sum is an upper bound
    of their peak together)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.rss_at_start = self._rss()
        self.peak_rss_sampled = self.rss_at_start or 0
        self.rss_now = self.rss_at_start
        self.cpu_start: float | None = None
        self.cpu_end: float | None = None
        self.threads: dict[str, float] | None = None
        self.vmhwm: int | None = None
        self.cpus = cpus_allowed(pid)
        self.start()

    def start(self) -> None:
        """Take the CPU baselines (again): at the load's start, beside the machine's own reading."""
        tree = process_tree(self.pid)
        self._cpu_start = {p: proc_cpu_seconds(p) or 0.0 for p in tree}
        self.cpu_start = sum(self._cpu_start.values())
        self._readings_start = cpu_readings(tree)

    def _rss(self) -> int | None:
        values = [proc_status(p).get("VmRSS") for p in process_tree(self.pid)]
        known = [v for v in values if v is not None]
        return sum(known) if known else None

    async def sample(self) -> None:
        while True:
            rss = self._rss()
            if rss is not None:
                self.rss_now = rss
                self.peak_rss_sampled = max(self.peak_rss_sampled, rss)
            await asyncio.sleep(SAMPLE_INTERVAL)

    def finish(self) -> None:
        """Read the final figures while the processes are still alive (before they are stopped)."""
        tree = process_tree(self.pid)
        peaks = [proc_status(p).get("VmHWM") for p in tree]
        self.vmhwm = sum(v for v in peaks if v is not None) or None
        # A worker that started after start() (the load's start) counts from zero: its start-up is
        # server work too.
        self.cpu_end = self.cpu_now()
        after = cpu_readings(tree)
        # The server gone, or /proc unreadable: no split rather than one of zeros.
        self.threads = split_by_thread(self._readings_start, after) if self.pid in after else None

    def cpu_now(self) -> float:
        """CPU seconds of the whole tree so far (on the same footing as ``cpu_start``)."""
        tree = process_tree(self.pid)
        return sum((proc_cpu_seconds(p) or 0.0) for p in tree) + sum(
            start for p, start in self._cpu_start.items() if p not in tree
        )

    @property
    def cpu_seconds(self) -> float | None:
        if self.cpu_start is None or self.cpu_end is None or self.cpu_end < self.cpu_start:
            return None  # unknown (a process gone before its last reading) rather than wrong
        return self.cpu_end - self.cpu_start

    def as_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "rss_at_start_bytes": self.rss_at_start,
            "peak_rss_sampled_bytes": self.peak_rss_sampled,
            "peak_rss_vmhwm_bytes": self.vmhwm,
            "peak_rss_bytes": max(self.vmhwm or 0, self.peak_rss_sampled) or None,
            "cpu_seconds": self.cpu_seconds,
            "cpu_by_thread": self.threads,
            "cpus_allowed": self.cpus,
        }


# --- the load generator ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Upload:
    """The request every user sends: the same bytes each time."""

    url: str
    body: bytes
    headers: dict[str, str]
    description: str
    method: str = "POST"

    def request_head(self, *, expect_continue: bool) -> bytes:
        """The request line and headers, sent as they are before every body."""
        parts = urlsplit(self.url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        fields = {"Host": parts.netloc, **self.headers}
        if self.body or self.method == "POST":
            fields["Content-Length"] = str(len(self.body))
        if expect_continue and self.body:
            fields["Expect"] = "100-continue"
        lines = [f"{self.method} {target} HTTP/1.1", *(f"{k}: {v}" for k, v in fields.items())]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    @classmethod
    def build(cls, base_url: str, *, path: str, query: str, file: Path, field_name: str, raw: bool) -> Upload:
        data = file.read_bytes()
        url = base_url.rstrip("/") + path + (f"?{query}" if query else "")
        ctype = media_type(file)
        if raw:
            return cls(url, data, {"Content-Type": ctype}, f"raw body ({ctype})")
        # Built once by hand rather than with aiohttp.FormData, so that each request costs the client
        # nothing but sending the bytes.
        boundary = f"bench-{uuid.uuid4().hex}"
        head = (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="{field_name}"; filename="{file.name}"\r\n'
            f"Content-Type: {ctype}\r\n\r\n"
        ).encode()
        body = head + data + f"\r\n--{boundary}--\r\n".encode()
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        return cls(url, body, headers, f'multipart field "{field_name}"')


class ProtocolError(Exception):
    """An answer the client cannot read as HTTP/1.1."""


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # names lower-cased; a repeated header keeps its last value
    body: bytes
    keep_alive: bool


class Connection:
    """One user's keep-alive HTTP/1.1 connection, writing the prepared request as it is.

    The harness shares the two cores with the server, so the client must cost as little as possible:
    the request head and body are bytes built once, the body goes to the transport as a memoryview (one
    copy into its buffer, none for the part the socket takes at once), and the answer is read while the
    transport is still sending, because a refusal may come back before the upload has been sent. A
    request that got its answer before all of its body was sent leaves the connection unusable, so it
    is closed; so is one whose answer says ``Connection: close``.
    """

    def __init__(self, host: str, port: int, head: bytes, body: bytes, *, expect_continue: bool) -> None:
        self.host = host
        self.port = port
        self.head = head
        self.body = memoryview(body)
        self.expect_continue = expect_continue
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def exchange(self, connect_timeout: float) -> Answer:
        # A connection the server has closed while it sat idle is replaced, not written to.
        if (
            self.writer is None
            or self.writer.is_closing()
            or (self.reader is not None and self.reader.at_eof())
        ):
            self.close()
            async with asyncio.timeout(connect_timeout):
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        reader, writer = self.reader, self.writer
        assert reader is not None
        body_sent = not self.body
        try:
            writer.write(self.head)
            answer: Answer | None = None
            if self.expect_continue and self.body:
                answer = await self._read_answer(reader, interim=True)
            if answer is None:
                if self.body:
                    writer.write(self.body)
                    body_sent = True
                answer = await self._read_answer(reader, interim=False)
            assert answer is not None
        except BaseException:
            self.close()
            raise
        # Only a request that went out whole leaves the connection in a known state: a body refused
        # after Expect, or still in the buffer when the answer came, would be read as the next request.
        if not answer.keep_alive or not body_sent or writer.transport.get_write_buffer_size() > 0:
            self.close()
        return answer

    async def _read_answer(self, reader: asyncio.StreamReader, *, interim: bool) -> Answer | None:
        """The final answer; with ``interim``, ``None`` when the server said 100 Continue instead."""
        try:
            return await self._read_message(reader, interim=interim)
        except asyncio.IncompleteReadError as exc:
            raise ConnectionResetError(
                f"the server closed the connection mid-answer ({len(exc.partial)} bytes of a part)"
            ) from None
        except asyncio.LimitOverrunError:
            raise ProtocolError("a line of the answer is over 1 MiB") from None

    async def _read_message(self, reader: asyncio.StreamReader, *, interim: bool) -> Answer | None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *lines = head.decode("latin-1").split("\r\n")
            version, _, rest = status_line.partition(" ")
            code = rest[:3]
            if not version.startswith("HTTP/1.") or not code.isdigit():
                raise ProtocolError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
            status = int(code)
            headers = {}
            for line in lines:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            if 100 <= status < 200:
                if status == 100 and interim:
                    return None
                continue  # another interim answer (e.g. 103): the final one follows
            break
        keep_alive = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        if status in (204, 304):
            body = b""  # never a body, whatever the headers say
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = await self._read_chunked(reader)
        elif "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        else:
            body, keep_alive = await reader.read(), False
        return Answer(status, headers, body, keep_alive)

    async def _read_chunked(self, reader: asyncio.StreamReader) -> bytes:
        parts: list[bytes] = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            parts.append(await reader.readexactly(size))
            if await reader.readexactly(2) != b"\r\n":
                raise ProtocolError("a chunk of the answer does not end with CRLF")
        while await reader.readuntil(b"\r\n") != b"\r\n":  # trailer fields, if any
            pass
        return b"".join(parts)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()  # whatever is still buffered is dropped, not sent
            self.writer = self.reader = None


@dataclass
class Tally:
    """Everything the users observed. Counts are split at the end of the measured window."""

    window_end: float  # perf_counter() at the end of the window
    started: int = 0
    statuses: Counter[int] = field(default_factory=Counter)  # answered within the window
    statuses_late: Counter[int] = field(default_factory=Counter)  # answered during the grace period
    codes: Counter[str] = field(default_factory=Counter)  # "503 overloaded", answered within the window
    codes_late: Counter[str] = field(default_factory=Counter)  # the same, during the grace period
    ok_latencies: list[float] = field(default_factory=list)
    refusal_latencies: list[float] = field(default_factory=list)
    retry_after: list[float] = field(default_factory=list)
    timing_sums: dict[str, float] = field(default_factory=dict)  # Server-Timing of 2xx, ms
    connection_errors: Counter[str] = field(default_factory=Counter)
    timeouts: int = 0
    other_errors: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)  # a user task stopped by a harness bug
    error_samples: dict[str, str] = field(default_factory=dict)
    cut_off: int = 0  # still in flight when the grace period ended
    users_seen: int = 0  # users started so far; each has an index
    ok_by_user: Counter[int] = field(default_factory=Counter)  # 2xx per user, window and grace

    def record(
        self, user: int, answer: Answer, seconds: float, finished: float, retry_after: float | None
    ) -> None:
        """One answer, ``seconds`` after its request started. Only the window's enter the figures read
        beside the window's counts (problem codes, Retry-After, Server-Timing), so that they describe the
        same answers; one in the grace period is counted apart by status and by code. The 2xx latencies
        take every 2xx, the grace period's too: those are the slowest in flight when the load stops, and
        leaving them out would flatter p95 (k6 counts them as well). A 2xx also counts for its user's
        share either way."""
        status = answer.status
        in_window = finished <= self.window_end
        ok = 200 <= status < 300
        (self.statuses if in_window else self.statuses_late)[status] += 1
        if ok:
            self.ok_by_user[user] += 1
            self.ok_latencies.append(seconds)
        else:
            (self.codes if in_window else self.codes_late)[f"{status} {problem_code(answer.body)}"] += 1
        if not in_window:
            return
        if ok:
            for part in answer.headers.get("server-timing", "").split(","):
                name, _, duration = part.strip().partition(";dur=")
                with contextlib.suppress(ValueError):
                    self.timing_sums[name] = self.timing_sums.get(name, 0.0) + float(duration)
        elif status == 503:
            self.refusal_latencies.append(seconds)
            if retry_after is not None:
                self.retry_after.append(retry_after)

    def error(self, kind: Counter[str], exc: BaseException) -> None:
        name = type(exc).__name__
        kind[name] += 1
        self.error_samples.setdefault(name, str(exc)[:300])

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())

    @property
    def ok(self) -> int:
        return sum(n for status, n in self.statuses.items() if 200 <= status < 300)

    @property
    def errors(self) -> int:
        return (
            sum(self.connection_errors.values())
            + self.timeouts
            + sum(self.other_errors.values())
            + sum(self.unexpected.values())
        )


class LoadRun:
    """Closed-loop virtual users following a ``LoadPlan`` against one URL."""

    def __init__(
        self,
        upload: Upload,
        plan: LoadPlan,
        *,
        on_503: str,
        timeout: float,
        grace: float,
        expect_continue: bool,
        server: ChildServer | None,
        monitor: ServerMonitor | None,
        quiet: bool,
        cpus: Collection[int] | None = None,
        harness_cpus: Collection[int] | None = None,
    ) -> None:
        self.upload = upload
        # --server-cpus: the machine's time is read on the server's CPUs, where the harness does not run,
        # and the harness's CPUs are read apart, for other work that would slow the load generator down.
        self.cpus = cpus
        self.harness_cpus = harness_cpus
        self.harness_machine_before: tuple[float, float, float] | None = None
        self.plan = plan
        self.on_503 = on_503
        self.timeout = timeout
        self.connect_timeout = min(timeout, 10.0)
        self.grace = grace
        self.expect_continue = expect_continue
        self.server = server
        self.monitor = monitor
        self.quiet = quiet
        self.t0 = 0.0
        self.tally = Tally(window_end=0.0)
        self.active = 0
        self.timeline: list[dict[str, Any]] = []
        self.server_died: int | None = None
        self.server_died_at: float | None = None  # seconds into the window; None: after it, or never
        self.machine_before: tuple[float, float, float] | None = None

    async def run(self) -> dict[str, Any]:
        if self.monitor is not None:
            self.monitor.start()  # the server's CPU over the same span as the machine's and the client's
        cpu_before, wall_before = self_cpu_seconds(), time.perf_counter()
        self.window_middle = time.monotonic() + self.plan.seconds / 2  # to place it between ceilings
        self.machine_before = machine_cpu(self.cpus)
        if self.harness_cpus:
            self.harness_machine_before = machine_cpu(self.harness_cpus)
        self.t0 = wall_before
        self.tally.window_end = self.t0 + self.plan.seconds
        background = [asyncio.create_task(self._progress())]
        if self.monitor is not None:
            background.append(asyncio.create_task(self.monitor.sample()))
        try:
            await self._control()
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            if not self.quiet:
                print(file=sys.stderr)
        wall = time.perf_counter() - wall_before
        client_cpu = self_cpu_seconds() - cpu_before
        if self.server is not None and self.server_died is None:
            self.server_died = self.server.exited()  # during the grace period
        if self.monitor is not None:
            self.monitor.finish()  # the final figures, next to the machine's reading in _result()
        window = min(self.plan.seconds, wall)
        return self._result(window, wall, client_cpu)

    async def _control(self) -> None:
        """Start and stop users to follow the plan; at the end, let in-flight requests finish."""
        running: list[tuple[asyncio.Task[None], asyncio.Event]] = []
        stopping: list[asyncio.Task[None]] = []
        end = self.tally.window_end
        while (now := time.perf_counter()) < end:
            if self.server is not None and (code := self.server.exited()) is not None:
                self.server_died, self.server_died_at = code, now - self.t0
                break
            want = self.plan.target_at(now - self.t0)
            while len(running) < want:
                stop = asyncio.Event()
                self.tally.users_seen += 1
                user = self.tally.users_seen
                running.append((asyncio.create_task(self._user(stop, user)), stop))
            while len(running) > want:  # the newest users leave first, after their current request
                task, stop = running.pop()
                stop.set()
                stopping.append(task)
            self.active = len(running)
            await asyncio.sleep(min(CONTROL_INTERVAL, max(0.0, end - now)))
        for task, stop in running:
            stop.set()
            stopping.append(task)
        self.active = 0
        pending = {task for task in stopping if not task.done()}
        if pending:
            _, pending = await asyncio.wait(pending, timeout=self.grace)
        for task in pending:
            task.cancel()
        self.tally.cut_off += len(pending)
        await asyncio.gather(*stopping, return_exceptions=True)

    async def _pause(self, stop: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await stop.wait()

    async def _user(self, stop: asyncio.Event, user: int) -> None:
        try:
            upload = self.upload
            parts = urlsplit(upload.url)
            connection = Connection(
                parts.hostname or HOST,
                parts.port or 80,
                upload.request_head(expect_continue=self.expect_continue),
                upload.body,
                expect_continue=self.expect_continue,
            )
            try:
                await self._requests(stop, user, connection)
            finally:
                connection.close()
        except Exception as exc:
            # Not an answer the server gave: a bug in the harness, which would otherwise end this user
            # silently (_control gathers the users with return_exceptions). Counted, and shown once.
            if not self.tally.unexpected:
                print(
                    "\nbench.py: a virtual user stopped on an unexpected error (counted under "
                    f"errors.unexpected; the load offered is lower than planned):\n{traceback.format_exc()}",
                    file=sys.stderr,
                )
            self.tally.error(self.tally.unexpected, exc)

    async def _requests(self, stop: asyncio.Event, user: int, connection: Connection) -> None:
        tally = self.tally
        while not stop.is_set() and time.perf_counter() < tally.window_end:
            tally.started += 1
            started = time.perf_counter()
            try:
                async with asyncio.timeout(self.timeout):
                    answer = await connection.exchange(self.connect_timeout)
            except TimeoutError as exc:
                connection.close()
                tally.timeouts += 1
                tally.error_samples.setdefault("timeout", str(exc)[:300] or type(exc).__name__)
                continue
            except OSError as exc:  # refused, reset, closed before the answer
                tally.error(tally.connection_errors, exc)
                await self._pause(stop, CONNECTION_ERROR_PAUSE)
                continue
            except (ProtocolError, ValueError) as exc:
                tally.error(tally.other_errors, exc)
                continue
            finished = time.perf_counter()
            header = answer.headers.get("retry-after")
            retry_after = None if header is None or answer.status != 503 else retry_after_seconds(header)
            tally.record(user, answer, finished - started, finished, retry_after)
            if retry_after and self.on_503 == "retry-after":
                await self._pause(stop, min(retry_after, max(0.0, tally.window_end - time.perf_counter())))

    async def _progress(self) -> None:
        last = Counter[int]()
        last_errors = 0
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL)
            tally = self.tally
            now = time.perf_counter() - self.t0
            seen = tally.statuses + tally.statuses_late
            delta = seen - last
            errors = tally.errors
            point: dict[str, Any] = {
                "t": round(now, 2),
                "users": self.active,
                "ok": sum(n for s, n in delta.items() if 200 <= s < 300),
                "refused_503": delta.get(503, 0),
                "other": sum(n for s, n in delta.items() if not (200 <= s < 300 or s == 503)),
                "errors": errors - last_errors,
            }
            if self.monitor is not None:
                point["rss_bytes"] = self.monitor.rss_now
                point["server_cpu_seconds"] = self.monitor.cpu_now()
            self.timeline.append(point)
            last, last_errors = seen, errors
            if self.quiet:
                continue
            ok_total = sum(n for s, n in seen.items() if 200 <= s < 300)
            p95 = percentile(sorted(tally.ok_latencies), 0.95)
            rss = f"  rss {self.monitor.rss_now / MB:.0f} MB" if self.monitor and self.monitor.rss_now else ""
            line = (
                f"[{min(now, self.plan.seconds):5.1f}/{self.plan.seconds:g}s] users {self.active:3d}"
                f"  2xx {ok_total}  503 {seen.get(503, 0)}  other {point['other']}  err {errors}"
                f"  last 1s: {point['ok']} ok / {sum(delta.values())} answers"
                f"  goodput {ok_total / max(now, 1e-9):.2f}/s  p95 {fmt_seconds(p95)} s{rss}"
            )
            print("\r" + line.ljust(120), end="", file=sys.stderr, flush=True)

    def _machine(self, client_cpu: float, wall: float) -> dict[str, float | None] | None:
        server_cpu = None
        if self.monitor is not None:
            start = self.monitor.cpu_start
            server_cpu = None if start is None else self.monitor.cpu_now() - start
        # With --server-cpus the harness ran on other CPUs than the ones read.
        ours = None if server_cpu is None else server_cpu + (0.0 if self.cpus else client_cpu)
        return machine_cpu_delta(self.machine_before, ours, wall, self.cpus)

    def _invalid(self) -> str | None:
        """Why this run's figures are no result, or ``None``: a server that died measured a window cut
        short (or a server gone before its work was done), whatever its goodput says; so did a
        ``--processes`` server one of whose processes died and was restarted (an OOM kill), whose
        supervisor lived on (a review: such a run was headlined at 80 % of its ceiling, valid)."""
        if self.server_died is None and self.server is not None:
            for death in self.server.worker_deaths():
                return (
                    f"server process {death.get('child')} exited with code "
                    f"{exit_description(int(death.get('code', 0)))} during the run, and its supervisor "
                    "restarted it"
                )
        if self.server_died is None:
            return None
        code = exit_description(self.server_died)
        if self.server_died_at is None:
            return f"the server exited with code {code} after the window, while the last requests finished"
        return (
            f"the server exited with code {code} {self.server_died_at:.1f} s into the "
            f"{self.plan.seconds:g} s window"
        )

    def _result(self, window: float, wall: float, client_cpu: float) -> dict[str, Any]:
        tally = self.tally
        ok = tally.ok
        rates = {str(status): n / window for status, n in sorted(tally.statuses.items())}
        timings = {name: total / len(tally.ok_latencies) for name, total in tally.timing_sums.items()}
        return {
            "users": self.plan.max_users,
            "plan": {
                "start_users": self.plan.start_users,
                "stages": [asdict(stage) for stage in self.plan.stages],
                "description": self.plan.describe(),
            },
            "on_503": self.on_503,
            "window_seconds": window,
            "wall_seconds": wall,
            "measured_at": self.window_middle,
            "requests_started": tally.started,
            "responses": tally.answered,
            "responses_by_status": {str(s): n for s, n in sorted(tally.statuses.items())},
            "responses_per_s_by_status": rates,
            "responses_per_s": tally.answered / window if window > 0 else None,
            "responses_after_window_by_status": {str(s): n for s, n in sorted(tally.statuses_late.items())},
            "non_2xx_by_code": dict(sorted(tally.codes.items())),
            "non_2xx_after_window_by_code": dict(sorted(tally.codes_late.items())),
            "ok": ok,
            "ok_per_user": {
                "users": tally.users_seen,
                "users_without_2xx": tally.users_seen - len(tally.ok_by_user),
                **summary([float(tally.ok_by_user.get(u, 0)) for u in range(1, tally.users_seen + 1)]),
            },
            "goodput_per_s": ok / window if window > 0 else None,
            "latency_2xx_seconds": summary(tally.ok_latencies),
            "latency_503_seconds": summary(tally.refusal_latencies),
            "retry_after_seconds": summary(tally.retry_after),
            "server_timing_2xx_mean_ms": timings,
            "errors": {
                "total": tally.errors,
                "connection": dict(tally.connection_errors),
                "timeouts": tally.timeouts,
                "other": dict(tally.other_errors),
                "unexpected": dict(tally.unexpected),
                "samples": tally.error_samples,
                "cut_off_at_end": tally.cut_off,
            },
            "server_5xx_other_than_503": sum(n for s, n in tally.statuses.items() if s >= 500 and s != 503),
            "client_cpu_seconds": client_cpu,
            "client_cpu_share": client_cpu / wall if wall > 0 else None,
            "machine_cpu": self._machine(client_cpu, wall),
            "machine_cpus": cpu_list(self.cpus) if self.cpus else None,  # None: every CPU, shared
            # What the harness's own CPUs did meanwhile (with --server-cpus): its work and any other.
            "harness_machine_cpu": machine_cpu_delta(
                self.harness_machine_before, client_cpu, wall, self.harness_cpus
            )
            if self.harness_cpus
            else None,
            "harness_ran_on": cpu_list(os.sched_getaffinity(0)) if self.harness_cpus else None,
            "server_died_with_code": self.server_died,
            "server_died_at_seconds": self.server_died_at,
            "invalid": self._invalid(),
            "timeline": self.timeline,
        }


def retry_after_seconds(value: str, now: datetime | None = None) -> float | None:
    """A ``Retry-After`` value as seconds to wait: delay-seconds, or an HTTP-date (RFC 9110 allows
    either) as the seconds from ``now`` until then, at least 0; ``None`` when it is neither. A date read
    as 0 would turn retry-after mode into a flood."""
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # "-0000": UTC, as an HTTP-date always is
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def exit_description(code: int) -> str:
    """An exit code as ``subprocess`` gives it, with the signal named when it is one (-9: SIGKILL)."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"{code} ({signal.Signals(-code).name})"
    return str(code)


def problem_code(payload: bytes) -> str:
    """The ``code`` of a problem+json body, or ``-``."""
    try:
        body = json.loads(payload)
    except ValueError:
        return "-"
    return str(body.get("code", "-")) if isinstance(body, dict) else "-"


# --- a peer server, loaded with the same plan for comparison (--peer) -----------------------------------


def ipx_path(params: Params, name: str) -> str:
    """ipx's URL for ``params``: modifiers in the first path segment, then the file."""
    modifiers = [f"q_{params.quality}", f"f_{params.format}"]
    if params.width is not None:
        modifiers.insert(0, f"w_{params.width}")
    if params.height is not None:
        modifiers.insert(0, f"h_{params.height}")
    return f"/{','.join(modifiers)}/{quote(name)}"


def thumbor_path(params: Params, name: str) -> str:
    """thumbor's unsigned URL for ``params`` (0 for a free side keeps the aspect ratio)."""
    return (
        f"/unsafe/{params.width or 0}x{params.height or 0}"
        f"/filters:quality({params.quality}):format({params.format})/{quote(name)}"
    )


def thumbor_config(files: Path) -> str:
    # The file loader and no storage: every request reads and decodes the source again, as ours does.
    return (
        "LOADER = 'thumbor.loaders.file_loader'\n"
        f"FILE_LOADER_ROOT_PATH = {str(files)!r}\n"
        "STORAGE = 'thumbor.storages.no_storage'\n"
        "RESULT_STORAGE = None\n"
        "ALLOW_UNSAFE_URL = True\n"
    )


@dataclass(frozen=True)
class Peer:
    """How to start another image server on a folder and ask it for the same output as ours."""

    name: str
    executable: str  # relative to --peer-dir
    install: str  # shown when the executable is missing; {dir} is --peer-dir
    argv: Callable[[Path, Path, int], list[str]]  # (executable, folder served, port)
    path: Callable[[Params, str], str]
    env: Callable[[int], dict[str, str]] = lambda port: {}
    config: Callable[[Path], str] | None = None  # written to <folder>/peer.conf


PEERS: dict[str, Peer] = {
    "ipx": Peer(
        name="ipx 3 (sharp/libvips on Node.js)",
        executable="node_modules/.bin/ipx",
        install="npm install --prefix {dir} ipx@3",
        argv=lambda exe, files, port: [str(exe), "serve", "--dir", str(files)],
        env=lambda port: {"HOST": HOST, "PORT": str(port)},
        path=ipx_path,
    ),
    "thumbor": Peer(
        name="thumbor 7 (Pillow, Tornado), one process per core",
        executable="thumbor/bin/thumbor",
        install="python3 -m venv {dir}/thumbor && {dir}/thumbor/bin/pip install thumbor",
        argv=lambda exe, files, port: [
            str(exe),
            "--ip",
            HOST,
            "--port",
            str(port),
            "--conf",
            str(files / "peer.conf"),
            "--processes",
            str(effective_cpu_count()),
        ],
        path=thumbor_path,
        config=thumbor_config,
    ),
}


def free_port() -> int:
    """A port nobody listens on now (the peer binds it a moment later; a clash fails its start-up)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


class PeerProcess(ChildServer):
    """A peer serving a private copy of the file from a temporary folder on 127.0.0.1."""

    def __init__(
        self, peer: Peer, home: Path, file: Path, log_path: Path, cpus: Collection[int] | None = None
    ) -> None:
        with on_cpus(cpus):  # thumbor counts its processes from these
            self._start(peer, home, file, log_path)

    def _start(self, peer: Peer, home: Path, file: Path, log_path: Path) -> None:
        executable = home / peer.executable  # make_config() has checked that it exists
        self.files = Path(make_scratch("bench-peer"))
        # A copy, not a link: a server may refuse a link that leads out of the folder it serves.
        shutil.copyfile(file, self.files / file.name)
        if peer.config is not None:
            (self.files / "peer.conf").write_text(peer.config(self.files))
        self.port = free_port()
        self.argv = peer.argv(executable, self.files, self.port)
        self.log_path = log_path
        self._log = log_path.open("wb")
        try:
            self.proc = subprocess.Popen(
                dying_with_us(self.argv),
                cwd=self.files,
                env={**os.environ, **peer.env(self.port)},
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() reaches forked workers too
            )
        except OSError as exc:
            self._log.close()
            remove_scratch(str(self.files))
            raise BenchError(f"--peer: cannot start {self.argv[0]}: {exc}") from None

    def wait_ready(self, path: str, timeout: float = STARTUP_TIMEOUT) -> None:
        """Until one GET of ``path`` answers with an image (which also warms the peer up)."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"the peer exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
                    if response.status == 200 and response.headers.get_content_maintype() == "image":
                        return
                    last = f"{response.status} {response.headers.get_content_type()}"
            except urllib.error.HTTPError as exc:
                raise BenchError(f"the peer answered {exc.code} to GET {path}:\n{self.log_tail()}") from None
            except (OSError, urllib.error.URLError) as exc:
                last = str(exc)
            time.sleep(0.1)
        raise BenchError(
            f"the peer did not serve GET {path} within {timeout:g} s ({last}):\n{self.log_tail()}"
        )

    def stop(self, timeout: float) -> None:
        try:
            self._terminate(self._log, timeout, group=True)
        finally:
            remove_scratch(str(self.files))


# --- one run, with or without a server of our own ---------------------------------------------------------


@dataclass
class Config:
    file: Path
    path: str
    query: str
    raw: bool
    field_name: str
    url: str | None
    server_args: list[str]
    on_503: str
    timeout: float
    grace: float
    expect_continue: bool
    ceiling: bool
    ceiling_seconds: float | None
    threads: int
    ceiling_processes: int  # the server's --processes: the ceiling runs in as many children
    quiet: bool
    stop_timeout: float
    server_log: Path | None
    scenario: str | None
    source: Path
    label: str | None = None
    peer: str | None = None
    peer_dir: Path = Path()
    rounds: int = 1
    bracket: bool = True  # a last ceiling after the loads; each load against the ceilings either side
    # --server-cpus: the server, its ceiling and a peer run on these, the harness on harness_cpus.
    server_cpus: frozenset[int] | None = None
    harness_cpus: frozenset[int] | None = None


def load_once(config: Config, plan: LoadPlan, log_dir: Path, label: str) -> dict[str, Any]:
    server: ServerProcess | None = None
    monitor: ServerMonitor | None = None
    if config.url is None:
        log_path = (config.server_log or log_dir / "server.log").with_suffix(f".{label}.log")
        server = ServerProcess(config.server_args, log_path, config.source, cpus=config.server_cpus)
    try:
        if server is not None:
            # With --processes, the load starts once every worker listens, not just the first.
            server.wait_listening(processes=server_settings(config.server_args).processes)
            monitor = ServerMonitor(server.pid)
            base_url = server.url
        else:
            assert config.url is not None
            base_url = config.url
        upload = Upload.build(
            base_url,
            path=config.path,
            query=config.query,
            file=config.file,
            field_name=config.field_name,
            raw=config.raw,
        )
        result = drive(config, plan, upload, server, monitor)
    finally:
        if server is not None:
            server.stop(config.stop_timeout)
    if server is not None and monitor is not None:
        result["server"] = {
            **monitor.as_dict(),
            "threads": server.threads,
            "capacity": server.capacity,
            "args": server.args,
            "log_file": str(server.log_path) if config.server_log else None,
            "log": server.log_summary(),
        }
    else:
        result["server"] = None
    return result


def drive(
    config: Config,
    plan: LoadPlan,
    upload: Upload,
    process: ChildServer | None,
    monitor: ServerMonitor | None,
) -> dict[str, Any]:
    """Run the users of ``plan`` against ``upload`` (the run reads the monitor's final figures itself)."""
    if not config.quiet:
        print(f"load: {plan.describe()} -> {upload.method} {upload.url}", file=sys.stderr)
    run = LoadRun(
        upload,
        plan,
        on_503=config.on_503,
        timeout=config.timeout,
        grace=config.grace,
        expect_continue=config.expect_continue,
        server=process,
        monitor=monitor,
        quiet=config.quiet,
        cpus=config.server_cpus,
        harness_cpus=config.harness_cpus,
    )
    result = asyncio.run(run.run())
    result["url"] = upload.url
    result["request"] = upload.description
    return result


def peer_once(config: Config, plan: LoadPlan, log_dir: Path, label: str) -> dict[str, Any]:
    """The same plan against a peer server (``--peer``), started here on 127.0.0.1."""
    assert config.peer is not None
    peer = PEERS[config.peer]
    params = request_params(config.path, config.query, server_settings(config.server_args))
    process = PeerProcess(
        peer, config.peer_dir, config.file, log_dir / f"peer.{label}.log", cpus=config.server_cpus
    )
    try:
        path = peer.path(params, config.file.name)
        process.wait_ready(path)
        monitor = ServerMonitor(process.pid)
        upload = Upload(process.url + path, b"", {}, "GET: the peer reads the file from disk", method="GET")
        result = drive(config, plan, upload, process, monitor)
    finally:
        process.stop(config.stop_timeout)
    result["server"] = {**monitor.as_dict(), "peer": config.peer, "name": peer.name, "command": process.argv}
    return result


def compare(result: dict[str, Any], ceiling: dict[str, Any] | None) -> None:
    """Derived figures: goodput / ceiling, RSS difference, server CPU per response and per refusal."""
    server = result.get("server") or {}
    cpu = server.get("cpu_seconds")
    refusals = result["responses_by_status"].get("503", 0) + result["responses_after_window_by_status"].get(
        "503", 0
    )
    answered = result["responses"] + sum(result["responses_after_window_by_status"].values())
    ok_all = ok_with_grace(result)
    derived: dict[str, Any] = {
        "server_cpu_seconds_per_response": cpu / answered if cpu is not None and answered else None,
        "server_cpu_seconds_per_refusal_upper_bound": cpu / refusals
        if cpu is not None and refusals
        else None,
        "server_cpu_seconds_per_refusal_estimate": None,
        "goodput_over_ceiling": None,
        "server_minus_ceiling_peak_rss_bytes": None,
        "ceiling_images_per_s": None if ceiling is None else ceiling.get("images_per_s"),
    }
    if ceiling is not None:
        per_image = ceiling.get("cpu_seconds_per_image")
        # A run whose server died measured a cut-short window: its goodput is no result to compare.
        if ceiling.get("images_per_s") and result["goodput_per_s"] is not None and not result.get("invalid"):
            derived["goodput_over_ceiling"] = result["goodput_per_s"] / ceiling["images_per_s"]
        if cpu is not None and refusals and per_image is not None:
            # What the server spent beyond the images it delivered, spread over the refusals.
            derived["server_cpu_seconds_per_refusal_estimate"] = max(0.0, cpu - ok_all * per_image) / refusals
        if server.get("peak_rss_bytes") and ceiling.get("peak_rss_bytes"):
            derived["server_minus_ceiling_peak_rss_bytes"] = (
                server["peak_rss_bytes"] - ceiling["peak_rss_bytes"]
            )
    parts = machine_time_per_image(result, ceiling, ok_all)
    derived["machine_seconds_per_2xx"] = parts
    # An upper-bound estimate, for a harness that shares the cores: the measured ratio, had the
    # harness's CPU gone to the server (a load generator on cores of its own). It also takes away the
    # kernel's loopback work done in the harness's time, which a remote client's host would not do.
    ratio = derived["goodput_over_ceiling"]
    derived["goodput_over_ceiling_without_harness"] = (
        ratio * parts["total"] / (parts["total"] - parts["harness"])
        if ratio and parts and parts["total"] and parts["harness"]  # not apart: measured as such then
        else None
    )
    derived["noisy_phases"] = [
        name
        for name, part in noise_parts(result, ceiling)
        if part and (part.get("others_cores") or 0.0) > NOISY_CORES
    ]
    result["derived"] = derived


def ok_with_grace(result: dict[str, Any]) -> int:
    """The 2xx of a run, the window's and the grace period's: all the images its CPU time paid for."""
    late: dict[str, int] = result["responses_after_window_by_status"]
    return int(result["ok"]) + sum(n for status, n in late.items() if 200 <= int(status) < 300)


def machine_time_per_image(
    result: dict[str, Any], ceiling: dict[str, Any] | None, images: int
) -> dict[str, float | None] | None:
    """Where the machine's time went during the load, per 2xx (window and grace), in seconds.

    ``total`` is every CPU's time over the run (``/proc/stat``: busy, idle and steal; with
    --server-cpus the server's CPUs only) over the images. The parts are the server's threads other
    than the main ones (its image work), its main threads (the event loop: parsing, refusals, answers),
    the harness (0 with --server-cpus: its CPU is ``harness_elsewhere``), other processes (the rest of
    the busy time, kernel work outside these processes included), idle and steal; ``unaccounted`` is what they
    miss of the total, about zero by construction: it only shows the server's per-thread reading
    disagreeing with its process totals, or ``others`` clipped at zero. Beside them, the ceiling's CPU
    per image, and its machine time per image (the same cores over its rate): goodput / ceiling is
    about the ceiling's machine time over ``total``, so the parts say where the ratio went."""
    threads = (result.get("server") or {}).get("cpu_by_thread")
    machine = result.get("machine_cpu")
    wall = result.get("wall_seconds") or 0.0
    if not images or not threads or not machine or wall <= 0:
        return None
    machine_seconds = machine["busy_seconds"] + machine["idle_seconds"] + machine["steal_seconds"]
    # With --server-cpus the harness ran on other CPUs: none of this machine time is its.
    apart = result.get("machine_cpus") is not None
    parts: dict[str, float | None] = {
        "server_other_threads": threads["other_threads_seconds"] / images,
        "server_main_threads": threads["main_threads_seconds"] / images,
        "harness": 0.0 if apart else result["client_cpu_seconds"] / images,
        "other_processes": (machine.get("others_seconds") or 0.0) / images,
        "idle": machine["idle_seconds"] / images,
        "steal": machine["steal_seconds"] / images,
    }
    total = machine_seconds / images
    parts["unaccounted"] = total - sum(value or 0.0 for value in parts.values())
    parts["total"] = total
    parts["harness_elsewhere"] = result["client_cpu_seconds"] / images if apart else None
    rate = (ceiling or {}).get("images_per_s")
    parts["ceiling_cpu"] = (ceiling or {}).get("cpu_seconds_per_image")
    parts["ceiling_machine"] = machine_seconds / wall / rate if rate else None
    return parts


def ratio_rows(derived: dict[str, Any]) -> list[tuple[str, str, str]]:
    ratio = derived.get("goodput_over_ceiling")
    rows = [("goodput / ceiling", "-" if ratio is None else f"{ratio:.1%}", "")]
    alone = derived.get("goodput_over_ceiling_without_harness")
    if alone is not None:
        rows.append(("  the same without the harness*", f"{alone:.1%}", ""))
    return rows


def cpu_lines(derived: dict[str, Any]) -> list[str]:
    """What a refusal cost the server, and where the machine's time went per 2xx."""
    lines = []
    per_refusal = derived.get("server_cpu_seconds_per_refusal_estimate")
    bound = derived.get("server_cpu_seconds_per_refusal_upper_bound")
    if bound is not None:
        lines.append(
            f"  server CPU per refusal: {fmt_seconds(per_refusal)} s estimated (server CPU minus ceiling CPU"
            f" per image x 2xx, over 503s); {bound:.4f} s upper bound (all server CPU over 503s)"
        )
    parts = derived.get("machine_seconds_per_2xx")
    if parts:

        def ms(key: str) -> str:
            value = parts.get(key)
            return "-" if value is None else f"{value * 1000:.1f}"

        ceiling = "" if parts.get("ceiling_machine") is None else f" (the ceiling's: {ms('ceiling_machine')})"
        ceiling_cpu = "" if parts.get("ceiling_cpu") is None else f" (the ceiling's CPU: {ms('ceiling_cpu')})"
        unaccounted = parts.get("unaccounted") or 0.0
        rest = f" + unaccounted {ms('unaccounted')}" if abs(unaccounted) >= 0.0001 else ""
        elsewhere = parts.get("harness_elsewhere")
        harness = f"harness {ms('harness')} + " if elsewhere is None else ""
        lines.append(
            f"  machine time per 2xx, ms: {ms('total')}{ceiling} = image work (the server's other threads)"
            f" {ms('server_other_threads')}{ceiling_cpu} + event loop (main threads)"
            f" {ms('server_main_threads')} + {harness}other processes"
            f" {ms('other_processes')} + idle {ms('idle')} + steal {ms('steal')}{rest}"
        )
        if elsewhere is not None:
            lines.append(f"    besides: the harness, on its own CPUs, {ms('harness_elsewhere')} ms per 2xx")
    if derived.get("goodput_over_ceiling_without_harness") is not None:
        lines.append(f"  * {WITHOUT_HARNESS}")
    return lines


# --- report ---------------------------------------------------------------------------------------------


def print_report(results: dict[str, Any]) -> None:
    config = results["config"]
    machine = results["machine"]
    ceiling = results.get("ceiling")
    out: list[str] = []
    out.append(
        f"optimizer benchmark: POST {config['path']}{'?' + config['query'] if config['query'] else ''}"
        f"  file {Path(config['file']).name} ({config['file_bytes'] / MB:.2f} MB)"
        + (f"  scenario {config['scenario']}" if config["scenario"] else "")
    )
    out.append(
        f"machine: nproc {machine['nproc']}, usable {machine['effective_cpu_count']}, "
        f"{machine['cpu_model'] or 'unknown CPU'}, load average at start {machine['loadavg_at_start']}"
    )
    if config.get("server_cpus"):
        peer = " and the peer" if config.get("peer") else ""
        out.append(
            f"CPUs: the server, its ceiling{peer} on {config['server_cpus']}, the harness on "
            f"{config['harness_cpus']}: the load generator does not share the server's cores, and the "
            "machine's time is read on the server's"
        )
    if warning := cold_start_warning(machine):
        out.append(warning)
    code = results.get("code")
    if code:
        modified = {True: ", optimizer/ has uncommitted changes", False: "", None: ""}[
            code["optimizer_modified"]
        ]
        out.append(f"code: {code['root']} at commit {(code['commit'] or 'unknown')[:12]}{modified}")
    if results.get("label"):
        out.append(f"label: {results['label']}")
    if ceiling is not None:
        out.append(f"note: {SAME_MACHINE_NOTE}.")
    if ceiling is not None and config.get("url"):
        out.append(f"NOTE: {URL_CEILING_NOTE}")
    ceilings = results.get("ceilings") or []
    for run in results["runs"]:
        out.append("")
        if config.get("rounds", 1) > 1:
            out.append(f"round {run['round']} of {config['rounds']}:")
        # Each round's load against its own ceiling (before it, or either side of it); older result
        # files have none in the run.
        if "ceiling" in run:
            own = run["ceiling"]
        else:
            own = ceilings[run["round"] - 1] if "round" in run and len(ceilings) >= run["round"] else ceiling
        out.extend(run_table(run, own))
    if results.get("rounds"):
        out.append("")
        out.extend(rounds_lines(results["rounds"]))
    elif len(results["runs"]) > 1:
        out.append("")
        out.append("sweep (constant users, server restarted for each count):")
        out.append(
            f"  {'users':>6} {'goodput/s':>10} {'/ceiling':>9} {'p95 2xx s':>10} {'503/s':>8}"
            f" {'peak RSS':>10}"
        )
        for row in results.get("sweep", []):
            ratio = row.get("goodput_over_ceiling")
            out.append(
                f"  {row['users']:>6} {row['goodput_per_s'] or 0:>10.2f} "
                f"{'-' if ratio is None else f'{ratio:.0%}':>9} {fmt_seconds(row['p95_seconds']):>10} "
                f"{row['refused_per_s'] or 0:>8.1f} {fmt_mb(row['peak_rss_bytes']):>10}"
                + (f"   INVALID: {row['invalid']}" if row.get("invalid") else "")
            )
    print("\n".join(out))


def rounds_lines(summary: dict[str, Any]) -> list[str]:
    """The rounds side by side, and the median of each figure (``--rounds``)."""
    rows = (
        ("goodput images/s", "goodput_per_s", "{:.2f}"),
        ("ceiling images/s", "ceiling_images_per_s", "{:.2f}"),
        ("  its drift across the load", "ceiling_drift", "{:+.1%}"),
        ("goodput / ceiling", "goodput_over_ceiling", "{:.1%}"),
        ("the same without the harness*", "goodput_over_ceiling_without_harness", "{:.1%}"),
        ("p95 of 2xx, s", "p95_seconds", "{:.3f}"),
        ("server - ceiling peak RSS, MB", "server_minus_ceiling_peak_rss_bytes", "{:+.0f}"),
        ("machine time ms per 2xx", "machine_ms", "{:.1f}"),
        ("ceiling machine ms per image", "ceiling_machine_ms", "{:.1f}"),
        ("image work ms per 2xx", "image_work_ms", "{:.1f}"),
        ("ceiling CPU ms per image", "ceiling_cpu_ms", "{:.1f}"),
        ("event loop ms per 2xx", "event_loop_ms", "{:.1f}"),
        ("harness ms per 2xx", "harness_ms", "{:.1f}"),
        ("  on its own CPUs, ms per 2xx", "harness_elsewhere_ms", "{:.1f}"),
        ("ours / peer", "goodput_over_peer", "{:.0%}"),
    )
    last = ", and a last ceiling after them" if summary.get("bracketed") else ""
    each = "a ceiling then a load" if summary.get("with_ceiling", True) else "a load"
    excluded = summary.get("excluded_rounds") or []
    median = f"median of the {summary['rounds'] - len(excluded)} valid" if excluded else "median"
    lines = [f"{summary['rounds']} rounds, each {each}{last} ({median}, then each round):"]
    for name, key, fmt in rows:
        figure = summary.get(key)
        if figure is None:
            continue
        scale = MB if key.endswith("_bytes") else 1.0
        each = ", ".join("-" if v is None else fmt.format(v / scale) for v in figure["each"])
        lines.append(f"  {name:30} {fmt.format(figure['median'] / scale):>8}   ({each})")
    if summary.get("goodput_over_ceiling_without_harness") is not None:
        lines.append(f"  * {WITHOUT_HARNESS}")
    if excluded:
        rounds = ", ".join(str(n) for n in excluded)
        lines.append(
            f"  left out of the medians (shown as -): round {rounds}, whose server died during the run"
        )
    return lines


def noise_parts(
    run: dict[str, Any], ceiling: dict[str, Any] | None
) -> list[tuple[str, dict[str, Any] | None]]:
    """The phases whose other work is read: the ceiling, the load, and with --server-cpus the harness's
    CPUs during the load (other work there slows the load generator, and so the offered load)."""
    parts = [("ceiling", (ceiling or {}).get("machine_cpu")), ("load", run.get("machine_cpu"))]
    if run.get("harness_machine_cpu") is not None:
        parts.append(("load, on the harness's CPUs", run["harness_machine_cpu"]))
    return parts


def noise_lines(run: dict[str, Any], ceiling: dict[str, Any] | None) -> list[str]:
    """Other processes' CPU during the ceiling and the load, and a warning when it was large."""
    lines: list[str] = []
    parts = noise_parts(run, ceiling)
    noise = [
        f"during the {name} {part['others_cores']:.2f} cores"
        for name, part in parts
        if part and part.get("others_cores") is not None
    ]
    where = "on the server's CPUs unless said" if run.get("machine_cpus") else "on the machine"
    if noise:
        lines.append(f"  other processes' CPU {where} (noise, from /proc/stat): {', '.join(noise)}")
    busy = [name for name, part in parts if part and (part.get("others_cores") or 0.0) > NOISY_CORES]
    if busy:
        lines.append(
            f"  WARNING: other work used over {NOISY_CORES} cores during the {' and the '.join(busy)}: "
            "these figures (and the ratio) are unreliable; run again when the machine is quieter"
        )
    return lines


def ceiling_warnings(ceiling: dict[str, Any], processes: int, threads: int | None) -> list[str]:
    """What makes this ceiling a poor yardstick for the load beside it, said in the report."""
    warnings = []
    layout = (processes, (threads or 0) * processes)
    if threads and layout != (ceiling.get("processes", 1), ceiling.get("threads")):
        warnings.append(
            f"the server ran {layout[0]} processes and {layout[1]} threads, but the ceiling "
            f"{ceiling.get('processes', 1)} and {ceiling.get('threads')}"
        )
    drift = (ceiling.get("bracket") or {}).get("drift")
    if drift is not None and abs(drift) > BRACKET_DRIFT_WARNING:
        bracket = ceiling["bracket"]
        warnings.append(
            f"the ceiling moved {drift:+.1%} between its measurements either side of this load "
            f"({bracket['before_images_per_s']:.2f} images/s before, {bracket['after_images_per_s']:.2f} "
            "after): the machine's speed drifted, and the ratio is uncertain by about as much"
        )
    late = ceiling.get("started_late_seconds") or 0.0
    if late > 0.02 * (ceiling.get("seconds") or 0.0):
        warnings.append(
            f"a ceiling process started its clock {late:.1f} s after the others: their rates overlap "
            f"less than they add up (raise CEILING_START_DELAY on a machine this slow to start)"
        )
    return warnings


def bracket_lines(ceiling: dict[str, Any] | None) -> list[str]:
    """Under a run's table: the ceilings either side of the load, and their drift (``--bracket``)."""
    lines: list[str] = []
    bracket = (ceiling or {}).get("bracket")
    if bracket and bracket["before_images_per_s"] and bracket["after_images_per_s"]:
        loads = bracket.get("loads_between", 1)
        where = (
            "before the load and"
            if loads == 1
            else f"before the first of the {loads} loads between its measurements and"
        )
        lines.append(
            f"  the ceiling, {bracket['before_images_per_s']:.2f} images/s {where} "
            f"{bracket['after_images_per_s']:.2f} after {'it' if loads == 1 else 'the last'} "
            f"({bracket['drift']:+.1%}), is taken at this load's time; so are its CPU and peak RSS"
        )
    return lines


def run_table(run: dict[str, Any], ceiling: dict[str, Any] | None) -> list[str]:
    lat = run["latency_2xx_seconds"]
    server = run.get("server") or {}
    derived = run.get("derived", {})
    rows: list[tuple[str, str, str]] = []
    ceiling_rate = fmt_rate(ceiling["images_per_s"]) if ceiling else "-"
    invalid = run.get("invalid")
    # A dead server's goodput is over a window cut short: shown, but never as the run's result.
    goodput = f"INVALID ({fmt_rate(run['goodput_per_s'])})" if invalid else fmt_rate(run["goodput_per_s"])
    rows.append(("images/s (goodput: 2xx/s)", goodput, ceiling_rate))
    rows.extend(ratio_rows(derived))
    rows.append(
        (
            "2xx latency p50 / p95 / p99 s",
            f"{fmt_seconds(lat['p50'])} / {fmt_seconds(lat['p95'])} / {fmt_seconds(lat['p99'])}",
            f"{fmt_seconds(ceiling['image_seconds']['p50'])} per image (p50)" if ceiling else "-",
        )
    )
    rows.append(
        (
            "peak RSS",
            fmt_mb(server.get("peak_rss_bytes")),
            fmt_mb(ceiling.get("peak_rss_bytes")) if ceiling else "-",
        )
    )
    diff = derived.get("server_minus_ceiling_peak_rss_bytes")
    rows.append(("server minus ceiling peak RSS", "-" if diff is None else f"{diff / MB:+.0f} MB", ""))
    rows.append(
        (
            "CPU seconds",
            "-" if server.get("cpu_seconds") is None else f"{server['cpu_seconds']:.1f} (server)",
            f"{ceiling['cpu_seconds']:.1f}" if ceiling else "-",
        )
    )
    lines = [f"run: {run['plan']['description']}, on 503: {run['on_503']}, {run['request']}"]
    if invalid:
        lines.append(
            f"  INVALID RUN: {invalid}: the figures below are what was seen until then, not a result "
            "(no goodput / ceiling is computed)"
        )
    lines.append(f"  {'':34} {'HTTP':>26}   {'ceiling (no HTTP)':<26}")
    lines.extend(f"  {name:34} {http:>26}   {ceil:<26}" for name, http, ceil in rows)
    lines.extend(bracket_lines(ceiling))
    statuses = ", ".join(
        f"{status}: {n} ({run['responses_per_s_by_status'][status]:.1f}/s)"
        for status, n in run["responses_by_status"].items()
    )
    lines.append(f"  responses in the {run['window_seconds']:.1f} s window: {statuses or 'none'}")
    if run["non_2xx_by_code"]:
        lines.append(f"  non-2xx in the window by problem code: {run['non_2xx_by_code']}")
    if run["responses_after_window_by_status"]:
        late_codes = run.get("non_2xx_after_window_by_code")
        lines.append(
            "  answered after the window (grace; in the 2xx latencies and the CPU and machine time per "
            "answer, not in goodput): "
            f"{run['responses_after_window_by_status']}"
            + (f", non-2xx by code {late_codes}" if late_codes else "")
        )
    errors = run["errors"]
    lines.append(
        f"  errors: connection {sum(errors['connection'].values())}{count_detail(errors['connection'])}, "
        f"timeouts {errors['timeouts']}, "
        f"other {sum(errors['other'].values())}{count_detail(errors['other'])}, "
        f"cut off at the end {errors['cut_off_at_end']}"
    )
    if errors.get("unexpected"):
        stopped = sum(errors["unexpected"].values())
        lines.append(
            f"  WARNING: {stopped} virtual user(s) stopped on an unexpected error in the harness "
            f"{errors['unexpected']}: the load offered was lower than planned"
        )
    if errors["samples"]:
        lines.append(f"  error samples: {errors['samples']}")
    if run["server_5xx_other_than_503"]:
        lines.append(f"  5xx other than 503: {run['server_5xx_other_than_503']}")
    lines.extend(cpu_lines(derived))
    if run["server_timing_2xx_mean_ms"]:
        timing = ", ".join(f"{k} {v:.0f}" for k, v in run["server_timing_2xx_mean_ms"].items())
        lines.append(f"  Server-Timing of 2xx, mean ms: {timing}")
    fair = run["ok_per_user"]
    if fair["users"]:
        lines.append(
            f"  2xx per user: min {fair['min']:.0f}, median {fair['p50']:.0f}, "
            f"max {fair['max']:.0f}; users that never got a 2xx: "
            f"{fair['users_without_2xx']} of {fair['users']}"
        )
    lines.append(f"  client CPU share: {run['client_cpu_share']:.0%} of one core (the harness itself)")
    lines.extend(noise_lines(run, ceiling))
    lines.extend(server_end_lines(run))
    lines.extend(f"  WARNING: {warning}" for warning in run.get("warnings", []))
    if run.get("peer"):
        lines.extend(peer_lines(run["peer"], derived.get("goodput_over_peer")))
    return lines


def server_end_lines(run: dict[str, Any]) -> list[str]:
    """What the server's log said, and how it ended."""
    lines = []
    log = (run.get("server") or {}).get("log")
    if log:
        lines.append(f"  server log: statuses {log['statuses']}, codes {log['codes']}")
        if log["warnings_and_errors"] or log["tracebacks"]:
            lines.append(f"  server warnings/errors: {log['warnings_and_errors']}")
        lines.append(f"  {exit_line(log)}")
    if run["server_died_with_code"] is not None and not run.get("invalid"):  # a file from before "invalid"
        lines.append(f"  THE SERVER EXITED DURING THE RUN with code {run['server_died_with_code']}")
    return lines


def exit_line(log: dict[str, Any]) -> str:
    """How the server ended: stopped by the harness (and with which signals) or by itself."""
    code = "-" if log["exit_code"] is None else exit_description(log["exit_code"])
    sent = log.get("signals_sent")
    if sent is None:  # a results file from before the signals were recorded
        return f"server exit code after SIGTERM: {code}"
    if not sent:
        return f"server exit code: {code}, on its own: it had exited before the harness stopped it"
    if sent == ["SIGTERM"]:
        return f"server exit code after SIGTERM: {code}"
    return f"server exit code after {' then '.join(sent)} (it outlasted --stop-timeout): {code}"


def peer_lines(peer: dict[str, Any], ratio: float | None) -> list[str]:
    """The peer's run under the same plan, right after ours."""
    server = peer["server"]
    lat = peer["latency_2xx_seconds"]
    statuses = ", ".join(f"{status}: {n}" for status, n in peer["responses_by_status"].items())
    versus = "-" if ratio is None else f"{ratio:.0%}"
    lines = [
        f"  peer {server['name']} under the same plan ({peer['request']}):",
        *([f"    INVALID: {peer['invalid']}; its figures are not a result"] if peer.get("invalid") else []),
        f"    goodput {fmt_rate(peer['goodput_per_s'])}; ours / peer: {versus}",
        f"    2xx latency p50 / p95 / p99 s: {fmt_seconds(lat['p50'])} / {fmt_seconds(lat['p95'])} / "
        f"{fmt_seconds(lat['p99'])}",
        f"    peak RSS {fmt_mb(server.get('peak_rss_bytes'))}, CPU "
        + ("-" if server.get("cpu_seconds") is None else f"{server['cpu_seconds']:.1f} s")
        + f", client CPU share {peer['client_cpu_share']:.0%}",
        f"    responses: {statuses or 'none'}; errors {peer['errors']['total']}",
    ]
    parts = machine_time_per_image(peer, None, ok_with_grace(peer))
    if parts:
        main, other = parts["server_main_threads"] or 0.0, parts["server_other_threads"] or 0.0
        lines.append(
            f"    machine time per 2xx {(parts['total'] or 0.0) * 1000:.1f} ms; the peer's CPU per 2xx: "
            f"{main * 1000:.1f} ms on its processes' main threads, {other * 1000:.1f} ms on their others"
        )
    lines.extend("  " + line for line in noise_lines(peer, None))
    return lines


# --- chart ----------------------------------------------------------------------------------------------


@dataclass
class Series:
    name: str
    color: tuple[int, int, int]
    points: list[tuple[float, float]]
    dashed: bool = False


def nice_ticks(high: float, count: int = 5) -> list[float]:
    """Round tick values from 0 to at least ``high``."""
    if high <= 0:
        return [0.0, 1.0]
    raw = high / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    ticks = [0.0]
    while ticks[-1] < high - 1e-9:
        ticks.append(ticks[-1] + step)
    return ticks


def tick_label(value: float) -> str:
    return f"{value:.0f}" if value >= 10 or value == int(value) else f"{value:.2g}"


def point_label(value: float) -> str:
    """Three significant digits, but never in exponent form (1763 MB, not 1.76e+03)."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def font(size: int) -> Font:
    return ImageFont.load_default(size=size)


def free_spot(
    draw: ImageDraw.ImageDraw,
    placed: list[tuple[float, float, float, float]],
    text: str,
    text_font: Any,
    *,
    at: tuple[float, float],
    within: tuple[float, float],
) -> tuple[float, float]:
    """Where to draw a value label so that it overlaps none placed before (series close together, such
    as p50 and p95 on a fast server, would print their values over each other): ``at``, or a line
    below or above it, then two, and so on, staying between the plot's top and bottom (``within``). The
    box taken is added to ``placed``."""
    x, y = at
    top, bottom = within
    box = draw.textbbox((x, y), text, font=text_font, anchor="lb")
    line = box[3] - box[1] + 3
    for step in (0, 1, -1, 2, -2, 3, -3, 4, -4):
        box = draw.textbbox((x, y + step * line), text, font=text_font, anchor="lb")
        inside = top <= box[1] and box[3] <= bottom
        if inside and not any(
            box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed
        ):
            y += step * line
            break
    placed.append(draw.textbbox((x, y), text, font=text_font, anchor="lb"))
    return x, y


def draw_panel(
    image: Image.Image,
    box: tuple[int, int, int, int],
    *,
    title: str,
    y_label: str,
    x_values: Sequence[float],
    series: Sequence[Series],
) -> None:
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = box
    plot = (left + 80, top + 36, right - 20, bottom - 50)
    px0, py0, px1, py1 = plot
    draw.text((left + 80, top + 4), title, fill="black", font=font(18))
    values = [y for s in series for _, y in s.points]
    y_ticks = nice_ticks(max(values, default=1.0) * 1.1)
    y_max = y_ticks[-1]
    x_max = max(x_values, default=1.0) * 1.08 or 1.0

    def to_px(x: float, y: float) -> tuple[float, float]:
        return px0 + (px1 - px0) * x / x_max, py1 - (py1 - py0) * y / y_max

    tick_font = font(13)
    for y in y_ticks:
        _, py = to_px(0, y)
        draw.line((px0, py, px1, py), fill=(225, 225, 225))
        draw.text((px0 - 8, py), tick_label(y), fill="black", font=tick_font, anchor="rm")
    for x in sorted({0.0, *x_values}):
        px, _ = to_px(x, 0)
        draw.line((px, py1, px, py1 + 5), fill="black")
        draw.text((px, py1 + 8), tick_label(x), fill="black", font=tick_font, anchor="mt")
    draw.rectangle(plot, outline="black")
    draw.text(((px0 + px1) / 2, bottom - 18), "virtual users", fill="black", font=font(14), anchor="mm")
    label = Image.new("RGBA", (int(py1 - py0), 22), (255, 255, 255, 0))
    ImageDraw.Draw(label).text((label.width / 2, 11), y_label, fill="black", font=font(14), anchor="mm")
    rotated = label.rotate(90, expand=True)
    image.paste(rotated, (left + 4, py0), rotated)

    legend_x = float(px1)  # legends sit on the title's line, right-aligned, never over the data
    for s in reversed(series):
        legend_x -= draw.textlength(s.name, font=tick_font) + 44
        draw.line((legend_x, top + 14, legend_x + 30, top + 14), fill=s.color, width=3)
        draw.text((legend_x + 36, top + 14), s.name, fill="black", font=tick_font, anchor="lm")
    placed: list[tuple[float, float, float, float]] = []  # value labels drawn so far in this panel
    for s in series:
        points = [to_px(x, y) for x, y in sorted(s.points)]
        if s.dashed and len({y for _, y in s.points}) > 1:  # a reference that moves: dashes point to point
            for (x0, y0), (x1, y1) in itertools.pairwise(points):
                length = math.hypot(x1 - x0, y1 - y0)
                for start in range(0, math.ceil(length), 18):
                    end = min(start + 10, length)
                    draw.line(
                        (
                            x0 + (x1 - x0) * start / length,
                            y0 + (y1 - y0) * start / length,
                            x0 + (x1 - x0) * end / length,
                            y0 + (y1 - y0) * end / length,
                        ),
                        fill=s.color,
                        width=2,
                    )
        elif s.dashed and points:  # a level reference, across the whole panel
            y = points[0][1]
            x = float(px0)
            while x < px1:
                draw.line((x, y, min(x + 10, px1), y), fill=s.color, width=2)
                x += 18
        else:
            if len(points) > 1:
                draw.line(points, fill=s.color, width=3)
            for (px, py), (_, value) in zip(points, sorted(s.points), strict=True):
                draw.ellipse((px - 5, py - 5, px + 5, py + 5), fill=s.color)
                text = point_label(value)
                at = free_spot(draw, placed, text, tick_font, at=(px + 8, py - 4), within=(py0, py1))
                draw.text(at, text, fill=s.color, font=tick_font, anchor="lb")


def ceiling_series(
    runs: Sequence[dict[str, Any]], first: dict[str, Any], key: str, scale: float, fmt: str
) -> Series:
    """The ceiling's ``key`` on a chart: each run's own (taken at its time, ``--bracket``) where the runs
    have one and differ in users, else one level line: their mean, or, in older results, ``first``."""
    own = [run.get("ceiling") or {} for run in runs]
    values = [ceiling.get(key) for ceiling in own]
    known = [float(value) for value in values if value is not None]
    grey = (90, 90, 90)
    if len(known) == len(runs) and len({run["users"] for run in runs}) > 1:
        found = [(float(run["users"]), value / scale) for run, value in zip(runs, known, strict=True)]
        low, high = fmt.format(min(known) / scale), fmt.format(max(known) / scale)
        label = f"ceiling at each load's time, {low} - {high}"
        return Series(label, grey, found, True)
    level = statistics.fmean(known) if len(known) == len(runs) and known else first.get(key)
    width = max((float(run["users"]) for run in runs), default=1.0)
    line = [] if level is None else [(0.0, level / scale), (width, level / scale)]
    return Series("ceiling" if level is None else f"ceiling {fmt.format(level / scale)}", grey, line, True)


def draw_chart(results: dict[str, Any], out: Path) -> None:
    # A run whose server died is no point on a curve: left out, and said in the subtitle.
    runs = sorted((run for run in results["runs"] if not run.get("invalid")), key=lambda run: run["users"])
    left_out = len(results["runs"]) - len(runs)
    ceiling = results.get("ceiling")
    users = [float(run["users"]) for run in runs]

    def points(getter: Callable[[dict[str, Any]], Any], scale: float = 1.0) -> list[tuple[float, float]]:
        found = [(float(run["users"]), getter(run)) for run in runs]
        return [(x, float(y) / scale) for x, y in found if y is not None]

    panels: list[tuple[str, str, list[Series]]] = [
        (
            "Goodput: 2xx responses per second",
            "images / s",
            [Series("HTTP goodput", (31, 119, 180), points(lambda r: r["goodput_per_s"]))],
        ),
        (
            "Latency of 2xx responses",
            "seconds",
            [
                Series("p95", (255, 127, 14), points(lambda r: r["latency_2xx_seconds"]["p95"])),
                Series("p50", (148, 103, 189), points(lambda r: r["latency_2xx_seconds"]["p50"])),
            ],
        ),
        (
            "Peak RSS of the server process",
            "MB",
            [
                Series(
                    "server peak RSS",
                    (44, 160, 44),
                    points(lambda r: (r.get("server") or {}).get("peak_rss_bytes"), MB),
                )
            ],
        ),
        (
            "Refusals: 503 responses per second",
            "responses / s",
            [
                Series(
                    "503 / s",
                    (214, 39, 40),
                    points(lambda r: r["responses_per_s_by_status"].get("503", 0.0)),
                )
            ],
        ),
    ]
    if ceiling is not None:
        panels[0][2].append(ceiling_series(runs, ceiling, "images_per_s", 1.0, "{:.2f}/s"))
        panels[2][2].append(ceiling_series(runs, ceiling, "peak_rss_bytes", MB, "{:.0f} MB"))
    peer = results["config"].get("peer")
    if peer is not None:  # the same plan against the peer: its goodput, p95 and RSS beside ours
        brown = (140, 86, 75)

        def of_peer(getter: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
            return lambda run: getter(run["peer"]) if run.get("peer") else None

        panels[0][2].append(Series(f"{peer} (GET)", brown, points(of_peer(lambda r: r["goodput_per_s"]))))
        panels[1][2].append(
            Series(f"{peer} p95", brown, points(of_peer(lambda r: r["latency_2xx_seconds"]["p95"])))
        )
        panels[2][2].append(
            Series(
                f"{peer} peak RSS", brown, points(of_peer(lambda r: r["server"].get("peak_rss_bytes")), MB)
            )
        )
    width, panel_height, header = 1000, 300, 90
    image = Image.new("RGB", (width, header + panel_height * len(panels)), "white")
    draw = ImageDraw.Draw(image)
    config, machine = results["config"], results["machine"]
    query = f"?{config['query']}" if config["query"] else ""
    draw.text(
        (20, 14),
        f"optimizer: POST {config['path']}{query}, {Path(config['file']).name}",
        fill="black",
        font=font(22),
    )
    placed = results["config"]  # where the server and the harness ran (--server-cpus)
    subtitle = (
        (f"{results['label']}; " if results.get("label") else "")
        + f"on 503: {runs[0]['on_503'] if runs else '-'}; {len(runs)} run(s)"
        + (f" ({left_out} invalid left out: the server died)" if left_out else "")
        + f"; {machine['nproc']} CPUs "
        f"({machine['cpu_model'] or '?'}); {results['started_at'][:19]}"
        + (
            f"; server on CPUs {placed['server_cpus']}, harness on {placed['harness_cpus']}"
            if placed.get("server_cpus")
            else ""
        )
    )
    draw.text((20, 46), subtitle, fill=(60, 60, 60), font=font(14))
    if ceiling is not None:
        draw.text(
            (20, 66),
            "ceiling: optimize() alone, same machine, same invocation",
            fill=(60, 60, 60),
            font=font(14),
        )
    noisy = sorted({phase for run in runs for phase in run.get("derived", {}).get("noisy_phases", [])})
    if noisy:
        draw.text(
            (560, 66),
            f"noisy machine during: {', '.join(noisy)} (see the JSON)",
            fill=(200, 0, 0),
            font=font(14),
        )
    for index, (title, y_label, series) in enumerate(panels):
        top = header + index * panel_height
        draw_panel(
            image,
            (0, top, width, top + panel_height),
            title=title,
            y_label=y_label,
            x_values=users,
            series=series,
        )
    image.save(out, "PNG")


# --- command line ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench.py",
        description="Load-test the optimizer over HTTP and compare with the pipeline's ceiling. "
        "Flags after -- go to the server the harness starts (e.g. -- --threads 2 --queue 4). "
        "`bench.py chart RESULTS.json OUT.png` draws a chart from --json results.",
        epilog="Scenarios: "
        + "; ".join(f"{name}: {scenario.description}" for name, scenario in SCENARIOS.items()),
    )
    parser.add_argument(
        "--scenario", choices=sorted(SCENARIOS), help="named preset (flags given override it)"
    )
    parser.add_argument(
        "--file", type=Path, help="image to upload (relative paths are also tried in the corpus)"
    )
    parser.add_argument(
        "--corpus",
        type=Path,
        default=Path(os.environ.get("OPTIMIZER_CORPUS", ROOT.parent / "shared" / "corpus")),
        help="corpus folder for scenarios [default: $OPTIMIZER_CORPUS or ../shared/corpus]",
    )
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--start", action="store_true", help="start the server (the default without --url)")
    target.add_argument("--url", help="target a running server at this base URL (loopback only)")
    parser.add_argument("--path", help="route [default: /upload]")
    parser.add_argument("--query", help="query string, e.g. width=800&quality=80")
    parser.add_argument("--raw", action="store_true", help="send the raw file with its Content-Type")
    parser.add_argument("--field", default="image", help="multipart field name [default: image]")
    parser.add_argument("--users", type=int, help="constant number of users [default: 10]")
    parser.add_argument(
        "--duration", type=parse_duration, help="seconds of load, e.g. 25 or 25s [default: 10]"
    )
    parser.add_argument("--stages", type=parse_stages, help="k6-like ramp, e.g. 5s:20,10s:50,5s:0")
    parser.add_argument(
        "--sweep-users", type=parse_user_list, help="constant runs for each count, e.g. 10,50,200"
    )
    parser.add_argument(
        "--on-503",
        choices=("retry-after", "immediate"),
        help="sleep Retry-After seconds (a real client) or retry at once (k6 flood) [default: retry-after]",
    )
    parser.add_argument(
        "--expect-continue", action="store_true", help="send Expect: 100-continue (refusals skip the upload)"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in seconds [60]")
    parser.add_argument(
        "--grace", type=float, default=10.0, help="seconds in-flight requests get at the end [10]"
    )
    parser.add_argument(
        "--ceiling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure the pipeline alone first [default: on when the harness starts the server]",
    )
    parser.add_argument("--ceiling-duration", type=parse_duration, help="[default: the load's duration]")
    parser.add_argument(
        "--bracket",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure the ceiling once more after the last load, and compare each load with the "
        "ceilings before and after it, interpolated to its time: the machine's speed drifts by a few "
        "percent over minutes [default: on]",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure the ceiling and the load this many times, alternating, and report the median "
        "ratio: the machine's own speed drifts by a few percent between runs [default: 1]",
    )
    parser.add_argument("--ceiling-threads", type=positive_int, help="[default: the server's thread count]")
    parser.add_argument(
        "--server-cpus",
        type=parse_cpu_list,
        help="run the server, the ceiling and a --peer on these CPUs only (e.g. 0, or 0-1) and the "
        "harness on others, so that the load generator does not share the server's cores; the "
        "machine's time is then read on these CPUs [default: every CPU, shared]",
    )
    parser.add_argument(
        "--harness-cpus",
        type=parse_cpu_list,
        help="with --server-cpus: the harness's CPUs [default: the usable CPUs the server is not given]",
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=ROOT,
        help="optimizer checkout the server and the ceiling run from, e.g. a git worktree of another "
        "commit; the ceiling imports this harness's helpers from it, so it must be commit e005eff or "
        "later (c0f1f66 with --resizer vips); an optimizer module missing from it fails to import "
        "rather than come from elsewhere [default: this repository]",
    )
    parser.add_argument(
        "--peer",
        choices=sorted(PEERS),
        help="after each load, run the same plan against this peer server (GET of the file it serves "
        "from disk) and report both side by side",
    )
    parser.add_argument(
        "--peer-dir",
        type=Path,
        default=Path(os.environ.get("OPTIMIZER_PEER_DIR", Path.home() / ".cache" / "optimizer-peers")),
        help="where the peers are installed (see --peer's error for the install command) "
        "[default: $OPTIMIZER_PEER_DIR or ~/.cache/optimizer-peers]",
    )
    parser.add_argument("--label", help="free text stored with the results and shown on the chart")
    parser.add_argument("--json", type=Path, help="write the results as JSON to this file")
    parser.add_argument("--server-log", type=Path, help="keep the server's log (one file per run, suffixed)")
    parser.add_argument(
        "--stop-timeout", type=seconds_or_zero, default=30.0, help="SIGKILL the server after [30] s"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    return parser


def resolve_file(args: argparse.Namespace, scenario: Scenario | None) -> Path:
    candidates: list[Path] = []
    if args.file is not None:
        candidates += [args.file, args.corpus / args.file]
    elif scenario is not None:
        candidates.append(args.corpus / scenario.file)
    else:
        raise BenchError("give --file or --scenario")
    for candidate in candidates:
        if candidate.is_file():
            return _an_image(candidate.resolve())
    raise BenchError(f"no such file: {candidates[0]} (set --corpus or $OPTIMIZER_CORPUS for the corpus)")


def _an_image(file: Path) -> Path:
    """``file``, if its first bytes claim a format the service takes (as the service itself checks, before
    any decoder): anything else failed deep in the ceiling's child, or got only 415s."""
    try:
        with file.open("rb") as handle:
            head = handle.read(64)
    except OSError as exc:
        raise BenchError(f"--file {file}: {exc.strerror}") from None
    if sniff(head) is None:
        formats = ", ".join([*PILLOW_FORMATS, "heif"])
        raise BenchError(f"--file {file}: not an image the service takes (no {formats} signature)")
    return file


def _writable_log(path: Path | None) -> Path | None:
    """``--server-log``, checked before anything runs (a missing folder used to fail after the ceiling)."""
    if path is not None and not path.parent.is_dir():
        raise BenchError(f"--server-log {path}: no folder {path.parent}")
    return path


def _check_url(url: str | None, server_args: list[str]) -> None:
    """``--url``: plain HTTP on loopback, with a port that exists."""
    if url is None:
        return
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in LOOPBACK_HOSTS:
        raise BenchError(f"--url {url}: only http:// on 127.0.0.1 (loopback) is allowed")
    try:
        parts.port  # noqa: B018 - urlsplit checks the port only when asked for it
    except ValueError as exc:  # each user would fail on it, and report no answer at all
        raise BenchError(f"--url {url}: {exc}") from None
    if server_args:
        raise BenchError("flags after -- go to a server the harness starts; they make no sense with --url")


def _writable_json(path: Path | None) -> None:
    """``--json``, checked before anything runs: a folder, or a place this process cannot write, used to
    fail only when the results were written, after the whole run, losing them. Missing folders are made
    at the end, as before; the nearest one that exists must let us make them."""
    if path is None:
        return
    if path.is_dir():
        raise BenchError(f"--json {path}: that is a folder; name a file in it")
    existing = path if path.exists() else next(folder for folder in path.parents if folder.exists())
    if existing != path and not existing.is_dir():
        raise BenchError(f"--json {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK):
        raise BenchError(f"--json {path}: {existing} is not writable")


def write_results(results: dict[str, Any], path: Path) -> None:
    """The results to ``path``; when that fails after all (a full disk, a folder removed meanwhile), to a
    temporary file instead, so that the run is not lost."""
    text = json.dumps(results, indent=2) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as exc:
        with tempfile.NamedTemporaryFile("w", prefix="bench-results-", suffix=".json", delete=False) as spare:
            spare.write(text)
        print(f"bench.py: cannot write {path} ({exc}); the results are in {spare.name}", file=sys.stderr)
        return
    print(f"results written to {path}", file=sys.stderr)


def make_config(args: argparse.Namespace, server_args: list[str]) -> tuple[Config, list[LoadPlan]]:
    scenario = SCENARIOS.get(args.scenario) if args.scenario else None
    file = resolve_file(args, scenario)
    path = args.path or (scenario.path if scenario else "/upload")
    if not path.startswith("/"):
        path = "/" + path
    query = (args.query if args.query is not None else (scenario.query if scenario else "")).lstrip("?")
    on_503 = args.on_503 or (scenario.on_503 if scenario else "retry-after")
    users = args.users if args.users is not None else (scenario.users if scenario else 10)
    duration = args.duration if args.duration is not None else (scenario.duration if scenario else 10.0)
    if users < 1 or duration <= 0:
        raise BenchError("--users must be at least 1 and --duration positive")
    if args.timeout <= 0 or args.grace < 0:
        raise BenchError("--timeout must be positive and --grace 0 or more")

    _check_url(args.url, server_args)
    server_cpus, harness_cpus = split_cpus(args)
    settings, ceiling_threads = _server_threads(args, server_args, server_cpus)
    check_source(args.source, pipeline_limits(settings).resizer)
    if any(flag == f or flag.startswith(f + "=") for flag in server_args for f in ("--host", "--port")):
        raise BenchError(
            "the harness binds the server to 127.0.0.1 on a free port itself; drop --host/--port"
        )
    ceiling = args.ceiling if args.ceiling is not None else args.url is None
    if ceiling or args.peer is not None:
        # A bad query fails now, not in the ceiling's child, nor when the peer's URL is built from it.
        request_params(path, query, settings)

    if args.peer is not None:
        if args.url is not None:
            raise BenchError("--peer compares with a server the harness starts; drop --url")
        if not (args.peer_dir / PEERS[args.peer].executable).exists():
            raise BenchError(
                f"--peer {args.peer}: not installed in {args.peer_dir}; install it with: "
                + PEERS[args.peer].install.format(dir=args.peer_dir)
            )
    if args.rounds < 1:
        raise BenchError("--rounds must be at least 1")
    if args.rounds > 1 and args.sweep_users:
        raise BenchError("--rounds repeats one load; run a sweep once per round instead")
    if args.sweep_users and args.stages:
        raise BenchError("--sweep-users runs constant loads; it cannot be combined with --stages")
    _writable_json(args.json)
    if ceiling and args.url is not None:
        print(f"bench.py: note: {URL_CEILING_NOTE}", file=sys.stderr)
    if args.sweep_users:
        plans = [LoadPlan.constant(n, duration) for n in args.sweep_users]
    elif args.stages:
        plans = [LoadPlan(start_users=0, stages=args.stages)]
    else:
        plans = [LoadPlan.constant(users, duration)]
    config = Config(
        file=file,
        path=path,
        query=query,
        raw=args.raw,
        field_name=args.field,
        url=args.url,
        server_args=server_args,
        on_503=on_503,
        timeout=args.timeout,
        grace=args.grace,
        expect_continue=args.expect_continue,
        ceiling=ceiling,
        ceiling_seconds=args.ceiling_duration,
        threads=ceiling_threads,
        ceiling_processes=min(settings.processes, ceiling_threads),  # a child needs a thread at least
        quiet=args.quiet,
        stop_timeout=args.stop_timeout,
        server_log=_writable_log(args.server_log),
        scenario=args.scenario,
        source=args.source.resolve(),
        label=args.label,
        peer=args.peer,
        peer_dir=args.peer_dir.resolve(),
        rounds=args.rounds,
        bracket=args.bracket,
        server_cpus=server_cpus,
        harness_cpus=harness_cpus,
    )
    return config, plans


def _server_threads(
    args: argparse.Namespace, server_args: list[str], cpus: frozenset[int] | None
) -> tuple[Settings, int]:
    """The server's settings and the ceiling's thread count, as the server will see them on ``cpus``
    (its default thread count is its CPUs')."""
    try:
        with on_cpus(cpus):
            settings = server_settings(server_args)
            return settings, args.ceiling_threads or total_threads(settings, server_args)
    except SettingsError as exc:
        raise BenchError(f"server flags after --: {exc}") from None


def split_cpus(args: argparse.Namespace) -> tuple[frozenset[int] | None, frozenset[int] | None]:
    """``--server-cpus`` and the harness's CPUs (``--harness-cpus``, or the usable CPUs the server
    leaves): two disjoint sets of usable CPUs, or ``(None, None)`` to share them all."""
    if args.server_cpus is None:
        if args.harness_cpus is not None:
            raise BenchError("--harness-cpus goes with --server-cpus")
        return None, None
    if not hasattr(os, "sched_setaffinity"):
        raise BenchError("--server-cpus needs Linux (CPU affinity)")
    if args.url is not None:
        raise BenchError("--server-cpus places a server the harness starts; drop --url")
    usable = frozenset(os.sched_getaffinity(0))
    harness = args.harness_cpus if args.harness_cpus is not None else usable - args.server_cpus
    for flag, cpus in (("--server-cpus", args.server_cpus), ("--harness-cpus", harness)):
        if not cpus <= usable:
            raise BenchError(f"{flag} {cpu_list(cpus)}: this process may use CPUs {cpu_list(usable)} only")
    if not harness:
        raise BenchError(f"--server-cpus {cpu_list(args.server_cpus)} leaves no CPU to the harness")
    if harness & args.server_cpus:
        raise BenchError(
            f"--harness-cpus {cpu_list(harness)} and --server-cpus {cpu_list(args.server_cpus)} overlap"
        )
    return args.server_cpus, harness


def measure_ceiling(config: Config, plans: list[LoadPlan]) -> dict[str, Any]:
    seconds = config.ceiling_seconds or max(plan.seconds for plan in plans)
    if not config.quiet:
        layout = f"{config.ceiling_processes} processes, " if config.ceiling_processes > 1 else ""
        print(
            f"ceiling: optimize() on {layout}{config.threads} threads, no HTTP, {seconds:g} s ...",
            file=sys.stderr,
        )
    return run_ceiling(
        config.file,
        path=config.path,
        query=config.query,
        server_args=config.server_args,
        threads=config.threads,
        seconds=seconds,
        source=config.source,
        processes=config.ceiling_processes,
        cpus=config.server_cpus,
    )


def load_run(config: Config, plan: LoadPlan, log_dir: Path, name: str) -> dict[str, Any]:
    """One load on a fresh server, and the peer under the same plan (``judge`` compares them)."""
    result = load_once(config, plan, log_dir, name)
    if config.peer is not None:
        result["peer"] = peer_once(config, plan, log_dir, name)
    return result


def judge(config: Config, result: dict[str, Any], ceiling: dict[str, Any] | None) -> None:
    """Compare a load with its ceiling (and its peer), once the ceiling after it is known too."""
    result["ceiling"] = ceiling
    compare(result, ceiling)
    server = result.get("server") or {}
    processes = server_settings(config.server_args).processes
    result["warnings"] = ceiling_warnings(ceiling, processes, server.get("threads")) if ceiling else []
    peer_result = result.get("peer")
    valid = not result.get("invalid") and not (peer_result or {}).get("invalid")
    if peer_result and valid and result["goodput_per_s"] and peer_result["goodput_per_s"]:
        result["derived"]["goodput_over_peer"] = result["goodput_per_s"] / peer_result["goodput_per_s"]


def rounds_summary(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Median, lowest and highest of each round's figures (``--rounds``), for one repeated load. A
    round whose server died (``invalid``) measured a window cut short: it is left out of the medians,
    and its figures are ``None`` in ``each``."""
    valid = [not run.get("invalid") for run in runs]

    def spread(values: Sequence[float | None]) -> dict[str, Any] | None:
        each = [value if ok else None for value, ok in zip(values, valid, strict=True)]
        known = sorted(v for v in each if v is not None)
        if not known:
            return None
        return {"median": statistics.median(known), "min": known[0], "max": known[-1], "each": each}

    def of(getter: Callable[[dict[str, Any]], float | None]) -> dict[str, Any] | None:
        return spread([getter(run) for run in runs])

    def derived(key: str) -> dict[str, Any] | None:
        return of(lambda run: run["derived"].get(key))

    def per_image(part: str) -> dict[str, Any] | None:
        def ms(run: dict[str, Any]) -> float | None:
            value = (run["derived"].get("machine_seconds_per_2xx") or {}).get(part)
            return None if value is None else value * 1000

        return of(ms)

    return {
        "rounds": len(runs),
        "excluded_rounds": [run.get("round") for run, ok in zip(runs, valid, strict=True) if not ok],
        "with_ceiling": any(run.get("ceiling") for run in runs),
        # Each load against the ceilings either side of it (--bracket).
        "bracketed": all("bracket" in (run.get("ceiling") or {}) for run in runs),
        "goodput_per_s": of(lambda r: r["goodput_per_s"]),
        "ceiling_images_per_s": derived("ceiling_images_per_s"),
        "ceiling_drift": of(lambda r: ((r.get("ceiling") or {}).get("bracket") or {}).get("drift")),
        "goodput_over_ceiling": derived("goodput_over_ceiling"),
        "goodput_over_ceiling_without_harness": derived("goodput_over_ceiling_without_harness"),
        "p95_seconds": of(lambda r: r["latency_2xx_seconds"]["p95"]),
        "server_minus_ceiling_peak_rss_bytes": derived("server_minus_ceiling_peak_rss_bytes"),
        "goodput_over_peer": derived("goodput_over_peer"),
        "machine_ms": per_image("total"),
        "ceiling_machine_ms": per_image("ceiling_machine"),
        "image_work_ms": per_image("server_other_threads"),
        "ceiling_cpu_ms": per_image("ceiling_cpu"),
        "event_loop_ms": per_image("server_main_threads"),
        # With --server-cpus the harness is not part of the machine time read: its CPU is shown apart.
        "harness_ms": None if runs[0].get("machine_cpus") else per_image("harness"),
        "harness_elsewhere_ms": per_image("harness_elsewhere"),
    }


def run_bench(config: Config, plans: list[LoadPlan], command: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {
        "version": RESULTS_VERSION,
        "started_at": datetime.now(UTC).isoformat(),
        "label": config.label,
        "command": command,
        "machine": machine_info(),
        "config": {
            "scenario": config.scenario,
            "file": str(config.file),
            "file_bytes": config.file.stat().st_size,
            "path": config.path,
            "query": config.query,
            "body": "raw" if config.raw else f"multipart:{config.field_name}",
            "on_503": config.on_503,
            "expect_continue": config.expect_continue,
            "timeout_seconds": config.timeout,
            "grace_seconds": config.grace,
            "url": config.url,
            "server_started_by_harness": config.url is None,
            "server_args": config.server_args,
            "threads": config.threads,
            "peer": config.peer,
            "rounds": config.rounds,
            "server_cpus": cpu_list(config.server_cpus) if config.server_cpus else None,
            "harness_cpus": cpu_list(config.harness_cpus) if config.harness_cpus else None,
        },
        # Which code ran: the server (when the harness starts it) and the ceiling come from --source.
        "code": source_info(config.source) if config.url is None or config.ceiling else None,
        "ceiling": None,  # the first one measured, for readers of a single round
        "ceilings": [],  # one per round, in order, and with --bracket one more after the last load
        "runs": [],  # each with the ceiling it is compared with ("ceiling")
    }
    ceilings: list[dict[str, Any]] = results["ceilings"]
    sweep_stale_scratch()
    with scratch("bench") as log_dir, on_cpus(config.harness_cpus):
        for round_index in range(config.rounds):
            # Each round measures its own ceiling right before its load: the machine's speed drifts by
            # a few percent over minutes, and a ratio is only as good as the two figures being adjacent.
            if config.ceiling:
                ceilings.append(measure_ceiling(config, plans))
                results["note"] = SAME_MACHINE_NOTE
            for index, plan in enumerate(plans):
                name = f"{index + 1}-{plan.max_users}u"
                if config.rounds > 1:
                    name += f"-r{round_index + 1}"
                result = load_run(config, plan, Path(log_dir), name)
                result["round"] = round_index + 1
                results["runs"].append(result)
        if config.ceiling and config.bracket:
            try:
                ceilings.append(measure_ceiling(config, plans))
            except BenchError as exc:
                # The loads are measured already: compare them with the ceilings before them instead.
                results["bracket_error"] = str(exc)
                print(
                    f"bench.py: the last ceiling failed, so each load is compared with the one "
                    f"before it only: {exc}",
                    file=sys.stderr,
                )
    results["ceiling"] = ceilings[0] if ceilings else None
    for result in results["runs"]:
        index = result["round"] - 1
        before = ceilings[index] if index < len(ceilings) else None
        after = ceilings[index + 1] if config.bracket and index + 1 < len(ceilings) else None
        ceiling = (
            None
            if before is None
            else bracket_ceiling(before, after, result["measured_at"], loads=len(plans))
        )
        judge(config, result, ceiling)
    if config.rounds > 1:
        results["rounds"] = rounds_summary(results["runs"])
    with contextlib.suppress(OSError):
        results["machine"]["loadavg_at_end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    if len(plans) > 1:
        results["sweep"] = [
            {
                "users": run["users"],
                "goodput_per_s": run["goodput_per_s"],
                "goodput_over_ceiling": run["derived"]["goodput_over_ceiling"],
                "p95_seconds": run["latency_2xx_seconds"]["p95"],
                "refused_per_s": run["responses_per_s_by_status"].get("503", 0.0),
                "peak_rss_bytes": (run.get("server") or {}).get("peak_rss_bytes"),
                "errors": run["errors"]["total"],
                "invalid": run.get("invalid"),
            }
            for run in results["runs"]
        ]
    return results


def chart_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench.py chart", description="Draw a PNG from --json results.")
    parser.add_argument("results", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    try:
        results = json.loads(args.results.read_text())
    except OSError as exc:
        parser.error(f"{args.results}: {exc.strerror}")
    except ValueError as exc:  # not JSON, or not text
        parser.error(f"{args.results}: not JSON results from bench.py --json ({exc})")
    if not isinstance(results, dict) or not isinstance(results.get("runs"), list):
        parser.error(f"{args.results}: not results from bench.py --json (no list of runs)")
    if not args.out.parent.is_dir():
        parser.error(f"{args.out}: no folder {args.out.parent}")
    try:
        draw_chart(results, args.out)
    except OSError as exc:
        parser.error(f"{args.out}: {exc.strerror or exc}")
    except (KeyError, TypeError, ValueError) as exc:
        parser.error(f"{args.results}: results this version cannot draw ({type(exc).__name__}: {exc})")
    print(f"chart written to {args.out}", file=sys.stderr)
    return 0


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["chart"]:
        return chart_main(argv[1:])
    if argv[:1] == ["_ceiling"]:  # internal: the ceiling's child process
        return ceiling_child(json.loads(argv[1]))
    own, server_args = (
        (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    )
    # SIGTERM (a CI timeout, say) and SIGHUP (a closed terminal) unwind like Ctrl-C, so that the finally
    # blocks stop the server.
    signal.signal(signal.SIGTERM, _interrupted)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # under nohup, a hang-up stays ignored
        signal.signal(signal.SIGHUP, _interrupted)
    parser = build_parser()
    args = parser.parse_args(own)
    try:
        config, plans = make_config(args, server_args)
        results = run_bench(config, plans, ["scripts/bench.py", *argv])
    except BenchError as exc:
        print(f"bench.py: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nbench.py: interrupted; the server (if started) has been stopped", file=sys.stderr)
        return 130
    except SystemExit as exc:  # the server's own flag parser refused a flag after --
        return exc.code if isinstance(exc.code, int) else 2
    print_report(results)
    if args.json is not None:
        write_results(results, args.json)
    # An invalid run (its server, or one of a --processes server's processes, died) fails the harness as
    # a dead server does: its report says INVALID, and CI must not read success (a review).
    failed = any(
        run["ok"] == 0 or run["server_died_with_code"] is not None or run.get("invalid")
        for run in results["runs"]
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
