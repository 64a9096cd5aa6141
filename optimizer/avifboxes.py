"""Refuse an AVIF whose boxes would make libavif build a record for each of very many entries.

libavif, which Pillow opens AVIF with, parses every item and every sample of a sequence when the file
is opened, with a record for each: a review's 3.7 MB AVIF of 160 000 items took 15 s of CPU and 225 MB
(the time grows with the square of the items), and a sequence declaring 2 million one-byte samples held
171 MB, all against estimates of 4, before the memory budget was asked. A real AVIF has a few items (a
grid some hundreds) and a sequence one sample per frame. The walk here reads box headers and the entry
counts libavif sizes its records by, up to the limits.
"""

from __future__ import annotations

import struct

MAX_ITEMS = 4096  # items, their locations and property associations
MAX_SAMPLES = 16_384  # samples of an image sequence, and its table entries
_MAX_DEPTH = 8
# Boxes that hold boxes; "meta" is a full box, its children after 4 bytes of version and flags.
_CONTAINERS = frozenset(
    {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"dinf", b"iprp", b"ipco", b"edts", b"meta"}
)
# Full boxes with an entry count: where it is after the box header, its format, and what it counts.
_ITEM_COUNTS = {b"ipma": (4, ">I")}
_SAMPLE_COUNTS = {b"stsz": (8, ">I"), b"stz2": (8, ">I"), b"stts": (4, ">I"), b"stsc": (4, ">I")}
_SAMPLE_COUNTS |= {b"stco": (4, ">I"), b"co64": (4, ">I"), b"stss": (4, ">I"), b"ctts": (4, ">I")}


class TooManyEntries(Exception):
    """The AVIF declares more items or samples than the limits allow."""


MAX_BOXES = 65_536  # a real AVIF has some dozens; 3 million tiny ones took the walk itself 1 s


def check_boxes(data: bytes) -> None:
    """``TooManyEntries`` past the limits; boxes cut short or malformed end the walk (libavif refuses
    or ignores them)."""
    try:
        _walk(data, 0, len(data), 0, [0])
    except (struct.error, IndexError):
        return


def _walk(data: bytes, start: int, end: int, depth: int, walked: list[int]) -> None:
    pos = start
    while pos + 8 <= end:
        walked[0] += 1
        if walked[0] > MAX_BOXES:
            raise TooManyEntries(f"the AVIF has more than {MAX_BOXES} boxes; the limit is {MAX_BOXES}")
        size, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if size == 1:
            (size,) = struct.unpack_from(">Q", data, pos + 8)
            header = 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            return
        body = pos + header
        if kind in _CONTAINERS and depth < _MAX_DEPTH:
            _walk(data, body + (4 if kind == b"meta" else 0), pos + size, depth + 1, walked)
            if kind == b"stbl":
                _check_samples(data, body, pos + size)
        elif kind == b"iref":
            _check_references(data, body, pos + size)
        else:
            _count(data, kind, body)
        pos += size


def _children(data: bytes, start: int, end: int) -> dict[bytes, int]:
    """The body offsets of a container's direct children, by type (the first of each)."""
    found: dict[bytes, int] = {}
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        if size < 8 or pos + size > end:
            break
        found.setdefault(kind, pos + 8)
        pos += size
    return found


def _check_samples(data: bytes, start: int, end: int) -> None:
    """The samples a sample table makes, not its entries: one stsc entry of 2 million samples per chunk
    made libavif 2 million records, 192 MiB (found in review)."""
    children = _children(data, start, end)
    chunks = 0
    for kind in (b"stco", b"co64"):
        if kind in children:
            chunks = max(chunks, struct.unpack_from(">I", data, children[kind] + 4)[0])
    if b"stsc" in children:
        at = children[b"stsc"]
        (entries,) = struct.unpack_from(">I", data, at + 4)
        widest = max(
            (struct.unpack_from(">I", data, at + 8 + 12 * i + 4)[0] for i in range(entries)), default=0
        )
        _limit(widest * max(chunks, 1), MAX_SAMPLES, "samples (chunks x samples per chunk)")
    if b"stts" in children:
        at = children[b"stts"]
        (entries,) = struct.unpack_from(">I", data, at + 4)
        samples = sum(struct.unpack_from(">I", data, at + 8 + 8 * i)[0] for i in range(entries))
        _limit(samples, MAX_SAMPLES, "samples (time-to-sample)")


def _check_references(data: bytes, start: int, end: int) -> None:
    """Each item id an iref reference names is an item to libavif, found by a search through all of
    them: 60 000 ids in a 120 KB file took 2.2 s (found in review)."""
    wide = data[start] != 0  # version 1: 32-bit item ids
    pos, named = start + 4, 0
    while pos + 8 <= end:
        size, _kind = struct.unpack_from(">I4s", data, pos)
        if size < 8 or pos + size > end:
            break
        count_at = pos + 8 + (4 if wide else 2)
        named += struct.unpack_from(">H", data, count_at)[0] + 1
        _limit(named, MAX_ITEMS, "item references")
        pos += size


def _count(data: bytes, kind: bytes, body: int) -> None:
    version = data[body]
    if kind == b"iinf":
        (items,) = struct.unpack_from(">H" if version == 0 else ">I", data, body + 4)
        _limit(items, MAX_ITEMS, "items")
    elif kind == b"iloc":
        (items,) = struct.unpack_from(">H" if version < 2 else ">I", data, body + 6)
        _limit(items, MAX_ITEMS, "item locations")
    elif kind in _ITEM_COUNTS:
        at, code = _ITEM_COUNTS[kind]
        _limit(struct.unpack_from(code, data, body + at)[0], MAX_ITEMS, "item properties")
    elif kind in _SAMPLE_COUNTS:
        at, code = _SAMPLE_COUNTS[kind]
        _limit(struct.unpack_from(code, data, body + at)[0], MAX_SAMPLES, "samples")


def _limit(count: int, limit: int, what: str) -> None:
    if count > limit:
        raise TooManyEntries(f"the AVIF declares {count} {what}; the limit is {limit}")
