"""Refuse a TIFF whose first directory would keep Pillow's parser busy in Python.

Pillow reads the first image file directory entry by entry in Python, turns every numeric value into a
Python int (36 bytes or more each), and for an uncompressed TIFF makes one Python tile per strip: a
review's 23 MB TIFF of a 2x2 image with 2 000 000 strip offsets took 9.7 s of CPU and 620 MB, most of
it while only the header was being read, before the memory budget was asked. A real TIFF has a few
dozen entries and at most tens of thousands of values (the offsets and byte counts of its strips).
The walk here reads the directory's entries only, up to the limits.
"""

from __future__ import annotations

import struct

MAX_ENTRIES = 4096
# Numeric values (SHORT, LONG, RATIONAL, FLOAT, ...) whose data lies in the file, all tags together:
# 65 536 strips with their byte counts (a 50 Mpx image of one row per strip has 7000), ~0.3 s of Pillow.
MAX_VALUES = 131_072
# Bytes per value of the numeric field types (TIFF 6.0 and BigTIFF); bytes, ASCII and UNDEFINED data
# stays one bytes object in Pillow.
_NUMERIC_SIZE = {3: 2, 4: 4, 5: 8, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}


class TooManyValues(Exception):
    """The TIFF's first directory is larger than the limits allow."""


def check_directory(data: bytes) -> None:
    """``TooManyValues`` past the limits; a directory cut short or malformed is left to Pillow."""
    order = {b"II": "<", b"MM": ">"}.get(data[:2])
    if order is None or len(data) < 16:
        return
    (magic,) = struct.unpack_from(order + "H", data, 2)
    if magic == 42:
        (offset,) = struct.unpack_from(order + "I", data, 4)
        count_format, entry_format, entry_size = "H", "HHII", 12
    elif magic == 43:  # BigTIFF
        (offset,) = struct.unpack_from(order + "Q", data, 8)
        count_format, entry_format, entry_size = "Q", "HHQQ", 20
    else:
        return
    count_size = struct.calcsize(count_format)
    if offset + count_size > len(data):
        return
    (entries,) = struct.unpack_from(order + count_format, data, offset)
    if entries > MAX_ENTRIES:
        raise TooManyValues(f"the TIFF's directory has {entries} entries; the limit is {MAX_ENTRIES}")
    values = 0
    at = offset + count_size
    for _ in range(entries):
        if at + entry_size > len(data):
            return
        _tag, kind, count, _value = struct.unpack_from(order + entry_format, data, at)
        size = _NUMERIC_SIZE.get(kind)
        if size is not None and count * size <= len(data):  # Pillow skips values the file cannot hold
            values += count
            if values > MAX_VALUES:
                raise TooManyValues(
                    f"the TIFF's directory holds more than {MAX_VALUES} numeric values; an encoder writes "
                    "a few thousand"
                )
        at += entry_size
