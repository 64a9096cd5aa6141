"""Refuse a GIF whose extension blocks before its first image would keep Pillow's parser looping.

Pillow reads a GIF's blocks in Python up to the first image, one sub-block at a time, and keeps each
comment sub-block as a bytes object of its own: a review's 25 MB GIF of one comment in 12 million
one-byte sub-blocks took 5.2 s of CPU and 1 GB, all while only the header was read. A real GIF has a
few extensions before its first image (a loop count, XMP or an ICC profile in some hundreds of
sub-blocks). The walk here reads the block structure only, up to the limits.
"""

from __future__ import annotations

MAX_EXTENSIONS = 1024
MAX_SUB_BLOCKS = 16_384  # 4 MB of extension data in full 255-byte sub-blocks
_HEADER = 13
_EXTENSION, _IMAGE, _TRAILER = 0x21, 0x2C, 0x3B


class TooManyBlocks(Exception):
    """The GIF has more extension blocks before its first image than the limits allow."""


def check_blocks(data: bytes) -> None:
    """``TooManyBlocks`` past the limits; a GIF cut short or malformed is left to Pillow to refuse."""
    if len(data) < _HEADER:
        return
    flags = data[10]
    pos = _HEADER + (3 << ((flags & 0x07) + 1) if flags & 0x80 else 0)  # the global colour table
    extensions = sub_blocks = 0
    size = len(data)
    while pos < size and data[pos] == _EXTENSION:
        extensions += 1
        pos += 2  # the introducer and the label
        while pos < size and (length := data[pos]):
            sub_blocks += 1
            pos += 1 + length
        pos += 1  # the terminator
        if extensions > MAX_EXTENSIONS or sub_blocks > MAX_SUB_BLOCKS:
            raise TooManyBlocks(
                f"the GIF has more than {MAX_EXTENSIONS} extension blocks or {MAX_SUB_BLOCKS} sub-blocks "
                "before its first image; an encoder writes a few"
            )
