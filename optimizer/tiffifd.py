"""Refuse a TIFF (or an EXIF block, which is one) whose directories would keep Pillow busy in Python.

Pillow reads an image file directory entry by entry in Python, turns every numeric value into a Python
int (~36 bytes each), and for an uncompressed TIFF makes one Python tile per strip. Reviews built:
- a 23 MB TIFF of a 2x2 image with 2 000 000 strip offsets: 9.7 s of CPU and 620 MB, most of it while
  only the header was read, before the memory budget was asked;
- the same with the offsets stored as bytes (Pillow iterates them as ints): 20.6 s and 2.7 GB;
- an EXIF directory of 3 000 000 RATIONALs behind a clean first directory, read when Pillow finishes
  loading a TIFF (``getexif``): 5.9 s and 529 MB; in a PNG's eXIf, 345 MB inside the header's read.
A real TIFF has a few dozen entries per directory and up to some hundred thousand values (the
offsets and byte counts of its strips). The walk here reads the first directory and the EXIF, GPS
and interoperability directories it points at, entries only, up to the limits.
"""

from __future__ import annotations

import contextlib
import struct
from dataclasses import dataclass

from optimizer.errors import StructureLimit

MAX_ENTRIES = 4096  # per directory (a sub-directory past the end of the data is skipped instead)
# Numeric values, inline or whose data lies in the file, all walked directories together: ~40 MB as
# Python ints.
MAX_VALUES = 1_048_576
# Strips or tiles of an uncompressed TIFF, for each of which Pillow makes a Python tile (~5 us, 300 B).
MAX_RAW_STRIPS = 65_536
# Bytes per value of the numeric field types (TIFF 6.0 and BigTIFF). SBYTE (6) becomes a tuple too;
# BYTE (1) stays one bytes object, except in the tags below, which Pillow goes through value by value.
_NUMERIC_SIZE = {3: 2, 4: 4, 5: 8, 6: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}
_TYPE_SIZE = {1: 1, 2: 1, 7: 1, **_NUMERIC_SIZE}
_BYTE = 1
_OFFSETS = frozenset({273, 279, 324, 325})  # StripOffsets, StripByteCounts, TileOffsets, TileByteCounts
_COMPRESSION = 259
_SUB_DIRECTORIES = frozenset({34665, 34853, 40965})  # EXIF, GPS, interoperability


class TooManyValues(StructureLimit):
    """A directory is larger than the limits allow."""


@dataclass(frozen=True, slots=True)
class Summary:
    values: int  # numeric values Pillow turns into ints
    data_bytes: int  # bytes of all the tags' data that lies in the file


def check_directory(data: bytes) -> Summary:
    """The walked directories' sizes, or ``TooManyValues`` past the limits. A directory cut short or
    malformed ends the walk: Pillow refuses or ignores it itself."""
    walk = _Walk(data)
    with contextlib.suppress(struct.error):  # a field cut by the end: Pillow fails on it or ignores it
        walk.run()
    return Summary(walk.values, min(walk.data_bytes, len(data)))


def check_exif(exif: bytes) -> Summary:
    """``check_directory`` for an EXIF block (a TIFF structure, after ``Exif\\0\\0`` in a JPEG)."""
    return check_directory(exif[6:] if exif.startswith(b"Exif\x00\x00") else exif)


class _Walk:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self.values = 0
        self.data_bytes = 0

    def run(self) -> None:
        data = self._data
        order = {b"II": "<", b"MM": ">"}.get(data[:2])
        if order is None or len(data) < 16:
            return
        (magic,) = struct.unpack_from(order + "H", data, 2)
        if magic == 42:
            (first,) = struct.unpack_from(order + "I", data, 4)
            big = False
        elif magic == 43:  # BigTIFF
            (first,) = struct.unpack_from(order + "Q", data, 8)
            big = True
        else:
            return
        # Pillow reads the first directory and the EXIF, GPS and interoperability ones: the walk follows
        # those three pointers from any directory it reads, four directories at most (directories that
        # overlap could otherwise make it read millions of entries, found in review).
        pending: list[tuple[int, bool]] = [(first, True)]
        seen: set[int] = set()
        while pending and len(seen) < MAX_DIRECTORIES:
            offset, is_first = pending.pop(0)
            if offset and offset not in seen:  # 0: none (Pillow reads nothing there)
                seen.add(offset)
                pending += [
                    (pointer, False) for pointer in self._directory(order, big, offset, first=is_first)
                ]
        self.data_bytes = min(self.data_bytes, len(data))  # Pillow keeps at most the file's size of it

    def _directory(self, order: str, big: bool, offset: int, *, first: bool) -> list[int]:
        """Counts one directory's values; the sub-directories it points at."""
        data, size = self._data, len(self._data)
        count_format, head_format, entry_size, inline = ("Q", "HHQ", 20, 8) if big else ("H", "HHI", 12, 4)
        count_size = struct.calcsize(count_format)
        if offset + count_size > size:
            return []
        (entries,) = struct.unpack_from(order + count_format, data, offset)
        if entries > MAX_ENTRIES:
            if first or offset + count_size + entries * entry_size <= size:
                # Pillow reads a sub-directory that fits in the file as surely as the first one (a
                # review's EXIF directory of 5000 entries took it 2.5 s and 218 MB).
                raise TooManyValues(f"a TIFF directory has {entries} entries; the limit is {MAX_ENTRIES}")
            return []  # a pointer into other bytes, past the end: Pillow's read of it fails
        pointers: list[int] = []
        strips = 0
        compressed = False
        at = offset + count_size
        for _ in range(entries):
            if at + entry_size > size:
                break
            tag, kind, count = struct.unpack_from(order + head_format, data, at)
            value_at = at + entry_size - inline
            at += entry_size
            length = count * _TYPE_SIZE.get(kind, 0)
            if length > size:
                continue  # Pillow skips values the file cannot hold
            self.data_bytes += length if length > inline else 0
            if kind in _NUMERIC_SIZE or (kind == _BYTE and tag in _OFFSETS):
                self.values += count
            if tag in (273, 324):
                strips = max(strips, count)
            if count == 1 and kind in _INTEGER and tag in (_COMPRESSION, *_SUB_DIRECTORIES):
                value = self._integer(order, kind, value_at, inline)
                if value is None:
                    continue
                if tag == _COMPRESSION:
                    compressed = value not in (0, 1)
                else:
                    pointers.append(value)  # of any integer type: Pillow follows them all
        if self.values > MAX_VALUES:
            raise TooManyValues(
                f"the TIFF's directories hold more than {MAX_VALUES} numeric values; an encoder writes "
                "a few thousand"
            )
        if first and not compressed and strips > MAX_RAW_STRIPS:
            raise TooManyValues(
                f"the uncompressed TIFF has {strips} strips or tiles; the limit is {MAX_RAW_STRIPS}"
            )
        return pointers

    def _integer(self, order: str, kind: int, value_at: int, inline: int) -> int | None:
        """An entry's single integer value: in its value field, or where that field points when the
        type is wider (an 8-byte integer in a classic TIFF); ``None`` past the end of the data."""
        code = _INTEGER[kind]
        width = struct.calcsize(code)
        at = value_at
        if width > inline:
            (at,) = struct.unpack_from(order + "I", self._data, value_at)
        if at + width > len(self._data):
            return None
        (value,) = struct.unpack_from(order + code, self._data, at)
        return int(value) if value >= 0 else None


MAX_DIRECTORIES = 4
# The integer types, and how to read one: SHORT, LONG, SSHORT, SLONG, IFD, LONG8, SLONG8, IFD8.
_INTEGER = {3: "H", 4: "I", 8: "h", 9: "i", 13: "I", 16: "Q", 17: "q", 18: "Q"}
