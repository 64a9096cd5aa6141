"""Refuse an AVIF that would make libavif work or allocate far beyond the image it declares, before
Pillow opens it, and tell the memory estimate what libavif will hold.

libavif, which Pillow opens AVIF with, parses every item and every sample of a sequence when the file
is opened, with a record for each: a review's 3.7 MB AVIF of 160 000 items took 15 s of CPU and 225 MB
(the time grows with the square of the items), and a sequence declaring 2 million one-byte samples held
171 MB, all against estimates of 4, before the memory budget was asked. A real AVIF has a few items (a
grid some hundreds) and a sequence one sample per frame. The walk here reads box headers and the entry
counts libavif sizes its records by, up to the limits, over the whole file.

What libavif copies is bounded as well: the bytes the items' locations name (an item of several extents
is joined into a copy, so 4000 XMP items each spanning a 512 KB file held 2 GB), and the properties
associated with items (an unknown property is copied for each association: one of 100 KB associated
16 320 times held 1.6 GB). An extent may take no bytes at all, and each is a record: 4000 items of
65 535 extents in a 32 KB file held 4 GB. A sample description's boxes are copied one at a time, as
each is added (150 000 took 7 s).

Pillow's open parses an Exif item in Python (an EXIF directory of 65 535 entries in a 787 KB file took
0.1 s with the GIL held, twice a request), so each Exif item's payload gets the limits of any EXIF block
(``optimizer.tiffifd``), read as libavif reads it: from the locations of its own ``meta``, extents of
length 0 empty.

The walk keeps what libavif reads about items and tracks (``Meta``, ``Track``), so that
``optimizer.avifdecode`` can hold what libavif decodes to the sizes the AVIF declares. Boxes are read
only where libavif reads them: a decoy elsewhere cannot stand in for the real one.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from optimizer.avifdecode import Decoded, check_decoded
from optimizer.errors import StructureLimit
from optimizer.tiffifd import check_exif

MAX_ITEMS = 4096  # items, their locations and property associations
MAX_SAMPLES = 16_384  # samples of an image sequence, and its table entries
MAX_BOXES = 65_536  # a real AVIF has some dozens; 3 million tiny ones took the walk itself 1 s
# Property associations (ipma): a few per item; 4096 entries of 255 each held 77 MiB (a review).
MAX_ASSOCIATIONS = 16_384
# Extents of all item locations: an encoder writes one an item (libavif, a grid's tiles included).
MAX_EXTENTS = 16_384
# Exif items whose payload is walked: an encoder writes one. Each walk is bounded (four directories
# of 4096 entries), but not thousands of them.
MAX_EXIF_ITEMS = 16
# Sample descriptions (stsd entries), each a record with room for 16 properties (~1.2 KB): one a track
# in a real file; 600 000 held 728 MB (a review).
MAX_SAMPLE_DESCRIPTIONS = 64
# Boxes inside one sample description: libavif grows its list of them one copy at a time.
MAX_DESCRIPTION_BOXES = 256
# Associated properties' bytes beyond the file's own size: items share small properties (a grid's
# tiles their av1C, ispe and pixi: ~60 bytes a tile).
ASSOCIATED_BYTES_SLACK = 1024 * 1024
_MAX_DEPTH = 8
# Boxes that hold boxes, besides meta (a full box: its children after 4 bytes of version and flags) and
# trak, which open a scope of their own (``Walk.box``).
_CONTAINERS = frozenset({b"moov", b"mdia", b"minf", b"stbl", b"dinf", b"iprp", b"edts"})
# Full boxes with an entry count: where it is after the box header, and its format.
_SAMPLE_COUNTS = {b"stsz": (8, ">I"), b"stz2": (8, ">I"), b"stts": (4, ">I"), b"stsc": (4, ">I")}
_SAMPLE_COUNTS |= {b"stco": (4, ">I"), b"co64": (4, ">I"), b"stss": (4, ">I"), b"ctts": (4, ">I")}
# A visual sample entry's fields before its boxes, after the box header (ISO/IEC 14496-12 12.1.3).
_VISUAL_SAMPLE_ENTRY = 78
# iloc's construction methods: from the file's start, or from the start of the meta's idat.
_FILE_OFFSET, _IDAT_OFFSET = 0, 1
# A colour property's ICC profile is referred to, not copied, and one profile may serve several items.
_NOT_COPIED = frozenset({b"colr"})


class TooManyEntries(StructureLimit):
    """The AVIF declares more items or samples than the limits allow."""


@dataclass(frozen=True, slots=True)
class Summary:
    grid_tiles: int  # item ids named by dimg references: a grid's tiles, each decoded on its own
    decoded: Decoded = field(default_factory=Decoded)  # what libavif decodes beyond the declared image
    # The primary image's nclx colour description (colour primaries, transfer characteristics, ITU-T
    # H.273 code points) where it has no ICC profile: Pillow hands over the pixels without it.
    nclx: tuple[int, int] | None = None


@dataclass(slots=True)
class Meta:
    """What one ``meta`` box says about its items: libavif resolves ids and idat offsets per meta."""

    primary: int | None = None  # pitm
    item_types: dict[int, bytes] = field(default_factory=dict)  # from infe versions 2 and 3
    exif_items: list[int] = field(default_factory=list)
    # Each item's construction method and extents (offset with the base added, length).
    locations: dict[int, tuple[int, list[tuple[int, int]]]] = field(default_factory=dict)
    idat: tuple[int, int] | None = None  # the first idat's body
    properties: list[tuple[bytes, int, int]] | None = None  # the first ipco's: type, body, end
    item_properties: dict[int, list[int]] = field(default_factory=dict)  # ipma's 1-based indices
    references: dict[bytes, list[tuple[int, list[int]]]] = field(default_factory=dict)  # iref, by type

    def named(self, kind: bytes, item: int) -> list[int]:
        """The items ``item`` refers to with references of ``kind`` (a grid's tiles: dimg)."""
        return [to for origin, targets in self.references.get(kind, ()) if origin == item for to in targets]

    def referring(self, kind: bytes, item: int) -> list[int]:
        """The items that refer to ``item`` with references of ``kind`` (its alpha: auxl)."""
        return [origin for origin, targets in self.references.get(kind, ()) if item in targets]


@dataclass(slots=True)
class Track:
    """A track's declared size (tkhd) and where its first sample is, for its sequence header."""

    size: tuple[int, int] | None = None
    codec: bytes | None = None  # b"av01" when one of its sample descriptions is AV1
    first_chunk: int | None = None
    first_sample_bytes: int | None = None
    # Its AV1 sample description's colour box: nclx code points, or an ICC profile (colour None, icc True).
    colour: tuple[int, int] | None = None
    icc: bool = False


def check_boxes(data: bytes) -> Summary:
    """What the estimate needs, or ``TooManyEntries`` past the limits. Boxes cut short or malformed end
    the walk of the box holding them (libavif refuses or ignores them)."""
    walk = Walk(data)
    with contextlib.suppress(struct.error, IndexError):
        walk.boxes(0, len(data), ())
    walk.check_located_bytes()
    walk.check_associated_bytes()
    decoded = check_decoded(walk)
    exif = [(meta, item) for meta in walk.metas for item in meta.exif_items if item in meta.locations]
    if len(exif) > MAX_EXIF_ITEMS:
        raise TooManyEntries(
            f"the AVIF declares more than {MAX_EXIF_ITEMS} Exif items; an encoder writes one"
        )
    for meta, item in exif:
        try:
            check_exif(_exif_tiff(walk.payload(meta, item)))
        except StructureLimit as exc:
            raise TooManyEntries(f"the AVIF's Exif item: {exc}") from None
    return Summary(walk.tiles, decoded, _primary_nclx(walk))


def _primary_nclx(walk: Walk) -> tuple[int, int] | None:
    """The nclx colour description of what libavif decodes, unless an ICC profile (which libavif and
    browsers take instead) comes with it. libavif picks its source by the major brand: an AV1 track for
    'avis', the primary item for 'avif', and a track if there is one for any other brand."""
    track = next((track for track in walk.tracks if track.codec == b"av01"), None)
    meta = walk.top
    primary = None if meta is None or meta.properties is None else meta.primary
    if track is not None and (walk.brand != b"avif" or primary is None):
        return track.colour
    if meta is None or meta.properties is None or primary is None:
        return None
    properties = meta.properties
    associated = [
        properties[index - 1]
        for index in meta.item_properties.get(primary, ())
        if 0 < index <= len(properties)
    ]
    return walk.colour_box(associated)[0]


def _exif_tiff(payload: bytes) -> bytes:
    """An Exif item's TIFF structure: after its 4-byte header offset, from the first TIFF header, as
    libavif finds it (with an ``Exif\\0\\0`` before it, Pillow reads the same structure)."""
    found = [at for at in (payload.find(b"II*\x00", 4), payload.find(b"MM\x00*", 4)) if at >= 0]
    return payload[min(found) :] if found else b""


class Walk:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.totals: dict[str, int] = {}
        self.tiles = 0
        self.meta = Meta()  # boxes outside any meta are looked at too, as if in one
        self.metas = [self.meta]
        self.top: Meta | None = None
        self.brand: bytes | None = None  # ftyp's major brand
        self.track = Track()
        self.tracks: list[Track] = []
        self.payloads: dict[tuple[object, ...], bytes] = {}  # by where they are: items share bytes

    def add(self, what: str, count: int, limit: int) -> None:
        total = self.totals[what] = self.totals.get(what, 0) + count
        if total > limit:
            raise TooManyEntries(f"the AVIF declares more than {limit} {what}")

    def children(self, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
        """The boxes from ``start`` to ``end``, each counted: type, body start, end. A 64-bit size is
        read as libavif reads it, size 0 runs to ``end``; a size that does not fit ends the list."""
        data, pos = self.data, start
        while pos + 8 <= end:
            self.add("boxes", 1, MAX_BOXES)
            size, kind = struct.unpack_from(">I4s", data, pos)
            header = 8
            if size == 1:
                (size,) = struct.unpack_from(">Q", data, pos + 8)
                header = 16
            elif size == 0:
                size = end - pos
            if size < header or pos + size > end:
                return
            yield kind, pos + header, pos + size
            pos += size

    def boxes(self, start: int, end: int, path: tuple[bytes, ...]) -> None:
        for kind, body, box_end in self.children(start, end):
            # Each box's own reading ends at its end: a malformed one leaves the boxes after it counted.
            with contextlib.suppress(struct.error, IndexError):
                self.box(kind, body, box_end, path)

    def box(self, kind: bytes, body: int, box_end: int, path: tuple[bytes, ...]) -> None:
        """One box, under the boxes in ``path``. Counts are made wherever a box is (more than libavif
        reads, never less); what a box says about items and tracks is taken only where libavif reads
        it, so that a decoy elsewhere cannot stand in for the real one (found in review)."""
        parent = path[-1] if path else b""
        inside = (*path, kind)
        if len(path) >= _MAX_DEPTH:
            return
        if kind == b"meta":
            self.enter_meta(body, box_end, inside)
        elif kind == b"trak":
            outer_track, self.track = self.track, Track()
            if path == (b"moov",):
                self.tracks.append(self.track)
            try:
                self.boxes(body, box_end, inside)
            finally:
                self.track = outer_track
        elif kind in _CONTAINERS:
            self.boxes(body, box_end, inside)
            if kind == b"stbl":
                self.samples(body, box_end, record=path[-3:] == (b"trak", b"mdia", b"minf"))
        elif kind == b"ftyp" and not path and self.brand is None:
            self.brand = self.data[body : body + 4]
        elif kind == b"tkhd" and parent == b"trak":
            at = body + (88 if self.data[body] == 1 else 76)  # width and height, 16.16 fixed point
            width, height = struct.unpack_from(">II", self.data, at)
            self.track.size = (-(-width >> 16), -(-height >> 16))  # rounded up
        elif kind == b"iref":
            self.references(body, box_end, record=parent == b"meta")
        elif kind == b"ipco":
            properties = list(self.children(body, box_end))
            if path[-2:] == (b"meta", b"iprp") and self.meta.properties is None:
                self.meta.properties = properties
        elif kind == b"ipma":
            self.associations(body, box_end, record=path[-2:] == (b"meta", b"iprp"))
        elif kind == b"iinf":
            self.item_types(body, box_end, record=parent == b"meta")
        elif kind == b"iloc":
            self.item_locations(body, box_end, record=parent == b"meta")
        elif kind == b"idat" and parent == b"meta" and self.meta.idat is None:
            self.meta.idat = (body, box_end)
        elif kind == b"pitm" and parent == b"meta":
            self.meta.primary = _number(self.data, body + 4, 2 if self.data[body] == 0 else 4, box_end)
        elif kind == b"stsd":
            self.descriptions(body, box_end, record=path[-4:] == (b"trak", b"mdia", b"minf", b"stbl"))
        elif kind in _SAMPLE_COUNTS:
            at, code = _SAMPLE_COUNTS[kind]
            self.add(
                f"{kind.decode()} entries", struct.unpack_from(code, self.data, body + at)[0], MAX_SAMPLES
            )

    def enter_meta(self, body: int, box_end: int, inside: tuple[bytes, ...]) -> None:
        outer, self.meta = self.meta, Meta()
        self.metas.append(self.meta)
        if inside == (b"meta",) and self.top is None:
            self.top = self.meta  # the file's own, whose primary item libavif decodes
        try:
            self.boxes(body + 4, box_end, inside)
        finally:
            self.meta = outer

    def item_types(self, start: int, end: int, *, record: bool) -> None:
        """Counts the items; notes which are Exif (infe version 2 and 3 name a type, 0 and 1 none)."""
        data = self.data
        version = data[start]
        self.add("items", struct.unpack_from(">H" if version == 0 else ">I", data, start + 4)[0], MAX_ITEMS)
        for kind, body, box_end in self.children(start + (6 if version == 0 else 8), end):
            if kind == b"infe" and data[body] in (2, 3) and body + 12 <= box_end:
                wide = data[body] == 3
                item = struct.unpack_from(">I" if wide else ">H", data, body + 4)[0]
                item_type = data[body + (10 if wide else 8) : body + (14 if wide else 12)]
                if record:
                    if item in self.meta.item_types:  # libavif takes the last, the walk took the first
                        raise TooManyEntries(f"the AVIF describes item {item} twice")
                    self.meta.item_types[item] = item_type
                    if item_type == b"Exif":
                        self.meta.exif_items.append(item)

    def item_locations(self, start: int, end: int, *, record: bool) -> None:
        """Counts the items' locations, their extents (libavif's record each) and the bytes they name;
        keeps where each item is. A location cut short by the box's end ends this box's reading."""
        data, meta = self.data, self.meta
        version = data[start]
        offset_size, length_size = data[start + 4] >> 4, data[start + 4] & 15
        base_size, index_size = data[start + 5] >> 4, (data[start + 5] & 15 if version in (1, 2) else 0)
        id_size = 2 if version < 2 else 4
        count = _number(data, start + 6, id_size, end)
        self.add("item locations", count, MAX_ITEMS)
        pos = start + 6 + id_size
        for _ in range(count):
            item = _number(data, pos, id_size, end)
            pos += id_size
            method = 0
            if version in (1, 2):
                method = _number(data, pos, 2, end) & 15
                pos += 2
            base = _number(data, pos + 2, base_size, end)  # after the data reference index
            pos += 2 + base_size
            extent_count = _number(data, pos, 2, end)
            pos += 2
            self.add("item extents", extent_count, MAX_EXTENTS)
            extents = []
            for _ in range(extent_count):
                offset = _number(data, pos + index_size, offset_size, end)
                length = _number(data, pos + index_size + offset_size, length_size, end)
                pos += index_size + offset_size + length_size
                extents.append((base + offset, length))
            if not record:
                continue
            if item in meta.locations:
                raise TooManyEntries(f"the AVIF locates item {item} twice")
            meta.locations[item] = (method, extents)

    def check_located_bytes(self) -> None:
        """The bytes libavif reads for the items, at most the file's. An item of several extents is
        joined into a copy of its own, and an XMP or Exif item is copied into the image's metadata
        (2000 XMP items at one 20 MB extent took 1.35 s, in review), so their bytes count each time.
        An AV1 item of one extent is decoded in place, and libavif's writer points tiles with the same
        data at the same bytes (a flat 8x8 grid: 43 extents, 17 distinct), so each place counts once."""
        total, places = 0, set()
        for meta in self.metas:
            for item, (method, extents) in meta.locations.items():
                if len(extents) == 1 and meta.item_types.get(item) == b"av01":
                    place = (id(meta), method, *extents[0])
                    if place in places:
                        continue
                    places.add(place)
                total += sum(length for _offset, length in extents)
        if total > len(self.data):
            raise TooManyEntries(
                f"the AVIF's item locations name more bytes than its {len(self.data)} (an item of several "
                "extents, or of metadata, is read into a copy of its own)"
            )

    def payload(self, meta: Meta, item: int) -> bytes:
        """An item's bytes, its extents joined, as libavif reads them; what lies past the end of the
        file or the idat is left out (libavif refuses such an item). All items' together are at most
        the file's size (``item_locations``)."""
        if item not in meta.locations:
            return b""  # libavif refuses an item it cannot find
        method, extents = meta.locations[item]
        key = (id(meta), method, *extents)
        if key in self.payloads:  # each distinct place copied once (bounded by ``locate``)
            return self.payloads[key]
        if method == _FILE_OFFSET:
            start, end = 0, len(self.data)
        elif method == _IDAT_OFFSET and meta.idat is not None:
            start, end = meta.idat
        else:
            return b""  # from another item, or no idat: libavif reads no Exif that way
        joined = b"".join(
            self.data[start + offset : min(end, start + offset + length)] for offset, length in extents
        )
        self.payloads[key] = joined
        return joined

    def associations(self, start: int, end: int, *, record: bool) -> None:
        """Each entry's property associations, not the entries: libavif keeps one record each, and a copy
        of an unknown property's payload."""
        data = self.data
        version, wide_index = data[start], data[start + 3] & 1
        (entries,) = struct.unpack_from(">I", data, start + 4)
        self.add("item property entries", entries, MAX_ITEMS)
        pos = start + 8
        for _ in range(entries):
            item = _number(data, pos, 2 if version < 1 else 4, end)
            pos += 2 if version < 1 else 4
            if pos >= end:
                return
            associations = data[pos]
            self.add("property associations", associations, MAX_ASSOCIATIONS)
            named = self.meta.item_properties.setdefault(item, []) if record else []
            for index in range(associations):
                at = pos + 1 + index * (2 if wide_index else 1)
                if at + (2 if wide_index else 1) > end:
                    return
                named.append(
                    struct.unpack_from(">H", data, at)[0] & 0x7FFF if wide_index else data[at] & 0x7F
                )
            pos += 1 + associations * (2 if wide_index else 1)

    def check_associated_bytes(self) -> None:
        """The bytes of the properties associated with items, over all metas: at most the file's size,
        and some slack for small properties that tiles share."""
        total = 0
        for meta in self.metas:
            sizes = [0 if kind in _NOT_COPIED else end - body for kind, body, end in meta.properties or ()]
            for named in meta.item_properties.values():
                total += sum(sizes[index - 1] for index in named if 0 < index <= len(sizes))
        if total > len(self.data) + ASSOCIATED_BYTES_SLACK:
            raise TooManyEntries(
                f"the AVIF associates {total} bytes of properties with its items, more than its "
                f"{len(self.data)} bytes hold"
            )

    def samples(self, start: int, end: int, *, record: bool) -> None:
        """The samples a sample table makes, not its entries: one stsc entry of 2 million samples per
        chunk made libavif 2 million records, 192 MiB (found in review). libavif appends a table's
        repeated boxes, so each is read: the widest stsc entry, the chunks of all stco and co64."""
        data = self.data
        chunks = widest = timed = sizes = 0
        for kind, body, box_end in self.children(start, end):
            sizes += kind in (b"stsz", b"stz2")
            if kind in (b"stco", b"co64"):
                count = struct.unpack_from(">I", data, body + 4)[0]
                if record and count and chunks == 0 and self.track.first_chunk is None:
                    self.track.first_chunk = struct.unpack_from(
                        ">I" if kind == b"stco" else ">Q", data, body + 8
                    )[0]
                chunks += count
            elif kind == b"stsz" and record and self.track.first_sample_bytes is None:
                fixed, count = struct.unpack_from(">II", data, body + 4)
                if fixed or count:  # libavif gives a fixed size to every sample the chunks make, count or not
                    self.track.first_sample_bytes = fixed or struct.unpack_from(">I", data, body + 12)[0]
            elif kind == b"stsc":
                entries = min(struct.unpack_from(">I", data, body + 4)[0], (box_end - body - 8) // 12)
                for i in range(entries):
                    widest = max(widest, struct.unpack_from(">I", data, body + 12 + 12 * i)[0])
            elif kind == b"stts":
                entries = min(struct.unpack_from(">I", data, body + 4)[0], (box_end - body - 8) // 8)
                timed += sum(struct.unpack_from(">I", data, body + 8 + 8 * i)[0] for i in range(entries))
        if sizes > 1:  # the walk reads the first sample's size from the first, libavif from another
            raise TooManyEntries(f"an AVIF sample table has {sizes} tables of sample sizes")
        if widest:
            self.add("samples", widest * max(chunks, 1), MAX_SAMPLES)
        if timed:
            self.add("samples", timed, MAX_SAMPLES)

    def colour_box(self, boxes: Iterable[tuple[bytes, int, int]]) -> tuple[tuple[int, int] | None, bool]:
        """The colour description among ``boxes``: nclx code points (colour primaries, transfer), and
        whether an ICC profile is there, which libavif and browsers take instead."""
        data, nclx, icc = self.data, None, False
        for kind, body, end in boxes:
            if kind != b"colr" or end - body < 8:
                continue
            colour_type = data[body : body + 4]
            if colour_type in (b"prof", b"rICC"):
                icc = True
            elif colour_type == b"nclx" and nclx is None:
                primaries, transfer = struct.unpack_from(">HH", data, body + 4)
                nclx = (primaries, transfer)
        return (None, True) if icc else (nclx, False)

    def descriptions(self, start: int, end: int, *, record: bool) -> None:
        """A sample table's descriptions (stsd), and the boxes in each."""
        data = self.data
        self.add("sample descriptions", struct.unpack_from(">I", data, start + 4)[0], MAX_SAMPLE_DESCRIPTIONS)
        for kind, body, box_end in self.children(start + 8, end):
            if record and kind == b"av01":  # libavif decodes a track with an av01 description anywhere
                if self.track.codec is None:  # the first such description's colour box is the track's
                    self.track.colour, self.track.icc = self.colour_box(
                        self.children(body + _VISUAL_SAMPLE_ENTRY, box_end)
                    )
                self.track.codec = kind
            inside = sum(1 for _ in self.children(body + _VISUAL_SAMPLE_ENTRY, box_end))
            if inside > MAX_DESCRIPTION_BOXES:
                raise TooManyEntries(
                    f"an AVIF sample description holds {inside} boxes; the limit is {MAX_DESCRIPTION_BOXES}"
                )

    def references(self, start: int, end: int, *, record: bool) -> None:
        """Each item id an iref reference names is an item to libavif, found by a search through all of
        them: 60 000 ids in a 120 KB file took 2.2 s (found in review). A grid's tiles are its dimg ids."""
        data = self.data
        wide = data[start] != 0  # version 1: 32-bit item ids
        width = 4 if wide else 2
        for kind, body, box_end in self.children(start + 4, end):
            origin = _number(data, body, width, box_end)
            named = _number(data, body + width, 2, box_end)
            self.add("item references", named + 1, MAX_ITEMS)
            if kind == b"dimg":
                self.tiles += named
            if record and kind in (b"dimg", b"auxl"):
                targets = [_number(data, body + width + 2 + i * width, width, box_end) for i in range(named)]
                self.meta.references.setdefault(kind, []).append((origin, targets))


def _number(data: bytes, pos: int, size: int, end: int) -> int:
    """A big-endian unsigned integer of ``size`` bytes (0 makes 0); ``IndexError`` past ``end``."""
    if pos + size > end:
        raise IndexError("a field runs past its box")
    return int.from_bytes(data[pos : pos + size], "big")
