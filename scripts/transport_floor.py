#!/usr/bin/env python3
"""What receiving one upload costs before any image work: the floor under bench.py's goodput / ceiling.

    python scripts/transport_floor.py                                  # bench.py's S2 request
    python scripts/transport_floor.py --scenario s1 --ceiling 28.06 --rounds 5
    python scripts/transport_floor.py --file photo.jpg --path /optimize --query width=800

bench.py's ceiling runs the pipeline on bytes already in memory. A server must first receive them, and
when the load generator runs on the same machine, both ends' CPU comes out of the same cores. Each row
is the CPU one upload costs, the client's and the server's apart (user + system), for the request
bench.py sends (the same bytes: multipart unless ``--raw``):

- ``kernel``: the request's bytes over loopback TCP between two blocking sockets, sent from one buffer
  and received into one. The kernel's copies and TCP work, with no HTTP at all.
- ``aiohttp``: the request on a keep-alive connection to a bare aiohttp handler that reads the body
  with ``readany()`` and answers 204. It runs with the service's allocator settings and its large
  reads, but it neither parses the form nor keeps the bytes: about the least a server on aiohttp
  spends for such an upload.
- ``optimizer``: the request to the service's own server (``optimizer.cli.main`` after the
  allocator's restart, as ``python -m optimizer`` runs it; one process, default settings otherwise)
  with the image work replaced by the answer the pipeline gives for this request, computed once at
  start-up. Everything the service does for an upload but the pipeline: the form, the gate, one trip
  to a worker thread, the access log, the metrics and the answer.

The client is the same minimal blocking socket in every row. The rows run in turn, ``--rounds`` times,
and the medians are printed: this machine's speed drifts by tens of percent within an hour. With
``--ceiling`` (bench.py's ceiling for the same request, images/s), each row is also given as a share of
one image's machine time (cores / ceiling).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import bench  # scripts/ is the first entry of sys.path when a script runs
from aiohttp import web

from optimizer import allocator
from optimizer.intake import UPLOAD_READ_BYTES
from optimizer.settings import effective_cpu_count

WARMUP = 20  # uploads before each measurement, not counted
IO_TIMEOUT = 30.0  # seconds any one send or receive may block before the row is given up


@dataclass(frozen=True)
class Row:
    client_ms: float
    server_ms: float

    @property
    def total_ms(self) -> float:
        return self.client_ms + self.server_ms


class FloorError(Exception):
    """A measurement that could not be taken (a server that did not start or answered otherwise)."""


def task_cpu_seconds(pid: int) -> float:
    """CPU time of every thread of a process, in nanosecond resolution (``/proc/PID/task/*/schedstat``;
    ``/proc/PID/stat`` counts 10 ms ticks, too coarse for a few hundred uploads). The servers' threads
    all live as long as they do, so none is lost between two readings."""
    total, read = 0, 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        tasks = []
    for task in tasks:
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            total += int((task / "schedstat").read_text().split()[0])
            read += 1
    if not read:
        raise FloorError(f"cannot read the CPU time of process {pid} (no /proc/{pid}/task/*/schedstat)")
    return total / 1e9


def kernel_row(request: bytes, reps: int) -> Row:
    """Both ends as plain sockets: the receiver a forked child that knows the request's length."""
    with socket.create_server((bench.HOST, 0)) as listener:
        sender = socket.create_connection(listener.getsockname(), timeout=IO_TIMEOUT)
        try:
            receiver, _ = listener.accept()
        except BaseException:
            sender.close()
            raise
    receiver.settimeout(IO_TIMEOUT)
    report_read, report_write = os.pipe()
    sys.stdout.flush()  # nothing buffered before the fork is written twice
    child = os.fork()
    if child == 0:  # the receiver: whatever happens, it ends here and never returns into main()
        code = 1
        try:
            sender.close()
            os.close(report_read)
            code = _receive(receiver, len(request), reps, report_write)
        finally:
            os._exit(code)
    receiver.close()
    os.close(report_write)

    def exchange() -> None:
        sender.sendall(request)
        if sender.recv(1) != b"k":
            raise FloorError("the receiver stopped")

    try:
        with sender:
            for _ in range(WARMUP):
                exchange()
            started = bench.self_cpu_seconds()
            for _ in range(reps):
                exchange()
            client = bench.self_cpu_seconds() - started
        received = os.read(report_read, 64)
    finally:
        os.close(report_read)
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)  # a no-op once it has exited on its own
        os.waitpid(child, 0)
    if not received:
        raise FloorError("the receiver failed")
    return Row(client / reps * 1000, float(received) / reps * 1000)


def _receive(conn: socket.socket, length: int, reps: int, report: int) -> int:
    """The receiver's loop: 0, its CPU seconds written to ``report``; 1 if the sender went away."""
    buffer = memoryview(bytearray(length))

    def exchange() -> bool:
        got = 0
        while got < length:
            more = conn.recv_into(buffer[got:], length - got)
            if not more:
                return False
            got += more
        conn.sendall(b"k")
        return True

    if not all(exchange() for _ in range(WARMUP)):
        return 1
    started = bench.self_cpu_seconds()
    if not all(exchange() for _ in range(reps)):
        return 1
    os.write(report, str(bench.self_cpu_seconds() - started).encode())
    return 0


def http_row(server: bench.ServerProcess, request: bytes, reps: int, expected: int) -> Row:
    """The request ``reps`` times on one keep-alive connection; the server's CPU over the same span."""
    with socket.create_connection((bench.HOST, server.port), timeout=IO_TIMEOUT) as conn:

        def exchange() -> None:
            try:
                conn.sendall(request)
            except OSError as exc:  # answered and closed before the body was in: say with what
                raise FloorError(f"the server stopped reading the request: {_early_answer(conn)}") from exc
            status = _read_answer(conn)
            if status != expected:
                raise FloorError(f"the server answered {status}, not {expected}:\n{server.log_tail()}")

        for _ in range(WARMUP):
            exchange()
        client_started, server_started = bench.self_cpu_seconds(), task_cpu_seconds(server.pid)
        for _ in range(reps):
            exchange()
        client = bench.self_cpu_seconds() - client_started
        served = task_cpu_seconds(server.pid) - server_started
    return Row(client / reps * 1000, served / reps * 1000)


def _read_answer(conn: socket.socket) -> int:
    """One whole answer (its head and ``Content-Length`` bytes); its status."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += _recv(conn)
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    fields = {
        name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)
    }
    if "content-length" not in fields and status not in (204, 304):
        raise FloorError(f"an answer without Content-Length: {status_line}")
    length = int(fields.get("content-length", "0"))
    while len(rest) < length:
        rest += _recv(conn)
    return status


def _recv(conn: socket.socket) -> bytes:
    more = conn.recv(65536)
    if not more:
        raise FloorError("the server closed the connection")
    return more


def _early_answer(conn: socket.socket) -> str:
    with contextlib.suppress(OSError):
        return conn.recv(4096).decode("latin-1").split("\r\n\r\n", 1)[0] or "nothing"
    return "nothing"


# --- the servers, each run as this script in a child process ---------------------------------------------


def exit_with_parent() -> None:
    """Stop this server (SIGTERM: it drains and exits) once the script that started it is gone, even if
    the script was killed outright (the benchmark's children start in their own session)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def serve_bare(server_args: Sequence[str]) -> int:
    """The bare aiohttp server, on ``--host`` and ``--port`` (0: a free one, logged as bench.py reads it)."""
    allocator.restart_with_tunables()  # the service's allocator settings, for a like-for-like row
    allocator.tune()
    exit_with_parent()
    flags = argparse.ArgumentParser()
    flags.add_argument("--host", default=bench.HOST)
    flags.add_argument("--port", type=int, default=0)
    args, _ = flags.parse_known_args(server_args)

    async def sink(request: web.Request) -> web.Response:
        if request.transport is not None:  # the service's large reads (optimizer.intake)
            request.transport.max_size = UPLOAD_READ_BYTES  # type: ignore[attr-defined]
        while await request.content.readany():
            pass
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/{path:.*}", sink)
    sock = socket.create_server((args.host, args.port))
    print(json.dumps({"event": "listening", "port": sock.getsockname()[1]}), file=sys.stderr, flush=True)
    web.run_app(app, sock=sock, print=None, access_log=None)
    return 0


def serve_optimizer(request: argparse.Namespace, server_args: Sequence[str]) -> int:
    """``optimizer.cli.main`` with the image work replaced by the request's real answer."""
    for key in [key for key in os.environ if key.startswith("OPTIMIZER_")]:
        del os.environ[key]  # the service's defaults, whatever the environment says
    allocator.restart_with_tunables()  # as optimizer.entry does; it re-runs this command line
    exit_with_parent()
    from optimizer import handlers  # noqa: PLC0415 - after the restart, as in optimizer.entry
    from optimizer.cli import main  # noqa: PLC0415
    from optimizer.pipeline import Output, optimize  # noqa: PLC0415
    from optimizer.settings import Settings  # noqa: PLC0415
    from optimizer.state import pipeline_limits  # noqa: PLC0415

    settings = Settings.from_env(os.environ)
    params = bench.request_params(request.path, request.query, settings)
    answer = optimize(Path(request.file).read_bytes(), params, pipeline_limits(settings))

    def prepared(*_: object) -> Output:
        return answer

    handlers._inspect_then_optimize = prepared  # type: ignore[assignment]
    return main([*server_args, "--processes", "1"])


# --- the script ------------------------------------------------------------------------------------------


def start(mode: str, request: argparse.Namespace, log: Path) -> bench.ServerProcess:
    command = [sys.executable, __file__, mode, "--file", str(request.file), "--path", request.path]
    command += ["--query", request.query, "--"]
    server = bench.ServerProcess([], log, command=command)
    try:
        server.wait_listening()
    except BaseException:
        server.stop(10)
        raise
    return server


def measure(args: argparse.Namespace, request: bytes, workdir: Path) -> dict[str, list[Row]]:
    rows: dict[str, list[Row]] = {"kernel": [], "aiohttp": [], "optimizer": []}
    bare = start("--serve-bare", args, workdir / "bare.log")
    try:
        service = start("--serve-optimizer", args, workdir / "optimizer.log")
        try:
            measures: dict[str, Callable[[], Row]] = {
                "kernel": lambda: kernel_row(request, args.reps),
                "aiohttp": lambda: http_row(bare, request, args.reps, 204),
                "optimizer": lambda: http_row(service, request, args.reps, 200),
            }
            for round_ in range(args.rounds):
                for name, row in measures.items():
                    rows[name].append(row())
                print(f"round {round_ + 1} of {args.rounds} done", file=sys.stderr)
        finally:
            service.stop(10)
    finally:
        bare.stop(10)
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0])
    parser.add_argument("--scenario", choices=("s1", "s2"), default="s2", help="bench.py's request [s2]")
    parser.add_argument("--file", type=Path, help="upload this file instead of the scenario's")
    parser.add_argument("--path", help="route [the scenario's]")
    parser.add_argument("--query", help="query string [the scenario's]")
    parser.add_argument("--raw", action="store_true", help="send the raw file, not a form")
    parser.add_argument(
        "--corpus",
        type=Path,
        default=Path(os.environ.get("OPTIMIZER_CORPUS", bench.ROOT.parent / "shared" / "corpus")),
        help="corpus folder for the scenarios [default: $OPTIMIZER_CORPUS or ../shared/corpus]",
    )
    parser.add_argument("--reps", type=int, default=300, help="uploads per row and round [300]")
    parser.add_argument("--rounds", type=int, default=3, help="the rows in turn, this many times [3]")
    parser.add_argument("--ceiling", type=float, help="bench.py's ceiling for this request, images/s")
    parser.add_argument("--cores", type=int, default=effective_cpu_count(), help="cores the ceiling used")
    parser.add_argument("--serve-bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-optimizer", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, server_args = (
        (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    )
    parser = build_parser()
    args = parser.parse_args(own)
    scenario = bench.SCENARIOS[args.scenario]
    args.path = args.path or scenario.path
    args.query = scenario.query if args.query is None else args.query
    if args.serve_bare:
        return serve_bare(server_args)
    if args.serve_optimizer:
        return serve_optimizer(args, server_args)
    if args.reps < 1 or args.rounds < 1:
        parser.error("--reps and --rounds must be at least 1")
    signal.signal(signal.SIGTERM, bench._interrupted)  # unwind, so that the servers are stopped
    try:
        args.file = bench.resolve_file(args, scenario)
    except bench.BenchError as exc:
        parser.error(str(exc))
    upload = bench.Upload.build(
        f"http://{bench.HOST}",
        path=args.path,
        query=args.query,
        file=args.file,
        field_name="image",
        raw=args.raw,
    )
    request = upload.request_head(expect_continue=False) + upload.body
    print(f"{args.file.name}, {len(upload.body) / 1e6:.2f} MB as {upload.description} to {args.path}")
    print(f"{args.reps} uploads per row and round after {WARMUP} to warm up; medians of {args.rounds} rounds")
    image_ms = args.cores / args.ceiling * 1000 if args.ceiling else None
    if image_ms:
        print(f"one image's machine time at the ceiling: {args.cores} cores / {args.ceiling:g}/s", end="")
        print(f" = {image_ms:.1f} ms")
    try:
        with tempfile.TemporaryDirectory(prefix="transport-floor-") as workdir:
            rows = measure(args, request, Path(workdir))
    except (FloorError, bench.BenchError) as exc:
        print(f"transport_floor.py: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (above): the servers have been stopped
        print("transport_floor.py: interrupted", file=sys.stderr)
        return 130
    for name, measured in rows.items():
        sides = ("sender", "receiver") if name == "kernel" else ("client", "server")
        print(f"  {name:9} {describe(measured, sides, image_ms)}")
    return 0


def describe(measured: list[Row], sides: tuple[str, str], image_ms: float | None) -> str:
    """One row's medians over the rounds, its share of an image, and the spread of its totals."""
    client = statistics.median(row.client_ms for row in measured)
    server = statistics.median(row.server_ms for row in measured)
    total = statistics.median(row.total_ms for row in measured)
    share = f" = {total / image_ms:.1%} of an image" if image_ms else ""
    low, high = min(row.total_ms for row in measured), max(row.total_ms for row in measured)
    split = f"{sides[0]} {client:.2f} + {sides[1]} {server:.2f} = {total:.2f} ms per upload"
    return f"{split}{share} (rounds {low:.2f}-{high:.2f})"


if __name__ == "__main__":
    raise SystemExit(main())
