"""Refuse an AVIF whose boxes would make libavif build a record for each of very many entries.

libavif, which Pillow opens AVIF with, parses every item and every sample of a sequence when the file
is opened, with a record for each: a review's 3.7 MB AVIF of 160 000 items took 15 s of CPU and 225 MB
(the time grows with the square of the items), and a sequence declaring 2 million one-byte samples held
171 MB, all against estimates of 4, before the memory budget was asked. A real AVIF has a few items (a
grid some hundreds) and a sequence one sample per frame. The walk here reads box headers and the entry
counts libavif sizes its records by, up to the limits.

Two things Pillow's open does with what libavif hands it are checked here too, because both happen
before the service sees the image: each item location's extents are a record in libavif (4000 items of
65 535 extents, in 32 KB because an extent may take no bytes at all, held 4 GB and 11 s of CPU), and
an Exif item is parsed in Python at open (an EXIF directory of 65 535 entries in a 787 KB file took
0.1 s with the GIL held, twice a request): its payload gets the same limits as any EXIF block
(``optimizer.tiffifd``).
"""

from __future__ import annotations

import contextlib
import struct
from dataclasses import dataclass

from optimizer.errors import StructureLimit
from optimizer.tiffifd import check_exif

MAX_ITEMS = 4096  # items, their locations and property associations
MAX_SAMPLES = 16_384  # samples of an image sequence, and its table entries
_MAX_DEPTH = 8
# Boxes that hold boxes; "meta" is a full box, its children after 4 bytes of version and flags.
_CONTAINERS = frozenset(
    {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"dinf", b"iprp", b"ipco", b"edts", b"meta"}
)
# Full boxes with an entry count: where it is after the box header, and its format.
_SAMPLE_COUNTS = {b"stsz": (8, ">I"), b"stz2": (8, ">I"), b"stts": (4, ">I"), b"stsc": (4, ">I")}
_SAMPLE_COUNTS |= {b"stco": (4, ">I"), b"co64": (4, ">I"), b"stss": (4, ">I"), b"ctts": (4, ">I")}


class TooManyEntries(StructureLimit):
    """The AVIF declares more items or samples than the limits allow."""


MAX_BOXES = 65_536  # a real AVIF has some dozens; 3 million tiny ones took the walk itself 1 s
# Property associations (ipma): a few per item; 4096 entries of 255 each held 77 MiB (a review).
MAX_ASSOCIATIONS = 16_384
# Extents of all item locations: an encoder writes one an item (libavif, a grid's tiles included).
MAX_EXTENTS = 16_384
# Exif items whose payload is walked: an encoder writes one. Each walk is bounded (four directories
# of 4096 entries), but not thousands of them.
MAX_EXIF_ITEMS = 16
# iloc's construction methods: from the file's start, or from the start of the meta's idat.
_FILE_OFFSET, _IDAT_OFFSET = 0, 1


@dataclass(frozen=True, slots=True)
class Summary:
    grid_tiles: int  # item ids named by dimg references: a grid's tiles, each decoded on its own


def check_boxes(data: bytes) -> Summary:
    """What the estimate needs, or ``TooManyEntries`` past the limits. The counts run over the whole
    file (a meta in each of eleven tracks multiplied per-box limits to 808 MiB, in review); boxes cut
    short or malformed end the walk (libavif refuses or ignores them)."""
    walk = _Walk(data)
    with contextlib.suppress(struct.error, IndexError):
        walk.boxes(0, len(data), 0)
    exif_items = [item for item in walk.exif_items if item in walk.locations]
    if len(exif_items) > MAX_EXIF_ITEMS:
        raise TooManyEntries(
            f"the AVIF declares more than {MAX_EXIF_ITEMS} Exif items; an encoder writes one"
        )
    for item in exif_items:
        try:
            check_exif(_exif_tiff(walk.payload(item)))
        except StructureLimit as exc:
            raise TooManyEntries(f"the AVIF's Exif item: {exc}") from None
    return Summary(walk.tiles)


def _exif_tiff(payload: bytes) -> bytes:
    """An Exif item's TIFF structure: after its 4-byte header offset, from the first TIFF header, as
    libavif finds it (with an ``Exif\0\0`` before it, Pillow reads the same structure)."""
    found = [at for at in (payload.find(b"II*\x00", 4), payload.find(b"MM\x00*", 4)) if at >= 0]
    return payload[min(found) :] if found else b""


class _Walk:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.totals: dict[str, int] = {}
        self.tiles = 0
        self.exif_items: list[int] = []  # ids of the items of type Exif
        # Each item's construction method and extents (offset, length); its base offset is added in.
        self.locations: dict[int, tuple[int, list[tuple[int, int]]]] = {}
        self.idat: tuple[int, int] = (0, 0)  # the first idat's body, where method 1 extents point

    def payload(self, item: int) -> bytes:
        """An item's bytes, its extents joined, as libavif reads them; what lies past the end of the
        file or the idat is left out (libavif refuses such an item)."""
        method, extents = self.locations[item]
        start, end = (0, len(self.data)) if method == _FILE_OFFSET else self.idat
        if method not in (_FILE_OFFSET, _IDAT_OFFSET):
            return b""  # from another item: libavif does not read Exif that way
        parts, total = [], 0
        for offset, length in extents:
            begin = start + offset
            stop = end if length == 0 else min(end, begin + length)  # 0: to the end of the source
            if begin < stop and total < len(self.data):
                parts.append(self.data[begin : min(stop, begin + len(self.data) - total)])
                total += len(parts[-1])
        return b"".join(parts)

    def add(self, what: str, count: int, limit: int) -> None:
        total = self.totals[what] = self.totals.get(what, 0) + count
        if total > limit:
            raise TooManyEntries(f"the AVIF declares more than {limit} {what}")

    def boxes(self, start: int, end: int, depth: int) -> None:
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
            body, box_end = pos + header, pos + size
            if kind in _CONTAINERS and depth < _MAX_DEPTH:
                self.boxes(body + (4 if kind == b"meta" else 0), box_end, depth + 1)
                if kind == b"stbl":
                    self.samples(body, box_end)
            elif kind == b"iref":
                self.references(body, box_end)
            elif kind == b"ipma":
                self.associations(body, box_end)
            elif kind == b"iinf":
                self.item_types(body, box_end)
            elif kind == b"iloc":
                self.item_locations(body, box_end)
            elif kind == b"idat" and self.idat == (0, 0):
                self.idat = (body, box_end)
            else:
                self.count(kind, body)
            pos = box_end

    def count(self, kind: bytes, body: int) -> None:
        data = self.data
        if kind in _SAMPLE_COUNTS:
            at, code = _SAMPLE_COUNTS[kind]
            self.add(f"{kind.decode()} entries", struct.unpack_from(code, data, body + at)[0], MAX_SAMPLES)

    def item_types(self, start: int, end: int) -> None:
        """Counts the items; notes which are Exif (infe version 2 and 3 name a type, 0 and 1 none)."""
        data = self.data
        version = data[start]
        self.add("items", struct.unpack_from(">H" if version == 0 else ">I", data, start + 4)[0], MAX_ITEMS)
        pos = start + (6 if version == 0 else 8)
        while pos + 8 <= end:
            self.add("boxes", 1, MAX_BOXES)
            size, kind = struct.unpack_from(">I4s", data, pos)
            if size < 8 or pos + size > end:
                return
            if kind == b"infe" and data[pos + 8] in (2, 3):
                wide = data[pos + 8] == 3
                item = struct.unpack_from(">I" if wide else ">H", data, pos + 12)[0]
                item_type = data[pos + (18 if wide else 16) : pos + (22 if wide else 20)]
                if item_type == b"Exif":
                    self.exif_items.append(item)
            pos += size

    def item_locations(self, start: int, end: int) -> None:
        """Counts the items' locations and their extents, libavif's record each; keeps where they are.
        A location cut short by the box's end ends this box's reading only."""
        data = self.data
        version = data[start]
        offset_size, length_size = data[start + 4] >> 4, data[start + 4] & 15
        base_size, index_size = data[start + 5] >> 4, (data[start + 5] & 15 if version in (1, 2) else 0)
        id_size = 2 if version < 2 else 4
        count = _number(data, start + 6, id_size, end)
        self.add("item locations", count, MAX_ITEMS)
        pos = start + 6 + id_size
        with contextlib.suppress(IndexError):
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
                self.locations.setdefault(item, (method, extents))

    def associations(self, start: int, end: int) -> None:
        """Each entry's property associations, not the entries: libavif keeps one record each."""
        data = self.data
        version, wide_index = data[start], data[start + 3] & 1
        (entries,) = struct.unpack_from(">I", data, start + 4)
        self.add("item property entries", entries, MAX_ITEMS)
        pos = start + 8
        for _ in range(entries):
            pos += 2 if version < 1 else 4  # the item id
            if pos >= end:
                return
            associations = data[pos]
            self.add("property associations", associations, MAX_ASSOCIATIONS)
            pos += 1 + associations * (2 if wide_index else 1)

    def samples(self, start: int, end: int) -> None:
        """The samples a sample table makes, not its entries: one stsc entry of 2 million samples per
        chunk made libavif 2 million records, 192 MiB (found in review)."""
        data, children = self.data, _children(self.data, start, end)
        chunks = 0
        for kind in (b"stco", b"co64"):
            if kind in children:
                chunks = max(chunks, struct.unpack_from(">I", data, children[kind][0] + 4)[0])
        if b"stsc" in children:
            at, box_end = children[b"stsc"]
            entries = min(struct.unpack_from(">I", data, at + 4)[0], (box_end - at - 8) // 12)
            widest = max(
                (struct.unpack_from(">I", data, at + 12 + 12 * i)[0] for i in range(entries)), default=0
            )
            self.add("samples", widest * max(chunks, 1), MAX_SAMPLES)
        if b"stts" in children:
            at, box_end = children[b"stts"]
            entries = min(struct.unpack_from(">I", data, at + 4)[0], (box_end - at - 8) // 8)
            self.add(
                "samples",
                sum(struct.unpack_from(">I", data, at + 8 + 8 * i)[0] for i in range(entries)),
                MAX_SAMPLES,
            )

    def references(self, start: int, end: int) -> None:
        """Each item id an iref reference names is an item to libavif, found by a search through all of
        them: 60 000 ids in a 120 KB file took 2.2 s (found in review). A grid's tiles are its dimg ids."""
        data = self.data
        wide = data[start] != 0  # version 1: 32-bit item ids
        pos = start + 4
        while pos + 8 <= end:
            size, kind = struct.unpack_from(">I4s", data, pos)
            if size < 8 or pos + size > end:
                break
            (named,) = struct.unpack_from(">H", data, pos + 8 + (4 if wide else 2))
            self.add("item references", named + 1, MAX_ITEMS)
            if kind == b"dimg":
                self.tiles += named
            pos += size


def _number(data: bytes, pos: int, size: int, end: int) -> int:
    """A big-endian unsigned integer of ``size`` bytes (0 makes 0); ``IndexError`` past ``end``."""
    if pos + size > end:
        raise IndexError("a field runs past its box")
    return int.from_bytes(data[pos : pos + size], "big")


def _children(data: bytes, start: int, end: int) -> dict[bytes, tuple[int, int]]:
    """A container's direct children by type (the first of each): where their bodies start and end."""
    found: dict[bytes, tuple[int, int]] = {}
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        if size < 8 or pos + size > end:
            break
        found.setdefault(kind, (pos + 8, pos + size))
        pos += size
    return found
