"""``optimizer.settings`` (defaults, environment, validation) and the command line of ``optimizer.cli``."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from optimizer.cli import EXIT_BAD_SETTINGS, main
from optimizer.settings import (
    KNOWN_INPUT_FORMATS,
    MIB,
    Settings,
    SettingsError,
    effective_cpu_count,
    memory_limit,
    parse_value,
    setting_fields,
    unknown_variables,
)

ENV_NAMES = [str(spec.metadata["env"]) for spec in setting_fields()]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No OPTIMIZER_* setting from the surrounding environment leaks into a test of main()."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# --------------------------------------------------------------------------------------------- defaults


def test_documented_defaults() -> None:
    settings = Settings()
    assert settings.host == "127.0.0.1"
    assert settings.port == 8080
    assert settings.queue is None
    assert settings.max_body_bytes == 25 * MIB == 26_214_400
    assert settings.max_pixels == 50_000_000
    assert settings.max_dimension == 8192
    assert settings.read_timeout == 10
    assert settings.min_upload_rate == 16384
    assert settings.drain_seconds == 20
    assert settings.shutdown_delay == 0
    assert settings.jpeg_quality == 80
    assert settings.webp_quality == 80
    assert settings.avif_quality == 60
    assert settings.background == "#ffffff"
    assert settings.background_rgb == (255, 255, 255)
    assert settings.input_formats == KNOWN_INPUT_FORMATS
    assert settings.input_formats == {"jpeg", "png", "webp", "gif", "avif", "tiff", "bmp"}
    assert settings.log_level == "info"


def test_default_threads_is_the_usable_cpu_count() -> None:
    assert Settings().threads == effective_cpu_count() >= 1


def fake_cgroup(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    return root


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "100000 100000"}, 1),  # cgroup v2: --cpus 1
        ({"cpu.max": "150000 100000"}, 2),  # 1.5 CPUs: two threads
        ({"cpu.max": "max 100000"}, None),
        ({"cpu/cpu.cfs_quota_us": "100000", "cpu/cpu.cfs_period_us": "100000"}, 1),  # v1 (found in review)
        ({"cpu,cpuacct/cpu.cfs_quota_us": "50000", "cpu,cpuacct/cpu.cfs_period_us": "100000"}, 1),
        ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
        ({}, None),
    ],
    ids=["v2", "v2-fraction", "v2-unlimited", "v1", "v1-cpuacct", "v1-unlimited", "none"],
)
def test_threads_follow_the_cgroup_cpu_quota_v1_or_v2(
    tmp_path: Path, files: dict[str, str], quota: int | None
) -> None:
    usable = len(os.sched_getaffinity(0))
    expected = usable if quota is None else min(usable, quota)
    assert effective_cpu_count(fake_cgroup(tmp_path, files)) == expected


@pytest.mark.parametrize("name", ["memory.max", "memory/memory.limit_in_bytes"], ids=["v2", "v1"])
def test_memory_limit_follows_the_cgroup_v1_or_v2(tmp_path: Path, name: str) -> None:
    assert memory_limit(fake_cgroup(tmp_path, {name: str(512 * MIB)})) == 512 * MIB
    assert memory_limit(fake_cgroup(tmp_path / "unlimited", {name: "max"})) > 512 * MIB


def test_settings_that_do_not_fit_the_machine_are_named() -> None:
    fits = Settings(threads=2, memory_budget=256 * MIB)
    assert list(fits.conflicts(cpus=2, memory=512 * MIB)) == []
    assert list(Settings(threads=2).conflicts(cpus=2, memory=64 * MIB)) == []  # the default budget fits
    too_much = Settings(threads=16, memory_budget=4096 * MIB)
    conflicts = list(too_much.conflicts(cpus=1, memory=512 * MIB))
    assert len(conflicts) == 2
    assert "OPTIMIZER_MEMORY_BUDGET" in conflicts[0] and "OPTIMIZER_THREADS=16" in conflicts[1]


def test_conflicts_count_every_process() -> None:
    """``--processes 2`` with two threads and a 300 MiB budget each fits one process, not the two."""
    each = Settings(processes=2, threads=2, memory_budget=300 * MIB)
    conflicts = list(each.conflicts(cpus=2, memory=512 * MIB))
    assert len(conflicts) == 2
    assert all("2 processes (OPTIMIZER_PROCESSES)" in line for line in conflicts)
    # More processes than CPUs, with the one thread each the supervisor gives them: both settings named.
    (crowded,) = Settings(processes=4, threads=1).conflicts(cpus=2, memory=512 * MIB)
    assert "4 processes" in crowded and "1 thread(s) each" in crowded
    assert list(Settings(processes=2, threads=1, memory_budget=200 * MIB).conflicts(2, 512 * MIB)) == []


def test_queue_none_means_twice_the_threads() -> None:
    settings = Settings(threads=3)
    assert settings.queue is None
    assert settings.queue_slots == 6
    assert settings.capacity == 9


@pytest.mark.parametrize(
    ("threads", "queue", "capacity"), [(1, None, 3), (4, None, 12), (3, 0, 3), (2, 5, 7)]
)
def test_capacity_is_threads_plus_queue(threads: int, queue: int | None, capacity: int) -> None:
    assert Settings(threads=threads, queue=queue).capacity == capacity


def test_default_quality_per_format() -> None:
    settings = Settings(jpeg_quality=70, webp_quality=75, avif_quality=50)
    assert settings.default_quality("jpeg") == 70
    assert settings.default_quality("webp") == 75
    assert settings.default_quality("avif") == 50
    assert settings.default_quality("png") == 100


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.port = 1  # type: ignore[misc]
    with pytest.raises((dataclasses.FrozenInstanceError, AttributeError, TypeError)):
        settings.unknown = 1  # type: ignore[attr-defined]
    assert settings.port == 8080


def test_settings_are_keyword_only() -> None:
    with pytest.raises(TypeError):
        Settings("0.0.0.0")  # type: ignore[call-arg]


def test_every_field_names_its_variable_and_help() -> None:
    names = {spec.name for spec in setting_fields()}
    assert names == {spec.name for spec in dataclasses.fields(Settings)}
    for spec in setting_fields():
        assert spec.metadata["env"] == "OPTIMIZER_" + spec.name.upper()
        assert spec.metadata["help"]


# ----------------------------------------------------------------------------------------- environment


def test_from_env_empty_is_the_defaults() -> None:
    assert Settings.from_env({}) == Settings()


def test_from_env_reads_every_variable() -> None:
    env = {
        "OPTIMIZER_HOST": "0.0.0.0",
        "OPTIMIZER_PORT": "9000",
        "OPTIMIZER_THREADS": "3",
        "OPTIMIZER_QUEUE": "5",
        "OPTIMIZER_MAX_BODY_BYTES": "1048576",
        "OPTIMIZER_MAX_PIXELS": "1000000",
        "OPTIMIZER_MAX_DIMENSION": "4096",
        "OPTIMIZER_READ_TIMEOUT": "2.5",
        "OPTIMIZER_MIN_UPLOAD_RATE": "1000",
        "OPTIMIZER_DRAIN_SECONDS": "7",
        "OPTIMIZER_SHUTDOWN_DELAY": "1.5",
        "OPTIMIZER_JPEG_QUALITY": "90",
        "OPTIMIZER_WEBP_QUALITY": "70",
        "OPTIMIZER_AVIF_QUALITY": "40",
        "OPTIMIZER_BACKGROUND": "#000",
        "OPTIMIZER_FORMATS": "png,jpeg",
        "OPTIMIZER_LOG_LEVEL": "debug",
        "OPTIMIZER_API_KEYS": "key-one-0123456789,key-two-0123456789",
        "OPTIMIZER_SIGNING_KEY": "signing-0123456789",
        "OPTIMIZER_CORS_ORIGINS": "https://a.example, https://b.example",
        "OPTIMIZER_MEMORY_BUDGET": "536870912",
        "OPTIMIZER_MEMORY_WAIT": "2.5",
        "OPTIMIZER_LINGER_SECONDS": "3",
        "OPTIMIZER_PROCESSES": "2",
        "OPTIMIZER_REUSE_PORT": "true",
        "OPTIMIZER_LOOP_NICE": "0",
        "OPTIMIZER_RESIZER": "vips",  # the test extra installs it
        "OPTIMIZER_JPEG_PROGRESSIVE": "0",
    }
    assert set(env) == set(ENV_NAMES)
    settings = Settings.from_env(env)
    assert settings == Settings(
        host="0.0.0.0",
        port=9000,
        threads=3,
        queue=5,
        resizer="vips",
        jpeg_progressive=False,
        max_body_bytes=1_048_576,
        max_pixels=1_000_000,
        max_dimension=4096,
        read_timeout=2.5,
        min_upload_rate=1000,
        drain_seconds=7.0,
        shutdown_delay=1.5,
        jpeg_quality=90,
        webp_quality=70,
        avif_quality=40,
        background="#000",
        formats="png,jpeg",
        log_level="debug",
        api_keys="key-one-0123456789,key-two-0123456789",
        signing_key="signing-0123456789",
        cors_origins="https://a.example, https://b.example",
        memory_budget=536_870_912,
        memory_wait=2.5,
        linger_seconds=3.0,
        processes=2,
        reuse_port=True,
        loop_nice=0,
    )
    assert settings.api_key_set == {"key-one-0123456789", "key-two-0123456789"}
    assert settings.cors_origin_set == {"https://a.example", "https://b.example"}
    assert isinstance(settings.port, int)
    assert isinstance(settings.read_timeout, float)
    assert settings.background_rgb == (0, 0, 0)
    assert settings.capacity == 8


def test_from_env_strips_whitespace_and_normalises_formats() -> None:
    settings = Settings.from_env({"OPTIMIZER_PORT": " 9000\n", "OPTIMIZER_FORMATS": " PNG , Jpeg ,"})
    assert settings.port == 9000
    assert settings.input_formats == {"png", "jpeg"}


def test_from_env_ignores_other_variables() -> None:
    settings = Settings.from_env({"OPTIMIZER_CORPUS": "/nowhere", "PORT": "1", "HOME": "/root"})
    assert settings == Settings()


def test_overrides_win_over_the_environment() -> None:
    env = {"OPTIMIZER_PORT": "9000", "OPTIMIZER_THREADS": "3"}
    settings = Settings.from_env(env, port=1234)
    assert settings.port == 1234
    assert settings.threads == 3


def test_an_override_hides_a_bad_variable() -> None:
    settings = Settings.from_env({"OPTIMIZER_PORT": "abc"}, port=1234)
    assert settings.port == 1234


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("OPTIMIZER_PORT", "abc", "expected a whole number"),
        ("OPTIMIZER_PORT", "80.5", "expected a whole number"),
        ("OPTIMIZER_PORT", "", "expected a whole number"),
        ("OPTIMIZER_THREADS", "four", "expected a whole number"),
        ("OPTIMIZER_QUEUE", "none", "expected a whole number"),
        ("OPTIMIZER_READ_TIMEOUT", "soon", "expected a number"),
        ("OPTIMIZER_DRAIN_SECONDS", "", "expected a number"),
    ],
)
def test_unparsable_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({name: value})
    assert name in str(caught.value)
    assert message in str(caught.value)
    assert repr(value) in str(caught.value)


def test_unparsable_variables_are_listed_together() -> None:
    env = {"OPTIMIZER_PORT": "abc", "OPTIMIZER_THREADS": "x", "OPTIMIZER_READ_TIMEOUT": "soon"}
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    lines = str(caught.value).splitlines()
    assert len(lines) == 3
    for name in env:
        assert sum(line.startswith(name + "=") for line in lines) == 1


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OPTIMIZER_HOST", ""),
        ("OPTIMIZER_PORT", "-1"),
        ("OPTIMIZER_PORT", "65536"),
        ("OPTIMIZER_THREADS", "0"),
        ("OPTIMIZER_QUEUE", "-1"),
        ("OPTIMIZER_LOOP_NICE", "-1"),
        ("OPTIMIZER_LOOP_NICE", "20"),
        ("OPTIMIZER_MAX_BODY_BYTES", "0"),
        ("OPTIMIZER_MAX_PIXELS", "0"),
        ("OPTIMIZER_MAX_DIMENSION", "-5"),
        ("OPTIMIZER_MIN_UPLOAD_RATE", "0"),
        ("OPTIMIZER_READ_TIMEOUT", "0"),
        ("OPTIMIZER_READ_TIMEOUT", "-1"),
        ("OPTIMIZER_READ_TIMEOUT", "nan"),
        ("OPTIMIZER_READ_TIMEOUT", "inf"),
        ("OPTIMIZER_DRAIN_SECONDS", "0"),
        ("OPTIMIZER_SHUTDOWN_DELAY", "-0.5"),
        ("OPTIMIZER_SHUTDOWN_DELAY", "nan"),
        ("OPTIMIZER_JPEG_QUALITY", "0"),
        ("OPTIMIZER_WEBP_QUALITY", "101"),
        ("OPTIMIZER_AVIF_QUALITY", "-3"),
        ("OPTIMIZER_BACKGROUND", "#ffff"),
        ("OPTIMIZER_BACKGROUND", "red"),
        ("OPTIMIZER_FORMATS", "png,heif"),
        ("OPTIMIZER_FORMATS", "psd"),
        ("OPTIMIZER_FORMATS", ""),
        ("OPTIMIZER_FORMATS", " , "),
        ("OPTIMIZER_LOG_LEVEL", "loud"),
        ("OPTIMIZER_API_KEYS", ","),
        ("OPTIMIZER_CORS_ORIGINS", "https://app.example/"),
        ("OPTIMIZER_CORS_ORIGINS", "app.example"),
        ("OPTIMIZER_MAX_DIMENSION", "20000"),
    ],
)
def test_invalid_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({name: value})
    assert str(caught.value).startswith(name)


@pytest.mark.parametrize(
    ("values", "names"),
    [
        ({"port": 70000, "threads": 0}, ["OPTIMIZER_PORT", "OPTIMIZER_THREADS"]),
        (
            {"jpeg_quality": 0, "background": "#ggg", "log_level": "loud", "read_timeout": math.nan},
            [
                "OPTIMIZER_JPEG_QUALITY",
                "OPTIMIZER_BACKGROUND",
                "OPTIMIZER_LOG_LEVEL",
                "OPTIMIZER_READ_TIMEOUT",
            ],
        ),
    ],
)
def test_every_problem_is_listed(values: dict[str, object], names: list[str]) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings(**values)  # type: ignore[arg-type]
    lines = str(caught.value).splitlines()
    assert len(lines) == len(names)
    for name in names:
        assert sum(line.startswith(name + "=") for line in lines) == 1


def test_settings_error_is_a_value_error() -> None:
    assert issubclass(SettingsError, ValueError)


def test_boundaries_are_valid() -> None:
    Settings(port=0, queue=0, threads=1, shutdown_delay=0, jpeg_quality=1, webp_quality=100, max_pixels=1)
    Settings(port=65535, formats="bmp")


def test_parse_value_by_field_type() -> None:
    assert parse_value("port", " 42 ") == 42
    assert parse_value("queue", "3") == 3
    assert parse_value("read_timeout", "1e1") == 10.0
    assert parse_value("host", " ::1 ") == "::1"


# ------------------------------------------------------------------------------------------ background


@pytest.mark.parametrize(
    ("text", "rgb"),
    [
        ("#fff", (255, 255, 255)),
        ("#ffffff", (255, 255, 255)),
        ("#000", (0, 0, 0)),
        ("#123", (0x11, 0x22, 0x33)),
        ("#0000FF", (0, 0, 255)),
        ("#a1B2c3", (0xA1, 0xB2, 0xC3)),
        (" #fff ", (255, 255, 255)),
        ("abc", (0xAA, 0xBB, 0xCC)),  # the "#" may be left out (a shell comment character)
    ],
)
def test_background_colour(text: str, rgb: tuple[int, int, int]) -> None:
    assert Settings(background=text).background_rgb == rgb


@pytest.mark.parametrize(
    "text", ["", "#", "#ff", "#ffff", "#fffff", "#fffffff", "#ggg", "#gggggg", "white", "rgb(0,0,0)"]
)
def test_bad_background_colour(text: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings(background=text)
    assert "OPTIMIZER_BACKGROUND" in str(caught.value)
    assert "#fff" in str(caught.value)  # the message shows the expected form


@pytest.mark.parametrize(
    "text", ["#0x1234", "#-12345", "#+12345", "#12_345", "#\u0661\u0662\u0663\u0664\u0665\u0666"]
)
def test_background_colour_accepts_only_hex_digits(text: str) -> None:
    with pytest.raises(SettingsError):
        Settings(background=text)


# ------------------------------------------------------------------------------------------ command line


def test_help_lists_every_variable(capsys: pytest.CaptureFixture[str], clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as caught:
        main(["--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    for spec in setting_fields():
        assert str(spec.metadata["env"]) in out
        assert "--" + spec.name.replace("_", "-") in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out.startswith("optimizer ")


def _error_record(err: str) -> dict[str, Any]:
    """The one line the command wrote: a JSON record, as every line it writes is."""
    lines = err.splitlines()
    assert len(lines) == 1, err
    record: dict[str, Any] = json.loads(lines[0])
    assert record["level"] == "error"
    assert record["event"] == "invalid_settings"
    return record


def test_bad_flag_value_is_refused_by_argparse(
    capsys: pytest.CaptureFixture[str], clean_env: pytest.MonkeyPatch
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--port", "abc"])
    assert caught.value.code == 2
    record = _error_record(capsys.readouterr().err)
    assert "--port" in record["message"]
    assert "expected a whole number" in record["message"]


def test_unknown_flag_is_refused(capsys: pytest.CaptureFixture[str], clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--widht", "3"])
    assert caught.value.code == 2
    assert "--widht" in _error_record(capsys.readouterr().err)["message"]


def test_invalid_flag_value(capsys: pytest.CaptureFixture[str], clean_env: pytest.MonkeyPatch) -> None:
    """Named as the flag the operator typed (found in review: the variable was named)."""
    assert main(["--threads", "0"]) == EXIT_BAD_SETTINGS == 2
    captured = capsys.readouterr()
    record = _error_record(captured.err)
    assert record["problems"] == ["--threads=0: must be at least 1"]
    assert record["message"].startswith("invalid settings: ")
    assert captured.out == ""


def test_invalid_environment(capsys: pytest.CaptureFixture[str], clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("OPTIMIZER_PORT", "abc")
    assert main([]) == 2
    assert _error_record(capsys.readouterr().err)["problems"] == [
        "OPTIMIZER_PORT='abc': expected a whole number"
    ]


def test_a_kubernetes_service_link_in_the_port_is_explained(
    capsys: pytest.CaptureFixture[str], clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("OPTIMIZER_PORT", "tcp://10.96.0.12:80")
    assert main([]) == 2
    (problem,) = _error_record(capsys.readouterr().err)["problems"]
    assert problem.startswith("OPTIMIZER_PORT='tcp://10.96.0.12:80': expected a whole number")
    assert "enableServiceLinks: false" in problem


def test_several_problems_are_reported_together(
    capsys: pytest.CaptureFixture[str], clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("OPTIMIZER_JPEG_QUALITY", "0")
    assert main(["--port", "70000", "--log-level", "loud"]) == 2
    problems = _error_record(capsys.readouterr().err)["problems"]
    assert sorted(p.split("=")[0] for p in problems) == ["--log-level", "--port", "OPTIMIZER_JPEG_QUALITY"]


def test_flag_wins_over_a_bad_variable(
    capsys: pytest.CaptureFixture[str], clean_env: pytest.MonkeyPatch
) -> None:
    # The variable alone would be refused; the flag replaces it, so only the other problem is reported
    # (a problem is needed, or main() would start serving).
    clean_env.setenv("OPTIMIZER_THREADS", "0")
    assert main(["--threads", "2", "--port", "-1"]) == 2
    assert _error_record(capsys.readouterr().err)["problems"] == ["--port=-1: must be between 0 and 65535"]


def test_unknown_variables_are_named_with_the_closest_setting() -> None:
    environ = {
        "OPTIMIZER_THREAD": "5",
        "OPTIMIZER_MAX_BODY_SIZE": "1",
        "OPTIMIZER_NONSENSE": "1",
        "OPTIMIZER_PORT": "8080",  # a setting
        "OPTIMIZER_CORPUS": "/corpus",  # the tests' and the benchmark's own
        "OPTIMIZER_SERVICE_HOST": "10.96.0.12",  # Kubernetes service links
        "OPTIMIZER_PORT_80_TCP_ADDR": "10.96.0.12",
        "OTHER_THREADS": "1",
    }
    assert list(unknown_variables(environ)) == [
        ("OPTIMIZER_MAX_BODY_SIZE", "OPTIMIZER_MAX_BODY_BYTES"),
        ("OPTIMIZER_NONSENSE", None),
        ("OPTIMIZER_THREAD", "OPTIMIZER_THREADS"),
    ]


def test_every_problem_is_reported_in_one_round() -> None:
    env = {"OPTIMIZER_PORT": "abc", "OPTIMIZER_JPEG_QUALITY": "0", "OPTIMIZER_BACKGROUND": "#zz"}
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    message = str(caught.value)
    for name in env:
        assert name in message


def test_pixel_limit_cannot_exceed_pillows_own() -> None:
    with pytest.raises(SettingsError, match="OPTIMIZER_MAX_PIXELS"):
        Settings(max_pixels=500_000_000)


def test_spellings_an_operator_would_expect_are_taken() -> None:
    settings = Settings.from_env(
        {
            "OPTIMIZER_LOG_LEVEL": "INFO",
            "OPTIMIZER_FORMATS": "jpg, PNG, tif",
            "OPTIMIZER_CORS_ORIGINS": "https://App.Example, http://localhost:3000",
        }
    )
    assert settings.input_formats == {"jpeg", "png", "tiff"}
    assert settings.cors_origin_set == {"https://app.example", "http://localhost:3000"}


def test_a_blank_switch_is_as_if_unset() -> None:
    """Templated environments (a Helm value left empty) give blank variables: a switch keeps its
    default rather than reading as false (and a blank number is refused, above)."""
    blank = Settings.from_env({"OPTIMIZER_REUSE_PORT": "", "OPTIMIZER_JPEG_PROGRESSIVE": " "})
    default = Settings()
    assert (blank.reuse_port, blank.jpeg_progressive) == (default.reuse_port, default.jpeg_progressive)
    assert Settings.from_env({"OPTIMIZER_CORS_ORIGINS": "null, https://app.example"}).cors_origin_set == {
        "null",
        "https://app.example",
    }
