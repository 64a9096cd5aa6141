#!/usr/bin/env python3
"""What receiving one upload costs before any image work: the floor under bench.py's goodput / ceiling.

    python scripts/transport_floor.py                      # the S2 photo
    python scripts/transport_floor.py --file seed-loadtest-5760x3840.jpg --ceiling 28.1

bench.py's ceiling runs the pipeline on bytes already in memory; the server must first receive them,
and on a machine shared with the load generator both ends' CPU comes out of the same cores. Two floors
are measured here, each as CPU milliseconds per upload (user + system, client and server apart):

- ``kernel``: the bytes over loopback TCP between two blocking sockets, sent from one buffer and
  received into one (``sendall`` / ``recv_into``): the kernel's copies and TCP work, and nothing else;
- ``aiohttp``: the same client sending a raw-body HTTP/1.1 POST on a keep-alive connection to a bare
  aiohttp server whose handler reads the body with ``readany()`` and answers 204: the least a
  server on aiohttp and asyncio spends, with no multipart, no pool, no logging;
- ``optimizer``: the same client posting the file as a form, like bench.py, to the optimizer's own
  server (``python -m optimizer`` on its defaults) with the image work replaced by a prepared 40 KB
  answer: everything the service does for an upload but the pipeline (multipart, gate, one pool
  trip, access log and metrics, the answer).

With ``--ceiling IMAGES_PER_S`` (bench.py's ceiling for the same file), each floor is also shown as a
share of one image's machine time (cores / ceiling): the share of the ceiling no HTTP server on this
machine can keep, whatever it does.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from optimizer import allocator  # noqa: E402

DEFAULT_CORPUS = Path(os.environ.get("OPTIMIZER_CORPUS", ROOT.parent / "shared" / "corpus"))
DEFAULT_FILE = "photos/kleiber-lukas-baubkus-6028x3391.jpg"
WARMUP = 20
STARTUP_SECONDS = 20.0


def cpu_of(pid: int) -> float:
    """User + system seconds of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def kernel_floor(body: bytes, reps: int) -> tuple[float, float]:
    """CPU ms per transfer: (sender, receiver), the receiver a forked child."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # the receiver
        os.close(reader)
        conn, _ = listener.accept()
        buffer = memoryview(bytearray(len(body)))
        started = own_cpu()
        for rep in range(WARMUP + reps):
            if rep == WARMUP:
                started = own_cpu()
            got = 0
            while got < len(body):
                got += conn.recv_into(buffer[got:], len(body) - got)
            conn.sendall(b"k")
        os.write(writer, f"{own_cpu() - started}".encode())
        os._exit(0)
    os.close(writer)
    listener.close()
    with socket.create_connection(("127.0.0.1", port)) as conn:
        started = own_cpu()
        for rep in range(WARMUP + reps):
            if rep == WARMUP:
                started = own_cpu()
            conn.sendall(body)
            conn.recv(1)
        sender = own_cpu() - started
    os.waitpid(child, 0)
    receiver = float(os.read(reader, 64))
    os.close(reader)
    return sender / reps * 1000, receiver / reps * 1000


def serve_bare(port: int) -> None:
    """The bare aiohttp server (run in a child process)."""

    async def sink(request: web.Request) -> web.Response:
        while await request.content.readany():
            pass
        return web.Response(status=204)

    app = web.Application(client_max_size=1 << 30)
    app.router.add_post("/sink", sink)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, handle_signals=True)


def serve_optimizer(port: int) -> int:
    """The optimizer's server with a stub for the image work (run in a child process)."""
    allocator.restart_with_tunables()  # as the optimizer command does; it re-runs this command line
    from optimizer import handlers  # noqa: PLC0415 - after the restart, as in optimizer.entry
    from optimizer.pipeline import Output  # noqa: PLC0415
    from optimizer.server import main  # noqa: PLC0415

    answer = Output(bytes(40_000), "image/jpeg", 800, 450, "JPEG", 6028, 3391)

    def prepared(*_: object) -> Output:
        return answer

    handlers._inspect_then_optimize = prepared  # type: ignore[assignment]
    return main(["--host", "127.0.0.1", "--port", str(port)])


def raw_request(port: int, body: bytes) -> bytes:
    head = (
        f"POST /sink HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def form_request(port: int, body: bytes) -> bytes:
    """``POST /upload`` with the file as the form field ``image``, framed as bench.py frames it."""
    boundary = "optimizer-floor-0123456789abcdef0123456789"
    start = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="photo.jpg"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    end = f"\r\n--{boundary}--\r\n".encode()
    head = (
        f"POST /upload HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {len(start) + len(body) + len(end)}\r\n\r\n"
    )
    return head.encode() + start + body + end


def aiohttp_floor(body: bytes, reps: int) -> tuple[float, float]:
    """CPU ms per request to the bare aiohttp server: (client, server)."""
    return _http_floor(body, reps, "--serve-bare", raw_request, b"HTTP/1.1 204")


def optimizer_floor(body: bytes, reps: int) -> tuple[float, float]:
    """CPU ms per request to the optimizer with the image work stubbed out: (client, server)."""
    return _http_floor(body, reps, "--serve-optimizer", form_request, b"HTTP/1.1 200")


def _http_floor(
    body: bytes, reps: int, serve: str, build: Callable[[int, bytes], bytes], ok: bytes
) -> tuple[float, float]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, __file__, serve, str(port)], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    )
    try:
        conn = _connect(port)
        request = build(port, body)
        with conn:
            for rep in range(WARMUP + reps):
                if rep == WARMUP:
                    client_started, server_started = own_cpu(), cpu_of(server.pid)
                conn.sendall(request)
                answer = _read_answer(conn)
                if not answer.startswith(ok):
                    raise SystemExit(f"the server answered {answer[:40]!r}")
            client = own_cpu() - client_started
            served = cpu_of(server.pid) - server_started
    finally:
        server.terminate()
        server.wait(10)
    return client / reps * 1000, served / reps * 1000


def _read_answer(conn: socket.socket) -> bytes:
    """One whole answer: its head, and as many bytes as its Content-Length says."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        more = conn.recv(65536)
        if not more:
            raise SystemExit("the server closed the connection")
        answer += more
    head, _, rest = answer.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        more = conn.recv(65536)
        if not more:
            raise SystemExit("the server closed the connection mid-answer")
        rest += more
    return head


def _connect(port: int) -> socket.socket:
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port))
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise SystemExit("the server did not start") from None
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--file", default=DEFAULT_FILE, help=f"upload to send [default: {DEFAULT_FILE}]")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="where --file is also looked for")
    parser.add_argument("--reps", type=int, default=300, help="uploads per floor [300]")
    parser.add_argument("--ceiling", type=float, help="bench.py's ceiling for this file, images/s")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores the ceiling ran on")
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--serve-optimizer", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_bare is not None:
        serve_bare(args.serve_bare)
        return 0
    if args.serve_optimizer is not None:
        return serve_optimizer(args.serve_optimizer)
    path = Path(args.file)
    if not path.is_file():
        path = args.corpus / args.file
    if not path.is_file():
        parser.error(f"no such file: {args.file} (nor in {args.corpus})")
    body = path.read_bytes()
    print(f"{path.name}: {len(body) / 1e6:.2f} MB, {args.reps} uploads each (after {WARMUP} to warm up)")
    image_ms = args.cores / args.ceiling * 1000 if args.ceiling else None
    if image_ms:
        print(
            f"one image's machine time at the ceiling: {args.cores} cores / {args.ceiling:g}/s"
            f" = {image_ms:.1f} ms"
        )
    for name, measure, sides in (
        ("kernel", kernel_floor, ("sender", "receiver")),
        ("aiohttp", aiohttp_floor, ("client", "server")),
        ("optimizer", optimizer_floor, ("client", "server")),
    ):
        first, second = measure(body, args.reps)
        total = first + second
        share = f"  = {total / image_ms:.1%} of an image" if image_ms else ""
        split = f"{sides[0]} {first:.2f} ms + {sides[1]} {second:.2f} ms"
        print(f"  {name:9} {split} = {total:.2f} ms per upload{share}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
