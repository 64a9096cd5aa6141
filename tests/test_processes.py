"""``--processes N``: N servers on one port, every one of them drains on SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from optimizer.settings import Settings, effective_cpu_count
from optimizer.startup import EXIT_BAD_SETTINGS, EXIT_CRASH_LOOP
from optimizer.supervisor import Supervisor, child_flags
from tests.conftest import image_bytes
from tests.test_server_process import EXIT_GRACE, Launch, launch, upload  # noqa: F401 - fixture

pytestmark = pytest.mark.slow


async def test_processes_share_the_port_and_all_drain(launch: Launch) -> None:  # noqa: F811
    server = launch("--processes", "2", "--drain-seconds", "10")

    def both_listening(_record: dict[str, object]) -> bool:
        return len({r["pid"] for r in server.records() if r.get("event") == "listening"}) >= 2

    server.wait_for(both_listening, "two processes listening", 20)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        replies = [await upload(session, server.url, image_bytes((600, 400))) for _ in range(12)]
    assert [reply.status for reply in replies] == [200] * 12

    listening = {r["pid"] for r in server.records() if r.get("event") == "listening"}
    assert len(listening) == 2
    assert server.proc.pid not in listening  # the parent only supervises
    served = {r["pid"] for r in server.records() if r.get("logger") == "optimizer.access"}
    assert served <= listening
    assert len(served) == 2  # new connections were spread over both processes

    server.send(signal.SIGTERM)
    assert await server.exit_code(10 + EXIT_GRACE) == 0
    stopped = [r for r in server.records() if r.get("event") == "stopped"]
    assert {r["pid"] for r in stopped} == listening
    assert all(r["abandoned"] == 0 for r in stopped)


def test_children_share_threads_and_budget_unless_told() -> None:
    settings = Settings(processes=2)
    flags = child_flags(settings, ["--processes", "2"], {}, 8080)
    assert flags[:2] == ["--processes", "2"]
    assert flags[flags.index("--port") + 1] == "8080"
    assert flags[flags.index("--reuse-port") + 1] == "1"
    assert flags[flags.index("--processes", 2) + 1] == "1"  # the children do not supervise again
    assert "--threads" in flags
    assert "--memory-budget" in flags
    told = child_flags(settings, ["--processes", "2", "--threads=3"], {"OPTIMIZER_MEMORY_BUDGET": "1"}, 1)
    assert told.count("--threads") == 0
    assert "--memory-budget" not in told


def test_the_supervisor_leaves_aiohttp_and_pillow_to_its_children(launch: Launch) -> None:  # noqa: F811
    """The parent of ``--processes`` only starts and watches: it must not be a third full server in memory.
    It is also the one that sees the children together: each given every CPU, they ask for twice them."""
    server = launch("--processes", "2", "--threads", str(effective_cpu_count()))
    server.wait_for(
        lambda _r: len({r["pid"] for r in server.records() if r.get("event") == "listening"}) >= 2,
        "two processes listening",
        20,
    )
    conflicts = [r for r in server.records() if r.get("event") == "settings_conflict"]
    assert [r["pid"] for r in conflicts] == [server.pid]  # the children fit one at a time
    assert "2 processes (OPTIMIZER_PROCESSES)" in conflicts[0]["message"]
    maps = Path(f"/proc/{server.pid}/maps").read_text()  # the shared libraries it has loaded
    assert "_imaging" not in maps  # Pillow's native core
    assert "aiohttp" not in maps  # aiohttp's compiled HTTP parser
    server.send(signal.SIGTERM)  # the children stop with it (a killed parent would leave them running)
    assert server.wait_exit(EXIT_GRACE) == 0

    in_child = subprocess.run(
        [sys.executable, "-c", "import sys, optimizer.cli, optimizer.supervisor; print(sorted(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    modules = in_child.stdout.split("'")
    assert not [m for m in modules if m.split(".")[0] in ("aiohttp", "PIL")]


def test_children_stop_when_the_supervisor_is_killed(launch: Launch) -> None:  # noqa: F811
    """A supervisor killed outright (SIGKILL, the OOM killer) forwards no signal: its children, in
    sessions of their own, must still stop rather than serve the port unsupervised."""
    server = launch("--processes", "2")
    server.wait_for(
        lambda _r: len({r["pid"] for r in server.records() if r.get("event") == "listening"}) >= 2,
        "two processes listening",
        20,
    )
    children = {r["pid"] for r in server.records() if r.get("event") == "listening"}
    server.send(signal.SIGKILL)
    try:
        server.wait_for(
            lambda _r: {r["pid"] for r in server.records() if r.get("event") == "stopped"} >= children,
            "both children stopped",
            EXIT_GRACE,
        )
        deadline = time.monotonic() + EXIT_GRACE
        while any(Path(f"/proc/{pid}").exists() for pid in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]
    finally:
        for pid in children:  # on failure: orphans would hold the log pipe open and hang the teardown
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_child_started_after_the_supervisor_died_does_not_run() -> None:
    """Between fork and the death-signal setting the supervisor may die: the child sees a new parent
    and exits instead of serving unsupervised (the signal would never come)."""
    supervisor = Supervisor(Settings(processes=2), [])
    if supervisor._prctl is None:
        pytest.skip("PR_SET_PDEATHSIG is not available here")
    supervisor._pid = -1  # as if the supervisor were already gone when the child checks
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        preexec_fn=supervisor._die_with_parent,  # noqa: PLW1509 - the test process's threads do not fork
    )
    assert child.wait(timeout=60) == 1


class FakeChild:
    """Stands in for a child process: ``code`` is what ``poll()`` says; a signal ends a running one (0)."""

    def __init__(self, code: int | None, pid: int) -> None:
        self.code = code
        self.pid = pid
        self.signals: list[int] = []

    def poll(self) -> int | None:
        return self.code

    def send_signal(self, signum: int) -> None:
        self.signals.append(signum)
        if self.code is None:
            self.code = 0

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def test_children_that_keep_dying_are_restarted_later_each_time_then_given_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A child that dies soon after every start (a crash in serving, say) is restarted after 1, 2, 4, 8
    s; at the fifth exit within a minute the supervisor stops the healthy one and exits 4, instead of
    looking alive while a child crash-loops."""
    supervisor = Supervisor(Settings(processes=2), [])
    pauses: list[float] = []
    monkeypatch.setattr(supervisor, "_pause", pauses.append)
    pids = iter(range(1000, 2000))

    def spawn(_flags: list[str]) -> FakeChild:
        child = FakeChild(70, next(pids))  # dies at once, with a code that says nothing about why
        supervisor.children.append(child)  # type: ignore[arg-type]
        return child

    monkeypatch.setattr(supervisor, "_spawn", spawn)
    healthy = FakeChild(None, 1)
    supervisor.children = [healthy, FakeChild(70, 2)]  # type: ignore[list-item]
    assert supervisor._watch([]) == EXIT_CRASH_LOOP == 4
    assert pauses == [1.0, 2.0, 4.0, 8.0]
    assert healthy.signals == [signal.SIGHUP]  # drained, not killed


def test_a_child_that_cannot_start_is_not_restarted(monkeypatch: pytest.MonkeyPatch) -> None:
    supervisor = Supervisor(Settings(processes=2), [])
    monkeypatch.setattr(supervisor, "_spawn", lambda _flags: pytest.fail("restarted"))
    healthy = FakeChild(None, 1)
    supervisor.children = [healthy, FakeChild(EXIT_BAD_SETTINGS, 2)]  # type: ignore[list-item]
    assert supervisor._watch([]) == EXIT_BAD_SETTINGS
    assert healthy.signals == [signal.SIGHUP]


def test_the_first_signal_drains_the_children_and_a_second_kills_them() -> None:
    supervisor = Supervisor(Settings(processes=2), [])
    first, second = FakeChild(None, 1), FakeChild(None, 2)
    supervisor.children = [first]  # type: ignore[list-item]
    supervisor._on_signal(signal.SIGTERM, None)
    assert first.signals == [signal.SIGHUP]  # never taken as a second signal by a child
    supervisor.children = [second]  # type: ignore[list-item]
    supervisor._on_signal(signal.SIGINT, None)
    assert second.signals == [signal.SIGKILL]


def test_children_signalled_with_their_supervisor_still_drain(launch: Launch) -> None:  # noqa: F811
    """systemd's stop signals every process of the service (KillMode=control-group): each child gets
    the SIGTERM and the supervisor's forwarding, and must drain rather than take the two as a second
    signal (exit at once, no drain)."""
    server = launch("--processes", "2", "--drain-seconds", "10")
    server.wait_for(
        lambda _r: len({r["pid"] for r in server.records() if r.get("event") == "listening"}) >= 2,
        "two processes listening",
        20,
    )
    children = {r["pid"] for r in server.records() if r.get("event") == "listening"}
    for pid in children:  # the children first, and handled (two signals at once would merge into one)
        os.kill(int(pid), signal.SIGTERM)
    server.wait_for(
        lambda _r: {r["pid"] for r in server.records() if r.get("event") == "shutdown"} >= children,
        "both children draining",
        20,
    )
    server.send(signal.SIGTERM)  # then the supervisor, which passes it on
    assert server.wait_exit(10 + EXIT_GRACE) == 0
    stopped = {r["pid"] for r in server.records() if r.get("event") == "stopped"}
    assert stopped == children
    assert not [r for r in server.records() if "exiting at once" in str(r.get("message"))]


class StubbornChild(FakeChild):
    """A child still draining: signals are noted, it does not exit."""

    def send_signal(self, signum: int) -> None:
        self.signals.append(signum)


def test_children_that_served_a_while_before_dying_are_not_a_crash_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Processes killed after serving for a while (the OOM killer, a crash in one image) are restarted
    after a second each, however many: only children dying soon after they start add up to giving up."""
    supervisor = Supervisor(Settings(processes=8), [])
    pauses: list[float] = []
    monkeypatch.setattr(supervisor, "_pause", pauses.append)
    pids = iter(range(1000, 2000))
    spawned = 0

    def spawn(_flags: list[str]) -> FakeChild:
        nonlocal spawned
        spawned += 1
        child = FakeChild(None if spawned > 6 else -9, next(pids))
        supervisor.children.append(child)  # type: ignore[arg-type]
        supervisor._started[child.pid] = time.monotonic() - 3600  # served for an hour
        if spawned > 6:
            supervisor._on_signal(signal.SIGTERM, None)  # then the operator stops the service
        return child

    monkeypatch.setattr(supervisor, "_spawn", spawn)
    first = FakeChild(-9, 1)
    supervisor.children = [first]  # type: ignore[list-item]
    supervisor._started[first.pid] = time.monotonic() - 3600
    assert supervisor._watch([]) == 0
    assert pauses == [1.0] * 7  # no backoff, no giving up


def test_after_giving_up_the_operators_first_signal_is_not_a_second() -> None:
    supervisor = Supervisor(Settings(processes=2), [])
    draining = StubbornChild(None, 1)
    supervisor.children = [draining]  # type: ignore[list-item]
    supervisor.give_up_code = EXIT_CRASH_LOOP
    supervisor._stop_children()  # what giving up does
    supervisor._on_signal(signal.SIGTERM, None)  # the operator's first: still a drain
    assert draining.signals == [signal.SIGHUP, signal.SIGHUP]
    supervisor._on_signal(signal.SIGTERM, None)  # the second: at once
    assert draining.signals[-1] == signal.SIGKILL
    draining.code = -signal.SIGKILL
    assert supervisor._watch([]) == EXIT_CRASH_LOOP  # why it stopped, not how the children ended


class DiesOfTheStop(FakeChild):
    """A child still starting when told to stop: no handler yet, so the signal's default action."""

    def send_signal(self, signum: int) -> None:
        self.signals.append(signum)
        self.code = -signum


def test_a_child_stopped_before_it_could_handle_the_signal_is_a_clean_stop() -> None:
    """Found in review: a SIGTERM right after start made the supervisor exit 129. Such a child had
    admitted nothing; a child killed by the operator's second signal still counts."""
    supervisor = Supervisor(Settings(processes=2), [])
    starting, serving = DiesOfTheStop(None, 1), FakeChild(None, 2)
    supervisor.children = [starting, serving]  # type: ignore[list-item]
    supervisor._on_signal(signal.SIGTERM, None)
    assert supervisor._watch([]) == 0
    killed = DiesOfTheStop(None, 3)
    supervisor.children = [killed]  # type: ignore[list-item]
    supervisor._on_signal(signal.SIGTERM, None)  # the second: SIGKILL
    assert supervisor._watch([]) == 128 + signal.SIGKILL


@pytest.mark.parametrize("processes", ["1", "2"])
def test_a_stop_signal_while_starting_is_acted_on_once_the_handlers_are_in(processes: str) -> None:
    """The signal comes after the entry point's hold and before the server's (or supervisor's) own
    handlers: it stops the service cleanly, exit 0, and says so, instead of 143 and silence."""
    probe = (
        "import os, signal, sys\n"
        "from optimizer import startup\n"
        "from optimizer.cli import main\n"
        "startup.hold_stop_signals()\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        f"sys.exit(main(['--host', '127.0.0.1', '--port', '0', '--processes', '{processes}', "
        "'--threads', '1']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    if processes == "2":  # the supervisor starts no child
        assert '"event": "stopping"' in result.stderr
        assert '"event": "listening"' not in result.stderr
    else:
        assert '"event": "stopped"' in result.stderr


def test_held_stop_signals_are_given_once() -> None:
    probe = (
        "import os, signal\n"
        "from optimizer.startup import hold_stop_signals, held_stop_signals\n"
        "hold_stop_signals()\n"
        "os.kill(os.getpid(), signal.SIGHUP)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "print(held_stop_signals(), held_stop_signals())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == f"[{int(signal.SIGHUP)}, {int(signal.SIGTERM)}] []"
