"""The real server as a subprocess: startup, settings errors, signals, readiness and the graceful drain.

Each test starts ``python -m optimizer --port 0`` on 127.0.0.1, waits for the JSON ``listening`` line on
stderr to learn the port, and talks to it over HTTP. Uploads can be *held*: all of the body but its last
bytes is sent, and the rest only when the test says so. A held request has been admitted (it owns a gate
slot) but cannot finish, which makes "N requests in flight when the signal arrives" deterministic instead
of a race against the pipeline's speed.

Timing is never asserted except as a generous upper bound on how long the process may take to exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.http_exceptions import BadHttpMethod, LineTooLong
from PIL import Image

from optimizer.allocator import GLIBC_TUNABLES, RESTARTED, is_glibc, start_environment
from optimizer.nativelog import LINE_BURST
from optimizer.server import HANDLER_GRACE_SECONDS, ClientErrorsAsWarnings
from optimizer.startup import EXIT_CANNOT_START
from tests.conftest import ROOT, corpus_dir, decode, image_bytes
from tests.realserver import RealServer, server_env

pytestmark = pytest.mark.slow

HOST = "127.0.0.1"
SEED = Path("photos") / "seed-loadtest-5760x3840.jpg"
BOUNDARY = "optimizer-process-test-boundary"
HELD_BYTES = 64  # the tail of a held upload: part of the image and the closing boundary
STARTUP_TIMEOUT = 20.0
LOG_TIMEOUT = 15.0
REQUEST_TIMEOUT = 30.0
EXIT_GRACE = 10.0  # on top of any configured deadline, for "exits within the deadline"
PROBLEM_JSON = "application/problem+json"


# --- the server process ------------------------------------------------------------------------------


# One launcher for every real-server test: tests/realserver.py.
ServerProcess = RealServer


Launch = Callable[..., ServerProcess]


@pytest.fixture
def launch() -> Iterator[Launch]:
    """``launch(*flags, **env)``: a listening server; every one is killed at teardown."""
    servers: list[ServerProcess] = []

    def start(*flags: str, **env: str | None) -> ServerProcess:
        server = ServerProcess(list(flags), server_env(**env))
        servers.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.stop()


# --- HTTP helpers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    content_type: str
    body: bytes

    def problem_code(self) -> str | None:
        if self.content_type != PROBLEM_JSON:
            return None
        code = json.loads(self.body).get("code")
        return code if isinstance(code, str) else None


def multipart_body(image: bytes) -> bytes:
    head = (
        f"--{BOUNDARY}\r\n"
        'Content-Disposition: form-data; name="image"; filename="upload.jpg"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head + image + f"\r\n--{BOUNDARY}--\r\n".encode()


async def _held_body(body: bytes, hold: asyncio.Event) -> AsyncIterator[bytes]:
    yield body[:-HELD_BYTES]
    await hold.wait()
    yield body[-HELD_BYTES:]


async def upload(
    session: aiohttp.ClientSession, base: str, image: bytes, hold: asyncio.Event | None = None
) -> Reply:
    """POST /upload with ``image`` as the multipart field "image"; with ``hold``, the last bytes of the
    body are sent only once ``hold`` is set."""
    body = multipart_body(image)
    headers = {
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        "Content-Length": str(len(body)),
    }
    # A BytesIO, not bytes: aiohttp warns about large raw bytes bodies (an error under this suite).
    data: io.BytesIO | AsyncIterator[bytes] = io.BytesIO(body) if hold is None else _held_body(body, hold)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with session.post(f"{base}/upload", data=data, headers=headers, timeout=timeout) as response:
        return Reply(response.status, response.content_type, await response.read())


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)) as response:
        body = await response.json(content_type=None)
        assert isinstance(body, dict)
        return response.status, body


async def wait_in_flight(session: aiohttp.ClientSession, base: str, count: int) -> None:
    """Poll /readyz until ``count`` requests hold a gate slot."""
    deadline = time.monotonic() + LOG_TIMEOUT
    while True:
        _, body = await get(session, f"{base}/readyz")
        if body["in_flight"] == count:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"in_flight never reached {count}; last /readyz: {body}")
        await asyncio.sleep(0.02)


async def finish(tasks: list[asyncio.Task[Reply]]) -> list[Reply | BaseException]:
    """Every task's reply or exception, within a bound."""
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT + EXIT_GRACE):
            return await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for task in tasks:
            task.cancel()


@contextlib.asynccontextmanager
async def uploads_in_flight(
    session: aiohttp.ClientSession, base: str, image: bytes, count: int
) -> AsyncIterator[tuple[list[asyncio.Task[Reply]], asyncio.Event]]:
    """``count`` held uploads, admitted by the server (``in_flight == count``) and not yet finished.

    Yields the tasks and the event that releases their last bytes; on exit the event is set and any
    task still running is cancelled, so that a failing test cannot leave one behind."""
    hold = asyncio.Event()
    tasks = [asyncio.create_task(upload(session, base, image, hold)) for _ in range(count)]
    try:
        await wait_in_flight(session, base, count)
        yield tasks, hold
    finally:
        hold.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def first_done(tasks: list[asyncio.Task[Reply]]) -> None:
    done, _ = await asyncio.wait(tasks, timeout=REQUEST_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
    assert done, "no upload finished"


def assert_thumbnail(reply: Reply | BaseException) -> None:
    """A 200 answer with the /upload contract's JPEG, 300 px wide (the seed photo is 3:2)."""
    assert isinstance(reply, Reply), reply
    assert reply.status == 200, reply
    assert reply.content_type == "image/jpeg"
    image = decode(reply.body)
    assert image.format == "JPEG"
    assert image.size == (300, 200)


def seed_photo() -> bytes:
    return (corpus_dir() / SEED).read_bytes()


# --- tests -------------------------------------------------------------------------------------------


async def test_sigterm_drains_admitted_uploads_and_exits_0(launch: Launch) -> None:
    seed = seed_photo()
    server = launch("--threads", "2", "--queue", "2", "--drain-seconds", "20")
    async with (
        aiohttp.ClientSession() as session,
        uploads_in_flight(session, server.url, seed, 4) as (tasks, hold),
    ):
        # Let the bodies in and wait for the first answer: every upload has then been read (see
        # test_upload_still_arriving_at_sigterm_is_drained for why that matters) and the other three
        # are in the pool, more work than two threads finish before the signal lands.
        hold.set()
        await first_done(tasks)
        server.send(signal.SIGTERM)
        shutdown = await asyncio.to_thread(server.wait_for_event, "shutdown")
        assert shutdown["in_flight"] >= 1
        await asyncio.to_thread(server.wait_for_drain)

        # The listener is closed now: a newcomer is refused, by the kernel or by the gate.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as fresh:
            try:
                late = await upload(fresh, server.url, image_bytes((600, 400)))
            except aiohttp.ClientConnectorError:
                pass
            else:
                assert (late.status, late.problem_code()) == (503, "draining"), late

        replies = await finish(tasks)

    for reply in replies:
        assert_thumbnail(reply)
    assert await server.exit_code(20 + EXIT_GRACE) == 0
    stopped = server.wait_for_event("stopped", 0)
    assert stopped["abandoned"] == 0


async def test_upload_still_arriving_at_sigterm_is_drained(launch: Launch) -> None:
    # Admitted (it holds a slot), but the last bytes of its body are sent only once the drain has begun.
    server = launch("--threads", "1", "--queue", "1", "--drain-seconds", "2")
    async with (
        aiohttp.ClientSession() as session,
        uploads_in_flight(session, server.url, image_bytes((600, 400)), 1) as (tasks, hold),
    ):
        server.send(signal.SIGTERM)
        await asyncio.to_thread(server.wait_for_drain)
        hold.set()
        (reply,) = await finish(tasks)

    code = await server.exit_code(2 + EXIT_GRACE)
    assert_thumbnail(reply)
    assert code == 0


async def test_shutdown_delay_keeps_serving_while_readyz_says_draining(launch: Launch) -> None:
    server = launch("--threads", "2", "--queue", "2", "--shutdown-delay", "2", "--drain-seconds", "5")
    # A fresh connection per request: what a load balancer's new traffic would look like.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        status, body = await get(session, f"{server.url}/readyz")
        assert (status, body["status"]) == (200, "ready")

        server.send(signal.SIGTERM)
        await asyncio.to_thread(server.wait_for_event, "shutdown")

        status, body = await get(session, f"{server.url}/readyz")
        assert (status, body["status"]) == (503, "draining")
        status, body = await get(session, f"{server.url}/healthz")
        assert (status, body["status"]) == (200, "ok")
        assert_thumbnail(await upload(session, server.url, image_bytes((600, 400))))

    assert await server.exit_code(2 + 5 + EXIT_GRACE) == 0
    assert server.wait_for_event("stopped", 0)["abandoned"] == 0


async def test_drain_deadline_answers_unfinished_work_503_and_exits_1(launch: Launch) -> None:
    seed = seed_photo()
    # One thread, four uploads of ~0.06-0.2 s of work each: more than a 0.05 s deadline allows.
    server = launch("--threads", "1", "--queue", "3", "--drain-seconds", "0.05")
    async with (
        aiohttp.ClientSession() as session,
        uploads_in_flight(session, server.url, seed, 4) as (tasks, hold),
    ):
        hold.set()
        await first_done(tasks)  # all read; three left, 0.15 s or more of work for the one thread
        server.send(signal.SIGTERM)
        replies = await finish(tasks)

    abandoned: list[Reply] = []
    for reply in replies:
        if isinstance(reply, aiohttp.ClientError):
            continue  # dropped while its body was still being read: allowed
        assert isinstance(reply, Reply), reply
        if reply.status == 200:
            assert_thumbnail(reply)
        else:
            assert (reply.status, reply.problem_code()) == (503, "shutdown_deadline"), reply
            abandoned.append(reply)
    assert abandoned, f"no request was answered 503 shutdown_deadline: {replies}"

    assert await server.exit_code(0.05 + EXIT_GRACE) == 1
    stopped = server.wait_for_event("stopped", 0)
    assert stopped["abandoned"] >= len(abandoned)


def noise_jpeg() -> bytes:
    """A JPEG of noise whose answer at its own size and quality 100 (~10 MB) is larger than the socket
    buffers on both sides, so it stays unsent while its client does not read."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", (3000, 2400), os.urandom(3000 * 2400 * 3)).save(buffer, "JPEG", quality=100)
    return buffer.getvalue()


def start_big_answer(server: ServerProcess) -> tuple[socket.socket, bytes]:
    """A request whose answer is larger than the socket buffers, read until its first bytes are in:
    the job is done and its slot given back, and the answer is on its way."""
    image = noise_jpeg()
    client = socket.create_connection((HOST, server.port), timeout=REQUEST_TIMEOUT)
    client.sendall(
        b"POST /optimize?quality=100 HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
        b"Content-Length: %d\r\n\r\n" % len(image) + image
    )
    received = b""
    while len(received) < 100_000:
        received += client.recv(65536)
    return client, received


def read_to_end(client: socket.socket, received: bytes) -> tuple[int, int]:
    """The answer's declared length and the bytes of its body that arrived before the connection ended."""
    with client:
        while chunk := client.recv(1 << 20):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return length, len(body)


async def test_the_drain_waits_for_an_answer_still_being_sent(launch: Launch) -> None:
    """A job gives its slot back when the image is made, before the answer is sent: the shutdown used to
    cut off a 9.8 MB answer a client was reading, and exit 0 (found in review). The drain now waits for
    answers too."""
    server = launch("--threads", "1", "--drain-seconds", "30")
    client, received = await asyncio.to_thread(start_big_answer, server)
    server.send(signal.SIGTERM)
    drain = await asyncio.to_thread(server.wait_for_drain)
    assert "1 answer(s) being sent" in drain["message"]
    # Longer than the runner's grace for handlers, which is all the answer had before.
    await asyncio.sleep(HANDLER_GRACE_SECONDS + 1)
    length, got = await asyncio.to_thread(read_to_end, client, received)
    assert got == length
    assert await server.exit_code(30 + EXIT_GRACE) == 0
    assert server.wait_for_event("stopped", 0)["abandoned"] == 0


async def test_a_client_leaving_during_the_drain_is_not_the_shutdowns_doing(launch: Launch) -> None:
    """Its answer's write is cancelled too, and was counted as cut off by the shutdown: exit 1 (a
    review)."""
    server = launch("--threads", "1", "--drain-seconds", "30")
    client, _received = await asyncio.to_thread(start_big_answer, server)
    server.send(signal.SIGTERM)
    await asyncio.to_thread(server.wait_for_drain)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # a reset, with the answer half sent
    assert await server.exit_code(30 + EXIT_GRACE) == 0
    assert server.wait_for_event("stopped", 0)["abandoned"] == 0
    assert not [line for line in server.records() if line.get("event") == "answer_cut_off"]


async def test_an_answer_cut_off_at_the_drain_deadline_is_logged_and_exits_1(launch: Launch) -> None:
    server = launch("--threads", "1", "--drain-seconds", "0.2")
    client, _received = await asyncio.to_thread(start_big_answer, server)
    with client:
        server.send(signal.SIGTERM)  # and the client reads no more
        assert await server.exit_code(0.2 + HANDLER_GRACE_SECONDS + EXIT_GRACE) == 1
    cut = server.wait_for_event("answer_cut_off", 0)
    assert cut["bytes_out"] > 0 and cut["request_id"]
    assert server.wait_for_event("stopped", 0)["abandoned"] == 1


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_second_signal_during_drain_exits_at_once(launch: Launch, second: signal.Signals) -> None:
    # A held upload never finishes, so without the second signal the drain would last 30 s.
    server = launch("--threads", "1", "--queue", "1", "--drain-seconds", "30")
    async with (
        aiohttp.ClientSession() as session,
        uploads_in_flight(session, server.url, image_bytes((600, 400)), 1) as (tasks, _hold),
    ):
        server.send(signal.SIGTERM)
        await asyncio.to_thread(server.wait_for_drain)
        server.send(second)
        code = await server.exit_code(EXIT_GRACE)
        (reply,) = await finish(tasks)

    assert code != 0
    assert isinstance(reply, aiohttp.ClientError), reply  # the process is gone: no answer
    assert not any(record.get("event") == "stopped" for record in server.records())
    warning = server.wait_for(lambda record: record["level"] == "warning", "a warning", 0)
    assert f"second {second.name}" in warning["message"]


async def test_a_hang_up_during_a_drain_lets_it_finish(launch: Launch) -> None:
    """SIGHUP (a --processes child gets it when its supervisor dies) drains, and is never taken as the
    second signal that cuts a drain short: the supervisor may be killed after forwarding a SIGTERM."""
    server = launch("--threads", "1", "--queue", "1", "--drain-seconds", "30")
    async with (
        aiohttp.ClientSession() as session,
        uploads_in_flight(session, server.url, seed_photo(), 1) as (tasks, hold),
    ):
        server.send(signal.SIGTERM)
        await asyncio.to_thread(server.wait_for_drain)
        server.send(signal.SIGHUP)
        hangup = await asyncio.to_thread(server.wait_for_event, "hangup")
        assert hangup["draining"] is True
        hold.set()
        (reply,) = await finish(tasks)

    assert_thumbnail(reply)
    assert await server.exit_code(30 + EXIT_GRACE) == 0
    assert server.wait_for_event("stopped", 0)["abandoned"] == 0
    assert not any(record["level"] == "warning" for record in server.records())


def test_a_hang_up_stops_an_idle_server_with_exit_0(launch: Launch) -> None:
    server = launch()
    server.send(signal.SIGHUP)
    assert server.wait_exit(20 + EXIT_GRACE) == 0
    assert server.wait_for_event("hangup", 0)["draining"] is False
    assert server.wait_for_event("stopped", 0)["abandoned"] == 0


def test_sigint_stops_an_idle_server_with_exit_0(launch: Launch) -> None:
    server = launch()
    server.send(signal.SIGINT)
    assert server.wait_exit(20 + EXIT_GRACE) == 0
    assert server.wait_for_event("stopped", 0)["abandoned"] == 0
    assert "Traceback" not in server.stderr_text()


def thread_nice_values(pid: int) -> dict[int, int]:
    """Each thread's nice value (field 19 of /proc/PID/task/TID/stat, after the parenthesised name)."""
    values = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rpartition(")")[2].split()
        values[int(task.name)] = int(fields[16])
    return values


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are a Linux feature")
@pytest.mark.parametrize(
    ("flags", "raised"), [((), 10), (("--loop-nice", "4"), 4), (("--loop-nice", "0"), 0)]
)
def test_the_event_loop_yields_the_cpu_to_the_workers(
    launch: Launch, flags: tuple[str, ...], raised: int
) -> None:
    server = launch("--threads", "3", *flags)
    assert server.wait_for_event("listening")["loop_nice"] == raised
    nice = thread_nice_values(server.pid)
    loop = nice.pop(server.pid)  # the main thread runs the event loop
    # The workers were started before the loop's priority was lowered, and keep the start-up value.
    assert sum(1 for value in nice.values() if value == loop - raised) >= 3


GLIBC = is_glibc()


def process_environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(os.fsdecode(item).partition("=")[::2] for item in raw if item)


@pytest.mark.skipif(not GLIBC, reason="the huge-page tunable is glibc's")
def test_the_server_restarts_itself_once_with_huge_pages_for_large_buffers(launch: Launch) -> None:
    # The launcher's own child: execve keeps the pid, so the process it started is the one serving.
    server = launch(GLIBC_TUNABLES=None)
    server.wait_for_event("listening")
    environment = process_environment(server.pid)  # as the restart was given it
    assert environment.get("GLIBC_TUNABLES") == GLIBC_TUNABLES
    assert environment.get(RESTARTED)  # the marker that stops a second restart


@pytest.mark.skipif(not GLIBC, reason="the huge-page tunable is glibc's")
def test_the_supervisors_children_inherit_the_tunable_and_do_not_restart(launch: Launch) -> None:
    server = launch("--processes", "2", "--threads", "1", GLIBC_TUNABLES=None)

    def both_listening(_record: dict[str, object]) -> bool:
        return len({r["pid"] for r in server.records() if r.get("event") == "listening"}) >= 2

    server.wait_for(both_listening, "two processes listening", 20)
    children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
    assert len(children) == 2
    try:
        for child in children:
            assert process_environment(int(child)).get("GLIBC_TUNABLES") == GLIBC_TUNABLES
            assert RESTARTED not in process_environment(int(child))  # started with it: no restart
    finally:
        # SIGTERM, not the launcher's SIGKILL: the supervisor stops its children, which would otherwise
        # outlive it holding the log pipe open.
        server.send(signal.SIGTERM)
        assert server.wait_exit(30) == 0


@pytest.mark.skipif(not GLIBC, reason="the huge-page tunable is glibc's")
@pytest.mark.parametrize("chosen", ["", "glibc.malloc.arena_max=2"])
def test_an_operators_own_glibc_tunables_are_kept(launch: Launch, chosen: str) -> None:
    server = launch(GLIBC_TUNABLES=chosen)
    server.wait_for_event("listening")
    environment = process_environment(server.pid)
    assert environment["GLIBC_TUNABLES"] == chosen
    assert RESTARTED not in environment


def test_the_restart_comes_before_the_heavy_imports() -> None:
    # What the entry point loads before it restarts is loaded twice; aiohttp and Pillow are most of a
    # start-up, so they must wait for the process that stays.
    probe = "import sys, optimizer.entry; print(sorted(m for m in ('aiohttp', 'PIL') if m in sys.modules))"
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=STARTUP_TIMEOUT
    )
    assert loaded.stdout.strip() == "[]"


def test_the_start_environment_adds_the_tunable_only_where_it_applies() -> None:
    assert start_environment({"GLIBC_TUNABLES": ""}) is None  # the operator's choice
    assert start_environment({RESTARTED: "optimizer"}) is None  # never twice, even if glibc dropped it
    if GLIBC:
        assert start_environment({"PATH": "/bin"}) == {"PATH": "/bin", "GLIBC_TUNABLES": GLIBC_TUNABLES}
    else:
        assert start_environment({"PATH": "/bin"}) is None


def run_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "optimizer", *args],
        cwd=ROOT,
        env=server_env(**env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=STARTUP_TIMEOUT,
        check=False,
    )


def test_invalid_environment_setting_exits_2_naming_the_variable() -> None:
    # No --port flag: a flag would win over the variable and hide it.
    result = run_cli("--host", HOST, OPTIMIZER_PORT="abc")
    assert result.returncode == 2, result
    assert "OPTIMIZER_PORT" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_flag_exits_2_naming_the_flag() -> None:
    result = run_cli("--host", HOST, "--drain-seconds", "soon")
    assert result.returncode == 2, result
    assert "--drain-seconds" in result.stderr


def test_help_exits_0_and_lists_the_environment_variables() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result
    assert "OPTIMIZER_DRAIN_SECONDS" in result.stdout
    assert "OPTIMIZER_SHUTDOWN_DELAY" in result.stdout


def test_submodules_are_attributes_of_the_lazy_package() -> None:
    probe = (
        "import optimizer\n"
        "assert optimizer.settings.Settings is optimizer.Settings\n"
        "assert callable(optimizer.app.create_app)\n"
        "for missing in ('nope', '_private'):\n"
        "    try:\n"
        "        getattr(optimizer, missing)\n"
        "    except AttributeError:\n"
        "        pass\n"
        "    else:\n"
        "        raise SystemExit(missing)\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=STARTUP_TIMEOUT)


def test_an_abbreviated_flag_is_refused() -> None:
    """``--thread 6`` must not pass for ``--threads``: the supervisor looks for the flags by full name."""
    result = run_cli("--host", HOST, "--thread", "6")
    assert result.returncode == 2, result
    assert "--thread" in result.stderr


def _log_records(stderr: str) -> list[dict[str, object]]:
    records = []
    for line in stderr.splitlines():
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records


@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_port_in_use_is_one_clear_error_and_exit_3(processes: str) -> None:
    """The operator sees why in one JSON line (before, the traceback went through the native-stderr relay
    and the exit could cut it off); a supervisor must not share the port through SO_REUSEPORT."""
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind((HOST, 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("--host", HOST, "--port", str(port), "--processes", processes, "--threads", "1")
    assert result.returncode == EXIT_CANNOT_START == 3, result
    failed = [r for r in _log_records(result.stderr) if r.get("event") == "listen_failed"]
    assert len(failed) == 1, result.stderr
    assert "already in use" in str(failed[0]["message"])
    assert failed[0]["port"] == port
    assert "Traceback" not in result.stderr


def test_a_broken_installation_is_not_restarted(tmp_path: Path) -> None:
    """A child that cannot import its native libraries exits 3, and the supervisor stops instead of
    restarting it for ever."""
    broken = tmp_path / "PIL"
    broken.mkdir()
    (broken / "__init__.py").write_text(
        'raise ImportError("libjpeg.so.62: cannot open shared object file")\n'
    )
    result = run_cli(
        "--host", HOST, "--port", "0", "--processes", "2", "--threads", "1", PYTHONPATH=str(tmp_path)
    )
    assert result.returncode == EXIT_CANNOT_START, result
    assert "the installation is broken: libjpeg.so.62" in result.stderr
    records = _log_records(result.stderr)
    assert [r for r in records if r.get("event") == "giving_up"], result.stderr
    assert not [r for r in records if r.get("event") == "child_exited"]  # no restart was tried


@pytest.mark.parametrize(
    "head",
    [
        b"POST /optimize HTTP/1.1\r\nHost: t\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n",
        b"POST /optimize HTTP/1.1\r\nHost: t\r\nContent-Encoding: br\r\nContent-Length: 5\r\n\r\nhello",
    ],
    ids=["header-too-long", "undecodable-encoding"],
)
def test_a_request_aiohttp_cannot_parse_is_one_warning_not_a_traceback(launch: Launch, head: bytes) -> None:
    """A client's malformed request is the client's mistake: one WARNING with the reason, not an ERROR
    with a traceback that any client could repeat to fill the log; the metrics count it with the other
    refusals."""
    server = launch()
    with socket.create_connection((HOST, server.port), timeout=REQUEST_TIMEOUT) as connection:
        connection.sendall(head)
        answer = connection.recv(4096)
    assert answer.split(b"\r\n", 1)[0].endswith(b"400 Bad Request")
    server.wait_for(lambda r: r.get("event") == "bad_request", "the bad request logged", LOG_TIMEOUT)
    logged = [r for r in server.records() if r.get("event") == "bad_request"]
    assert logged[0]["level"] == "warning"
    assert "traceback" not in logged[0]
    assert not [r for r in server.records() if r.get("level") == "error"]
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=REQUEST_TIMEOUT) as response:
        metrics = response.read().decode()
    assert 'optimizer_requests_total{route="unparsed",status="400"} 1.0' in metrics
    assert 'optimizer_refusals_total{reason="bad_request"} 1.0' in metrics


def test_a_bad_request_line_is_left_out_where_warnings_are() -> None:
    """The filter makes an ERROR a WARNING after the logger's level check: it must then apply the level
    itself, or --log-level error would still print client mistakes."""
    logger = logging.getLogger("optimizer.http")

    def parse_error() -> logging.LogRecord:  # a fresh one each time: the filter rewrites it
        error = LineTooLong(b"X-Long", 8190, "9000")
        return logger.makeRecord(
            logger.name, logging.ERROR, __file__, 1, "Error handling request from %s", ("127.0.0.1",),
            (type(error), error, None),
        )  # fmt: skip

    previous = logger.level
    try:
        logger.setLevel(logging.ERROR)
        assert not ClientErrorsAsWarnings().filter(parse_error())
        logger.setLevel(logging.INFO)
        record = parse_error()
        assert ClientErrorsAsWarnings().filter(record)
    finally:
        logger.setLevel(previous)
    assert record.levelname == "WARNING"
    assert record.getMessage().startswith("refused a malformed request from 127.0.0.1: ")
    assert record.exc_info is None


def test_bytes_that_are_not_http_stay_at_debug_level() -> None:
    """aiohttp logs a first request that is not HTTP at all at debug level, on purpose (scanners, TLS
    sent to the HTTP port); the filter must not raise it to a warning (found in review)."""
    logger = logging.getLogger("optimizer.http")
    error = BadHttpMethod("\x16\x03\x01")
    previous = logger.level
    try:
        logger.setLevel(logging.INFO)
        record = logger.makeRecord(
            logger.name, logging.DEBUG, __file__, 1, "Error handling request from %s", ("127.0.0.1",),
            (type(error), error, None),
        )  # fmt: skip
        assert not ClientErrorsAsWarnings().filter(record)
        logger.setLevel(logging.DEBUG)
        assert ClientErrorsAsWarnings().filter(record)
    finally:
        logger.setLevel(previous)
    assert record.levelname == "DEBUG"
    assert record.getMessage().startswith("refused a malformed request from 127.0.0.1: ")


def tiff_with_bad_tags(count: int) -> bytes:
    """A 2x2 deflate TIFF (so libtiff reads it) with ``count`` private tags of type 0, which does not
    exist: libtiff writes two lines to fd 2 for each (found in review: 4000 lines from 24 KB)."""
    pixels = zlib.compress(b"\x80" * 4)
    first_entries = 9
    data_at = 8 + 2 + 12 * (first_entries + count) + 4
    short, long_ = 3, 4
    entries = [
        (256, short, 2), (257, short, 2), (258, short, 8), (259, short, 8), (262, short, 1),
        (273, long_, data_at), (277, short, 1), (278, short, 2), (279, long_, len(pixels)),
    ] + [(40000 + i, 0, 0) for i in range(count)]  # fmt: skip
    # A SHORT value sits in the first two of the entry's four value bytes; any other fills all four.
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHIHH", tag, kind, 1, value, 0)
        if kind == short
        else struct.pack("<HHII", tag, kind, 1, value)
        for tag, kind, value in entries
    )
    tiff = b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0)
    assert len(tiff) == data_at
    return tiff + pixels


def test_a_file_made_to_fill_the_log_gets_a_bounded_number_of_lines(launch: Launch) -> None:
    """What libtiff writes to fd 2 goes to the log at a bounded rate, with a count of the rest."""
    server = launch()
    request = urllib.request.Request(
        f"{server.url}/optimize?format=png",
        data=tiff_with_bad_tags(2000),
        method="POST",
        headers={"X-Request-ID": "the-bad-tiff"},
    )
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:
        assert response.status == 200
        assert decode(response.read()).size == (2, 2)
    summary = server.wait_for_event("native_suppressed")
    native = [r for r in server.records() if r.get("logger") == "optimizer.native"]
    lines = [r for r in native if r.get("event") != "native_suppressed"]
    assert 1 <= len(lines) <= LINE_BURST
    assert int(summary["suppressed"]) >= 2000  # two lines a tag
    assert all(r["level"] == "warning" for r in native)
    # Each line names the request whose decode made libtiff write it, and no mark reaches the log.
    assert all(r["event"] == "native" and r["request_ids"] == ["the-bad-tiff"] for r in lines), lines
    assert not any("\x1e" in r["message"] or "\x1f" in r["message"] for r in native)


@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_misspelt_variable_is_one_warning_naming_the_setting(launch: Launch, processes: str) -> None:
    """It would otherwise leave its default in place without a word (found in review). With
    ``--processes`` the supervisor says it once; its children read the same environment."""
    server = launch("--processes", processes, "--threads", "1", OPTIMIZER_THREAD="5")
    deadline = time.monotonic() + LOG_TIMEOUT
    while sum(r.get("event") == "listening" for r in server.records()) < int(processes):
        assert time.monotonic() < deadline, server.stderr_text()
        time.sleep(0.05)
    warnings = [r for r in server.records() if r.get("event") == "unknown_setting"]
    assert len(warnings) == 1, server.stderr_text()
    assert warnings[0]["level"] == "warning"
    assert warnings[0]["variable"] == "OPTIMIZER_THREAD"
    assert warnings[0]["did_you_mean"] == "OPTIMIZER_THREADS"
    assert "OPTIMIZER_THREADS" in warnings[0]["message"]


def test_the_start_up_line_says_what_the_service_sized_itself_to_and_warns_of_misfits(launch: Launch) -> None:
    server = launch("--threads", "64", "--memory-budget", str(1 << 50))
    conflicts = [line for line in server.records() if line.get("event") == "settings_conflict"]
    assert any("OPTIMIZER_THREADS=64" in line["message"] for line in conflicts)
    assert any("OPTIMIZER_MEMORY_BUDGET" in line["message"] for line in conflicts)
    listening = server.wait_for_event("listening", 0)
    assert listening["memory_budget"] == 1 << 50 and listening["memory_limit"] < 1 << 50
    assert listening["threads"] == 64 and listening["cpus"] >= 1 and listening["max_body_bytes"] > 0


def test_invalid_settings_are_one_json_line() -> None:
    result = run_cli("--host", HOST, "--port", "99999", OPTIMIZER_JPEG_QUALITY="0")
    assert result.returncode == 2, result
    (record,) = _log_records(result.stderr)
    assert len(result.stderr.splitlines()) == 1
    assert record["event"] == "invalid_settings"
    assert record["problems"] == [
        "--port=99999: must be between 0 and 65535",
        "OPTIMIZER_JPEG_QUALITY=0: must be between 1 and 100",
    ]


def test_out_of_descriptors_the_connections_waiting_longest_make_room() -> None:
    """Found in review: connections that never finish a head (here within a long head deadline) held
    every descriptor, and the service stopped accepting. Out of descriptors, it closes the ones that have
    waited longest for a request, and a new client is served."""
    server = RealServer(["--read-timeout", "120"], server_env(), max_files=96)
    waiting: list[socket.socket] = []
    try:
        server.start()
        for _ in range(120):  # more than the descriptors: the rest wait in the accept queue
            connection = socket.create_connection((HOST, server.port), timeout=REQUEST_TIMEOUT)
            connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")  # never finished
            waiting.append(connection)
        with urllib.request.urlopen(f"{server.url}/healthz", timeout=REQUEST_TIMEOUT) as response:
            assert response.status == 200
        shed = server.wait_for_event("connections_shed")
        assert int(shed["closed"]) >= 1
        for connection in waiting[:20]:  # the first to come are the first to go
            connection.settimeout(REQUEST_TIMEOUT)  # one still open fails the test with a timeout
            try:
                answer = connection.recv(100)
            except ConnectionResetError:
                # Shed before the server had read its head: closing a socket with unread bytes makes
                # the kernel send a reset instead of an end of stream (about 1 run in 10 here).
                answer = b""
            assert answer == b"", answer  # closed unanswered: no 408, the deadline is far off
    finally:
        for connection in waiting:
            connection.close()
        server.stop()
