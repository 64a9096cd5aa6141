"""Refuse a PNG whose chunks would keep Pillow's parser looping in Python.

Pillow reads a PNG chunk by chunk in Python: each ancillary chunk at opening or after the image data
(``PngImagePlugin``), each IDAT as the decoder asks for data. A review's 25 MB of 2.2 million empty
private chunks took 8.1 s of CPU; a real PNG has a handful of ancillary chunks and its image data in
chunks of 8-64 KiB (libpng, Go and Skia write 8 KiB, Pillow 64 KiB). The walk here reads only the
chunk headers, up to the limits, so its own cost is bounded too.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from optimizer.errors import StructureLimit

# Chunks other than image data (IDAT, and APNG's fdAT and fcTL, which Pillow reads frame by frame),
# IHDR and IEND included.
MAX_ANCILLARY_CHUNKS = 1024
# All chunks: a 25 MiB PNG of 1 KiB IDATs is 25 600; Pillow goes through 65 536 empty ones in ~0.04 s.
MAX_CHUNKS = 65536
# ICC profile chunks. The standard allows one; Pillow inflates each (up to 1 MiB) as it opens the file:
# a review's 1 MB PNG of 990 of them took 2 s of CPU per open, twice a request.
MAX_ICC_CHUNKS = 4
_IMAGE_DATA = frozenset({b"IDAT", b"fdAT", b"fcTL"})
_SIGNATURE = 8
_CHUNK_OVERHEAD = 12  # length, type and CRC


class TooManyChunks(StructureLimit):
    """The PNG has more chunks than the limits allow."""


@dataclass(frozen=True, slots=True)
class PngChunks:
    """What the memory estimate needs from the walk: the text chunks after the image data, which Pillow
    reads with the pixels, not at open."""

    late_text_bytes: int = 0  # tEXt, as stored
    late_compressed_text: int = 0  # zTXt and iTXt, each inflated up to Pillow's limit
    largest_ancillary: int = 0  # the longest chunk besides the image data, which Pillow reads whole
    private_bytes: int = 0  # private chunks (second letter lower case), which Pillow keeps while open
    # The first cICP chunk before the image data (colour primaries, transfer, matrix, full range): the
    # colour description that outranks an ICC profile, which Pillow does not read.
    cicp: tuple[int, int, int, int] | None = None


def check_chunks(data: bytes) -> PngChunks:
    """``TooManyChunks`` past the limits; a PNG cut short or malformed is left to Pillow to refuse."""
    pos, size = _SIGNATURE, len(data)
    chunks = ancillary = profiles = late_text = late_compressed = largest = private = 0
    image_seen = False
    cicp: tuple[int, int, int, int] | None = None
    while pos + 8 <= size:
        length, kind = struct.unpack_from(">I4s", data, pos)
        chunks += 1
        if kind not in _IMAGE_DATA:
            ancillary += 1
            largest = max(largest, min(length, size - pos))
            if kind[1:2].islower():
                private += min(length, size - pos)
        image_seen = image_seen or kind == b"IDAT"
        if image_seen and kind == b"tEXt":
            late_text += length
        elif image_seen and kind in (b"zTXt", b"iTXt"):
            late_compressed += 1
        if kind == b"cICP" and cicp is None and not image_seen and length == 4 and pos + 12 <= size:
            cicp = (data[pos + 8], data[pos + 9], data[pos + 10], data[pos + 11])
        if kind == b"iCCP":
            profiles += 1
            if profiles > MAX_ICC_CHUNKS:
                raise TooManyChunks(
                    f"the PNG has more than {MAX_ICC_CHUNKS} ICC profile chunks; the standard allows one"
                )
        if chunks > MAX_CHUNKS or ancillary > MAX_ANCILLARY_CHUNKS:
            raise TooManyChunks(
                f"the PNG has more than {MAX_CHUNKS} chunks, or more than {MAX_ANCILLARY_CHUNKS} besides "
                "its image data; an encoder writes a few"
            )
        if kind == b"IEND":
            break
        pos += _CHUNK_OVERHEAD + length
    return PngChunks(late_text, late_compressed, largest, private, cicp)
