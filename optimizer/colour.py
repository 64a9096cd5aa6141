"""Colours to sRGB through an image's embedded ICC profile, with LittleCMS, and the profile checks that
keep LittleCMS from a hostile profile's cost.

A profile that does what sRGB does (sRGB by any name: a camera's "sRGB IEC61966-2.1", an "IEC 61966-2.1
Default RGB", an Ultra HDR photo's "sRGB Gamut with sRGB Transfer") changes no pixel, and is skipped:
which profiles do is found once, by a transform of a probe of colours, and remembered by the profile's
digest. The name alone is no guide: a linear profile on sRGB's primaries named "sRGB linear" (Krita and
darktable ship such) was taken for sRGB and left its image 48 levels too dark on average (a review).
"""

from __future__ import annotations

import hashlib
import io
import struct

from PIL import Image, ImageChops, ImageCms

SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
LAB = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB"))

# The colour space a profile must describe for an image of each mode.
_SPACES = {"RGB": "RGB", "CMYK": "CMYK", "L": "GRAY"}
# The probe: every channel at 16 levels (0, 17 ... 255), as 4096 colours, or 256 greys.
_LEVELS = range(0, 256, 17)
_RGB_PROBE = Image.frombytes(
    "RGB", (4096, 1), bytes(value for r in _LEVELS for g in _LEVELS for b in _LEVELS for value in (r, g, b))
)
_GREY_PROBE = Image.frombytes("L", (256, 1), bytes(range(256)))
# A profile that moves no probe colour by more than this is sRGB's: a v2 sRGB profile's 1024-point curves
# against LittleCMS's own sRGB differ by 1 here and there.
_SAME = 1
# Profiles found to be sRGB's or not, by digest and mode: bounded, and cleared when full.
_KNOWN: dict[tuple[bytes, str], bool] = {}
_KNOWN_MAX = 1024


def to_srgb(im: Image.Image, icc: bytes | None) -> Image.Image:
    """Convert colours to sRGB through the embedded ICC profile; CMYK always ends as RGB, grey stays grey.

    A profile that LittleCMS cannot parse (a bogus marker, a truncated profile), or that describes another
    colour space than the image's, is ignored, as browsers do.
    """
    if not icc and im.mode != "CMYK":
        return im  # untagged is sRGB: nothing to convert, and no copies of the pixels
    alpha = im.getchannel("A") if im.mode in ("RGBA", "LA") else None
    colour = im.convert(im.mode[:-1]) if alpha is not None else im
    if icc and (transform := _transform_to_srgb(icc, colour.mode)) is not None:
        converted = transform.apply(colour)
        # A grey profile's greys land on sRGB's neutral axis: R = G = B, so one channel is the grey.
        colour = converted.getchannel("G") if colour.mode == "L" else converted
    if colour.mode == "CMYK":
        colour = colour.convert("RGB")
    if alpha is not None:
        colour = colour.copy() if colour is im else colour
        colour.putalpha(alpha)
    return colour


def _transform_to_srgb(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """LittleCMS's transform from ``icc`` to sRGB for an image of ``mode``, or ``None``: the profile is
    unusable, describes another colour space, or is sRGB's already."""
    space = _SPACES.get(mode)
    if space is None:
        return None
    key = (hashlib.blake2b(icc, digest_size=16).digest(), mode)
    if _KNOWN.get(key) is True:
        return None  # sRGB's (found before): the common case costs a digest
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(usable_icc(icc)))
        if profile.profile.xcolor_space.strip() != space:
            return None
        transform = ImageCms.buildTransform(profile, SRGB, mode, "RGB")
        if key not in _KNOWN:
            same = mode != "CMYK" and _changes_nothing(transform, mode)
            if len(_KNOWN) >= _KNOWN_MAX:
                _KNOWN.clear()
            _KNOWN[key] = same
            if same:
                return None
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None
    return transform


def _changes_nothing(transform: ImageCms.ImageCmsTransform, mode: str) -> bool:
    """Whether ``transform`` leaves every probe colour where it was (within ``_SAME``)."""
    probe = _GREY_PROBE if mode == "L" else _RGB_PROBE
    out = transform.apply(probe)
    extrema = ImageChops.difference(out, probe.convert("RGB")).getextrema()
    return all(high <= _SAME for _low, high in extrema)  # type: ignore[misc]


# ICC v4's floating-point transforms (D2Bx, B2Dx): a list of processing elements that LittleCMS reads
# and runs one by one, each a copy even when the list points at the same element again. A review built
# a 626-byte PNG whose profile lists 20 000 of them: 35 s of CPU and 750 MB for one 8x8 image, all
# outside the memory budget. LittleCMS prefers these tags to the A2Bx/B2Ax lookup tables and the
# matrix-and-curves a profile also carries (the fixed-size forms browsers use); renamed, they are
# unknown tags and ignored. A profile with nothing else cannot be used and is ignored, as browsers do.
_FLOAT_LUT_TAGS = frozenset(prefix + bytes([digit]) for prefix in (b"D2B", b"B2D") for digit in b"0123")
_ICC_HEADER = 128
_ICC_TAG_ENTRY = 12
_ICC_MAX_TAGS = 100  # LittleCMS's own limit (MAX_TABLE_TAG): it refuses a profile with more


def usable_icc(icc: bytes) -> bytes:
    """``icc`` with the tags LittleCMS must not read renamed (case swapped: unknown to it), else as it is:
    float transforms (above), and tags whose counts promise more than they hold (``icc_tag_fits``)."""
    if len(icc) < _ICC_HEADER + 4:
        return icc
    (count,) = struct.unpack_from(">I", icc, _ICC_HEADER)
    table_end = _ICC_HEADER + 4 + _ICC_TAG_ENTRY * count
    if count > _ICC_MAX_TAGS or table_end > len(icc):
        return icc  # LittleCMS refuses such a table itself
    view = memoryview(icc)  # a tag is looked at in place: a copy per tag was quadratic (a review)
    found = []
    for at in range(_ICC_HEADER + 4, table_end, _ICC_TAG_ENTRY):
        signature, offset, size = struct.unpack_from(">4sII", icc, at)
        if signature in _FLOAT_LUT_TAGS or not icc_tag_fits(view[offset : offset + size]):
            found.append(at)
    if not found:
        return icc
    renamed = bytearray(icc)
    for at in found:
        renamed[at : at + 4] = icc[at : at + 4].swapcase()  # ``desc`` is lower case already
    return bytes(renamed)


def icc_tag_fits(tag: bytes | memoryview) -> bool:
    """Whether a tag holds what its counts say, for the types LittleCMS allocates from a count before
    reading: a 588-byte profile whose description (an ``mluc``) claimed 44 million records made it
    allocate and clear 504 MiB for a 1x1 PNG (a review's fuzzing); lookup tables (``mft1``, ``mft2``,
    and the CLUT of ``mAB``/``mBA``) can claim ~500 MB the same way. A tag cut short is LittleCMS's to
    refuse; here only what it would allocate is compared with the tag's size."""
    kind, size = bytes(tag[:4]), len(tag)
    try:
        if kind == b"mluc":
            records, record = struct.unpack_from(">II", tag, 8)
            return bool(16 + records * record <= size)
        if kind in (b"mft1", b"mft2"):
            inputs, outputs, grid = tag[8], tag[9], tag[10]
            if kind == b"mft1":
                entries = 256 * inputs + grid**inputs * outputs + 256 * outputs
                return bool(48 + entries <= size)
            input_entries, output_entries = struct.unpack_from(">HH", tag, 48)
            entries = input_entries * inputs + grid**inputs * outputs + output_entries * outputs
            return bool(52 + 2 * entries <= size)
        if kind in (b"mAB ", b"mBA "):
            inputs, outputs = tag[8], tag[9]
            (clut,) = struct.unpack_from(">I", tag, 24)
            if not clut:
                return True
            points = 1
            for grid in tag[clut : clut + min(inputs, 16)]:
                points *= grid
            precision = tag[clut + 16]
            return bool(clut + 20 + points * outputs * precision <= size)
    except (struct.error, IndexError):
        return True  # cut short: LittleCMS refuses it as it reads
    return True
