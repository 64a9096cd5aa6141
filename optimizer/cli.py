"""The ``optimizer`` command line: flags and environment to ``Settings``, JSON logging, then either one
server in this process (``optimizer.server``) or a supervisor of several (``optimizer.supervisor``).

Kept apart from ``optimizer.server`` so that a ``--processes`` supervisor never imports aiohttp or
Pillow: it only starts and watches its children, and importing the server made it a third full
interpreter (45 MB of RSS, as much as each worker at rest) beside the workers that do the work.
"""

from __future__ import annotations

import argparse
import faulthandler
import functools
import json
import logging
import os
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TextIO

from optimizer import __version__, allocator, nativelog
from optimizer.nativelog import Relay
from optimizer.settings import (
    Settings,
    SettingsError,
    flag_name,
    parse_value,
    setting_fields,
    unknown_variables,
)
from optimizer.startup import (
    EXIT_BAD_SETTINGS,
    EXIT_CANNOT_START,
    EXIT_FAILED,
    SUPERVISED,
)

__all__ = ["EXIT_BAD_SETTINGS", "main"]

log = logging.getLogger("optimizer")
# Set while fd 2 is relayed (``_capture_native_stderr``): puts fd 2 back and waits for the relay.
_release_stderr: Callable[[], None] | None = None
# How long the relay gets to pass on what is left in its pipe at exit.
RELAY_DRAIN_SECONDS = 1.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    try:
        settings = Settings.from_env(os.environ, **args)
    except SettingsError as exc:
        problems = str(exc).splitlines()
        _early_record(f"invalid settings: {'; '.join(problems)}", event="invalid_settings", problems=problems)
        return EXIT_BAD_SETTINGS
    if settings.processes > 1:
        # A supervisor runs no native code, and its children must inherit the real stderr, not a pipe.
        configure_logging(settings.log_level, capture_native=False)
        allocator.report_restart()
        _warn_unknown_variables()
        from optimizer.supervisor import Supervisor  # noqa: PLC0415 - see the module's docstring

        return Supervisor(settings, list(sys.argv[1:] if argv is None else argv)).run()
    # Imported before stderr is pointed at the log relay: a broken install's traceback (a missing native
    # library, say) then reaches the real stderr whole instead of line by line through a daemon thread.
    try:
        from optimizer.server import run  # noqa: PLC0415 - see the module's docstring
    except (ImportError, OSError) as exc:
        traceback.print_exc()
        print(f"optimizer: cannot start, the installation is broken: {exc}", file=sys.stderr)
        return EXIT_CANNOT_START

    configure_logging(settings.log_level)
    allocator.report_restart()
    if SUPERVISED not in os.environ:  # a supervisor's children would repeat what it said
        _warn_unknown_variables()
    try:
        code = run(settings)
    except Exception:
        # One JSON record with the whole traceback, written by the handler on the real stderr: printed
        # by the interpreter instead, it would go through the relay line by line, and could be cut off
        # by the exit.
        log.exception("the server stopped on an unexpected error", extra={"fields": {"event": "crashed"}})
        code = EXIT_FAILED
    finally:
        if _release_stderr is not None:
            _release_stderr()
    if code != 0 and any(t.name.startswith("optimizer-worker") for t in threading.enumerate()):
        # A worker is still inside Pillow and cannot be interrupted; the interpreter would wait for it
        # at exit, past the deadline the operator set. Leave now.
        logging.shutdown()
        os._exit(code)
    return code


class JsonFormatter(logging.Formatter):
    """One JSON object per line: easy to grep by eye, easy for a log pipeline to parse."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def _early_record(message: str, **fields: Any) -> None:
    """One JSON error line on stderr before logging is set up (its level is a setting), without setting
    it up: ``main`` is also called by tests and embedders, whose logging must stay theirs."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, (), None, extra={"fields": fields})
    print(JsonFormatter().format(record), file=sys.stderr)


def _warn_unknown_variables() -> None:
    for name, close in unknown_variables(os.environ):
        log.warning(
            "%s is not a setting and is ignored%s",
            name,
            f"; did you mean {close}?" if close else "",
            extra={"fields": {"event": "unknown_setting", "variable": name, "did_you_mean": close}},
        )


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """A mistyped flag or value as the same JSON line as an invalid setting (exit 2, as argparse)."""
        _early_record(f"{message} (see --help)", event="invalid_settings", problems=[message])
        sys.exit(EXIT_BAD_SETTINGS)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="optimizer",
        description="Image-optimization HTTP service. Every flag can also be set by the environment "
        "variable named in its help; a flag wins over the variable.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        # No abbreviations: "--thread 6" would set --threads, but the supervisor looks for the flags
        # its children must not be given twice by their full names (optimizer.supervisor.child_flags).
        allow_abbrev=False,
    )
    defaults = Settings()
    for spec in setting_fields():
        default = getattr(defaults, spec.name)
        parser.add_argument(
            flag_name(spec.name),
            dest=spec.name,
            metavar=spec.metadata["env"],
            default=argparse.SUPPRESS,
            type=functools.partial(_flag_value, spec.name),
            help=f"{spec.metadata['help']} [env {spec.metadata['env']}; default: {default}]",
        )
    parser.add_argument("--version", action="version", version=f"optimizer {__version__}")
    return parser


def _flag_value(name: str, text: str) -> Any:
    try:
        return parse_value(name, text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def configure_logging(level: str, *, capture_native: bool = True) -> None:
    stream = _capture_native_stderr() if capture_native else sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Pillow reports malformed files as Python warnings; route them through the JSON log too.
    logging.captureWarnings(True)
    # A failing log write must not be reported on sys.stderr: that is the relay's own pipe.
    logging.raiseExceptions = False


def _capture_native_stderr() -> TextIO:
    """Keep stderr JSON lines only: C libraries (libtiff, libjpeg) write their messages straight to file
    descriptor 2. Point fd 2 at a pipe whose lines a thread logs as JSON records ("optimizer.native", at
    a bounded rate: ``optimizer.nativelog``), and return a stream on the real stderr for the log handler.
    faulthandler writes to the real stderr directly, so a crash's traceback never depends on that
    thread."""
    real = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    faulthandler.enable(file=real)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    sys.stderr = os.fdopen(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
    relaying = threading.Thread(target=Relay(read_end).run, name="optimizer-native-stderr", daemon=True)
    relaying.start()
    nativelog.start_marks(write_end)  # the relay names the request each line came with

    def release() -> None:
        """At exit: fd 2 back to the real stderr, which closes the pipe's last write end, so the relay
        passes on what is left in it and stops (a daemon thread would otherwise be cut off mid-pipe)."""
        global _release_stderr  # noqa: PLW0603 - one relay per process
        _release_stderr = None
        sys.stderr.flush()
        nativelog.stop_marks()  # closes the marks' own write end; the pipe's last is fd 2, next
        os.dup2(real.fileno(), 2)
        relaying.join(RELAY_DRAIN_SECONDS)

    global _release_stderr  # noqa: PLW0603 - one relay per process
    _release_stderr = release
    return real
