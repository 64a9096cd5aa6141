"""Give libjpeg only the scans of a progressive JPEG that a 1/8-scale decode can use.

At 1/8 scale libjpeg reduces each 8x8 block to one pixel, computed from the block's DC coefficient
alone (``jpeg_idct_1x1``). A progressive JPEG keeps the DC coefficients in scans of their own, and the
AC scans, 80-90 % of the file, only feed coefficients such a component never reads, yet libjpeg
Huffman-decodes every one of them into its whole-image coefficient buffer first. The Go service's own
load-test photo (5760x3840, progressive 4:4:4) asked for 300 px wide decodes in 174 ms that way, and
in 59 ms from its DC scans alone, with the same pixels.

Two details keep the pixels the same, and are checked by ``tests/test_jpegscans.py`` against a full
decode for every sampling layout:

- A component that libjpeg scales up by IDCT rather than by upsampling (the chroma of 4:2:0 gets a 2x2
  IDCT at 1/8) does read AC coefficients; its AC scans are kept. The rule is libjpeg-turbo's
  (``jdmaster.c``): a component's DCT size doubles while the maximum sampling factors divide evenly.
- With AC coefficients missing, libjpeg would "smooth" the blocks (``decompress_smooth_data``), which
  also changes DC values. It does so only when the first AC quantizers are non-zero, so the second
  entry of each quantization table used only by DC-only components is set to 0: it multiplies AC
  coefficients that are now all 0 anyway.

Anything unexpected (another frame type, a table redefined between scans, a truncated stream, a DNL
marker) leaves the stream as it is, so damaged files fail or decode exactly as before.
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image, JpegImagePlugin

# libjpeg scales by 1/8 when Pillow's draft asks for it: the only scale where a component may need DC alone.
DC_ONLY_SCALE = 8
_SOI, _EOI, _SOS, _DQT, _DNL = 0xD8, 0xD9, 0xDA, 0xDB, 0xDC
_SOF_PROGRESSIVE_HUFFMAN = 0xC2
# Every other start-of-frame marker: baseline, extended, lossless, arithmetic, hierarchical.
_OTHER_SOF = frozenset({0xC0, 0xC1, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# The end of a scan's entropy-coded data: 0xFF followed by anything but a stuffed 0x00 or a restart
# marker (0xFF fill bytes before the next marker end it too).
_END_OF_ENTROPY = re.compile(rb"\xff[^\x00\xd0-\xd7]")


@dataclass(frozen=True, slots=True)
class _Component:
    ident: int
    h_samp: int
    v_samp: int
    table: int


class _Unsupported(Exception):
    """The stream is not one this rewrite is known to be exact for: leave it alone."""


def decode_dc_scans_only(im: Image.Image) -> None:
    """After ``draft``: if libjpeg will decode ``im`` at 1/8 scale, give it the stream without the AC
    scans that decode would ignore. Pixels, and errors on damaged files, stay what they were."""
    if (
        type(im) is not JpegImagePlugin.JpegImageFile  # not an MPO, whose frames are found by offset
        or im.decoderconfig[:1] != (DC_ONLY_SCALE,)
        or not im.info.get("progressive")
        or not isinstance(im.fp, io.BytesIO)
    ):
        return
    stream = dc_scans_only(im.fp.getvalue())  # the upload itself: BytesIO shares it, no copy
    if stream is not None:
        im.fp = io.BytesIO(stream)


def dc_scans_only(data: bytes) -> bytes | None:
    """``data`` without the AC scans a 1/8-scale decode ignores, or ``None`` to decode it as it is."""
    try:
        return _rewrite(data)
    except (_Unsupported, struct.error, IndexError):
        return None


def _segments(data: bytes) -> Iterator[tuple[int, int, int]]:
    """Each marker segment after SOI up to EOI: (marker, start, end); a scan's end is that of its data."""
    if data[:2] != b"\xff\xd8":
        raise _Unsupported
    pos = 2
    while True:
        if data[pos] != 0xFF:
            raise _Unsupported
        while data[pos + 1] == 0xFF:  # fill bytes before a marker
            pos += 1
        marker = data[pos + 1]
        if marker == _EOI:
            yield marker, pos, len(data)  # the EOI, and whatever follows it
            return
        if marker == _SOI or 0xD0 <= marker <= 0xD7 or marker in (0x01, _DNL) or marker in _OTHER_SOF:
            raise _Unsupported
        (length,) = struct.unpack_from(">H", data, pos + 2)
        end = pos + 2 + length
        if length < 2 or end > len(data):
            raise _Unsupported
        if marker == _SOS:
            found = _END_OF_ENTROPY.search(data, end)
            if found is None:  # truncated: no marker after the scan's data
                raise _Unsupported
            end = found.start()
        yield marker, pos, end
        pos = end


def _rewrite(data: bytes) -> bytes | None:
    pieces: list[bytes] = []
    components: dict[int, _Component] = {}
    dc_only: set[int] = set()  # component ids whose AC coefficients the decode never reads
    tables: list[tuple[int, int, int]] = []  # (table id, offset of its zigzag entry 1, bytes per entry)
    dqt_pieces: list[tuple[int, int]] = []  # (index in ``pieces``, offset in ``data``) of each DQT segment
    scanned = dropped = False
    for marker, pos, end in _segments(data):
        if marker == _SOF_PROGRESSIVE_HUFFMAN:
            if components:
                raise _Unsupported
            components = _frame_components(data, pos)
            dc_only = _dc_only_components(list(components.values()))
        elif marker == _DQT:
            if scanned:  # libjpeg latches tables per scan: keep to files that define them once, first
                raise _Unsupported
            dqt_pieces.append((len(pieces), pos))
            tables.extend(_table_entries(data, pos, end))
        elif marker == _SOS:
            if not components:
                raise _Unsupported
            scanned = True
            if _droppable(data, pos, components, dc_only):
                dropped = True
                continue
        pieces.append(data[pos:end])
    patched = _tables_to_patch(components, dc_only)
    if not dropped or not patched:
        return None
    for index, start in dqt_pieces:
        pieces[index] = _zero_second_entries(pieces[index], start, tables, patched)
    return data[:2] + b"".join(pieces)


def _zero_second_entries(
    segment: bytes, start: int, tables: list[tuple[int, int, int]], patched: set[int]
) -> bytes:
    """The DQT ``segment`` (found at ``start``) with the second entry of each ``patched`` table at 0."""
    edited = bytearray(segment)
    for table, offset, width in tables:
        if table in patched and start <= offset < start + len(segment):
            edited[offset - start : offset - start + width] = bytes(width)
    return bytes(edited)


def _frame_components(data: bytes, pos: int) -> dict[int, _Component]:
    precision, _height, _width, count = struct.unpack_from(">BHHB", data, pos + 4)
    if precision != 8 or not 1 <= count <= 4:
        raise _Unsupported
    components: dict[int, _Component] = {}
    for index in range(count):
        ident, sampling, table = struct.unpack_from(">BBB", data, pos + 10 + 3 * index)
        h_samp, v_samp = sampling >> 4, sampling & 0x0F
        if ident in components or not (1 <= h_samp <= 4 and 1 <= v_samp <= 4) or table > 3:
            raise _Unsupported
        components[ident] = _Component(ident, h_samp, v_samp, table)
    return components


def _dc_only_components(components: list[_Component]) -> set[int]:
    """Components whose IDCT size is 1 at 1/8 scale (libjpeg-turbo's jdmaster.c, with min size 1)."""
    h_max = max(c.h_samp for c in components)
    v_max = max(c.v_samp for c in components)
    dc_only = set()
    for component in components:
        size = 1
        while (
            size < 8
            and h_max % (component.h_samp * size * 2) == 0
            and v_max % (component.v_samp * size * 2) == 0
        ):
            size *= 2
        if size == 1:
            dc_only.add(component.ident)
    return dc_only


def _table_entries(data: bytes, pos: int, end: int) -> list[tuple[int, int, int]]:
    """Each table in a DQT segment: its id, the offset of its second (zigzag) entry, its entry width."""
    entries = []
    at = pos + 4
    while at < end:
        precision, table = data[at] >> 4, data[at] & 0x0F
        if precision > 1 or table > 3:
            raise _Unsupported
        width = precision + 1
        entries.append((table, at + 1 + width, width))
        at += 1 + 64 * width
    if at != end:
        raise _Unsupported
    return entries


def _droppable(data: bytes, pos: int, components: dict[int, _Component], dc_only: set[int]) -> bool:
    """An AC scan (spectral start above 0) of a component the decode reads DC alone from."""
    count = data[pos + 4]
    spectral_start = data[pos + 5 + 2 * count]
    if spectral_start == 0:
        return False
    if count != 1:  # AC scans carry one component (ITU T.81, G.1.1.1.1)
        raise _Unsupported
    ident = data[pos + 5]
    if ident not in components:
        raise _Unsupported
    return ident in dc_only


def _tables_to_patch(components: dict[int, _Component], dc_only: set[int]) -> set[int]:
    """The tables of DC-only components; none if one is shared with a component that reads AC."""
    patched = {c.table for c in components.values() if c.ident in dc_only}
    shared = {c.table for c in components.values() if c.ident not in dc_only}
    return set() if patched & shared else patched
