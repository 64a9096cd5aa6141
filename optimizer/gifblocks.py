"""Refuse a GIF whose extension blocks before its first image would keep Pillow's parser looping.

Pillow reads a GIF's blocks in Python up to the first image, one sub-block at a time, and keeps each
comment sub-block as a bytes object of its own: a review's 25 MB GIF of one comment in 12 million
one-byte sub-blocks took 5.2 s of CPU and 1 GB, all while only the header was read. A real GIF has a
few extensions before its first image (a loop count, XMP or an ICC profile in some hundreds of
sub-blocks). The walk here reads the block structure only, up to the limits.
"""

from __future__ import annotations

from optimizer.errors import StructureLimit

MAX_EXTENSIONS = 1024
MAX_SUB_BLOCKS = 16_384  # 4 MB of extension data in full 255-byte sub-blocks
MAX_JUNK = 65_536  # bytes that start no block, which Pillow steps over one at a time
_HEADER = 13
_EXTENSION, _IMAGE, _TRAILER = 0x21, 0x2C, 0x3B


class TooManyBlocks(StructureLimit):
    """The GIF has more extension blocks before its first image than the limits allow."""


def check_blocks(data: bytes) -> int:
    """``TooManyBlocks`` past the limits; a GIF cut short or malformed is left to Pillow to refuse.
    Returns the pixels of the canvas Pillow makes for the first image (0 if there is none to read):
    Pillow widens the canvas to a frame larger than the screen, and allocates the frame's disposal
    buffer, as it opens the file, before any check of ours can see the size. A review's 49-byte GIF
    of one 65535x2730 frame took 171 MiB that way, then was refused for its pixels.

    Walks as Pillow reads: up to the first image or the trailer, stepping over bytes that start no block
    one at a time (a stray byte before the extensions let a review's flood past the first version)."""
    if len(data) < _HEADER:
        return 0
    flags = data[10]
    pos = _HEADER + (3 << ((flags & 0x07) + 1) if flags & 0x80 else 0)  # the global colour table
    extensions = sub_blocks = junk = 0
    size = len(data)
    while pos < size and data[pos] not in (_IMAGE, _TRAILER):
        if data[pos] != _EXTENSION:
            junk += 1
            if junk > MAX_JUNK:
                raise TooManyBlocks(f"the GIF has more than {MAX_JUNK} stray bytes before its first image")
            pos += 1
            continue
        extensions += 1
        if extensions > MAX_EXTENSIONS:
            raise TooManyBlocks(
                f"the GIF has more than {MAX_EXTENSIONS} extension blocks before its first image"
            )
        pos += 2  # the introducer and the label
        while pos < size and (length := data[pos]):
            sub_blocks += 1
            if sub_blocks > MAX_SUB_BLOCKS:
                raise TooManyBlocks(
                    f"the GIF has more than {MAX_SUB_BLOCKS} extension sub-blocks before its first image; an "
                    "encoder writes a few"
                )
            pos += 1 + length
        pos += 1  # the terminator
    if pos + 9 > size or data[pos] != _IMAGE:
        return 0
    screen_width, screen_height = int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    left, top, width, height = (
        int.from_bytes(data[at : at + 2], "little") for at in range(pos + 1, pos + 9, 2)
    )
    return max(screen_width, left + width) * max(screen_height, top + height)
