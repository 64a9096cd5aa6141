"""Turn a request's query string into pipeline ``Params``, refusing anything unknown or out of range.

A typo such as ``?widht=300`` is answered with 400 naming the parameter rather than silently ignored:
the client would otherwise get a full-size image and never learn why.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from multidict import MultiMapping

from optimizer.errors import InvalidParameter
from optimizer.pipeline import Params
from optimizer.settings import OUTPUT_FORMATS, Settings

_FORMAT_ALIASES = {"jpg": "jpeg"}
_BOOLEANS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


@dataclass(frozen=True, slots=True)
class RouteDefaults:
    """What a route does when the query string is silent (``/upload`` keeps the Go service's contract)."""

    width: int | None = None
    format: str = "jpeg"
    quality: int | None = None  # None: the per-format default from the settings
    enlarge: bool = False


_MAX_DIGITS = 9  # past any limit here, and short of what int() parses slowly


def _integer(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        # ASCII digits only: int() also takes "+300", "3_00" and "٣٠٠", each another spelling of the same
        # request (another cache key, another string to sign). Surrounding spaces are stripped before.
        if not (text.isascii() and text.isdigit() and len(text) <= _MAX_DIGITS):
            raise ValueError(f"expected a whole number from {low} to {high}")
        value = int(text)
        if not low <= value <= high:
            raise ValueError(f"expected a whole number from {low} to {high}, got {value}")
        return value

    return parse


def _output_format(text: str) -> str:
    name = _FORMAT_ALIASES.get(text.lower(), text.lower())
    if name not in OUTPUT_FORMATS:
        raise ValueError(f"expected one of {', '.join(OUTPUT_FORMATS)}")
    return name


def _boolean(text: str) -> bool:
    try:
        return _BOOLEANS[text.lower()]
    except KeyError:
        raise ValueError("expected 1 or 0") from None


def parse_params(
    query: MultiMapping[str],
    settings: Settings,
    defaults: RouteDefaults,
    consumed: frozenset[str] = frozenset(),
) -> Params:
    """``Params`` for this request; ``InvalidParameter`` names the first offending parameter.

    ``consumed`` names parameters another layer has already handled (the URL signature).
    """
    parsers: Mapping[str, Callable[[str], Any]] = {
        "width": _integer(1, settings.max_dimension),
        "height": _integer(1, settings.max_dimension),
        "format": _output_format,
        "quality": _integer(1, 100),
        "enlarge": _boolean,
    }
    values: dict[str, Any] = {}
    for name in query:
        if name in consumed:
            continue
        if name not in parsers:
            raise InvalidParameter(name, f"unknown parameter; known: {', '.join(parsers)}")
        given = query.getall(name)
        if len(given) > 1 or name in values:
            raise InvalidParameter(name, "given more than once")
        raw = given[0]
        try:
            values[name] = parsers[name](raw.strip())
        except ValueError as exc:
            raise InvalidParameter(name, str(exc)) from None

    output_format: str = values.get("format", defaults.format)
    box_given = "width" in values or "height" in values
    quality = values.get("quality", defaults.quality)
    return Params(
        width=values.get("width", None if box_given else defaults.width),
        height=values.get("height"),
        format=output_format,
        quality=quality if quality is not None else settings.default_quality(output_format),
        enlarge=values.get("enlarge", defaults.enlarge),
        background=settings.background_rgb,
    )
