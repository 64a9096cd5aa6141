"""Refuse a PNG whose chunks would keep Pillow's parser looping in Python.

Pillow reads a PNG chunk by chunk in Python: each ancillary chunk at opening or after the image data
(``PngImagePlugin``), each IDAT as the decoder asks for data. A review's 25 MB of 2.2 million empty
private chunks took 8.1 s of CPU; a real PNG has a handful of ancillary chunks and its image data in
chunks of 8-64 KiB (libpng, Go and Skia write 8 KiB, Pillow 64 KiB). The walk here reads only the
chunk headers, up to the limits, so its own cost is bounded too.

The walk also finds the chunks Pillow refuses a whole file over where libpng drops the chunk alone (a
"benign error") and browsers draw the image: an ancillary chunk whose CRC is wrong, a colour or
resolution chunk of the wrong length, an ICC profile chunk that holds no profile. ``hiding`` gives
Pillow the upload with those renamed to a type it skips.
"""

from __future__ import annotations

import bisect
import io
import struct
import zlib
from collections.abc import Sequence
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
class PngColours:
    """The first of each colour chunk before the image data, as Chromium reads them (Pillow keeps the
    last, and does not read cICP; libpng keeps the first gAMA and cHRM, and drops repeated iCCPs)."""

    cicp: tuple[int, int, int, int] | None = None  # primaries, transfer, matrix, full range
    gamma: float | None = None  # gAMA: the encoding exponent
    chromaticity: tuple[float, ...] | None = None  # cHRM: white x, y, then red's, green's and blue's
    srgb: bool = False
    # The first ICC profile before the image data (Pillow keeps the last, and a broken later one wiped
    # out a good first one).
    first_icc: bytes | None = None


# Each colour chunk's length; one of another length is not read.
_COLOUR_CHUNKS = {b"cICP": 4, b"gAMA": 4, b"cHRM": 32, b"sRGB": 1}
# The chunks Pillow refuses a file over when their length is not this (libpng drops them).
_FIXED_LENGTHS = {b"gAMA": 4, b"cHRM": 32, b"sRGB": 1, b"pHYs": 9}
# What a hidden chunk is renamed to: ancillary, public (Pillow keeps a private chunk's bytes), unknown.
_HIDDEN = b"sKIp"
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
    hidden: tuple[tuple[int, int], ...] = ()  # (offset, length) of each chunk Pillow must not read


def check_chunks(data: bytes) -> PngChunks:
    """``TooManyChunks`` past the limits; a PNG cut short or malformed is left to Pillow to refuse."""
    pos, size = _SIGNATURE, len(data)
    chunks = ancillary = profiles = late_text = late_compressed = largest = private = 0
    image_seen = False
    colour_chunks: dict[bytes, bytes] = {}
    first_icc: bytes | None = None  # the first usable iCCP before the image data, as its profile
    hidden: list[tuple[int, int]] = []
    view = memoryview(data)  # CRCs and profiles are read in place
    while pos + 8 <= size:
        length, kind = struct.unpack_from(">I4s", data, pos)
        chunks += 1
        whole = pos + _CHUNK_OVERHEAD + length <= size
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
        if kind == b"iCCP":
            profiles += 1
            if profiles > MAX_ICC_CHUNKS:
                raise TooManyChunks(
                    f"the PNG has more than {MAX_ICC_CHUNKS} ICC profile chunks; the standard allows one"
                )
        # Ancillary (dropped, not fatal), and a chunk at all: libpng refuses a type that is not 4 letters.
        if whole and kind not in _IMAGE_DATA and kind[0] & 0x20 and kind.isalpha():
            payload = view[pos + 8 : pos + 8 + length]
            profile = _inflated_profile(payload) if kind == b"iCCP" else None
            stored = struct.unpack_from(">I", data, pos + 8 + length)[0]
            if (
                zlib.crc32(view[pos + 4 : pos + 8 + length]) != stored
                or _FIXED_LENGTHS.get(kind, length) != length
                or (kind == b"iCCP" and profile is None)
            ):
                hidden.append((pos, length))  # from here on as if it were not there
            elif not image_seen and kind not in colour_chunks and _COLOUR_CHUNKS.get(kind) == length:
                colour_chunks[kind] = bytes(payload)
            elif not image_seen and kind == b"iCCP" and first_icc is None:
                first_icc = profile
        if chunks > MAX_CHUNKS or ancillary > MAX_ANCILLARY_CHUNKS:
            raise TooManyChunks(
                f"the PNG has more than {MAX_CHUNKS} chunks, or more than {MAX_ANCILLARY_CHUNKS} besides "
                "its image data; an encoder writes a few"
            )
        if kind == b"IEND":
            break
        pos += _CHUNK_OVERHEAD + length
    colours = _colours(colour_chunks, first_icc)
    return PngChunks(late_text, late_compressed, largest, private, colours, tuple(hidden))


def _colours(chunks: dict[bytes, bytes], first_icc: bytes | None) -> PngColours:
    cicp = chunks.get(b"cICP")
    gamma = struct.unpack(">I", chunks[b"gAMA"])[0] if b"gAMA" in chunks else None
    chromaticity = struct.unpack(">8I", chunks[b"cHRM"]) if b"cHRM" in chunks else None
    return PngColours(
        cicp=(cicp[0], cicp[1], cicp[2], cicp[3]) if cicp is not None else None,
        gamma=gamma / 100000 if gamma is not None and _GAMMA_LOWEST <= gamma <= _GAMMA_HIGHEST else None,
        chromaticity=tuple(v / 100000 for v in chromaticity) if chromaticity is not None else None,
        srgb=b"sRGB" in chunks,
        first_icc=first_icc,
    )


def _inflated_profile(payload: bytes | memoryview) -> bytes | None:
    """An iCCP chunk's profile: a name, a zero byte, compression method 0, then zlib's stream."""
    name_end = bytes(payload[:81]).find(b"\0")
    if not 1 <= name_end <= 79 or bytes(payload[name_end + 1 : name_end + 2]) != b"\0":
        return None
    inflater = zlib.decompressobj()
    try:
        profile = inflater.decompress(payload[name_end + 2 :], _MAX_ICC_BYTES)
    except zlib.error:
        return None
    # A stream cut short (or past the cap) is no profile: its first part would pass for one.
    return profile if inflater.eof and profile else None


def hiding(data: bytes, hidden: Sequence[tuple[int, int]]) -> io.BytesIO:
    """``data`` to hand Pillow, with each (offset, length) chunk in ``hidden`` renamed to a type it skips
    and given the CRC that name needs: patched as it is read, not copied."""
    patches = []
    for at, length in hidden:
        crc = zlib.crc32(memoryview(data)[at + 8 : at + 8 + length], zlib.crc32(_HIDDEN))
        patches += [(at + 4, _HIDDEN), (at + 8 + length, struct.pack(">I", crc))]
    return _Patched(data, patches)


class _Patched(io.BytesIO):
    """A BytesIO that reads ``patches`` (offset, bytes; none overlapping) over its data. Only the patches
    a read meets are looked at: Pillow reads a few times a chunk, and a PNG of 1000 hidden chunks and
    60 000 image data chunks took 8 s of CPU when each read looked at them all (a review)."""

    def __init__(self, data: bytes, patches: list[tuple[int, bytes]]) -> None:
        super().__init__(data)
        self._patches = sorted(patches)
        self._starts = [at for at, _patch in self._patches]

    def read(self, size: int | None = -1) -> bytes:
        start = self.tell()
        block = super().read(size)
        end = start + len(block)
        first = max(0, bisect.bisect_right(self._starts, start) - 1)  # the last patch starting before
        hits = []
        for at, patch in self._patches[first:]:
            if at >= end:
                break
            if at + len(patch) > start:
                hits.append((at, patch))
        if not hits:
            return block
        patched = bytearray(block)
        for at, patch in hits:
            low, high = max(at, start), min(at + len(patch), end)
            patched[low - start : high - start] = patch[low - at : high - at]
        return bytes(patched)

    def again(self) -> _Patched:
        """The same, read from the start (for a second decode)."""
        return _Patched(self.getvalue(), self._patches)
