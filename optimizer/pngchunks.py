"""Refuse a PNG whose chunks would keep Pillow's parser looping in Python.

Pillow reads a PNG chunk by chunk in Python: each ancillary chunk at opening or after the image data
(``PngImagePlugin``), each IDAT as the decoder asks for data. A review's 25 MB of 2.2 million empty
private chunks took 8.1 s of CPU; a real PNG has a handful of ancillary chunks and its image data in
chunks of 8-64 KiB (libpng, Go and Skia write 8 KiB, Pillow 64 KiB). The walk here reads only the
chunk headers, up to the limits, so its own cost is bounded too.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, replace

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
class PngColours:
    """The first of each colour chunk before the image data, as Chromium reads them (Pillow keeps the
    last, and does not read cICP; libpng keeps the first gAMA and cHRM, and drops repeated iCCPs)."""

    cicp: tuple[int, int, int, int] | None = None  # primaries, transfer, matrix, full range
    gamma: float | None = None  # gAMA: the encoding exponent
    chromaticity: tuple[float, ...] | None = None  # cHRM: white x, y, then red's, green's and blue's
    srgb: bool = False
    # With more than one iCCP before the image data, the first one's profile (None if it does not
    # inflate): Pillow keeps the last, and a broken later one wiped out a good first one.
    icc_repeated: bool = False
    first_icc: bytes | None = None


# Each colour chunk's length; one of another length is not read.
_COLOUR_CHUNKS = {b"cICP": 4, b"gAMA": 4, b"cHRM": 32, b"sRGB": 1}
# libpng's range for a gAMA (png_colorspace_set_gamma): one outside it is ignored, as Firefox ignores it.
_GAMMA_LOWEST, _GAMMA_HIGHEST = 16, 625_000_000
# The most an ICC profile may inflate to, Pillow's own limit for it (MAX_TEXT_CHUNK).
_MAX_ICC_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class PngChunks:
    """What the memory estimate needs from the walk: the text chunks after the image data, which Pillow
    reads with the pixels, not at open."""

    late_text_bytes: int = 0  # tEXt, as stored
    late_compressed_text: int = 0  # zTXt and iTXt, each inflated up to Pillow's limit
    largest_ancillary: int = 0  # the longest chunk besides the image data, which Pillow reads whole
    private_bytes: int = 0  # private chunks (second letter lower case), which Pillow keeps while open
    colours: PngColours = PngColours()


def check_chunks(data: bytes) -> PngChunks:
    """``TooManyChunks`` past the limits; a PNG cut short or malformed is left to Pillow to refuse."""
    pos, size = _SIGNATURE, len(data)
    chunks = ancillary = profiles = late_text = late_compressed = largest = private = 0
    image_seen = False
    colour_chunks: dict[bytes, bytes] = {}
    early_profiles: list[tuple[int, int]] = []  # where each iCCP before the image data is
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
        if _COLOUR_CHUNKS.get(kind) == length and kind not in colour_chunks and not image_seen:
            colour_chunks[kind] = data[pos + 8 : pos + 8 + length]
        if kind == b"iCCP":
            if not image_seen:
                early_profiles.append((pos + 8, length))
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
    colours = _colours(colour_chunks)
    if len(early_profiles) > 1:
        at, length = early_profiles[0]
        colours = replace(colours, icc_repeated=True, first_icc=_inflated_profile(data[at : at + length]))
    return PngChunks(late_text, late_compressed, largest, private, colours)


def _colours(chunks: dict[bytes, bytes]) -> PngColours:
    cicp = chunks.get(b"cICP")
    gamma = struct.unpack(">I", chunks[b"gAMA"])[0] if b"gAMA" in chunks else None
    chromaticity = struct.unpack(">8I", chunks[b"cHRM"]) if b"cHRM" in chunks else None
    return PngColours(
        cicp=(cicp[0], cicp[1], cicp[2], cicp[3]) if cicp is not None else None,
        gamma=gamma / 100000 if gamma is not None and _GAMMA_LOWEST <= gamma <= _GAMMA_HIGHEST else None,
        chromaticity=tuple(v / 100000 for v in chromaticity) if chromaticity is not None else None,
        srgb=b"sRGB" in chunks,
    )


def _inflated_profile(payload: bytes) -> bytes | None:
    """An iCCP chunk's profile: a name, a zero byte, compression method 0, then zlib's stream."""
    name_end = payload.find(b"\0", 0, 80)
    if name_end < 1 or payload[name_end + 1 : name_end + 2] != b"\0":
        return None
    inflater = zlib.decompressobj()
    try:
        profile = inflater.decompress(payload[name_end + 2 :], _MAX_ICC_BYTES)
    except zlib.error:
        return None
    # A stream cut short (or past the cap) is no profile: its first part would pass for one.
    return profile if inflater.eof and profile else None
