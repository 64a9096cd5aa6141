"""Give libjpeg only the scans of a progressive JPEG that a 1/8-scale decode can use.

At 1/8 scale libjpeg reduces each 8x8 block to one pixel, computed from the block's DC coefficient
alone (``jpeg_idct_1x1``). A progressive JPEG keeps the DC coefficients in scans of their own, and the
AC scans, 80-90 % of the file, only feed coefficients such a component never reads, yet libjpeg
Huffman-decodes every one of them into its whole-image coefficient buffer first. The Go service's own
load-test photo (5760x3840, progressive 4:4:4) asked for 300 px wide decodes in 174 ms that way, and
in 59 ms from its DC scans alone, with the same pixels.

The pixels stay the same because the rewrite follows libjpeg-turbo exactly, and refuses (returns
``None``, and the file is decoded as it is) wherever it cannot be sure:

- A component that libjpeg scales up by IDCT rather than by upsampling (the chroma of 4:2:0 gets a 2x2
  IDCT at 1/8) does read AC coefficients; its AC scans are kept. The rule is ``jdmaster.c``'s.
- libjpeg "smooths" blocks whose first AC coefficients (zigzag 1-9) it has not fully received, which
  changes DC values too. So the file must send every bit of coefficients 0-9 of every component (the
  untouched file is then not smoothed either), and the second entry of each quantization table used
  only by DC-only components is set to 0, which keeps smoothing off for the rewritten stream: that entry
  multiplies AC coefficients that are now all 0.
- Every dropped scan must be one libjpeg would have accepted (header, progression, Huffman table), so
  a file that fails as it is still fails; each component's DC scan comes first, so a file that decodes
  as it is still decodes.
- Only with libjpeg-turbo (IJG libjpeg 8 and 9 size the IDCTs differently).

``tests/test_jpegscans.py`` checks the pixels against the untouched decode for each sampling layout,
the corpus's JPEGs, and mutated files; the work is linear in the size of the file.
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

from PIL import Image, JpegImagePlugin, features

from optimizer.errors import StructureLimit

# libjpeg scales by 1/8 when Pillow's draft asks for it: the only scale where a component may need DC alone.
DC_ONLY_SCALE = 8
# Coefficients (zigzag order) whose precision decides whether libjpeg-turbo smooths (SAVED_COEFS - 1).
_SMOOTHED_COEFFICIENTS = 10
_SOI, _EOI, _SOS, _DQT, _DHT, _DNL = 0xD8, 0xD9, 0xDA, 0xDB, 0xC4, 0xDC
_COM, _APP0, _APP15 = 0xFE, 0xE0, 0xEF
_SOF_PROGRESSIVE_HUFFMAN = 0xC2
_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})  # Huffman and arithmetic, hierarchical or not
# Every other start-of-frame marker: baseline, extended, lossless, arithmetic, hierarchical.
_OTHER_SOF = frozenset({0xC0, 0xC1, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_HUFFMAN_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7})
# The end of a scan's entropy-coded data: 0xFF followed by anything but a stuffed 0x00 or a restart
# marker (0xFF fill bytes before the next marker end it too).
_END_OF_ENTROPY = re.compile(rb"\xff[^\x00\xd0-\xd7]")
_FILL = re.compile(rb"\xff+")
# The next marker from anywhere: fill bytes and junk before it are skipped, as libjpeg's next_marker does.
# One 0xFF, not a run of them: the search finds the run's last one all the same, and "\xff+" tried again
# from every 0xFF of a run that led nowhere, quadratic in the run (40 000 bytes took 4.4 s, in review).
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xff]")
# Segment lengths below which a segment lacks the fields read from it (SOF: the component count at 9;
# SOS: the component count at 4).
_MIN_LENGTH = {marker: 8 for marker in (*_OTHER_SOF, _SOF_PROGRESSIVE_HUFFMAN)} | {_SOS: 3}
_IS_TURBO = bool(features.check_feature("libjpeg_turbo"))


@dataclass(frozen=True, slots=True)
class _Component:
    ident: int
    h_samp: int
    v_samp: int
    table: int


@dataclass(slots=True)
class _Tables:
    """One DQT segment's tables: (table id, offset of its zigzag entry 1 in the segment, entry width)."""

    piece: int  # its index among the output pieces
    entries: list[tuple[int, int, int]] = field(default_factory=list)


class _Unsupported(Exception):
    """The stream is not one this rewrite is known to be exact for: leave it alone."""


# Marker segments a walk reads. Each costs a turn of a Python loop here, and those before the first scan
# one of Pillow's too (JpegImagePlugin reads every one, and keeps each COM and APPn): a review's 26 MB of
# empty COM segments took 15.8 s and 420 MB. A JPEG carries a few dozen, a few hundred with an ICC
# profile or XMP split over many APPn, and two or three per scan after the first.
MAX_SEGMENTS = 4096


# Bytes that are not marker segments before the first scan (fill bytes, junk): an encoder writes none,
# or a few 0xFF of padding.
MAX_JUNK = 65536
# Segments whose contents Pillow parses in Python, item by item: quantization tables (libjpeg has four
# slots; 388 000 tables took 1.8 s, in review) and Photoshop's 8BIM resources (2 million took 1.5 s).
_APP13 = 0xED
_MAX_HEADER_BYTES = {_DQT: 65_536, _APP13: 4 * 1024 * 1024}


class TooManySegments(StructureLimit):
    """The stream has more than ``MAX_SEGMENTS`` marker segments, or more than ``MAX_JUNK`` bytes of junk
    before its first scan."""


def check_headers(data: bytes) -> None:
    """``TooManySegments`` if ``data`` has more than ``MAX_SEGMENTS`` marker segments, or more than
    ``MAX_JUNK`` bytes between them, before its first scan: Pillow's parser reads those in Python, junk
    one byte at a time (24 MB of it took 5.7 s, in review). To be called before it does. (Segments after
    the first scan are counted by the walk that counts scans, ``scans_to_decode``; libjpeg reads them in
    C.)"""
    held = {_DQT: 0, _APP13: 0}
    for marker, pos, end in _segments(data, junk_limit=MAX_JUNK):
        if marker == _SOS:
            return
        if marker in held:
            held[marker] += end - pos
            if held[marker] > _MAX_HEADER_BYTES[marker]:
                raise TooManySegments(
                    f"the JPEG has more than {_MAX_HEADER_BYTES[marker]} bytes of "
                    f"{'quantization tables' if marker == _DQT else 'Photoshop resources'} before its first "
                    "scan; an encoder writes a few hundred"
                )


def decode_dc_scans_only(im: Image.Image) -> None:
    """After ``draft``: if libjpeg will decode ``im`` at 1/8 scale, give it the stream without the AC
    scans that decode would ignore. Pixels, and errors on damaged files, stay what they were."""
    if (
        not _IS_TURBO
        or type(im) is not JpegImagePlugin.JpegImageFile  # not an MPO, whose frames are found by offset
        or im.decoderconfig[:1] != (DC_ONLY_SCALE,)
        or not im.info.get("progressive")
        or not isinstance(im.fp, io.BytesIO)
    ):
        return
    stream = dc_scans_only(im.fp.getvalue())  # the upload itself: BytesIO shares it, no copy
    if stream is not None:
        im.fp = io.BytesIO(stream)


def scans_to_decode(data: bytes, limit: int) -> int:
    """How many scans libjpeg decodes from ``data`` before it can output a pixel, counted up to one past
    ``limit``.

    libjpeg only warns about a progressive scan that repeats what earlier ones sent, and decodes it: a
    file of thousands of such scans costs a pass over the whole image each (a 0.5 MB file took 17 s),
    whatever its size. A sequential JPEG whose first scan carries every component is one scan (libjpeg
    refuses another, "EOI expected"), and its entropy-coded data is not walked. A stream the walk cannot
    follow counts what was seen before it: libjpeg fails on such a file anyway.
    """
    scans = 0
    for scans, whole in enumerate(_scans(data), start=1):
        if scans > limit or (scans == 1 and whole):
            return scans
    return scans


def buffers_whole_image(data: bytes) -> bool:
    """Whether libjpeg keeps the whole image's coefficients while decoding ``data``: a progressive JPEG,
    or a sequential one whose components arrive in separate scans. Reads the headers up to the first
    scan only."""
    first = next(_scans(data), None)
    return first is not None and not first


def huffman_coded(data: bytes) -> bool:
    """Whether ``data``'s frame is Huffman-coded (every JPEG browsers draw), not arithmetic-coded. Reads
    the headers up to the frame's only."""
    for marker, _pos, _end in _segments(data):
        if marker == _SOF_PROGRESSIVE_HUFFMAN or marker in _OTHER_SOF:
            return marker in _HUFFMAN_SOF
    return False


def _scans(data: bytes) -> Iterator[bool]:
    """For each scan: whether it is the whole image in one (a sequential frame's scan that carries all
    of the frame's components)."""
    frame: tuple[bool, int] | None = None  # (progressive, component count)
    for marker, pos, _end in _segments(data):
        if marker == _SOS:
            yield frame is not None and not frame[0] and data[pos + 4] >= frame[1]
        elif marker == _SOF_PROGRESSIVE_HUFFMAN or marker in _OTHER_SOF:
            frame = (marker in _PROGRESSIVE_SOF, data[pos + 9])


def _segments(data: bytes, junk_limit: int | None = None) -> Iterator[tuple[int, int, int]]:
    """(marker, position, end) of each marker segment from SOI to EOI, stepping over each scan's
    entropy-coded data (in C: a regular expression, not a Python loop over the bytes). Bytes where a
    marker should be are skipped, as libjpeg skips them (with a warning). A segment too short for what
    the callers read of it (an SOF's component count, an SOS's) ends the walk, without an error, as
    does anything else that stops making sense: libjpeg fails on such a stream anyway. Past
    ``MAX_SEGMENTS`` markers (restart markers and stray SOIs included), or past ``junk_limit`` bytes
    skipped where a marker should be (up to the end of the data, if no marker follows them),
    ``TooManySegments``."""
    if data[:2] != b"\xff\xd8":
        return
    pos, size = 2, len(data)
    walked = junk = 0
    while True:
        found = _NEXT_MARKER.search(data, pos)
        if junk_limit is not None:
            junk += (found.end() - 2 if found is not None else size) - pos
            if junk > junk_limit:
                raise TooManySegments(
                    f"the JPEG has more than {junk_limit} bytes of junk between its headers; an encoder "
                    "writes none"
                )
        if found is None:
            return
        walked += 1
        if walked > MAX_SEGMENTS:
            raise TooManySegments(
                f"the JPEG has more than {MAX_SEGMENTS} marker segments; an encoder writes a few dozen"
            )
        pos = found.end() - 2  # the marker's own 0xFF, after any fill bytes and junk
        marker = data[pos + 1]
        if marker == _EOI:
            return
        if marker == _SOI or 0xD0 <= marker <= 0xD7 or marker == 0x01:  # no length follows these
            pos += 2
            continue
        if pos + 4 > size:
            return
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if length < 2 and (marker in (_COM, _DNL) or _APP0 <= marker <= _APP15):
            # libjpeg skips what such a length leaves (nothing) and reads on after it: a walk that ended
            # here let a review hide 1000 scans behind one, 17.6 s of CPU for a 364 KB file.
            pos += 4
            continue
        end = pos + 2 + length
        if end > size or length < _MIN_LENGTH.get(marker, 2):
            return
        yield marker, pos, end
        if marker == _SOS:
            found = _END_OF_ENTROPY.search(data, end)
            if found is None:
                return
            end = found.start()
        pos = end


def dc_scans_only(data: bytes) -> bytes | None:
    """``data`` without the AC scans a 1/8-scale decode ignores, or ``None`` to decode it as it is.

    The result is at most as long as ``data`` (``estimate_memory`` counts it)."""
    try:
        return _Rewrite(data).run()
    except (_Unsupported, struct.error, IndexError):
        return None


class _Rewrite:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.view = memoryview(data)
        self.pieces: list[bytes | memoryview] = [self.view[:2]]
        self.components: dict[int, _Component] = {}
        self.dc_only: set[int] = set()  # component ids whose AC coefficients the decode never reads
        # libjpeg's coef_bits: per component and coefficient (zigzag), the low bit sent last (its point
        # transform): 0 when the coefficient is complete, -1 before any scan sent it.
        self.coef_bits: dict[int, list[int]] = {}
        self.ac_tables: set[int] = set()  # AC Huffman tables defined so far
        self.quant: list[_Tables] = []
        self.scanned = self.dropped = False

    def run(self) -> bytes | None:
        data = self.data
        if data[:2] != b"\xff\xd8":
            raise _Unsupported
        pos = 2
        while True:
            if data[pos] != 0xFF:
                raise _Unsupported
            fill = _FILL.match(data, pos)
            assert fill is not None
            pos = fill.end() - 1  # the last 0xFF: the marker's own
            marker = data[pos + 1]
            if marker == _EOI:
                self.pieces.append(self.view[pos : pos + 2])  # nothing after it is read
                break
            if marker == _SOI or 0xD0 <= marker <= 0xD7 or marker in (0x01, _DNL) or marker in _OTHER_SOF:
                raise _Unsupported
            (length,) = struct.unpack_from(">H", data, pos + 2)
            end = pos + 2 + length
            if length < 2 or end > len(data):
                raise _Unsupported
            if marker == _SOS:
                pos = self._scan(pos, end)
                continue
            self._segment(marker, pos, end)
            pos = end
        return self._result()

    def _segment(self, marker: int, pos: int, end: int) -> None:
        if marker == _SOF_PROGRESSIVE_HUFFMAN:
            if self.components:
                raise _Unsupported
            self.components = _frame_components(self.data, pos)
            self.dc_only = _dc_only_components(list(self.components.values()))
            self.coef_bits = {ident: [-1] * 64 for ident in self.components}
        elif marker == _DQT:
            if self.scanned:  # libjpeg latches tables per scan: keep to files that define them first
                raise _Unsupported
            self.quant.append(_Tables(len(self.pieces), _table_entries(self.data, pos, end)))
        elif marker == _DHT:
            self.ac_tables |= _huffman_tables(self.data, pos, end)
        self.pieces.append(self.view[pos:end])

    def _scan(self, pos: int, end: int) -> int:
        """Checks a scan as libjpeg would, notes what it sends, keeps or drops it; returns its end."""
        if not self.components:
            raise _Unsupported
        self.scanned = True
        idents, start, stop, high, low, ac_table = _scan_header(self.data, pos, end, self.components)
        for ident in idents:
            bits = self.coef_bits[ident]
            if start > 0 and bits[0] < 0:  # AC before DC: libjpeg warns and decodes something else
                raise _Unsupported
            for k in range(start, stop + 1):
                if bits[k] != (-1 if high == 0 else high):  # a bogus progression: libjpeg warns
                    raise _Unsupported
                bits[k] = low
        found = _END_OF_ENTROPY.search(self.data, end)
        if found is None:  # truncated: no marker after the scan's data
            raise _Unsupported
        if start > 0 and idents[0] in self.dc_only:
            if ac_table not in self.ac_tables:  # libjpeg fails on such a scan: let the file fail as it is
                raise _Unsupported
            self.dropped = True
        else:
            self.pieces.append(self.view[pos : found.start()])
        return found.start()

    def _result(self) -> bytes | None:
        # Untouched, libjpeg would smooth an image whose first coefficients are not all complete:
        # the rewrite, which cannot be smoothed, would then differ.
        if any(
            bits[:_SMOOTHED_COEFFICIENTS] != [0] * _SMOOTHED_COEFFICIENTS for bits in self.coef_bits.values()
        ):
            return None
        patched = {c.table for c in self.components.values() if c.ident in self.dc_only}
        if patched & {c.table for c in self.components.values() if c.ident not in self.dc_only}:
            return None  # a table shared with a component that reads AC: its entry must stay
        if not self.dropped or not patched:
            return None
        for tables in self.quant:
            segment = bytearray(self.pieces[tables.piece])
            for table, offset, width in tables.entries:
                if table in patched:
                    segment[offset : offset + width] = bytes(width)
            self.pieces[tables.piece] = bytes(segment)
        return b"".join(self.pieces)


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
    """Each table in a DQT segment: its id, the offset of its second (zigzag) entry in the segment, its
    entry width."""
    entries = []
    at = pos + 4
    while at < end:
        precision, table = data[at] >> 4, data[at] & 0x0F
        if precision > 1 or table > 3:
            raise _Unsupported
        width = precision + 1
        entries.append((table, at + 1 + width - pos, width))
        at += 1 + 64 * width
    if at != end:
        raise _Unsupported
    return entries


def _huffman_tables(data: bytes, pos: int, end: int) -> set[int]:
    """The AC table ids a DHT segment defines; ``_Unsupported`` for one libjpeg would reject."""
    defined = set()
    at = pos + 4
    while at < end:
        index = data[at]
        counts = data[at + 1 : at + 17]
        total = sum(counts)
        if len(counts) != 16 or total > 256 or at + 17 + total > end or (index & 0x0F) > 3 or index >> 4 > 1:
            raise _Unsupported
        # jpeg_make_d_derived_tbl: canonical codes must fit their lengths.
        code = 0
        for length, count in enumerate(counts, start=1):
            code += count
            if code >= 1 << length:  # the all-ones code is not allowed either
                raise _Unsupported
            code <<= 1
        if index >> 4 == 1:
            defined.add(index & 0x0F)
        at += 17 + total
    if at != end:
        raise _Unsupported
    return defined


def _scan_header(
    data: bytes, pos: int, end: int, components: dict[int, _Component]
) -> tuple[list[int], int, int, int, int, int]:
    """A progressive SOS header checked as libjpeg checks it: (component ids, Ss, Se, Ah, Al, the
    first component's AC table)."""
    count = data[pos + 4]
    if not 1 <= count <= 4 or end - pos != 2 + 6 + 2 * count:
        raise _Unsupported
    idents = [data[pos + 5 + 2 * i] for i in range(count)]
    ac_table = data[pos + 6] & 0x0F
    start, stop, approximation = data[pos + 5 + 2 * count : pos + 8 + 2 * count]
    high, low = approximation >> 4, approximation & 0x0F
    if len(set(idents)) != count or any(ident not in components for ident in idents):
        raise _Unsupported
    # A DC scan covers the DC alone; an AC scan carries one component and a band within 1-63.
    bad = stop != 0 if start == 0 else count != 1 or not start <= stop <= 63
    if bad or low > 13 or (high != 0 and low != high - 1):
        raise _Unsupported
    return idents, start, stop, high, low, ac_table
