"""What libavif will decode from an AVIF, checked against the sizes the AVIF declares, and the facts the
memory estimate prices it by; read from the boxes ``optimizer.avifboxes`` walked.

The decoder allocates for the frames the AV1 data codes (up to 16384x16384), and libavif then scales
them to the declared size, which is what Pillow reports and the estimate starts from: a review's 1.2 KB
file declaring 64x64 and coding 8192x8192 took 163 MB. So an image item's AV1 data (every sequence
header in it, ``optimizer.av1seq``) must fit its ispe, a grid's output must equal its ispe and its tiles
fit within that, and an alpha item must fit its image. A track's declared size may be a display size
(ffmpeg writes one for pixels that are not square), so a track's coded frames go to the pixel limit and
the estimate instead.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from optimizer.av1seq import scan
from optimizer.errors import StructureLimit

if TYPE_CHECKING:
    from optimizer.avifboxes import Meta, Walk

# Distinct AV1 sequence headers read: a stream has one, a grid's tiles repeat it (each parsed in Python).
MAX_SEQUENCE_HEADERS = 64
# AV1 OBUs read over the file (each a step in Python): a few an item, a grid's tiles included.
MAX_OBUS = 65_536


class LargerThanDeclared(StructureLimit):
    """An item's or a track's AV1 data codes frames larger than the size the AVIF declares for it."""


@dataclass(frozen=True, slots=True)
class Sampling:
    """How an AV1 stream stores a pixel, from its av1C: bytes a sample, and planes (1 for monochrome,
    1.5 for 4:2:0, 2 for 4:2:2, 3 for 4:4:4)."""

    sample_bytes: int
    planes: float

    @classmethod
    def from_config(cls, config: bytes | None) -> Sampling | None:
        """From an av1C body; ``None`` when there is none to read."""
        if config is None or len(config) < 3:
            return None
        high, mono, sub_x, sub_y = config[2] & 0x40, config[2] & 0x10, config[2] & 0x08, config[2] & 0x04
        return cls(2 if high else 1, 1.0 if mono else 1.5 if sub_x and sub_y else 2.0 if sub_x else 3.0)


@dataclass(frozen=True, slots=True)
class Decoded:
    """What libavif decodes beyond the declared image, for the pixel limit and the estimate."""

    # The largest frame a track's AV1 data codes, in pixels (libavif decodes at the coded size).
    track_frame_pixels: int = 0
    # What the tracks code beyond their declared sizes, all tracks together (colour and alpha each
    # decode at their coded size: 34 MiB over the estimate for two at 5000x5000 declared 1000x1000).
    track_excess_pixels: int = 0
    # The colour and alpha streams' sampling; ``None`` where it cannot be known (no av1C; a track, whose
    # av1C libavif does not hold to its stream: a review's 12-bit 4:4:4 sequence whose av1C said
    # monochrome peaked at twice the estimate), to be priced at the worst.
    colour: Sampling | None = None
    alpha: bool = False
    # An alpha stream is usually one plane, but may be coded in three (a review: 8-bit 4:4:4 alpha beside
    # 8-bit 4:2:0 colour peaked 41 MiB over an estimate that counted one).
    alpha_sampling: Sampling | None = None


def check_decoded(walk: Walk) -> Decoded:
    """``LargerThanDeclared`` where libavif would decode more than the AVIF declares; else the facts."""
    return _Frames(walk).check()


class _Frames:
    def __init__(self, walk: Walk) -> None:
        self.walk = walk
        self.headers: set[bytes] = set()  # distinct AV1 sequence headers read
        self.frames: dict[tuple[object, ...], tuple[int, int] | None] = {}  # by where the data is
        self.colour: bytes | None = None  # the colour stream's av1C
        self.alpha = False
        self.alpha_config: bytes | None = None

    def check(self) -> Decoded:
        """What libavif decodes for Pillow, against the sizes declared for it: the primary item (or,
        without one, every AV1 item), a grid's tiles, and the alpha items referring to them, then the
        tracks."""
        for meta in self.walk.metas:
            decoded = [meta.primary] if meta.primary is not None else list(meta.item_types)
            decoded += [alpha for item in decoded for alpha in meta.referring(b"auxl", item)]
            for item in decoded:
                self.check_item(meta, item)
        largest = excess = 0
        trusted = True  # no track decoded: the items' av1C hold
        for track in self.walk.tracks:
            if (
                track.codec == b"av01"
                and track.first_chunk is not None
                and track.first_sample_bytes is not None
            ):
                sample = self.walk.data[track.first_chunk : track.first_chunk + track.first_sample_bytes]
                coded = self.frame(sample)
                if coded is not None:
                    largest = max(largest, coded[0] * coded[1])
                    shown = track.size[0] * track.size[1] if track.size else 0
                    excess += max(0, coded[0] * coded[1] - shown)
                trusted = False  # libavif decodes the track: its streams are priced at the worst
        return Decoded(
            track_frame_pixels=largest,
            track_excess_pixels=excess,
            colour=Sampling.from_config(self.colour) if trusted else None,
            alpha=self.alpha or sum(track.codec == b"av01" for track in self.walk.tracks) > 1,
            alpha_sampling=Sampling.from_config(self.alpha_config) if trusted else None,
        )

    def check_item(self, meta: Meta, item: int) -> None:
        """One item libavif decodes: its AV1 data, or a grid's, within its ispe; an alpha item within
        its colour item."""
        declared = self.declared(meta, item)
        if meta.item_types.get(item) == b"grid":
            self.check_grid(meta, item, declared)
        elif meta.item_types.get(item) == b"av01":
            self.check_stream(meta, item, declared)
            if item == meta.primary or meta.primary is None:
                self.colour = self.colour or self.av1_config(meta, item)
        if meta.named(b"auxl", item):  # an alpha item, decoded beside its image
            self.alpha = True
            self.alpha_config = self.alpha_config or self.av1_config(meta, item)
        for colour in meta.named(b"auxl", item):
            colour_size = self.declared(meta, colour)
            if declared and colour_size and (declared[0] > colour_size[0] or declared[1] > colour_size[1]):
                raise LargerThanDeclared(
                    f"the AVIF's alpha item {item} is {declared[0]}x{declared[1]}, larger than its "
                    f"image's {colour_size[0]}x{colour_size[1]}"
                )

    def check_grid(self, meta: Meta, item: int, declared: tuple[int, int] | None) -> None:
        payload = self.walk.payload(meta, item)
        wide = len(payload) > 1 and payload[1] & 1
        if len(payload) < (12 if wide else 8):
            return  # libavif refuses a grid it cannot read
        output = struct.unpack_from(">II" if wide else ">HH", payload, 4)
        if output != declared:
            raise LargerThanDeclared(
                f"the AVIF's grid item {item} composes a {output[0]}x{output[1]} image but declares "
                f"{declared[0] if declared else 0}x{declared[1] if declared else 0}"
            )
        for tile in meta.named(b"dimg", item):
            tile_size = self.declared(meta, tile)
            if tile_size and (tile_size[0] > output[0] or tile_size[1] > output[1]):
                raise LargerThanDeclared(
                    f"the AVIF's grid item {item} has a {tile_size[0]}x{tile_size[1]} tile in a "
                    f"{output[0]}x{output[1]} image"
                )
            if meta.item_types.get(tile) == b"av01":
                self.check_stream(meta, tile, tile_size)
                self.colour = self.colour or self.av1_config(meta, tile)

    def check_stream(self, meta: Meta, item: int, declared: tuple[int, int] | None) -> None:
        """``LargerThanDeclared`` if the item's AV1 data may code frames wider or taller than
        ``declared``. Items at the same place are read once."""
        method, extents = meta.locations.get(item, (0, []))
        key = (id(meta), method, *extents)
        if key not in self.frames:
            self.frames[key] = self.frame(self.walk.payload(meta, item))
        coded = self.frames[key]
        if declared is not None and coded is not None and (coded[0] > declared[0] or coded[1] > declared[1]):
            raise LargerThanDeclared(
                f"the AVIF's item {item} is declared {declared[0]}x{declared[1]}, but its AV1 data codes "
                f"frames up to {coded[0]}x{coded[1]}"
            )

    def frame(self, stream: bytes) -> tuple[int, int] | None:
        """The largest frame the AV1 ``stream`` codes; each distinct sequence header counted."""
        seen: set[bytes] = set()
        coded, obus = scan(stream, seen)
        self.walk.add("AV1 OBUs", obus, MAX_OBUS)
        self.walk.add(
            "different sequence headers in its AV1 data", len(seen - self.headers), MAX_SEQUENCE_HEADERS
        )
        self.headers |= seen
        return coded

    def declared(self, meta: Meta, item: int) -> tuple[int, int] | None:
        """An item's ispe: the first associated, as libavif takes it."""
        found = self.property(meta, item, b"ispe")
        if found is None or len(found) < 12:
            return None
        width, height = struct.unpack_from(">II", found, 4)
        return int(width), int(height)

    def av1_config(self, meta: Meta, item: int) -> bytes | None:
        """An item's av1C property body: its depth and chroma subsampling."""
        return self.property(meta, item, b"av1C")

    def property(self, meta: Meta, item: int, kind: bytes) -> bytes | None:
        """The body of the first property of ``kind`` associated with ``item``."""
        properties = meta.properties or []
        for index in meta.item_properties.get(item, ()):
            if 0 < index <= len(properties) and properties[index - 1][0] == kind:
                _kind, body, end = properties[index - 1]
                return self.walk.data[body:end]
        return None
