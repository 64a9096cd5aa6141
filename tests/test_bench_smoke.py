"""``scripts/bench.py`` end to end: it starts a server, measures the ceiling, loads it, reports.

Only the shape of the report is checked, and that some images came back: never how fast, since the
machine running the tests may be shared and slow. A generated JPEG is uploaded, so no corpus is needed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from PIL import Image, ImageDraw

from tests.conftest import ROOT, image_bytes

BENCH = ROOT / "scripts" / "bench.py"
RUN_TIMEOUT = 120.0


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench", module)  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )


def short_run(tmp_path: Path, *flags: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """bench.py for 2 s with 2 users (a 1 s ceiling) on a generated photo, its JSON in ``tmp_path``:
    ``flags`` add to or override these (flags after ``--`` go to the server)."""
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(image_bytes((640, 480), quality=90))
    results_path = tmp_path / "results.json"
    short = ("--file", str(photo), "--users", "2", "--duration", "2", "--ceiling-duration", "1")
    own, server = (flags[: flags.index("--")], flags[flags.index("--") :]) if "--" in flags else (flags, ())
    return run_bench(*short, *own, "--json", str(results_path), *server), results_path


def test_an_idle_start_on_a_memory_reporting_machine_is_flagged() -> None:
    bench = load_bench()
    reporting = {"host_reclaims_free_memory": True}
    idle = bench.cold_start_warning({**reporting, "loadavg_at_start": "0.12 0.40 0.61"})
    assert idle is not None and "idle before this run" in idle
    assert bench.cold_start_warning({**reporting, "loadavg_at_start": "1.80 1.20 0.90"}) is None  # busy
    assert bench.cold_start_warning({"host_reclaims_free_memory": False, "loadavg_at_start": "0.01"}) is None
    assert bench.cold_start_warning({**reporting, "loadavg_at_start": ""}) is None  # unknown: no guess


def test_rounds_do_not_combine_with_a_sweep(tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(image_bytes((64, 48)))
    done = run_bench("--file", str(photo), "--sweep-users", "1,2", "--rounds", "2", "--no-ceiling")
    assert done.returncode == 2
    assert "--rounds repeats one load" in done.stderr
    done = run_bench("--file", str(photo), "--rounds", "0")
    assert done.returncode == 2
    assert "--rounds must be at least 1" in done.stderr
    done = run_bench("--file", str(photo), "--server-log", str(tmp_path / "missing" / "server.log"))
    assert done.returncode == 2  # at once, not after the ceiling has run
    assert "no folder" in done.stderr


def test_bad_arguments_are_refused_in_one_line_before_anything_runs(tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(image_bytes((64, 48)))
    refusals = {
        # the results would otherwise be lost at the end of the run
        ("--json", str(tmp_path)): "that is a folder",
        ("--json", str(photo / "results.json")): "is not a folder",
        # urlsplit() checks a port only when asked: each user used to die on it, unseen
        ("--url", "http://127.0.0.1:99999"): "Port out of range",
        # a parser's own message, not "invalid parse_stages value"
        ("--stages", "0s:5"): "--stages: needs at least one stage with a positive duration",
        ("--duration", "soon"): "argument --duration: not a duration: 'soon'",
        ("--sweep-users", "1,x"): "expected user counts like 10,50,200",
        ("--ceiling-threads", "0"): "argument --ceiling-threads: 0 is not 1 or more",  # was ignored
        ("--ceiling-threads", "-2"): "argument --ceiling-threads: -2 is not 1 or more",  # crashed the child
        ("--stop-timeout", "-1"): "argument --stop-timeout: '-1': seconds must be 0 or more",
        ("--file", str(ROOT / "README.md")): "not an image the service takes",
    }
    for flags, message in refusals.items():
        done = run_bench("--file", str(photo), "--no-ceiling", *flags)
        assert done.returncode == 2, (flags, done.stderr)
        [line] = done.stderr.strip().splitlines()[-1:]
        assert message in line, (flags, done.stderr)
        assert "Traceback" not in done.stderr, (flags, done.stderr)


def test_the_chart_refuses_what_it_cannot_draw_in_one_line(tmp_path: Path) -> None:
    text = tmp_path / "notes.json"
    text.write_text("not json")
    other = tmp_path / "other.json"
    other.write_text('{"version": 2}')
    empty = tmp_path / "empty.json"
    empty.write_text('{"runs": []}')
    refusals = {
        (str(tmp_path / "missing.json"), str(tmp_path / "x.png")): "No such file or directory",
        (str(text), str(tmp_path / "x.png")): "not JSON results",
        (str(other), str(tmp_path / "x.png")): "not results from bench.py --json",
        (str(empty), str(tmp_path / "missing" / "x.png")): "no folder",
    }
    for files, message in refusals.items():
        done = run_bench("chart", *files)
        assert done.returncode == 2, (files, done.stderr)
        assert message in done.stderr.strip().splitlines()[-1], (files, done.stderr)
        assert "Traceback" not in done.stderr, (files, done.stderr)


def test_a_file_the_pipeline_refuses_fails_the_ceiling_in_one_line(tmp_path: Path) -> None:
    bench = load_bench()
    fake = tmp_path / "fake.jpg"
    fake.write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 200)  # a JPEG's signature, and nothing after it
    with pytest.raises(bench.BenchError, match=r"exit 1\):\nthe pipeline refused .*fake\.jpg") as refused:
        bench.run_ceiling(fake, path="/upload", query="", server_args=[], threads=1, seconds=0.5, source=ROOT)
    assert "Traceback" not in str(refused.value)


async def test_an_unexpected_error_in_a_user_is_counted_and_shown_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A bug in the harness (here a port urlsplit refuses, past the argument checks) used to end each
    user silently, leaving a run with no answers and no error."""
    bench = load_bench()
    upload = bench.Upload("http://127.0.0.1:99999/upload", b"x", {}, "test")
    run = bench.LoadRun(
        upload,
        bench.LoadPlan.constant(3, 0.3),
        on_503="retry-after",
        timeout=5.0,
        grace=1.0,
        expect_continue=False,
        server=None,
        monitor=None,
        quiet=True,
    )
    result = await run.run()
    assert result["errors"]["unexpected"] == {"ValueError": 3}  # one per user, each stopped
    assert result["errors"]["total"] == 3
    assert "Port out of range" in result["errors"]["samples"]["ValueError"]
    assert capsys.readouterr().err.count("a virtual user stopped on an unexpected error") == 1


def test_a_source_checkout_without_what_the_harness_imports_is_refused(tmp_path: Path) -> None:
    bench = load_bench()
    package = tmp_path / "old" / "optimizer"
    package.mkdir(parents=True)
    for name in ("__init__", *bench.SOURCE_MODULES):
        (package / f"{name}.py").write_text("")
    bench.check_source(tmp_path / "old", "pillow")  # everything there
    with pytest.raises(bench.BenchError, match="c0f1f66 or later"):
        bench.check_source(tmp_path / "old", "vips")  # a vips.py without configure_process()
    (package / "cli.py").unlink()  # a checkout older than e005eff
    with pytest.raises(bench.BenchError, match=r"no optimizer/cli\.py there.*e005eff or later"):
        bench.check_source(tmp_path / "old", "pillow")


def test_a_child_imports_optimizer_from_its_source_only(tmp_path: Path) -> None:
    """The editable install in .venv serves any optimizer module missing from --source out of the main
    tree: an old checkout would run as a mix. A child of the harness fails on such an import instead."""
    bench = load_bench()
    package = tmp_path / "old" / "optimizer"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "pipeline.py").write_text("OLD = True\n")
    env = bench.source_env(tmp_path / "old")

    def child(code: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    assert child("import optimizer.pipeline as p; assert p.OLD").returncode == 0
    missing = child("import optimizer.cli")
    assert missing.returncode == 1
    assert "No module named 'optimizer.cli' in --source" in missing.stderr
    assert child("import json, aiohttp").returncode == 0  # anything else imports as before


def test_the_monitor_finds_a_supervisor_s_children_cheaply() -> None:
    """With --processes the server is a supervisor: its workers are its children. They are read from
    /proc/PID/task/*/children, and agree with a scan of every process."""
    bench = load_bench()
    children = [subprocess.Popen(["sleep", "30"]) for _ in range(2)]
    try:
        tree = bench.process_tree(os.getpid())
        assert tree[0] == os.getpid()
        assert sorted(tree[1:]) == sorted(child.pid for child in children)
        assert sorted(bench.children_by_scan(os.getpid())) == sorted(tree[1:])
        assert bench.process_tree(2**22 + 1) == [2**22 + 1]  # no such process: itself only
    finally:
        for child in children:
            child.kill()
            child.wait()


def test_cpu_is_split_between_main_and_other_threads() -> None:
    """The other threads' share is each process's total less its main thread, so a thread that ended
    between the readings still counts; a process that appeared counts from zero."""
    bench = load_bench()
    split = bench.split_by_thread({1: (1.0, 0.4)}, {1: (3.0, 0.9), 2: (0.5, 0.2)})
    assert split["main_threads_seconds"] == pytest.approx(0.5 + 0.2)
    assert split["other_threads_seconds"] == pytest.approx(1.5 + 0.3)
    # This process, read twice: its main thread is found, and time only grows.
    before = bench.cpu_readings([os.getpid()])
    sum(range(200_000))
    after = bench.cpu_readings([os.getpid()])
    assert set(after) == {os.getpid()}
    assert after[os.getpid()][1] >= before[os.getpid()][1]
    assert bench.cpu_readings([2**22 + 1]) == {}  # no such process

    # A thread that burns CPU and ends between two readings counts among the other threads.
    worker = threading.Thread(target=lambda: sum(range(3_000_000)))
    worker.start()
    worker.join()
    ended = bench.split_by_thread(after, bench.cpu_readings([os.getpid()]))
    assert ended["other_threads_seconds"] > 0


def test_the_monitor_gives_no_split_for_a_server_that_is_gone() -> None:
    bench = load_bench()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        monitor = bench.ServerMonitor(child.pid)
    finally:
        child.kill()
        child.wait()
    monitor.finish()
    assert monitor.threads is None
    assert monitor.as_dict()["cpu_by_thread"] is None


def test_the_harness_waits_for_every_server_process_to_listen(tmp_path: Path) -> None:
    """With --processes each worker logs its own 'listening': the load starts once all of them have."""
    bench = load_bench()
    fake = (
        "import json, sys, time\n"
        "for pid in (101, 102):\n"
        "    print(json.dumps({'event': 'listening', 'pid': pid, 'port': 4321, 'threads': 2}),"
        " file=sys.stderr, flush=True)\n"
        "time.sleep(30)\n"
    )
    server = bench.ServerProcess([], tmp_path / "fake.log", command=[sys.executable, "-c", fake])
    try:
        server.wait_listening(processes=2)
        assert (server.port, server.threads) == (4321, 2)
        with pytest.raises(bench.BenchError, match="2 of 3 server processes logged 'listening'"):
            server.wait_listening(0.3, processes=3)
    finally:
        server.stop(5)


def test_the_ceiling_runs_in_as_many_processes_as_the_server(tmp_path: Path) -> None:
    """With ``--processes 2`` the pipeline alone runs in two children at once, and their figures add."""
    bench = load_bench()
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(image_bytes((320, 240), quality=90))
    common = {"path": "/upload", "query": "", "server_args": [], "seconds": 0.5, "source": ROOT}
    alone = bench.run_ceiling(photo, threads=2, **common)
    split = bench.run_ceiling(photo, threads=2, processes=2, **common)

    assert alone["processes"] == 1 and alone["threads"] == 2
    assert split["processes"] == 2 and split["threads"] == 2
    assert split["images"] > 0 and split["image_seconds"]["count"] == split["images"]
    assert "latencies" not in split  # merged, not carried into the results
    assert split["cpu_seconds_per_image"] == pytest.approx(split["cpu_seconds"] / split["images"])
    # Two interpreters hold two interpreters' memory: more than one process alone (by ~10 MB at least).
    assert split["peak_rss_bytes"] > alone["peak_rss_bytes"] + 10 * 1024 * 1024


def test_a_failing_ceiling_child_stops_the_others(tmp_path: Path) -> None:
    """The first child to fail ends the ceiling at once, with its stderr's tail; the others are killed
    rather than waited for; a child that prints no result is a failure too."""
    bench = load_bench()
    env = dict(os.environ)
    pid_file = tmp_path / "sleeper.pid"
    sleeper = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    failing = "import sys, time; time.sleep(0.5); sys.exit('decoder exploded')"
    with pytest.raises(bench.BenchError, match=r"(?s)exit 1.*decoder exploded"):
        bench.run_children(
            [[sys.executable, "-c", sleeper], [sys.executable, "-c", failing]],
            cwd=tmp_path,
            env=env,
            timeout=60,
        )
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)  # killed and reaped, not left running

    with pytest.raises(bench.BenchError, match="printed no result"):
        bench.run_children([[sys.executable, "-c", "print('not json')"]], cwd=tmp_path, env=env, timeout=60)
    last_line = "print('progress'); print('{\"images\": 2}')"
    assert bench.run_children([[sys.executable, "-c", last_line]], cwd=tmp_path, env=env, timeout=60) == [
        {"images": 2}
    ]


def test_a_ceiling_unlike_the_server_is_flagged_in_the_report() -> None:
    bench = load_bench()
    matched = {"processes": 2, "threads": 2, "seconds": 25.0, "started_late_seconds": 0.0}
    assert bench.ceiling_warnings(matched, 2, 1) == []
    (layout,) = bench.ceiling_warnings({**matched, "processes": 1}, 2, 1)
    assert "2 processes and 2 threads, but the ceiling 1 and 2" in layout
    (late,) = bench.ceiling_warnings({**matched, "started_late_seconds": 2.0}, 2, 1)
    assert "2.0 s after the others" in late


def test_a_load_is_compared_with_the_ceilings_either_side_taken_at_its_time() -> None:
    bench = load_bench()
    before = {
        "images_per_s": 20.0,
        "images": 500,
        "cpu_seconds_per_image": 0.1,
        "peak_rss_bytes": 100,
        "threads": 2,
        "seconds": 25.0,
        "measured_at": 10.0,
        "started_late_seconds": 0.0,
        "machine_cpu": {"others_cores": 0.0},
    }
    after = {**before, "images_per_s": 22.0, "images": 550, "cpu_seconds_per_image": 0.09}
    after.update(peak_rss_bytes=110, measured_at=30.0, machine_cpu={"others_cores": 0.3})

    quarter = bench.bracket_ceiling(before, after, 15.0)
    assert quarter["images_per_s"] == pytest.approx(20.5)
    assert quarter["cpu_seconds_per_image"] == pytest.approx(0.0975)
    assert quarter["peak_rss_bytes"] == 102  # a count stays whole
    assert quarter["images"] == 512
    assert quarter["threads"] == 2
    assert quarter["machine_cpu"] == {"others_cores": 0.3}  # the noisier phase speaks for both
    assert quarter["bracket"] == {
        "before_images_per_s": 20.0,
        "after_images_per_s": 22.0,
        "weight_of_after": 0.25,
        "drift": pytest.approx(0.1),
        "loads_between": 1,
    }
    assert bench.bracket_ceiling(before, after, 99.0)["images_per_s"] == 22.0  # never extrapolated
    assert bench.bracket_ceiling(before, after, 1.0)["images_per_s"] == 20.0
    assert bench.bracket_ceiling(before, {**after, "measured_at": 10.0}, 15.0)["images_per_s"] == 21.0
    assert bench.bracket_ceiling(before, None, 15.0) is before  # no ceiling after it: the one before
    # A value only one side has is taken from that side.
    assert bench.bracket_ceiling(before, {**after, "peak_rss_bytes": None}, 15.0)["peak_rss_bytes"] == 100

    # A drift over the threshold is said beside the run, and so is a late start of either ceiling.
    (drift,) = bench.ceiling_warnings(quarter, 1, 2)
    assert "the ceiling moved +10.0% between its measurements either side of this load" in drift
    assert "(20.00 images/s before, 22.00 after)" in drift
    steady = bench.bracket_ceiling(before, {**after, "images_per_s": 20.2}, 15.0)
    assert bench.ceiling_warnings(steady, 1, 2) == []
    late = bench.bracket_ceiling(before, {**after, "images_per_s": 20.2, "started_late_seconds": 2.0}, 15.0)
    (started_late,) = bench.ceiling_warnings(late, 1, 2)
    assert "2.0 s after the others" in started_late


def test_the_chart_draws_each_load_s_own_ceiling_across_a_sweep() -> None:
    bench = load_bench()
    first = {"images_per_s": 20.0, "peak_rss_bytes": 100}
    sweep = [{"users": n, "ceiling": {"images_per_s": 20.0 + n}} for n in (10, 50, 200)]
    drawn = bench.ceiling_series(sweep, first, "images_per_s", 1.0, "{:.2f}/s")
    assert drawn.points == [(10.0, 30.0), (50.0, 70.0), (200.0, 220.0)]
    assert "ceiling at each load's time" in drawn.name
    # Rounds of one user count: one level line at their mean; an older file: the first ceiling's.
    rounds = [{"users": 16, "ceiling": {"images_per_s": rate}} for rate in (20.0, 22.0)]
    assert bench.ceiling_series(rounds, first, "images_per_s", 1.0, "{:.2f}/s").points == [
        (0.0, 21.0),
        (16.0, 21.0),
    ]
    older = [{"users": 16}]
    assert bench.ceiling_series(older, first, "peak_rss_bytes", 1.0, "{:.0f}").points == [
        (0.0, 100.0),
        (16.0, 100.0),
    ]


def test_value_labels_on_a_chart_never_cover_each_other() -> None:
    # p50 and p95 of a fast server sit a pixel apart: their labels used to print over each other.
    bench = load_bench()
    draw = ImageDraw.Draw(Image.new("RGB", (400, 300)))
    placed: list[tuple[float, float, float, float]] = []
    spots = [
        bench.free_spot(draw, placed, text, None, at=(100.0, 280.0), within=(50.0, 290.0))
        for text in ("0.172", "0.216", "1.33")
    ]
    assert len(set(spots)) == 3
    for i, first in enumerate(placed):
        assert first[1] >= 50 and first[3] <= 290  # inside the plot, not over the axis's labels
        for second in placed[i + 1 :]:
            assert first[3] <= second[1] or second[3] <= first[1]


def run_bench_in_process(bench: ModuleType, tmp_path: Path, *flags: str) -> dict[str, Any]:
    """``run_bench`` on a small photo with these flags, in this process (its phases patched by the test)."""
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(image_bytes((64, 48)))
    args = bench.build_parser().parse_args(["--file", str(photo), "--quiet", *flags])
    config, plans = bench.make_config(args, [])
    results: dict[str, Any] = bench.run_bench(config, plans, [])
    return results


def fake_load(users: int, at: float) -> dict[str, Any]:
    """What ``load_run`` returns, reduced to what ``judge`` and the report read."""
    return {
        "users": users,
        "measured_at": at,
        "goodput_per_s": 10.0,
        "ok": 100,
        "responses": 100,
        "responses_by_status": {"200": 100},
        "responses_after_window_by_status": {},
        "server": None,
        "latency_2xx_seconds": {"p95": 0.1},
        "responses_per_s_by_status": {"200": 10.0},
        "errors": {"total": 0},
    }


@pytest.mark.parametrize(
    ("flags", "ceilings", "pairs"),
    [
        # rounds: a ceiling before each load, one after the last; each load between its two
        (["--rounds", "3"], 4, [(0, 1), (1, 2), (2, 3)]),
        (["--rounds", "2", "--no-bracket"], 2, [(0, None), (1, None)]),
        # a sweep: its loads share the ceilings before the first and after the last
        (["--sweep-users", "1,2,3"], 2, [(0, 1), (0, 1), (0, 1)]),
        (["--no-ceiling"], 0, [(None, None)]),
    ],
)
def test_each_load_is_judged_against_the_ceilings_around_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: list[str], ceilings: int, pairs: list[Any]
) -> None:
    bench = load_bench()
    clock = iter(range(100))
    measured: list[dict[str, Any]] = []

    def measure_ceiling(config: Any, plans: Any) -> dict[str, Any]:
        ceiling = {"images_per_s": 20.0 + len(measured), "measured_at": float(next(clock))}
        measured.append(ceiling)
        return ceiling

    def load_run(config: Any, plan: Any, log_dir: Path, name: str) -> dict[str, Any]:
        return fake_load(plan.max_users, float(next(clock)))

    monkeypatch.setattr(bench, "measure_ceiling", measure_ceiling)
    monkeypatch.setattr(bench, "load_run", load_run)
    results = run_bench_in_process(bench, tmp_path, *flags)

    assert results["ceilings"] == measured and len(measured) == ceilings
    for run, (before, after) in zip(results["runs"], pairs, strict=True):
        own = run["ceiling"]
        if before is None:
            assert own is None
        elif after is None:
            assert own is measured[before]
        else:
            rates = (measured[before]["images_per_s"], measured[after]["images_per_s"])
            assert (own["bracket"]["before_images_per_s"], own["bracket"]["after_images_per_s"]) == rates
            same_round = sum(other["round"] == run["round"] for other in results["runs"])
            assert own["bracket"]["loads_between"] == same_round
            assert min(rates) < own["images_per_s"] < max(rates)  # taken at the load's time, between


def test_a_failing_last_ceiling_keeps_the_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench = load_bench()
    measured: list[dict[str, Any]] = []

    def measure_ceiling(config: Any, plans: Any) -> dict[str, Any]:
        if measured:
            raise bench.BenchError("the ceiling process printed no result")
        measured.append({"images_per_s": 20.0, "measured_at": 0.0})
        return measured[0]

    monkeypatch.setattr(bench, "measure_ceiling", measure_ceiling)
    monkeypatch.setattr(bench, "load_run", lambda config, plan, log_dir, name: fake_load(1, 1.0))
    results = run_bench_in_process(bench, tmp_path)

    assert "printed no result" in results["bracket_error"]
    [run] = results["runs"]
    assert run["ceiling"] is measured[0]
    assert run["derived"]["goodput_over_ceiling"] == 0.5


def test_a_round_whose_server_died_is_left_out_of_the_medians() -> None:
    bench = load_bench()
    runs = []
    for round_number, goodput in enumerate((10.0, 2.0, 12.0), start=1):
        run = {**fake_load(4, float(round_number)), "round": round_number, "goodput_per_s": goodput}
        run["derived"] = {"goodput_over_ceiling": goodput / 20}
        run["invalid"] = (
            "the server exited with code -9 (SIGKILL) 1.0 s into the 4 s window" if goodput == 2.0 else None
        )
        runs.append(run)
    summary = bench.rounds_summary(runs)
    assert summary["goodput_per_s"]["median"] == 11.0  # of rounds 1 and 3 only
    assert summary["goodput_per_s"]["each"] == [10.0, None, 12.0]
    assert summary["goodput_over_ceiling"]["min"] == 0.5
    assert summary["excluded_rounds"] == [2]
    text = "\n".join(bench.rounds_lines(summary))
    assert "3 rounds, each a load (median of the 2 valid, then each round)" in text  # no ceilings here
    assert "left out of the medians (shown as -): round 2, whose server died" in text


def test_the_report_says_how_the_server_ended() -> None:
    bench = load_bench()
    assert (
        bench.exit_line({"exit_code": 0, "signals_sent": ["SIGTERM"]}) == "server exit code after SIGTERM: 0"
    )
    assert "-9 (SIGKILL), on its own" in bench.exit_line({"exit_code": -9, "signals_sent": []})
    killed = bench.exit_line({"exit_code": -9, "signals_sent": ["SIGTERM", "SIGKILL"]})
    assert killed == "server exit code after SIGTERM then SIGKILL (it outlasted --stop-timeout): -9 (SIGKILL)"


def test_a_processes_server_whose_worker_died_makes_the_run_invalid(tmp_path: Path) -> None:
    """Its supervisor restarts the worker and lives on, so the server never "died": such a run was
    headlined at 80 % of its ceiling, valid (a review)."""
    bench = load_bench()
    server = bench.ServerProcess.__new__(bench.ServerProcess)
    server.log_path = tmp_path / "server.log"
    lines = [
        {"logger": "optimizer.access", "status": 200},
        {"event": "child_exited", "child": 4242, "code": -9},
    ]
    server.log_path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    run = bench.LoadRun.__new__(bench.LoadRun)
    run.server, run.server_died, run.server_died_at = server, None, None
    reason = run._invalid()
    assert reason is not None and "server process 4242 exited with code -9 (SIGKILL)" in reason
    server.log_path.write_text(json.dumps(lines[0]) + "\n")
    assert run._invalid() is None


def test_retry_after_is_read_as_seconds_or_as_a_date() -> None:
    bench = load_bench()
    now = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
    assert bench.retry_after_seconds("3", now) == 3.0
    assert bench.retry_after_seconds(" 0 ", now) == 0.0
    # An HTTP-date (RFC 9110): the seconds until then, never below 0. It used to be read as 0: a flood.
    assert bench.retry_after_seconds("Tue, 01 Dec 2026 12:00:05 GMT", now) == 5.0
    assert bench.retry_after_seconds("Tue, 01 Dec 2026 11:59:00 GMT", now) == 0.0
    assert bench.retry_after_seconds("-4", now) == 0.0
    for nonsense in ("soon", "", "nan", "inf"):
        assert bench.retry_after_seconds(nonsense, now) is None


def test_figures_beside_the_window_s_counts_describe_the_window_s_answers() -> None:
    """An answer in the grace period is counted apart; it enters neither the problem codes nor the
    Retry-After summary that sit beside the window's counts. A 2xx's latency counts either way: the
    slowest answers come in the grace period."""
    bench = load_bench()
    tally = bench.Tally(window_end=10.0)
    refused = bench.Answer(503, {"retry-after": "2"}, b'{"code": "overloaded"}', True)
    ok = bench.Answer(200, {"server-timing": "decode;dur=40"}, b"", True)
    tally.record(1, refused, 0.1, 9.0, 2.0)
    tally.record(1, ok, 1.0, 9.5, None)
    tally.record(2, refused, 0.2, 11.0, 3.0)  # after the window
    tally.record(2, ok, 4.0, 12.0, None)
    assert tally.statuses == {503: 1, 200: 1} and tally.statuses_late == {503: 1, 200: 1}
    assert tally.codes == {"503 overloaded": 1} and tally.codes_late == {"503 overloaded": 1}
    assert tally.ok_latencies == [1.0, 4.0] and tally.refusal_latencies == [0.1]
    assert tally.retry_after == [2.0]
    assert tally.timing_sums == {"decode": 40.0}
    assert tally.ok_by_user == {1: 1, 2: 1}  # each user's share counts the grace period's 2xx too


def test_a_ceiling_beside_a_server_started_elsewhere_says_whose_settings_it_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = load_bench()
    monkeypatch.setattr(
        bench, "measure_ceiling", lambda config, plans: {"images_per_s": 20.0, "measured_at": 0.0}
    )
    monkeypatch.setattr(bench, "load_run", lambda config, plan, log_dir, name: fake_load(1, 1.0))
    results = run_bench_in_process(bench, tmp_path, "--url", "http://127.0.0.1:9", "--ceiling")
    assert "the ceiling ran with the settings a server started here would have" in capsys.readouterr().err
    monkeypatch.setattr(bench, "run_table", lambda run, ceiling: [])  # the fake load has no table
    bench.print_report(results)
    assert "NOTE: the server at --url was started elsewhere" in capsys.readouterr().out


def test_merged_ceilings_add_rates_cpu_and_memory() -> None:
    bench = load_bench()
    child = {
        "images": 10,
        "seconds": 1.0,
        "images_per_s": 10.0,
        "threads": 1,
        "params": {},
        "output_bytes": 900,
        "cpu_seconds": 1.0,
        "peak_rss_bytes": 100,
        "ru_maxrss_bytes": 110,
        "latencies": [0.1] * 10,
        "measured_at": 100.0,
    }
    other = {**child, "images": 12, "seconds": 1.2, "ru_maxrss_bytes": None, "latencies": [0.1] * 12}
    other["measured_at"] = 100.2
    merged = bench.merge_ceilings([child, other])
    assert merged["images"] == 22 and merged["seconds"] == 1.2
    assert merged["images_per_s"] == 20.0 and merged["threads"] == 2 and merged["processes"] == 2
    assert merged["cpu_seconds_per_image"] == pytest.approx(2.0 / 22)
    assert merged["peak_rss_bytes"] == 200
    assert merged["ru_maxrss_bytes"] is None  # one child could not say: no sum that looks complete
    assert merged["image_seconds"]["count"] == 22
    assert merged["measured_at"] == pytest.approx(100.1)


def test_stages_ramp_linearly_between_targets() -> None:
    bench = load_bench()
    plan = bench.LoadPlan(start_users=0, stages=bench.parse_stages("5s:20,10s:50,5s:0"))
    assert plan.seconds == 20
    assert plan.max_users == 50
    assert [plan.target_at(t) for t in (0, 2.5, 5, 10, 15, 17.5, 25)] == [0, 10, 20, 35, 50, 25, 0]
    assert bench.parse_duration("500ms") == 0.5
    with pytest.raises(argparse.ArgumentTypeError, match="DURATION:USERS"):
        bench.parse_stages("5s")


@pytest.mark.slow
def test_bench_runs_against_its_own_server_and_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    done, results_path = short_run(tmp_path, "--rounds", "2", "--", "--threads", "1", "--queue", "1")

    assert done.returncode == 0, done.stdout + done.stderr
    assert "goodput / ceiling" in done.stdout  # the table on stdout
    assert "2 rounds, each a ceiling then a load, and a last ceiling after them" in done.stdout
    assert "images/s before the load and" in done.stdout
    results: dict[str, Any] = json.loads(results_path.read_text())
    assert {"version", "machine", "config", "code", "ceiling", "ceilings", "runs", "note"} <= results.keys()
    assert results["config"]["threads"] == 1

    assert_each_load_is_bracketed(results)
    # A results file from before each run kept its own ceiling still prints, against its round's.
    older = {**results, "runs": [{k: v for k, v in run.items() if k != "ceiling"} for run in results["runs"]]}
    bench = load_bench()
    bench.print_report(older)
    assert "round 2 of 2:" in capsys.readouterr().out
    ratios = results["rounds"]["goodput_over_ceiling"]
    assert ratios["each"] == [run["derived"]["goodput_over_ceiling"] for run in results["runs"]]
    assert ratios["min"] <= ratios["median"] <= ratios["max"]

    run = results["runs"][0]
    expected = {
        "goodput_per_s",
        "responses_by_status",
        "responses_per_s_by_status",
        "latency_2xx_seconds",
        "errors",
        "client_cpu_share",
        "server",
        "derived",
        "timeline",
    }
    assert expected <= run.keys()
    assert sum(n for status, n in run["responses_by_status"].items() if status.startswith("2")) > 0
    assert run["latency_2xx_seconds"]["p95"] is not None
    assert {"p50", "p95", "p99"} <= run["latency_2xx_seconds"].keys()
    assert run["server"]["peak_rss_bytes"] > 0
    assert run["server"]["cpu_seconds"] is not None
    assert run["server"]["threads"] == 1
    assert run["server"]["log"]["exit_code"] == 0
    assert {"goodput_over_ceiling", "server_minus_ceiling_peak_rss_bytes"} <= run["derived"].keys()
    assert run["derived"]["goodput_over_ceiling"] is not None

    assert_machine_time_is_accounted(run, run["ceiling"])
    assert "machine time per 2xx, ms:" in done.stdout
    assert "event loop ms per 2xx" in done.stdout
    assert "the same without the harness*" in done.stdout

    # The chart draws from the same file, even with a single point.
    chart = tmp_path / "chart.png"
    drawn = run_bench("chart", str(results_path), str(chart))
    assert drawn.returncode == 0, drawn.stderr
    with Image.open(chart) as png:
        assert png.format == "PNG"
        assert png.width > 0


def assert_each_load_is_bracketed(results: dict[str, Any]) -> None:
    """Each round measured its own ceiling, and one more came after the last load (--bracket, the
    default): each load is compared with the ceilings either side of it, taken at its time."""
    ceilings = results["ceilings"]
    assert len(ceilings) == 3
    assert results["ceiling"] == ceilings[0]
    for ceiling in ceilings:
        assert ceiling["threads"] == 1
        assert ceiling["images"] > 0
        assert ceiling["peak_rss_bytes"] > 0
    assert [run["round"] for run in results["runs"]] == [1, 2]
    for index, run in enumerate(results["runs"]):
        before, after, own = ceilings[index], ceilings[index + 1], run["ceiling"]
        assert before["measured_at"] < run["measured_at"] < after["measured_at"]
        assert own["bracket"]["before_images_per_s"] == before["images_per_s"]
        assert own["bracket"]["after_images_per_s"] == after["images_per_s"]
        low, high = sorted((before["images_per_s"], after["images_per_s"]))
        assert low <= own["images_per_s"] <= high
        assert run["derived"]["ceiling_images_per_s"] == own["images_per_s"]
        assert run["derived"]["goodput_over_ceiling"] == pytest.approx(
            run["goodput_per_s"] / own["images_per_s"]
        )
    assert results["rounds"]["bracketed"] is True
    assert len(results["rounds"]["ceiling_drift"]["each"]) == 2


def assert_machine_time_is_accounted(run: dict[str, Any], ceiling: dict[str, Any]) -> None:
    """Where the machine's time went per 2xx: the image work ran on the pool's thread, not the event
    loop's, and the parts account for the machine's whole time over the run (every CPU, wall time)."""
    threads = run["server"]["cpu_by_thread"]
    assert threads["other_threads_seconds"] > 0
    assert threads["main_threads_seconds"] > 0
    parts = run["derived"]["machine_seconds_per_2xx"]
    images = run["ok"] + sum(
        n for status, n in run["responses_after_window_by_status"].items() if status.startswith("2")
    )
    assert parts["total"] == pytest.approx((os.cpu_count() or 1) * run["wall_seconds"] / images, rel=0.1)
    shares = ("server_other_threads", "server_main_threads", "harness", "other_processes", "idle", "steal")
    assert all(parts[key] >= 0 for key in shares)
    assert abs(parts["unaccounted"]) <= 0.1 * parts["total"]
    assert parts["ceiling_cpu"] == ceiling["cpu_seconds_per_image"]
    assert parts["ceiling_machine"] > 0
    # Taking the harness's time out can only raise the ratio.
    assert run["derived"]["goodput_over_ceiling_without_harness"] >= run["derived"]["goodput_over_ceiling"]


# A stand-in for ipx: the harness finds it where `npm install --prefix DIR ipx@3` would put it, starts it
# with `serve --dir FOLDER` and HOST/PORT in the environment, and GETs /<modifiers>/<file>.
FAKE_IPX = """#!{python}
import io, os, sys, urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from PIL import Image

folder = sys.argv[sys.argv.index("--dir") + 1]

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        modifiers, _, name = self.path.lstrip("/").partition("/")
        width = int(dict(m.split("_", 1) for m in modifiers.split(","))["w"])
        with Image.open(os.path.join(folder, urllib.parse.unquote(name))) as im:
            im.thumbnail((width, width * 10))
            out = io.BytesIO()
            im.save(out, "JPEG")
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(out.getvalue())))
        self.end_headers()
        self.wfile.write(out.getvalue())

    def log_message(self, *args):
        pass

ThreadingHTTPServer((os.environ["HOST"], int(os.environ["PORT"])), Handler).serve_forever()
"""


USABLE_CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def test_cpu_lists_are_read_as_taskset_takes_them() -> None:
    bench = load_bench()
    assert bench.parse_cpu_list("0") == {0}
    assert bench.parse_cpu_list("0-2") == {0, 1, 2}
    assert bench.parse_cpu_list("0, 2-3") == {0, 2, 3}
    assert bench.cpu_list({3, 0, 2}) == "0,2,3"
    for bad in ("", "a", "2-1", "-1", "0,,1", "1-", "0-99999999999"):  # the last: refused, not built
        with pytest.raises(argparse.ArgumentTypeError, match="not a CPU list"):
            bench.parse_cpu_list(bad)


def test_the_machine_s_time_is_read_on_the_chosen_cpus_only() -> None:
    bench = load_bench()
    stat = Path("/proc/stat").read_text()  # one reading: the figures grow between two
    whole = bench.machine_cpu(stat=stat)
    every = [
        int(line.split()[0][3:]) for line in stat.splitlines() if line[:3] == "cpu" and line[3].isdigit()
    ]
    each = [bench.machine_cpu({cpu}, stat) for cpu in every]
    assert whole is not None and all(part is not None for part in each)
    # The CPUs' own lines add up to the machine's, field by field (each line rounds to its ticks).
    for field in range(3):
        total = sum(part[field] for part in each if part is not None)
        assert total == pytest.approx(whole[field], abs=0.02 * len(every) + 0.05)
    assert bench.machine_cpu(set(every), stat) == pytest.approx(whole, abs=0.02 * len(every) + 0.05)
    assert bench.machine_cpu({10**6}, stat) is None  # no such CPU: unknown, not zero


@pytest.mark.skipif(not USABLE_CPUS, reason="CPU affinity is Linux's")
def test_cpu_placement_is_checked_before_anything_runs(tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(image_bytes((64, 48)))
    common = ["--file", str(photo), "--no-ceiling"]
    refusals = {
        ("--harness-cpus", "0"): "--harness-cpus goes with --server-cpus",
        ("--server-cpus", "0", "--url", "http://127.0.0.1:9"): "drop --url",
        ("--server-cpus", "4096"): "may use CPUs",
        ("--server-cpus", "0-1x"): "not a CPU list",
    }
    if USABLE_CPUS:
        everything = ",".join(str(cpu) for cpu in USABLE_CPUS)
        refusals[("--server-cpus", everything)] = "leaves no CPU to the harness"
    if len(USABLE_CPUS) >= 2:
        first = str(USABLE_CPUS[0])
        refusals[("--server-cpus", first, "--harness-cpus", everything)] = "overlap"
    for flags, message in refusals.items():
        done = run_bench(*common, *flags)
        assert done.returncode == 2, (flags, done.stderr)
        assert message in done.stderr, (flags, done.stderr)


@pytest.mark.skipif(
    len(USABLE_CPUS) < 2, reason="needs two usable CPUs: one for the server, one for the harness"
)
def test_bench_runs_the_server_on_cpus_of_its_own(tmp_path: Path) -> None:
    """--server-cpus: the server and its ceiling run there, the harness elsewhere, and the machine's
    time is read on the server's CPUs, none of it the harness's."""
    server_cpu, harness_cpu = USABLE_CPUS[0], USABLE_CPUS[1]

    done, results_path = short_run(
        tmp_path, "--server-cpus", str(server_cpu), "--harness-cpus", str(harness_cpu)
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert f"the harness on {harness_cpu}" in done.stdout
    assert "besides: the harness, on its own CPUs" in done.stdout
    results: dict[str, Any] = json.loads(results_path.read_text())
    assert results["config"]["server_cpus"] == str(server_cpu)
    assert results["config"]["harness_cpus"] == str(harness_cpu)
    assert results["config"]["threads"] == 1  # the server's default: its one CPU
    assert [ceiling["cpus"] for ceiling in results["ceilings"]] == [str(server_cpu)] * 2
    run = results["runs"][0]
    assert run["server"]["cpus_allowed"] == str(server_cpu)
    assert run["server"]["threads"] == 1
    assert run["machine_cpus"] == str(server_cpu)
    assert run["harness_ran_on"] == str(harness_cpu)
    assert run["harness_machine_cpu"]["ours_seconds"] == pytest.approx(run["client_cpu_seconds"])
    # The load's machine time is one CPU's: busy, idle and steal over the wall time.
    machine = run["machine_cpu"]
    cores = (machine["busy_seconds"] + machine["idle_seconds"] + machine["steal_seconds"]) / run[
        "wall_seconds"
    ]
    assert cores == pytest.approx(1.0, abs=0.2)
    parts = run["derived"]["machine_seconds_per_2xx"]
    assert parts["harness"] == 0.0
    assert parts["harness_elsewhere"] > 0
    assert run["derived"]["goodput_over_ceiling"] is not None
    assert run["derived"]["goodput_over_ceiling_without_harness"] is None  # measured as such


def test_peer_urls_ask_for_the_same_output() -> None:
    bench = load_bench()
    params = bench.Params(width=800, quality=80, format="jpeg")
    assert bench.ipx_path(params, "a b.jpg") == "/w_800,q_80,f_jpeg/a%20b.jpg"
    assert bench.thumbor_path(params, "a.jpg") == "/unsafe/800x0/filters:quality(80):format(jpeg)/a.jpg"


def test_a_missing_peer_is_refused_with_its_install_command(tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(image_bytes((64, 48)))
    done = run_bench("--file", str(photo), "--peer", "ipx", "--peer-dir", str(tmp_path / "none"))
    assert done.returncode == 2
    assert "npm install --prefix" in done.stderr


@pytest.mark.slow
def test_bench_runs_a_peer_side_by_side(tmp_path: Path) -> None:
    fake = tmp_path / "peers" / "node_modules" / ".bin" / "ipx"
    fake.parent.mkdir(parents=True)
    fake.write_text(FAKE_IPX.format(python=sys.executable))
    fake.chmod(0o755)

    done, results_path = short_run(
        tmp_path,
        *("--path", "/optimize", "--query", "width=100", "--no-ceiling"),
        *("--peer", "ipx", "--peer-dir", str(fake.parents[2])),
        *("--", "--threads", "1"),
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert "ours / peer" in done.stdout
    [run] = json.loads(results_path.read_text())["runs"]
    peer = run["peer"]
    assert peer["url"].endswith("/w_100,q_80,f_jpeg/photo.jpg")
    assert peer["responses_by_status"].get("200", 0) > 0
    assert peer["server"]["peak_rss_bytes"] > 0
    assert run["derived"]["goodput_over_peer"] is not None

    chart = tmp_path / "chart.png"  # the peer is drawn beside the optimizer
    assert run_bench("chart", str(results_path), str(chart)).returncode == 0
    with Image.open(chart) as png:
        assert png.format == "PNG"


@contextlib.asynccontextmanager
async def serve_once(answer: bytes) -> AsyncIterator[tuple[int, list[bytes]]]:
    """A server that answers every request head with ``answer`` (and hangs up after one ending in
    ``cut``); yields its port and the heads it read."""
    heads: list[bytes] = []
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while head := await reader.readuntil(b"\r\n\r\n"):
                heads.append(head)
                writer.write(answer)
                await writer.drain()
                if answer.endswith(b"cut"):
                    break
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], heads
    finally:
        server.close()
        for writer in writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await server.wait_closed()


async def test_the_client_reports_an_answer_cut_short_as_a_connection_error() -> None:
    bench = load_bench()
    async with serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\ncut") as (port, _):
        connection = bench.Connection(
            "127.0.0.1", port, b"GET / HTTP/1.1\r\n\r\n", b"", expect_continue=False
        )
        with pytest.raises(ConnectionResetError):
            await connection.exchange(5.0)
        connection.close()


async def test_a_body_refused_after_expect_closes_the_connection() -> None:
    # The server answers the head at once, without Connection: close; the body was never sent, so the
    # connection cannot carry another request.
    bench = load_bench()
    async with serve_once(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n") as (port, heads):
        head = b"POST / HTTP/1.1\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        connection = bench.Connection("127.0.0.1", port, head, b"12345", expect_continue=True)
        first = await connection.exchange(5.0)
        assert first.status == 413
        assert connection.writer is None  # closed: the next exchange opens a new connection
        assert (await connection.exchange(5.0)).status == 413
        assert len(heads) == 2
        connection.close()


def test_a_child_that_ended_is_seen_without_being_reaped() -> None:
    """The harness notices a dead server without reaping it, so its CPU time can still be read: reaped
    first, its CPU read as 0 and the run reported negative server CPU."""
    bench = load_bench()
    server = bench.ChildServer()
    server.proc = subprocess.Popen([sys.executable, "-c", "sum(range(3_000_000))"])
    deadline = time.monotonic() + RUN_TIMEOUT
    while server.exited() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.exited() == 0
    assert Path(f"/proc/{server.pid}").exists()  # not reaped: a zombie still has its /proc entry
    assert bench.proc_cpu_seconds(server.pid) > 0
    assert server.proc.wait(timeout=10) == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_child_started_by_the_harness_dies_with_it(tmp_path: Path) -> None:
    """A server started in a session of its own would outlive a harness killed outright (SIGKILL, a
    closed terminal); it gets SIGTERM instead."""
    pid_file = tmp_path / "child.pid"
    parent = (
        f"import subprocess, sys, time; sys.path.insert(0, {str(BENCH.parent)!r}); import bench\n"
        "child = subprocess.Popen(bench.dying_with_us([sys.executable, '-c', 'import time; time.sleep(60)']),"
        " start_new_session=True)\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(60)\n"
    )
    harness = subprocess.Popen([sys.executable, "-c", parent], cwd=ROOT)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline, "the child was not started"
            time.sleep(0.05)
        child = int(pid_file.read_text())
        time.sleep(0.5)  # past the child's own start, to its sleep
        assert_dies_with(harness, child)
    finally:
        if harness.poll() is None:
            harness.kill()
            harness.wait(10)


def assert_dies_with(harness: subprocess.Popen[bytes], child: int) -> None:
    """Kill ``harness`` outright; ``child`` must be gone within 10 s."""
    harness.kill()
    harness.wait(10)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{child}").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_the_ceiling_s_children_die_with_the_harness(tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(image_bytes((64, 48)))
    parent = (
        f"import sys; sys.path.insert(0, {str(BENCH.parent)!r}); import bench\n"
        f"bench.run_ceiling(bench.Path({str(photo)!r}), path='/upload', query='', server_args=[], threads=1,"
        f" seconds=60, source=bench.ROOT, processes=1)\n"
    )
    harness = subprocess.Popen([sys.executable, "-c", parent], cwd=ROOT)
    try:
        bench = load_bench()
        deadline = time.monotonic() + RUN_TIMEOUT
        children: list[int] = []
        while not children:
            assert time.monotonic() < deadline, "the ceiling's child was not started"
            time.sleep(0.05)
            children = [pid for pid in bench.process_tree(harness.pid)[1:] if b"_ceiling" in cmdline(pid)]
        time.sleep(0.5)  # past the prefix, into the child itself
        assert_dies_with(harness, children[0])
    finally:
        if harness.poll() is None:
            harness.kill()
            harness.wait(10)


def cmdline(pid: int) -> bytes:
    """A process's arguments, NUL-separated; empty once it has ended."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_a_server_that_dies_mid_run_fails_the_run_and_its_cpu_is_not_made_up(tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(image_bytes((640, 480)))
    results = tmp_path / "results.json"
    args = ["--file", str(photo), "--users", "2", "--duration", "4", "--no-ceiling", "--quiet"]
    harness = subprocess.Popen(
        [sys.executable, str(BENCH), *args, "--json", str(results)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        bench = load_bench()
        deadline = time.monotonic() + RUN_TIMEOUT
        servers: list[int] = []
        while not servers and time.monotonic() < deadline:
            time.sleep(0.1)
            # The server by its arguments: the harness's other children (git, asking which commit runs)
            # may name the optimizer folder too, and end at once.
            servers = [
                pid for pid in bench.process_tree(harness.pid)[1:] if b"-m\0optimizer\0" in cmdline(pid)
            ]
        time.sleep(2.0)  # well into the load
        os.kill(servers[0], signal.SIGKILL)
        output, _ = harness.communicate(timeout=RUN_TIMEOUT)
    finally:
        if harness.poll() is None:
            harness.kill()
            harness.communicate()  # reaped, and its pipe closed (left open, a later gc.collect() warns)
    assert harness.returncode == 1, output
    assert "INVALID RUN: the server exited with code -9 (SIGKILL)" in output
    assert "images/s (goodput: 2xx/s)" in output and "INVALID (" in output  # not headlined as a result
    # No SIGTERM was sent to a server that had died already, and the report does not say one was.
    assert "server exit code: -9 (SIGKILL), on its own" in output
    assert "after SIGTERM" not in output
    run = json.loads(results.read_text())["runs"][0]
    assert run["server_died_with_code"] == -9
    assert run["invalid"].startswith("the server exited with code -9 (SIGKILL)")
    assert 0 < run["server_died_at_seconds"] < 4
    assert run["server"]["log"]["signals_sent"] == []
    cpu = run["server"]["cpu_seconds"]
    assert cpu is None or cpu > 0, cpu


def test_under_nohup_a_hang_up_stays_ignored() -> None:
    """A long run left going with nohup must survive the terminal closing; without nohup a hang-up
    stops the run and its server."""
    probe = (
        f"import signal, sys; sys.path.insert(0, {str(BENCH.parent)!r}); import bench\n"
        "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
        "bench.main(['--file', '/nonexistent.jpg'])  # sets its handlers, then refuses the file\n"
        "print(signal.getsignal(signal.SIGHUP) is signal.SIG_IGN)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout.strip() == "True", done.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the prefix is Linux's")
def test_a_child_that_cannot_be_started_says_so_in_one_line() -> None:
    bench = load_bench()
    done = subprocess.run(
        bench.dying_with_us(["/nonexistent/peer"]), capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode != 0
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("cannot start /nonexistent/peer: [Errno 2]")


def test_scratch_folders_of_harnesses_gone_are_swept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A harness killed outright runs no clean-up: its folders piled up in /tmp (a review). Only a folder
    whose owner file nobody holds locked goes: a pid read from a name removed a live harness's folder in
    another PID namespace, and a user's bench-2025-12-01-results (the next review)."""
    bench = load_bench()
    monkeypatch.setattr(bench.tempfile, "gettempdir", lambda: str(tmp_path))
    ours = Path(bench.make_scratch("bench-ceiling"))
    gone = tmp_path / "bench-ceiling-abc"  # its harness ended: the file is there, unlocked
    gone.mkdir()
    (gone / bench.OWNER_FILE).touch()
    someone_elses = tmp_path / "bench-2025-12-01-results"
    someone_elses.mkdir()
    other = tmp_path / "bench-peer-xyz"  # held by a harness in another process
    other.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
            str(other / bench.OWNER_FILE),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        bench.sweep_stale_scratch()
        assert not gone.exists()
        assert ours.exists() and someone_elses.exists() and other.exists()
    finally:
        holder.kill()
        holder.communicate(timeout=10)  # reaps it and closes its pipe
        bench.remove_scratch(str(ours))
    assert not ours.exists()
