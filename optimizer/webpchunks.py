"""Refuse a WebP whose chunks would make libwebp's demuxer build a record for each of millions.

libwebp's demuxer, which Pillow opens every WebP with, keeps a record for each chunk and each
animation frame: a review's 25 MB of 3 million empty chunks held 147 MB, and 500 000 one-pixel frames
97 MB, against an estimate of 4, inside Pillow's open. A real WebP is a few chunks, or one per frame of
an animation. The walk here reads the RIFF chunk headers only, up to the limit.
"""

from __future__ import annotations

import struct

from optimizer.errors import StructureLimit

MAX_CHUNKS = 65_536  # frames of an animation included
# What libwebp's demuxer keeps for each chunk or frame (~200 bytes measured in review), for the estimate.
BYTES_PER_CHUNK = 256
_RIFF_HEADER = 12


class TooManyChunks(StructureLimit):
    """The WebP has more chunks than the limit allows."""


def check_chunks(data: bytes) -> int:
    """The number of chunks, or ``TooManyChunks`` past the limit; a WebP cut short or malformed is left
    to libwebp to refuse."""
    pos, size, chunks = _RIFF_HEADER, len(data), 0
    while pos + 8 <= size:
        (length,) = struct.unpack_from("<I", data, pos + 4)
        chunks += 1
        if chunks > MAX_CHUNKS:
            raise TooManyChunks(f"the WebP has more than {MAX_CHUNKS} chunks; an encoder writes a few")
        pos += 8 + length + (length & 1)  # chunks are padded to an even length
    return chunks
