"""Service settings: one frozen, keyword-only dataclass, validated when it is built.

Each field's metadata names its environment variable and its help text, so the environment reader
(``Settings.from_env``) and the command line (``optimizer.cli``) are generated from this one table and
cannot drift apart. Only ``optimizer.cli`` passes ``os.environ`` in: an embedding application builds a
``Settings(...)`` itself and nothing here reads the process environment behind its back.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optimizer import vips

MIB = 1024 * 1024
# Pillow refuses any image over twice its MAX_IMAGE_PIXELS (default 89 478 485) on its own, before the
# service's check runs, and that limit is process-wide, so the service does not raise it: a larger
# OPTIMIZER_MAX_PIXELS could never take effect.
PILLOW_PIXEL_CEILING = 2 * 89_478_485

# The formats a client may upload, by the names used in OPTIMIZER_FORMATS. Anything else is refused with
# 415 before Pillow sees it (see optimizer.sniff).
KNOWN_INPUT_FORMATS = frozenset({"jpeg", "png", "webp", "gif", "avif", "tiff", "bmp"})
OUTPUT_FORMATS = ("jpeg", "png", "webp", "avif")
LOG_LEVELS = ("debug", "info", "warning", "error")
# The engines that can do the Lanczos step (see optimizer.vips); Pillow does everything else either way.
RESIZERS = ("pillow", "vips")
# Shorter API keys or signing keys are guessable; refuse them at start.
MIN_SECRET_LENGTH = 16
# The widest or tallest output every format can write: WebP's limit (JPEG's is 65500). A larger
# OPTIMIZER_MAX_DIMENSION would be accepted, then fail as a 500 in the encoder.
MAX_OUTPUT_DIMENSION = 16383
# Input format names accepted for OPTIMIZER_FORMATS beyond the canonical ones (as ``format=jpg`` is).
_INPUT_ALIASES = {"jpg": "jpeg", "tif": "tiff"}
# An allowed browser origin: a scheme, a host and perhaps a port, nothing after (browsers send no path).
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#\s]+")


class SettingsError(ValueError):
    """One or more settings are invalid; the message lists every problem, one per line."""


CGROUP_ROOT = Path("/sys/fs/cgroup")


def effective_cpu_count(cgroup: Path = CGROUP_ROOT) -> int:
    """CPUs this process may really use: its affinity mask, further capped by a cgroup CPU quota (v2's
    ``cpu.max``, or v1's ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``).

    ``os.cpu_count()`` reports the host's cores even in a container limited to one, which would size the
    pool for work it can never run in parallel.
    """
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cpu_quota(cgroup)
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def _cpu_quota(cgroup: Path) -> float | None:
    """CPUs' worth of time the cgroup may use, if it is limited: v2, else v1 (Docker and Kubernetes on
    older hosts; a v1 quota was ignored until a review found ``--cpus 1`` given two threads)."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for controller in ("cpu", "cpu,cpuacct"):
        try:
            quota_us = int((cgroup / controller / "cpu.cfs_quota_us").read_text())
            period_us = int((cgroup / controller / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None  # -1: no quota
    return None


def memory_limit(cgroup: Path = CGROUP_ROOT) -> int:
    """Memory this process may use: the cgroup limit (v2, then v1) when there is one, else the RAM."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in (cgroup / "memory.max", cgroup / "memory" / "memory.limit_in_bytes"):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < ram:
            return int(text)
    return ram


def default_memory_budget() -> int:
    """Half the memory limit: the other half is for the interpreter, uploads in flight and encoders."""
    return memory_limit() // 2


def _setting(default: Any, env: str, help: str, *, secret: bool = False) -> Any:
    # Secrets stay out of repr(), so logging the settings cannot leak them.
    return field(default=default, metadata={"env": env, "help": help}, repr=not secret)


_HEX_COLOUR = re.compile(r"#?(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6})")


def _parse_color(text: str) -> tuple[int, int, int]:
    value = text.strip()
    # fullmatch on ASCII hex digits: int(..., 16) alone would also take "0x", signs and underscores.
    if not _HEX_COLOUR.fullmatch(value):
        raise ValueError("expected a colour like #fff or #ffffff")
    value = value.removeprefix("#")
    if len(value) == 3:
        value = "".join(ch * 2 for ch in value)
    number = int(value, 16)
    return (number >> 16) & 0xFF, (number >> 8) & 0xFF, number & 0xFF


@dataclass(frozen=True, kw_only=True, slots=True)
class Settings:
    """Everything the service can be told. ``Settings()`` has the documented defaults."""

    host: str = _setting("127.0.0.1", "OPTIMIZER_HOST", "address to listen on (the container sets 0.0.0.0)")
    port: int = _setting(8080, "OPTIMIZER_PORT", "TCP port to listen on (0 picks a free port)")
    processes: int = _setting(
        1,
        "OPTIMIZER_PROCESSES",
        "server processes sharing the port (SO_REUSEPORT), each with its own loop, gate and pool",
    )
    reuse_port: bool = _setting(
        False, "OPTIMIZER_REUSE_PORT", "bind with SO_REUSEPORT, so several processes can share the port"
    )
    threads: int = field(
        default_factory=effective_cpu_count,
        metadata={"env": "OPTIMIZER_THREADS", "help": "image worker threads (default: usable CPU count)"},
    )
    queue: int | None = _setting(
        None,
        "OPTIMIZER_QUEUE",
        "admission slots beyond the threads (default: twice the threads); while uploads arrive more "
        "slowly than jobs finish, up to one request per thread more is admitted (the read-ahead)",
    )
    loop_nice: int = _setting(
        10,
        "OPTIMIZER_LOOP_NICE",
        "added to the event loop thread's nice value once the workers have started (0-19; 0 keeps it), "
        "so that image work gets the CPU before a flood of refusals does",
    )
    resizer: str = _setting(
        "pillow",
        "OPTIMIZER_RESIZER",
        "engine of the Lanczos resize: pillow, or vips (about 3x faster; needs the optional wheels: "
        f"{vips.INSTALL_HINT}); Pillow decodes and encodes either way",
    )
    max_body_bytes: int = _setting(25 * MIB, "OPTIMIZER_MAX_BODY_BYTES", "largest accepted upload, in bytes")
    max_pixels: int = _setting(
        50_000_000, "OPTIMIZER_MAX_PIXELS", "largest accepted width x height of the decoded frame"
    )
    max_dimension: int = _setting(
        8192,
        "OPTIMIZER_MAX_DIMENSION",
        "largest output width or height, at most 16383; also the cap for width/height",
    )
    read_timeout: float = _setting(
        10.0,
        "OPTIMIZER_READ_TIMEOUT",
        "seconds an upload has to arrive, extended as bytes come in; also a request head's deadline, and "
        "each 256 KiB of an image answer's",
    )
    min_upload_rate: int = _setting(
        16 * 1024,
        "OPTIMIZER_MIN_UPLOAD_RATE",
        "bytes per second that earn an upload one more second of read time (as Apache's mod_reqtimeout)",
    )
    memory_budget: int | None = _setting(
        None,
        "OPTIMIZER_MEMORY_BUDGET",
        "bytes of decode memory, and of image answers not yet sent, all workers together may hold; the "
        "uploads held in memory have half as much beside it (default: half the memory limit)",
    )
    memory_wait: float = _setting(
        5.0, "OPTIMIZER_MEMORY_WAIT", "seconds an image may wait for room in the memory budget before 503"
    )
    linger_seconds: float = _setting(
        2.0,
        "OPTIMIZER_LINGER_SECONDS",
        "after refusing an upload before reading all of it, seconds before its connection is closed, the "
        "rest of its body unread, so that the client sees the answer first (beyond 64 such connections, "
        "the oldest closes once its answer is acknowledged); 0 closes at once (the client may see a reset "
        "instead of the 503)",
    )
    drain_seconds: float = _setting(
        20.0, "OPTIMIZER_DRAIN_SECONDS", "on shutdown, seconds to finish the requests already admitted"
    )
    shutdown_delay: float = _setting(
        0.0,
        "OPTIMIZER_SHUTDOWN_DELAY",
        "on shutdown, seconds /readyz answers 503 while the listener stays open, before the drain",
    )
    jpeg_quality: int = _setting(80, "OPTIMIZER_JPEG_QUALITY", "default JPEG quality (1-100)")
    jpeg_progressive: bool = _setting(
        True,
        "OPTIMIZER_JPEG_PROGRESSIVE",
        "encode JPEG output progressive from 160x160 px up (about 2 percent smaller, shown coarse to fine); "
        "0 encodes baseline, as ipx and imgproxy do, ~2 ms less per 800 px image",
    )
    webp_quality: int = _setting(80, "OPTIMIZER_WEBP_QUALITY", "default WebP quality (1-100)")
    avif_quality: int = _setting(60, "OPTIMIZER_AVIF_QUALITY", "default AVIF quality (1-100)")
    background: str = _setting(
        "#ffffff", "OPTIMIZER_BACKGROUND", "colour transparent pixels are flattened onto for JPEG output"
    )
    formats: str = _setting(
        ",".join(sorted(KNOWN_INPUT_FORMATS)),
        "OPTIMIZER_FORMATS",
        "comma-separated input formats accepted (others get 415)",
    )
    log_level: str = _setting("info", "OPTIMIZER_LOG_LEVEL", "log level: " + ", ".join(LOG_LEVELS))
    api_keys: str = _setting(
        "",
        "OPTIMIZER_API_KEYS",
        "comma-separated API keys; when set, image requests need one in the X-API-Key header",
        secret=True,
    )
    signing_key: str = _setting(
        "",
        "OPTIMIZER_SIGNING_KEY",
        "when set, image requests need a 'signature' parameter: HMAC-SHA256 of path and query",
        secret=True,
    )
    cors_origins: str = _setting(
        "",
        "OPTIMIZER_CORS_ORIGINS",
        "comma-separated origins (scheme://host[:port], or null) allowed to call from a browser, or *",
    )

    def __post_init__(self) -> None:
        problems = list(self._problems())
        if problems:
            raise SettingsError("\n".join(problems))

    def conflicts(self, cpus: int, memory: int) -> Iterator[str]:
        """Valid settings that do not fit the machine (``cpus`` usable, ``memory`` the limit): worth a
        warning at start-up, not a refusal (a reviewer's 4 GiB budget in a 512 MiB container, or 16
        threads on one CPU, started silently). Each of ``processes`` processes has these threads and
        this budget: the ``--processes`` supervisor asks with its children's shares, which it may have
        chosen itself (one thread each for more processes than CPUs), so the warning then names both
        settings rather than blaming one the operator never set (a review)."""
        if self.processes > 1:
            if self.memory_budget is not None and self.memory_budget * self.processes > memory:
                yield (
                    f"{self.processes} processes (OPTIMIZER_PROCESSES) with a memory budget of "
                    f"{self.memory_budget} bytes each (OPTIMIZER_MEMORY_BUDGET) come to more than the "
                    f"memory limit of {memory} bytes: the kernel may kill the service before the budgets "
                    "refuse anything"
                )
            if self.threads * self.processes > cpus:
                yield (
                    f"{self.processes} processes (OPTIMIZER_PROCESSES) of {self.threads} thread(s) each "
                    f"(OPTIMIZER_THREADS) are more than the {cpus} CPU(s) this service may use: the extra "
                    "threads add memory and latency, not speed"
                )
            return
        if self.memory_budget is not None and self.memory_budget > memory:
            yield (
                f"OPTIMIZER_MEMORY_BUDGET={self.memory_budget} is more than the memory limit of {memory} "
                "bytes: the kernel may kill the service before the budget refuses anything"
            )
        if self.threads > cpus:
            yield (
                f"OPTIMIZER_THREADS={self.threads} is more than the {cpus} CPU(s) this process may use: "
                "the extra threads add memory and latency, not speed"
            )

    def _problems(self) -> Iterator[str]:
        name = _env_name

        if not self.host:
            yield f"{name('host')}: must not be empty"
        if not 0 <= self.port <= 65535:
            yield f"{name('port')}={self.port}: must be between 0 and 65535"
        if self.processes < 1:
            yield f"{name('processes')}={self.processes}: must be at least 1"
        if self.threads < 1:
            yield f"{name('threads')}={self.threads}: must be at least 1"
        if self.queue is not None and self.queue < 0:
            yield f"{name('queue')}={self.queue}: must be 0 or more"
        if not 0 <= self.loop_nice <= 19:
            yield f"{name('loop_nice')}={self.loop_nice}: must be between 0 and 19"
        if problem := self._resizer_problem():
            yield f"{name('resizer')}={self.resizer!r}: {problem}"
        for attr in ("max_body_bytes", "max_pixels", "max_dimension", "min_upload_rate"):
            value = getattr(self, attr)
            if value < 1:
                yield f"{name(attr)}={value}: must be at least 1"
        if self.max_dimension > MAX_OUTPUT_DIMENSION:
            yield (
                f"{name('max_dimension')}={self.max_dimension}: must be at most {MAX_OUTPUT_DIMENSION} "
                "(WebP cannot be wider or taller)"
            )
        if self.max_pixels > PILLOW_PIXEL_CEILING:
            yield (
                f"{name('max_pixels')}={self.max_pixels}: must be at most {PILLOW_PIXEL_CEILING} "
                "(Pillow refuses larger images on its own)"
            )
        if self.memory_budget is not None and self.memory_budget < 16 * MIB:
            yield f"{name('memory_budget')}={self.memory_budget}: must be at least {16 * MIB} bytes (16 MiB)"
        if not (self.memory_wait >= 0 and math.isfinite(self.memory_wait)):
            yield f"{name('memory_wait')}={self.memory_wait}: must be 0 or more seconds"
        for attr in ("read_timeout", "drain_seconds"):
            value = getattr(self, attr)
            if not (value > 0 and math.isfinite(value)):
                yield f"{name(attr)}={value}: must be a positive number of seconds"
        if not (self.linger_seconds >= 0 and math.isfinite(self.linger_seconds)):
            yield f"{name('linger_seconds')}={self.linger_seconds}: must be 0 or more seconds"
        if not (self.shutdown_delay >= 0 and math.isfinite(self.shutdown_delay)):
            yield f"{name('shutdown_delay')}={self.shutdown_delay}: must be 0 or more seconds"
        for attr in ("jpeg_quality", "webp_quality", "avif_quality"):
            value = getattr(self, attr)
            if not 1 <= value <= 100:
                yield f"{name(attr)}={value}: must be between 1 and 100"
        try:
            _parse_color(self.background)
        except ValueError as exc:
            yield f"{name('background')}={self.background!r}: {exc}"
        unknown = self.input_formats - KNOWN_INPUT_FORMATS
        if unknown or not self.input_formats:
            yield (
                f"{name('formats')}={self.formats!r}: choose one or more of "
                f"{', '.join(sorted(KNOWN_INPUT_FORMATS))}"
            )
        yield from self._access_problems()
        if self.log_level.lower() not in LOG_LEVELS:
            yield f"{name('log_level')}={self.log_level!r}: choose one of {', '.join(LOG_LEVELS)}"

    def _access_problems(self) -> Iterator[str]:
        """API keys, the signing key and CORS origins: each mistake here would quietly open or close
        the service to some clients."""

        name = _env_name

        if self.api_keys.strip() and not self.api_key_set:
            yield f"{name('api_keys')}: set, but no key in it (leave it empty to serve without keys)"
        if any(len(key) < MIN_SECRET_LENGTH for key in self.api_key_set):
            yield f"{name('api_keys')}: every key must be at least {MIN_SECRET_LENGTH} characters"
        if self.signing_key and len(self.signing_key) < MIN_SECRET_LENGTH:
            yield f"{name('signing_key')}: must be at least {MIN_SECRET_LENGTH} characters"
        for origin in self.cors_origin_set - {"*", "null"}:  # browsers send "null" from sandboxes
            if not _ORIGIN.fullmatch(origin):
                yield (
                    f"{name('cors_origins')}: {origin!r} is not an origin: scheme://host[:port], with no "
                    "path or trailing slash (a browser's Origin header never has one)"
                )

    def _resizer_problem(self) -> str | None:
        if self.resizer not in RESIZERS:
            return f"choose one of {', '.join(RESIZERS)}"
        if self.resizer == "vips":
            # Here, so that a missing wheel stops the start, not the first request. A supervisor
            # (processes > 1) resizes nothing: it checks in a child and stays without libvips.
            try:
                if self.processes > 1:
                    vips.check_in_child()
                else:
                    vips.load()
            except vips.VipsUnavailable as exc:
                return str(exc)
        return None

    # Derived values: computed, not stored, so that they can never disagree with the fields.

    @property
    def queue_slots(self) -> int:
        # Two per thread: jobs ready for each worker while the next uploads arrive. Against one per
        # thread (back to back, with one worker trip per image): S1 +2.5 %, S2 +2.4 %, a flood of
        # immediate retries +12 % (0.78 -> 0.87 x the polite goodput), for +7-10 MB of peak RSS (uploads
        # held) and p95 +35 % under saturation (S1 0.49 -> 0.66 s, S2 0.21 -> 0.28 s); docs/benchmarks.md.
        return 2 * self.threads if self.queue is None else self.queue

    @property
    def capacity(self) -> int:
        """Admission slots: requests being read, waiting for a thread, or running in one."""
        return self.threads + self.queue_slots

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        return _parse_color(self.background)

    @property
    def api_key_set(self) -> frozenset[str]:
        return _split(self.api_keys)

    @property
    def cors_origin_set(self) -> frozenset[str]:
        # Lower case, as browsers send the scheme and host (a port is digits).
        return frozenset(origin.lower() for origin in _split(self.cors_origins))

    @property
    def input_formats(self) -> frozenset[str]:
        return frozenset(_INPUT_ALIASES.get(part.lower(), part.lower()) for part in _split(self.formats))

    def default_quality(self, output_format: str) -> int:
        """The quality used when a request names none (PNG is lossless and ignores it)."""
        return {"jpeg": self.jpeg_quality, "webp": self.webp_quality, "avif": self.avif_quality}.get(
            output_format, 100
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides: Any) -> Settings:
        """Build settings from ``OPTIMIZER_*`` variables; ``overrides`` (e.g. CLI flags) win over them."""
        values: dict[str, Any] = {}
        problems: list[str] = []
        for attr, spec in _FIELDS.items():
            env = str(spec.metadata["env"])
            if attr in overrides:
                values[attr] = overrides[attr]
            elif env in environ and not environ[env].strip() and str(spec.type) == "bool":
                # A blank switch (as templated environments leave them) is as if unset: its default
                # applies, rather than one spelling of false. (A blank number is still refused.)
                continue
            elif env in environ:
                try:
                    values[attr] = parse_value(attr, environ[env])
                except ValueError as exc:
                    problems.append(f"{env}={environ[env]!r}: {exc}{_service_link_hint(env, environ[env])}")
        try:
            # Validate the rest too (unparsable ones fall back to their defaults here), so that one
            # start reports every problem, not one round at a time.
            settings = cls(**values)
        except SettingsError as exc:
            # A value given as a flag is named as the flag the operator typed, not as its variable.
            flags = {_env_name(attr): flag_name(attr) for attr in overrides if attr in _FIELDS}
            problems.extend(
                _NAMED.sub(lambda m: flags.get(m.group(0), m.group(0)), line, count=1)
                for line in str(exc).splitlines()
            )
        if problems:
            raise SettingsError("\n".join(problems))
        return settings


def _split(text: str) -> frozenset[str]:
    return frozenset(part.strip() for part in text.split(",") if part.strip())


_FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(Settings)}


def _env_name(attr: str) -> str:
    """The environment variable of a setting, as error messages name it."""
    return str(_FIELDS[attr].metadata["env"])


def flag_name(attr: str) -> str:
    """The command-line flag of a setting (``optimizer.cli`` makes them the same way)."""
    return "--" + attr.replace("_", "-")


# The variable a validation message starts with (``OPTIMIZER_PORT=70000: ...``, ``OPTIMIZER_HOST: ...``).
_NAMED = re.compile(r"^OPTIMIZER_[A-Z0-9_]+(?=[=:])")

# Variables with the prefix that are not settings and not mistakes: the tests' and the benchmark's own,
# and those Kubernetes adds for a Service named "optimizer" in the namespace (service links:
# OPTIMIZER_SERVICE_HOST, OPTIMIZER_PORT_80_TCP_ADDR, ...; the manifests in deploy/ turn them off).
OTHER_VARIABLES = ("OPTIMIZER_CORPUS", "OPTIMIZER_PEER_DIR")
_NOT_SETTINGS = re.compile(
    "|".join([*OTHER_VARIABLES, r"OPTIMIZER_SERVICE_[A-Z0-9_]+", r"OPTIMIZER_PORT_\d+_[A-Z0-9_]+"])
)


def unknown_variables(environ: Mapping[str, str]) -> Iterator[tuple[str, str | None]]:
    """Each ``OPTIMIZER_*`` variable that is no setting, with the setting it is closest to, if any: a
    misspelt variable would otherwise leave its default in place without a word."""
    prefix = "OPTIMIZER_"
    known = [_env_name(attr) for attr in _FIELDS]
    # Compared without the prefix, which every name shares and would make any two look alike.
    stems = {name.removeprefix(prefix): name for name in known}
    for name in sorted(environ):
        if name.startswith(prefix) and name not in known and not _NOT_SETTINGS.fullmatch(name):
            close = difflib.get_close_matches(name.removeprefix(prefix), stems, n=1, cutoff=0.6)
            yield name, stems[close[0]] if close else None


def _service_link_hint(env: str, value: str) -> str:
    """Kubernetes sets OPTIMIZER_PORT=tcp://10.0.0.1:80 in every pod of a namespace with a Service named
    "optimizer" unless the pod turns service links off: say so rather than leave the operator puzzled."""
    if env == "OPTIMIZER_PORT" and value.strip().startswith("tcp://"):
        return (
            " (this is a Kubernetes service link, set for a Service named optimizer: give the pod "
            "enableServiceLinks: false, as deploy/kubernetes/deployment.yaml does)"
        )
    return ""


def setting_fields() -> list[dataclasses.Field[Any]]:
    """The settings in declaration order, with their ``env`` and ``help`` metadata (for the CLI)."""
    return list(_FIELDS.values())


def parse_value(attr: str, text: str) -> Any:
    """Parse one setting from text (an environment variable or a CLI flag) by its field's type."""
    kind = str(_FIELDS[attr].type)
    text = text.strip()
    if kind.startswith("int"):
        try:
            return int(text)
        except ValueError:
            raise ValueError("expected a whole number") from None
    if kind == "float":
        try:
            return float(text)
        except ValueError:
            raise ValueError("expected a number") from None
    if kind == "bool":
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected 1 or 0 (true or false)")
    return text
