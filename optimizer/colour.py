"""Colours to sRGB through an image's embedded ICC profile, with LittleCMS, and the profile checks that
keep LittleCMS from a hostile profile's cost.

A profile that does what sRGB does (sRGB by any name: a camera's "sRGB IEC61966-2.1", an "IEC 61966-2.1
Default RGB", an Ultra HDR photo's "sRGB Gamut with sRGB Transfer") changes no pixel, and is skipped:
which profiles do is found once, by a transform of a probe of colours, and remembered by the profile's
digest. The name alone is no guide: a linear profile on sRGB's primaries named "sRGB linear" (Krita and
darktable ship such) was taken for sRGB and left its image 48 levels too dark on average (a review).
"""

from __future__ import annotations

import functools
import hashlib
import io
import struct
import threading
from collections import OrderedDict

from PIL import Image, ImageChops, ImageCms

from optimizer.pngchunks import PngColours

SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
LAB = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB"))

# The colour space a profile must describe for an image of each mode.
_SPACES = {"RGB": "RGB", "CMYK": "CMYK", "L": "GRAY"}
# The probe: every channel at 16 levels (0, 17 ... 255), as 4096 colours, then every level of each
# channel alone and of grey, so that a curve is looked at everywhere (one brightened between the 16
# levels passed for sRGB, 40 levels off there, a review).
_LEVELS = range(0, 256, 17)
_RGB_PROBE = Image.frombytes(
    "RGB",
    (4096 + 4 * 256, 1),
    bytes(value for r in _LEVELS for g in _LEVELS for b in _LEVELS for value in (r, g, b))
    + bytes(value for v in range(256) for value in (v, 0, 0))
    + bytes(value for v in range(256) for value in (0, v, 0))
    + bytes(value for v in range(256) for value in (0, 0, v))
    + bytes(value for v in range(256) for value in (v, v, v)),
)
_GREY_PROBE = Image.frombytes("L", (256, 1), bytes(range(256)))
# A profile that moves no probe colour by more than this is sRGB's: a v2 sRGB profile's 1024-point curves
# against LittleCMS's own sRGB differ by 1 here and there.
_SAME = 1
# Profiles found to be sRGB's or not, by digest and mode: bounded, and cleared when full.
_KNOWN: dict[tuple[bytes, str], bool] = {}
_KNOWN_MAX = 1024
# The transforms of the profiles used last (a phone's Display P3, an AVIF's nclx): parsing a profile and
# building its transform took ~2 ms a request. LittleCMS lets threads share a transform (each call
# copies its one-pixel cache); each holds its tables, up to a few hundred KB, hence only a few.
_TRANSFORMS: OrderedDict[tuple[bytes, str, bool], ImageCms.ImageCmsTransform] = OrderedDict()
_TRANSFORMS_MAX = 16
_TRANSFORMS_LOCK = threading.Lock()
# Where LittleCMS's optimised transforms are not close enough, they are built unoptimised ("exact"):
# - grey: its optimised 8-bit transform resamples the curve coarsely, and a linear grey (gAMA 1.0, or a
#   gamma-1 grey profile) came out up to 10 levels dark in the shadows (level 2 as 12 where browsers
#   show 22); to_srgb runs the exact one over the 256 levels only.
# - CMYK: the optimised one interpolates a 17-point grid precalculated from the profile, off by 0.2-1.2
#   levels on average and up to 18-31 at the gamut's edge for Photoshop's and Ghostscript's CMYK
#   profiles (a review), where browsers evaluate the profile itself. Exact costs ~0.25 µs a pixel
#   against ~0.04, so only up to this many pixels (~0.25 s); a larger output keeps the grid.
_EXACT_CMYK_PIXELS = 1 << 20


# An AVIF says what its colours are with an nclx colour box (ITU-T H.273 code points) instead of an ICC
# profile: a wide-gamut photo (Display P3, BT.2020) was taken for sRGB and came out dull (no ICC, so
# nothing was converted). The primaries' and the white's chromaticities (x, y), by code point:
_D65 = (0.3127, 0.3290)
_Chromaticities = tuple[tuple[float, float], tuple[float, float], tuple[float, float], tuple[float, float]]
_PRIMARIES: dict[int, _Chromaticities] = {
    1: ((0.640, 0.330), (0.300, 0.600), (0.150, 0.060), _D65),  # BT.709, sRGB's
    5: ((0.640, 0.330), (0.290, 0.600), (0.150, 0.060), _D65),  # BT.470 B/G
    6: ((0.630, 0.340), (0.310, 0.595), (0.155, 0.070), _D65),  # SMPTE 170M
    7: ((0.630, 0.340), (0.310, 0.595), (0.155, 0.070), _D65),  # SMPTE 240M
    9: ((0.708, 0.292), (0.170, 0.797), (0.131, 0.046), _D65),  # BT.2020
    11: ((0.680, 0.320), (0.265, 0.690), (0.150, 0.060), (0.314, 0.351)),  # DCI-P3
    12: ((0.680, 0.320), (0.265, 0.690), (0.150, 0.060), _D65),  # Display P3
    22: ((0.630, 0.340), (0.295, 0.605), (0.155, 0.077), _D65),  # EBU Tech 3213-E
}
_UNSPECIFIED = 2
_SRGB_TRANSFER = 13
# Transfer characteristics, as (gamma, a, b, c, d): value = (a*x + b)**gamma from x >= d, else c*x. The
# BT.709 family (1, 6, 14, 15) is displayed with sRGB's curve, as Chromium displays it (its camera curve's
# inverse made such files up to 16 levels lighter than browsers show them, a review). PQ and HLG (HDR)
# are not converted: they would need tone mapping, and such an image is left as it is.
_Curve = tuple[float, float, float, float, float]
_SRGB_CURVE: _Curve = (2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)
_TRANSFERS: dict[int, _Curve] = {
    13: _SRGB_CURVE,
    1: _SRGB_CURVE,  # BT.709
    6: _SRGB_CURVE,  # SMPTE 170M
    14: _SRGB_CURVE,  # BT.2020, 10 bits
    15: _SRGB_CURVE,  # BT.2020, 12 bits
    4: (2.2, 1.0, 0.0, 0.0, 0.0),  # gamma 2.2
    5: (2.8, 1.0, 0.0, 0.0, 0.0),  # gamma 2.8
    8: (1.0, 1.0, 0.0, 0.0, 0.0),  # linear
    7: (1 / 0.45, 1 / 1.1115, 0.1115 / 1.1115, 1 / 4.0, 0.0913),  # SMPTE 240M
    17: (2.6, (52.37 / 48) ** (1 / 2.6), 0.0, 0.0, 0.0),  # SMPTE ST 428-1 (DCI)
}
_PCS_WHITE = (0.9642, 1.0, 0.8249)  # D50, the profile connection space's
_BRADFORD = ((0.8951, 0.2664, -0.1614), (-0.7502, 1.7135, 0.0367), (0.0389, -0.0685, 1.0296))


# A PNG's gAMA within 5 % of 1/2.2 and no cHRM is taken as sRGB's, as Chromium takes it (libpng's
# PNG_GAMMA_THRESHOLD): such files are common, and their authors meant sRGB.
_NEUTRAL_GAMMA = 0.05


@functools.lru_cache(maxsize=64)
def nclx_profile(primaries: int, transfer: int, *, grey: bool = False) -> bytes | None:
    """An ICC profile (matrix and curves; a grey one for a ``grey`` image) for an nclx colour description,
    or ``None`` where there is nothing to convert (sRGB's, or unspecified) or no way to (HDR, code points
    this does not know)."""
    primaries = 1 if primaries == _UNSPECIFIED else primaries
    transfer = _SRGB_TRANSFER if transfer == _UNSPECIFIED else transfer
    if primaries not in _PRIMARIES or transfer not in _TRANSFERS:
        return None
    if _TRANSFERS[transfer] == _SRGB_CURVE and (primaries == 1 or grey):
        return None
    return _profile(f"nclx {primaries}/{transfer}", _PRIMARIES[primaries], _TRANSFERS[transfer], grey)


def png_profile(colours: PngColours, *, grey: bool) -> bytes | None:
    """The profile a PNG's colours are to be read through, or ``None`` for sRGB's, by the chunks'
    precedence in PNG's third edition and Chromium's reading of them: cICP (when its code points are
    known and not HDR's), then the first iCCP, then sRGB, then gAMA, with cHRM's primaries or else
    sRGB's, each the first before the image data that is whole (``pngchunks.check_chunks``). Browsers
    show a linear PNG (gAMA 1.0) as such; Pillow drops gAMA and cHRM and does not read cICP, and such a
    PNG came out with its shadows crushed."""
    if (cicp := colours.cicp) is not None and cicp[2] == 0 and cicp[3] == 1:
        primaries, transfer = cicp[0], cicp[1]
        if primaries in _PRIMARIES and transfer in _TRANSFERS:  # unspecified is not a description here
            return nclx_profile(primaries, transfer, grey=grey)
    if colours.first_icc is not None and _parses(colours.first_icc):
        return colours.first_icc  # one that does not parse is passed over, as Chromium passes it over
    gamma, chromaticity = colours.gamma, colours.chromaticity
    if colours.srgb or gamma is None or not gamma > 0:
        return None  # cHRM alone is not read: its curve would be a guess (Chromium, Firefox, Safari)
    if chromaticity is None and abs(gamma * 2.2 - 1) < _NEUTRAL_GAMMA:
        return None
    return _gamma_profile(gamma, chromaticity, grey)


def _parses(icc: bytes) -> bool:
    """Whether LittleCMS reads ``icc`` as a profile (its header and tag table; the tags as they are used)."""
    try:
        ImageCms.ImageCmsProfile(io.BytesIO(usable_icc(icc)))
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return False
    return True


@functools.lru_cache(maxsize=64)
def _gamma_profile(gamma: float, chromaticity: tuple[float, ...] | None, grey: bool) -> bytes | None:
    """A profile for a PNG's gAMA (its encoding exponent) on cHRM's primaries, or ``None`` where those
    make no colour space (a primary without luminance, a white outside the diagram), as browsers ignore
    them."""
    if chromaticity is None:
        primaries = _PRIMARIES[1]
    else:
        wx, wy, rx, ry, gx, gy, bx, by = chromaticity
        primaries = ((rx, ry), (gx, gy), (bx, by), (wx, wy))
        if not all(0 < y <= 1 and 0 <= x <= 1 for x, y in primaries):
            return None
    try:
        return _profile(f"PNG gamma {gamma:.5f}", primaries, (1 / gamma, 1.0, 0.0, 0.0, 0.0), grey)
    except (ZeroDivisionError, OverflowError, ValueError):
        return None  # primaries on one line: no matrix; or columns past what a profile's numbers hold


def _profile(name: str, primaries: _Chromaticities, curve: _Curve, grey: bool) -> bytes:
    """An ICC matrix-and-curves profile (a curve alone for a ``grey`` image) for ``primaries`` and
    ``curve``; ``ValueError`` where the primaries' matrix cannot be made."""
    gamma, a, b, c, d = curve
    table = b"".join(
        struct.pack(">H", round(65535 * min(1.0, (a * x + b) ** gamma if x >= d else c * x)))
        for x in (i / 1023 for i in range(1024))
    )
    curve_tag = b"curv" + bytes(4) + struct.pack(">I", 1024) + table
    tags = [(b"desc", _description(name)), (b"wtpt", _xyz(_PCS_WHITE))]
    if grey:
        return icc_profile([*tags, (b"kTRC", curve_tag)], b"GRAY")
    *colours, white = primaries
    columns = _adapted_columns(colours, white)
    if not all(abs(value) < 32767 for column in columns for value in column):
        raise ValueError("the primaries make no usable matrix")
    tags += [(name, _xyz(column)) for name, column in zip((b"rXYZ", b"gXYZ", b"bXYZ"), columns, strict=True)]
    tags += [(name, curve_tag) for name in (b"rTRC", b"gTRC", b"bTRC")]
    return icc_profile(tags)


def _adapted_columns(
    colours: list[tuple[float, float]], white: tuple[float, float]
) -> list[tuple[float, float, float]]:
    """Each primary's XYZ at full strength, for ``white`` at Y = 1, adapted to D50 (Bradford), as an
    ICC matrix profile's rXYZ, gXYZ, bXYZ hold them."""
    xyz = [(x / y, 1.0, (1 - x - y) / y) for x, y in colours]
    white_xyz = (white[0] / white[1], 1.0, (1 - white[0] - white[1]) / white[1])
    matrix = [[xyz[j][i] for j in range(3)] for i in range(3)]  # primaries as columns
    strengths = _solve(matrix, white_xyz)
    cone_white = _apply(_BRADFORD, white_xyz)
    cone_pcs = _apply(_BRADFORD, _PCS_WHITE)
    scale = [cone_pcs[i] / cone_white[i] for i in range(3)]
    adapted = []
    for j in range(3):
        column = [xyz[j][i] * strengths[j] for i in range(3)]
        cone = _apply(_BRADFORD, column)
        adapted.append(_solve([list(row) for row in _BRADFORD], [cone[i] * scale[i] for i in range(3)]))
    return [(column[0], column[1], column[2]) for column in adapted]


def _apply(
    matrix: tuple[tuple[float, ...], ...] | list[list[float]], vector: tuple[float, ...] | list[float]
) -> list[float]:
    return [sum(matrix[i][k] * vector[k] for k in range(3)) for i in range(3)]


def _solve(matrix: list[list[float]], vector: tuple[float, ...] | list[float]) -> list[float]:
    """``matrix``⁻¹ · ``vector`` for a 3x3 matrix (Cramer's rule)."""

    def det(m: list[list[float]]) -> float:
        return (
            m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
            - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
        )

    whole = det(matrix)
    solved = []
    for j in range(3):
        replaced = [[vector[i] if k == j else matrix[i][k] for k in range(3)] for i in range(3)]
        solved.append(det(replaced) / whole)
    return solved


def _xyz(value: tuple[float, float, float]) -> bytes:
    return b"XYZ " + bytes(4) + b"".join(struct.pack(">i", round(v * 65536)) for v in value)


def _description(text: str) -> bytes:
    ascii_text = text.encode("ascii") + b"\0"
    return b"desc" + bytes(4) + struct.pack(">I", len(ascii_text)) + ascii_text + bytes(8 + 3 + 67)


def icc_profile(tags: list[tuple[bytes, bytes]], space: bytes = b"RGB ") -> bytes:
    """An ICC v2 display profile of ``tags`` for a colour ``space`` (RGB or GRAY), PCS XYZ, D50."""
    offset = 128 + 4 + 12 * len(tags)
    table = blob = b""
    for signature, data in tags:
        blob += bytes(-(offset + len(blob)) % 4)
        table += signature + struct.pack(">II", offset + len(blob), len(data))
        blob += data
    header = bytearray(128)
    header[8:20] = struct.pack(">I", 0x02100000) + b"mntr" + space
    header[20:24] = b"XYZ "
    header[36:40] = b"acsp"
    header[68:80] = _xyz(_PCS_WHITE)[8:]  # the illuminant, as an XYZ tag's numbers
    profile = bytes(header) + struct.pack(">I", len(tags)) + table + blob
    return struct.pack(">I", len(profile)) + profile[4:]


def to_srgb(im: Image.Image, icc: bytes | None) -> Image.Image:
    """Convert colours to sRGB through the embedded ICC profile; CMYK always ends as RGB, grey stays grey.

    A profile that LittleCMS cannot parse (a bogus marker, a truncated profile), or that describes another
    colour space than the image's, is ignored, as browsers do.
    """
    if not icc and im.mode != "CMYK":
        return im  # untagged is sRGB: nothing to convert, and no copies of the pixels
    alpha = im.getchannel("A") if im.mode in ("RGBA", "LA") else None
    colour = im.convert(im.mode[:-1]) if alpha is not None else im
    exact = colour.mode == "L" or (
        colour.mode == "CMYK" and colour.width * colour.height <= _EXACT_CMYK_PIXELS
    )
    if icc and (transform := _transform_to_srgb(icc, colour.mode, exact=exact)) is not None:
        if colour.mode == "L":
            # A grey profile's greys land on sRGB's neutral axis (R = G = B), so the conversion is a
            # table of 256 levels: the exact transform is run once over them, and the image looked up
            # through it, without an RGB copy.
            colour = colour.point(list(transform.apply(_GREY_PROBE).getchannel("G").tobytes()))
        else:
            colour = transform.apply(colour)
    if colour.mode == "CMYK":
        colour = colour.convert("RGB")
    if alpha is not None:
        colour = colour.copy() if colour is im else colour
        colour.putalpha(alpha)
    return colour


def _transform_to_srgb(icc: bytes, mode: str, *, exact: bool) -> ImageCms.ImageCmsTransform | None:
    """LittleCMS's transform from ``icc`` to sRGB for an image of ``mode``, or ``None``: the profile is
    unusable, describes another colour space, or is sRGB's already. An ``exact`` one evaluates the
    profile for each pixel rather than through a table LittleCMS precalculates from it."""
    space = _SPACES.get(mode)
    if space is None:
        return None
    key = (hashlib.blake2b(icc, digest_size=16).digest(), mode)
    if _KNOWN.get(key) is True:
        return None  # sRGB's (found before): the common case costs a digest
    with _TRANSFORMS_LOCK:
        if (cached := _TRANSFORMS.get((*key, exact))) is not None:
            _TRANSFORMS.move_to_end((*key, exact))
            return cached
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(usable_icc(icc)))
        if profile.profile.xcolor_space.strip() != space:
            return None
        flags = ImageCms.Flags.NOOPTIMIZE if exact else ImageCms.Flags.NONE
        transform = ImageCms.buildTransform(profile, SRGB, mode, "RGB", flags=flags)
        if key not in _KNOWN:
            same = mode != "CMYK" and _changes_nothing(transform, mode)
            if len(_KNOWN) >= _KNOWN_MAX:
                _KNOWN.clear()
            _KNOWN[key] = same
            if same:
                return None
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None
    with _TRANSFORMS_LOCK:
        _TRANSFORMS[(*key, exact)] = transform
        while len(_TRANSFORMS) > _TRANSFORMS_MAX:
            _TRANSFORMS.popitem(last=False)
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
