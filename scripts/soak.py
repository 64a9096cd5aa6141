#!/usr/bin/env python3
"""Soak test: hours-long behaviour in minutes. Does the server's memory stay flat under steady load?

    python scripts/soak.py                          # ramp to find capacity, then 10 min at 80 %
    python scripts/soak.py --minutes 3 --warmup 120  # a quick run
    python scripts/soak.py --rate 12 --json soak.json -- --threads 2 --queue 4

Not part of CI. The script starts ``python -m optimizer`` itself on 127.0.0.1 and a free port (flags after
``--`` go to the server), then:

1. finds the capacity with a short ramp: closed-loop users 1, 2, 4, ... for ``--ramp-step`` seconds each,
   until more than 5 % are refused or the users are twice the server's admission capacity; the capacity
   is the best goodput (200s per second) seen. ``--rate`` skips the ramp and sets the arrival rate;
2. sends an open-loop stream of requests (evenly spaced, or ``--arrivals poisson``) at ``--load``
   (default 80 %) of that capacity for ``--minutes``: a mix of the corpus photos to ``POST /upload`` and
   small generated images to ``POST /optimize`` (``--photo-share`` of them photos);
3. measures the server's *idle RSS* twice: when the ``--warmup`` ends and when the load ends, the
   arrivals pause until nothing is in flight and the server has trimmed its heap (it does so once idle,
   ``optimizer.server.trim_memory_when_idle``), and the RSS is read then. That is the memory the process
   keeps between loads: what a leak adds to, and what the allocator's passing state does not. Growth
   above ``--max-growth`` percent (default 5) from the first to the second fails the run.
4. samples the RSS (``VmRSS``) every second under load too, and reports the growth of the median of a
   window right after the warm-up and one at the end (each 20 % of the measured time, 5 to 30 samples),
   for information: under load RSS jumps by 100 MB and more while a 22 MP photo is decoded.

Until 2026-11-30 the minimum of those windows decided. It depended on whether a trim happened to fall
into a window: the same code gave -7 % in one run and +32 % in another (67 MB after the warm-up, from a
sample right after a trim, against 89 MB at the end, a lower end than the run at -7 % had). The warm-up
must still outlast the time the allocator takes to reach its working size (at ~70 requests/s the floor
under load was still climbing 75 -> 95 MB at 60-80 s).

It prints the capacity ramp, the RSS every 10 s, goodput, latency percentiles and status counts, and
stops the server with SIGTERM (SIGKILL if it does not exit).

Exit status: 0 when the RSS growth is within the bound, 1 when it is not, when the server died or when no
request succeeded, 2 for bad arguments or a server that does not start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import bench  # scripts/ is the first entry of sys.path when a script runs
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 60.0
REQUEST_TIMEOUT = 60.0
MAX_OUTSTANDING = 500  # open-loop requests in flight before new arrivals are dropped (client side)
REPORT_EVERY = 10.0  # seconds between progress lines
# Once nothing is in flight, the server trims its heap at its next check (once a second, on a worker
# thread); the idle RSS is the lowest of IDLE_READS reads after this long.
IDLE_SETTLE_SECONDS = 3.0
IDLE_READS = 5
MB = 1024 * 1024


class SoakError(Exception):
    """A problem the user can fix: bad arguments, no corpus, a server that does not start."""


# --- the server ----------------------------------------------------------------------------------------


class Server:
    """``python -m optimizer`` on 127.0.0.1 and a free port; stderr drained on a thread."""

    def __init__(self, flags: Sequence[str]) -> None:
        env = {name: value for name, value in os.environ.items() if not name.startswith("OPTIMIZER_")}
        self.proc = subprocess.Popen(
            bench.dying_with_us([sys.executable, "-m", "optimizer", *flags, "--host", HOST, "--port", "0"]),
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        self.port = 0
        self.listening: dict[str, Any] = {}
        self.tail: deque[str] = deque(maxlen=50)
        self.non_json_lines = 0
        self.error_lines = 0
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._drain, name="soak-server-stderr", daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.rstrip("\n")
            self.tail.append(line)
            try:
                record = json.loads(line)
            except ValueError:
                self.non_json_lines += 1
                continue
            if not isinstance(record, dict):
                continue
            if record.get("level") == "error":
                self.error_lines += 1
            if record.get("event") == "listening" and not self._ready.is_set():
                self.listening = record
                self.port = int(record["port"])
                self._ready.set()
        self._ready.set()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_listening(self) -> None:
        if not self._ready.wait(STARTUP_TIMEOUT) or not self.port:
            self.stop()
            raise SoakError("the server did not start:\n" + "\n".join(self.tail))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after ``STOP_TIMEOUT``; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        self._reader.join(5)
        return self.proc.returncode


def read_rss(pid: int) -> int | None:
    """VmRSS summed over the server's process tree: with ``--processes`` the workers hold the images,
    the supervisor almost nothing (measured alone, a soak of two workers passed at a flat 17 MB)."""
    values = [bench.proc_status(p).get("VmRSS") for p in bench.process_tree(pid)]
    known = [value for value in values if value is not None]
    return sum(known) if known else None


# --- the request mix -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Upload:
    name: str
    path: str  # route and query
    body: bytes
    content_type: str


def generated(size: tuple[int, int], fmt: str, mode: str = "RGB") -> bytes:
    gradient = Image.linear_gradient("L").resize(size)
    image = Image.merge(
        "RGB", (gradient, gradient.rotate(90), gradient.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    )
    if mode == "RGBA":
        image.putalpha(gradient)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def build_mix(corpus: Path | None) -> tuple[list[Upload], list[Upload]]:
    """(photos, small images). Photos come from the corpus; without it, two large generated images."""
    photos: list[Upload] = []
    if corpus is not None and (corpus / "photos").is_dir():
        for path in sorted((corpus / "photos").iterdir()):
            if path.suffix.lower() in (".jpg", ".jpeg", ".png"):
                kind = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
                photos.append(Upload(path.name, "/upload", path.read_bytes(), kind))
    if not photos:
        print("soak: no corpus photos found; using generated large images", file=sys.stderr)
        photos = [
            Upload("generated-4000x3000.jpg", "/upload", generated((4000, 3000), "JPEG"), "image/jpeg"),
            Upload("generated-2000x1500.png", "/upload", generated((2000, 1500), "PNG"), "image/png"),
        ]
    small = [
        Upload("small-64x48.jpg", "/optimize?width=32", generated((64, 48), "JPEG"), "image/jpeg"),
        Upload(
            "small-320x240.png", "/optimize?format=webp", generated((320, 240), "PNG", "RGBA"), "image/png"
        ),
        Upload(
            "small-400x300.jpg", "/optimize?width=200&format=png", generated((400, 300), "JPEG"), "image/jpeg"
        ),
        Upload("small-200x200.webp", "/optimize?format=jpeg", generated((200, 200), "WEBP"), "image/webp"),
    ]
    return photos, small


class Mix:
    def __init__(self, photos: list[Upload], small: list[Upload], photo_share: float, seed: int) -> None:
        self.photos = photos
        self.small = small
        self.photo_share = photo_share
        self.rng = random.Random(seed)

    def pick(self) -> Upload:
        pool = self.photos if self.rng.random() < self.photo_share else self.small
        return self.rng.choice(pool)


# --- measuring -----------------------------------------------------------------------------------------


@dataclass
class Outcome:
    at: float  # seconds since the phase began, when the answer (or error) came
    key: str  # "200", "503 overloaded", "error ClientConnectorError", ...
    ok: bool
    seconds: float
    bytes_out: int


async def send(session: aiohttp.ClientSession, url: str, upload: Upload, started: float) -> Outcome:
    loop = asyncio.get_running_loop()
    begin = loop.time()
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    try:
        async with session.post(
            url + upload.path,
            data=io.BytesIO(upload.body),
            headers={"Content-Type": upload.content_type},
            timeout=timeout,
        ) as response:
            body = await response.read()
            key = str(response.status)
            if response.content_type == "application/problem+json":
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    key += " " + str(json.loads(body)["code"])
            ok = response.status == 200
            size = len(body)
    except (aiohttp.ClientError, TimeoutError) as error:
        key, ok, size = f"error {type(error).__name__}", False, 0
    end = loop.time()
    return Outcome(end - started, key, ok, end - begin, size)


async def closed_loop(
    session: aiohttp.ClientSession, url: str, mix: Mix, users: int, seconds: float
) -> list[Outcome]:
    loop = asyncio.get_running_loop()
    started = loop.time()
    outcomes: list[Outcome] = []

    async def user() -> None:
        while loop.time() - started < seconds:
            outcome = await send(session, url, mix.pick(), started)
            outcomes.append(outcome)
            if not outcome.ok:
                await asyncio.sleep(0.05)

    await asyncio.gather(*(user() for _ in range(users)))
    return outcomes


async def find_capacity(
    session: aiohttp.ClientSession, url: str, mix: Mix, step_seconds: float, server_capacity: int
) -> float:
    """Goodput (200s per second) at saturation, from a closed-loop ramp of users 1, 2, 4, ...

    The ramp goes on until the server refuses more than 5 % (the gate is full: more users only get 503s)
    or the users are twice the server's admission capacity; the capacity is the best goodput seen."""
    best = 0.0
    users = 1
    print(f"capacity ramp ({step_seconds:g} s per step):")
    while True:
        outcomes = await closed_loop(session, url, mix, users, step_seconds)
        good = sum(1 for outcome in outcomes if outcome.ok) / step_seconds
        refused = sum(1 for outcome in outcomes if not outcome.ok)
        print(f"  {users:3d} users: {good:7.2f} ok/s, {refused} not ok of {len(outcomes)}")
        best = max(best, good)
        if refused > 0.05 * max(1, len(outcomes)) or users >= 2 * max(1, server_capacity):
            break
        users *= 2
    if best <= 0:
        raise SoakError("no request succeeded during the capacity ramp")
    return best


@dataclass
class SoakResult:
    rate: float
    seconds: float
    warmup: float
    outcomes: list[Outcome] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)
    dropped: int = 0
    server_died: bool = False
    # The idle RSS when the warm-up ends and when the load ends (see the module's docstring), and the
    # seconds the arrivals paused for them; ``idle`` is set while they pause, so that the samples under
    # load leave those seconds out.
    idle_after_warmup: int | None = None
    idle_end: int | None = None
    paused: float = 0.0
    idle: bool = False
    warmed_up: bool = False
    # Seconds from the start to when the arrivals resumed after the warm-up's pause: what is sent from
    # then on is measured (the warm-up's own requests were all answered during the pause).
    measured_from: float | None = None


async def sample_rss(server: Server, result: SoakResult, started: float, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        rss = read_rss(server.pid)
        if rss is None or not server.alive():
            result.server_died = True
            stop.set()
            return
        if not result.idle:
            result.rss.append((loop.time() - started, rss))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)


async def idle_rss(server: Server, result: SoakResult, outstanding: set[asyncio.Task[Outcome]]) -> int | None:
    """The server's RSS once every request sent has been answered and the server has trimmed its heap;
    ``None`` when the server is gone or requests are still unanswered after their timeout. The caller
    sends nothing meanwhile."""
    loop = asyncio.get_running_loop()
    paused_at = loop.time()
    result.idle = True
    try:
        if outstanding:
            _, pending = await asyncio.wait(outstanding, timeout=REQUEST_TIMEOUT + 5)
            if pending:
                return None  # not idle: reading the RSS now would measure work in flight
        await asyncio.sleep(IDLE_SETTLE_SECONDS)
        reads = []
        for _ in range(IDLE_READS):
            rss = read_rss(server.pid) if server.alive() else None
            if rss is None:
                return None
            reads.append(rss)
            await asyncio.sleep(0.2)
        return min(reads)
    finally:
        result.idle = False
        result.paused += loop.time() - paused_at


async def open_loop(
    session: aiohttp.ClientSession,
    server: Server,
    mix: Mix,
    *,
    rate: float,
    seconds: float,
    warmup: float,
    seed: int,
    poisson: bool,
) -> SoakResult:
    """Arrivals at ``rate`` per second (evenly spaced or Poisson) for ``seconds`` of load, paused for the
    idle RSS when the warm-up ends; RSS every second, and idle at the end."""
    loop = asyncio.get_running_loop()
    result = SoakResult(rate=rate, seconds=seconds, warmup=warmup)
    rng = random.Random(seed)
    stop = asyncio.Event()
    started = loop.time()
    sampler = asyncio.create_task(sample_rss(server, result, started, stop))
    outstanding: set[asyncio.Task[Outcome]] = set()
    next_report = 0.0

    def collect(task: asyncio.Task[Outcome]) -> None:
        outstanding.discard(task)
        if not task.cancelled() and task.exception() is None:
            result.outcomes.append(task.result())

    arrival = started
    while not stop.is_set() and (now := loop.time()) - started - result.paused < seconds:
        if not result.warmed_up and now - started - result.paused >= warmup:
            result.warmed_up = True
            result.idle_after_warmup = await idle_rss(server, result, outstanding)
            arrival = now = loop.time()
            result.measured_from = now - started
            next_report = now - started  # the progress lines go on from here
            if stop.is_set():
                break
        if now >= arrival:  # not when woken only for the warm-up's end
            if len(outstanding) >= MAX_OUTSTANDING:
                result.dropped += 1
            else:
                task = asyncio.create_task(send(session, server.url, mix.pick(), started))
                outstanding.add(task)
                task.add_done_callback(collect)
            if now - started >= next_report:
                report_progress(result, now - started)
                next_report += REPORT_EVERY
            arrival += rng.expovariate(rate) if poisson else 1.0 / rate
        # Awake when the warm-up ends even if the next arrival is later (a low rate, a Poisson gap).
        wake = arrival if result.warmed_up else min(arrival, started + result.paused + warmup)
        await asyncio.sleep(max(0.0, wake - loop.time()))
    if not stop.is_set():
        result.idle_end = await idle_rss(server, result, outstanding)
    elif outstanding:
        await asyncio.wait(outstanding, timeout=REQUEST_TIMEOUT + 5)
    stop.set()
    await sampler
    return result


def report_progress(result: SoakResult, elapsed: float) -> None:
    rss = fmt(result.rss[-1][1] / MB if result.rss else None)
    recent = [outcome for outcome in result.outcomes if outcome.at >= elapsed - REPORT_EVERY]
    good = sum(1 for outcome in recent if outcome.ok) / REPORT_EVERY if elapsed >= REPORT_EVERY else 0.0
    phase = "warm-up" if elapsed < result.warmup else "measure"
    print(f"  t={elapsed:6.0f}s [{phase}] rss {rss:>7} MB, ok/s {good:6.2f}, answered {len(result.outcomes)}")


# --- the report ----------------------------------------------------------------------------------------


def percentile(ordered: Sequence[float], q: float) -> float:
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def rss_window(samples: Sequence[int], span: float) -> int:
    """Samples per comparison window: 20 % of the measured span, 5 to 30 samples (one per second)."""
    return max(5, min(30, int(span * 0.2), len(samples) // 2 or 1))


def summarise(result: SoakResult, capacity: float | None, max_growth: float) -> dict[str, Any]:
    """The figures of the run. The RSS growth that decides is the idle RSS's, from the end of the warm-up
    to the end of the load; that of the window medians under load is reported too."""
    measured_from = result.warmup if result.measured_from is None else result.measured_from
    measured = [outcome for outcome in result.outcomes if outcome.at >= measured_from]
    after = [rss for t, rss in result.rss if t >= measured_from]
    span = max(1e-9, result.seconds - result.warmup)
    window = rss_window(after, span)
    first, last = after[:window], after[-window:]
    baseline = statistics.median(first) if first else None
    end = statistics.median(last) if last else None
    median_growth = (end - baseline) / baseline * 100 if baseline and end is not None else None
    idle_before, idle_after = result.idle_after_warmup, result.idle_end
    growth = (idle_after - idle_before) / idle_before * 100 if idle_before and idle_after else None
    latencies = sorted(outcome.seconds for outcome in measured if outcome.ok)
    return {
        "capacity_ok_per_s": capacity,
        "rate_per_s": result.rate,
        "seconds": result.seconds,
        "warmup_seconds": result.warmup,
        "paused_seconds": result.paused,
        "rss_mb": {
            "start": result.rss[0][1] / MB if result.rss else None,
            "max": max(rss for _, rss in result.rss) / MB if result.rss else None,
            "idle_after_warmup": idle_before / MB if idle_before else None,
            "idle_end": idle_after / MB if idle_after else None,
            "growth_percent": growth,
            "median_after_warmup": baseline / MB if baseline else None,
            "median_end": end / MB if end else None,
            "median_growth_percent": median_growth,
            "window_samples": window,
            "max_growth_percent": max_growth,
        },
        "rss_samples_mb": [[round(t, 1), round(rss / MB, 1)] for t, rss in result.rss],
        "goodput_ok_per_s": sum(1 for outcome in measured if outcome.ok) / span,
        "goodput_mb_per_s": sum(outcome.bytes_out for outcome in measured if outcome.ok) / span / MB,
        "latency_ok_seconds": {
            "p50": percentile(latencies, 0.5),
            "p95": percentile(latencies, 0.95),
            "p99": percentile(latencies, 0.99),
        },
        "status_counts_measured": dict(Counter(outcome.key for outcome in measured).most_common()),
        "status_counts_all": dict(Counter(outcome.key for outcome in result.outcomes).most_common()),
        "dropped_client_side": result.dropped,
        "server_died": result.server_died,
    }


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def print_summary(summary: dict[str, Any], server: Server) -> None:
    rss = summary["rss_mb"]
    print("\nresult:")
    if summary["capacity_ok_per_s"] is not None:
        print(f"  capacity            {summary['capacity_ok_per_s']:.2f} ok/s (ramp)")
    print(f"  arrival rate        {summary['rate_per_s']:.2f} req/s for {summary['seconds']:.0f} s")
    bound, window = rss["max_growth_percent"], rss["window_samples"]
    print(f"  RSS                 at the start {fmt(rss['start'])} MB, max {fmt(rss['max'])} MB")
    print(
        f"  idle RSS            {fmt(rss['idle_after_warmup'])} MB after the warm-up -> "
        f"{fmt(rss['idle_end'])} MB at the end (nothing in flight, the heap trimmed)"
    )
    print(f"  idle RSS growth     {fmt(rss['growth_percent'], '+.2f')} % (bound {bound:g} %)")
    print(
        f"  under load, median  {fmt(rss['median_after_warmup'])} MB -> {fmt(rss['median_end'])} MB "
        f"({fmt(rss['median_growth_percent'], '+.2f')} %, for information: {window} samples each)"
    )
    good, out = summary["goodput_ok_per_s"], summary["goodput_mb_per_s"]
    print(f"  goodput             {good:.2f} ok/s, {out:.3f} MB/s out")
    latency = summary["latency_ok_seconds"]
    p50, p95, p99 = latency["p50"], latency["p95"], latency["p99"]
    print(f"  latency of 200s     p50 {p50:.3f} s, p95 {p95:.3f} s, p99 {p99:.3f} s")
    print("  statuses after warm-up:")
    for key, count in summary["status_counts_measured"].items():
        print(f"    {count:7d}  {key}")
    if summary["dropped_client_side"]:
        print(f"  dropped client-side (too many outstanding): {summary['dropped_client_side']}")
    print(f"  server log: {server.error_lines} error lines, {server.non_json_lines} non-JSON lines")


# --- main ----------------------------------------------------------------------------------------------


def default_corpus() -> Path:
    return Path(os.environ.get("OPTIMIZER_CORPUS", ROOT.parent / "shared" / "corpus"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Soak the optimizer at ~80%% of its capacity and check that its RSS stays flat.",
        epilog="Flags after -- go to the server, e.g. -- --threads 2 --queue 4",
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the soak (default 10)")
    parser.add_argument(
        "--warmup", type=float, default=120.0, help="seconds before the RSS baseline (default 120)"
    )
    parser.add_argument("--rate", type=float, help="arrivals per second; skips the capacity ramp")
    parser.add_argument(
        "--load", type=float, default=0.8, help="fraction of the capacity to run at (default 0.8)"
    )
    parser.add_argument(
        "--arrivals", choices=("even", "poisson"), default="even", help="arrival spacing (default even)"
    )
    parser.add_argument("--ramp-step", type=float, default=4.0, help="seconds per ramp step (default 4)")
    parser.add_argument(
        "--photo-share", type=float, default=0.3, help="share of photos in the mix (default 0.3)"
    )
    parser.add_argument("--max-growth", type=float, default=5.0, help="allowed RSS growth in %% (default 5)")
    parser.add_argument("--corpus", type=Path, default=default_corpus(), help="the image corpus folder")
    parser.add_argument("--seed", type=int, default=1, help="random seed for the mix and the arrivals")
    parser.add_argument("--json", type=Path, help="also write the summary to this file")
    return parser


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    server_flags: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, server_flags = argv[:cut], argv[cut + 1 :]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.warmup <= 0 or args.warmup >= args.minutes * 60:
        # The first idle RSS is read when the warm-up ends: at 0 that is the cold process, before the
        # allocator has reached its working size, and any run would look like growth.
        parser.error("--warmup must be shorter than --minutes, and both positive")
    if args.rate is not None and args.rate <= 0:
        parser.error("--rate must be positive")
    if not 0 < args.load <= 1.5 or not 0 <= args.photo_share <= 1:
        parser.error("--load must be in (0, 1.5] and --photo-share in [0, 1]")
    if any(flag in ("--host", "--port") for flag in server_flags):
        parser.error("the soak picks --host 127.0.0.1 and a free --port itself")
    return args, server_flags


async def run(args: argparse.Namespace, server_flags: list[str]) -> int:
    photos, small = build_mix(args.corpus if args.corpus.is_dir() else None)
    mix = Mix(photos, small, args.photo_share, args.seed)
    server = Server(server_flags)
    server.wait_listening()
    print(
        f"server pid {server.pid} on {server.url}: threads {server.listening.get('threads')}, "
        f"capacity {server.listening.get('capacity')}; {len(photos)} photos, {len(small)} small images"
    )
    capacity: float | None = None
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            if args.rate is None:
                server_capacity = int(server.listening.get("capacity", 4))
                capacity = await find_capacity(session, server.url, mix, args.ramp_step, server_capacity)
                rate = capacity * args.load
            else:
                rate = args.rate
            seconds = args.minutes * 60
            print(f"soak: {rate:.2f} req/s for {seconds:.0f} s, warm-up {args.warmup:.0f} s")
            result = await open_loop(
                session,
                server,
                mix,
                rate=rate,
                seconds=seconds,
                warmup=args.warmup,
                seed=args.seed,
                poisson=args.arrivals == "poisson",
            )
    finally:
        code = server.stop()
    summary = summarise(result, capacity, args.max_growth)
    summary["server_exit_code"] = code
    print_summary(summary, server)
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    growth = summary["rss_mb"]["growth_percent"]
    failures = []
    if result.server_died:
        failures.append("the server died during the soak")
    if not any(outcome.ok for outcome in result.outcomes):
        failures.append("no request succeeded")
    if growth is None:
        failures.append(
            "the idle RSS could not be read at the end of the warm-up or of the load (the server gone, "
            "or requests still unanswered after their timeout)"
        )
    elif growth > args.max_growth:
        failures.append(
            f"the idle RSS grew {fmt(growth, '+.2f')} % after the warm-up (bound {args.max_growth:g} %)"
        )
    for failure in failures:
        print(f"FAIL: {failure}")
    if not failures:
        print("PASS")
    return 1 if failures else 0


def _interrupted(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args, server_flags = parse_args(sys.argv[1:] if argv is None else argv)
    # SIGTERM and SIGHUP (unless nohup ignores it, as a long soak left running is) unwind like Ctrl-C,
    # so that run()'s finally stops the server.
    signal.signal(signal.SIGTERM, _interrupted)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # under nohup, a hang-up stays ignored
        signal.signal(signal.SIGHUP, _interrupted)
    try:
        return asyncio.run(run(args, server_flags))
    except SoakError as error:
        print(f"soak: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nsoak: interrupted; the server has been stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
