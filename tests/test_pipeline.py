"""Unit tests of ``optimizer.pipeline``: the Pillow work alone, without HTTP.

Pixel comparisons use the mean absolute difference (0..255 per channel) with tolerances: JPEG, WebP and
AVIF are lossy, so exact equality is never asked of them.
"""

from __future__ import annotations

import dataclasses
import io
import math
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageChops, ImageCms, ImageOps, ImageStat, JpegImagePlugin
from PIL.PngImagePlugin import PngInfo

from optimizer.colour import to_srgb
from optimizer.errors import CorruptImage, EmptyBody, OptimizerError, TooManyPixels, UnsupportedFormat
from optimizer.pipeline import (
    MEDIA_TYPES,
    PNG_OPTIMIZE_MAX_PIXELS,
    Limits,
    Output,
    Params,
    decode,
    encode,
    fit_mode_to_format,
    inspect,
    normalise_mode,
    open_image,
    optimize,
    orient,
    read_orientation,
    target_size,
)
from optimizer.settings import KNOWN_INPUT_FORMATS, OUTPUT_FORMATS, RESIZERS, Settings
from tests.conftest import CORPUS, image_bytes, manifest, vips_or_skip

# The limits the service builds from its default settings (see ServiceState.from_settings).
_DEFAULTS = Settings(threads=1)
LIMITS = Limits(
    max_pixels=_DEFAULTS.max_pixels,
    max_dimension=_DEFAULTS.max_dimension,
    input_formats=_DEFAULTS.input_formats,
)
ORIENTATION = 0x0112
PILLOW_NAMES = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "avif": "AVIF"}
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))

# Pillow warns (UserWarning) while parsing these hostile files; pyproject turns warnings into errors, so
# without these filters the warning escapes optimize() as an exception in tests only. In production the
# warning is just logged and the files end as 422.


# ---------------------------------------------------------------------------------------------- helpers


def run(data: bytes, params: Params | None = None, limits: Limits = LIMITS) -> tuple[Output, Image.Image]:
    """optimize() and the decoded output."""
    out = optimize(data, params or Params(), limits)
    image = Image.open(io.BytesIO(out.data))
    image.load()
    return out, image


def mad(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference per channel and pixel, 0..255."""
    assert a.size == b.size
    assert a.mode == b.mode
    means = ImageStat.Stat(ImageChops.difference(a, b)).mean
    return sum(means) / len(means)


def mean(image: Image.Image) -> list[float]:
    return list(ImageStat.Stat(image).mean)


def to_srgb_reference(image: Image.Image) -> Image.Image:
    """The source in sRGB RGB through its own ICC profile (if any), with LittleCMS directly."""
    icc = image.info.get("icc_profile")
    rgb = image.convert("RGB")
    if not icc:
        return rgb
    converted = ImageCms.profileToProfile(
        rgb, ImageCms.ImageCmsProfile(io.BytesIO(icc)), SRGB, outputMode="RGB"
    )
    assert converted is not None
    return converted


def png_chunks(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    offset = 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        yield data[offset + 4 : offset + 8], data[offset + 8 : offset + 8 + length]
        offset += 12 + length


def png_from_chunks(chunks: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(
        struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        for kind, payload in chunks
    )
    return b"\x89PNG\r\n\x1a\n" + body


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a size but holds no pixels: enough for the header check."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return png_from_chunks([(b"IHDR", ihdr), (b"IEND", b"")])


def encoded(image: Image.Image, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def gradient(size: tuple[int, int] = (96, 64)) -> Image.Image:
    """An RGB image with structure in both axes, so that flips and rotations are visible."""
    width, height = size
    red = Image.linear_gradient("L").resize(size)
    green = Image.linear_gradient("L").rotate(90).resize(size)
    blue = Image.new("L", size, 0)
    blue.paste(255, (0, 0, width // 3, height // 3))
    return Image.merge("RGB", (red, green, blue))


def half_transparent(size: tuple[int, int] = (80, 40)) -> Image.Image:
    """Opaque red on the left half, fully transparent green on the right (the green must never show)."""
    image = Image.new("RGBA", size, (0, 255, 0, 0))
    image.paste((255, 0, 0, 255), (0, 0, size[0] // 2, size[1]))
    return image


def halves(image: Image.Image) -> tuple[Image.Image, Image.Image]:
    """The left and right halves, each with a margin away from the seam (resampling blurs it)."""
    width, height = image.size
    margin = max(1, width // 8)
    return (
        image.crop((0, 0, width // 2 - margin, height)),
        image.crop((width // 2 + margin, 0, width, height)),
    )


def corpus_file(corpus: Path, name: str) -> bytes:
    return (corpus / name).read_bytes()


def exif_orientation_files() -> list[str]:
    return sorted(f"valid/{path.name}" for path in (CORPUS / "valid").glob("*exif-orientation*"))


# ------------------------------------------------------------------------------------------ target_size


@pytest.mark.parametrize(
    ("size", "params", "expected"),
    [
        ((400, 200), Params(width=100), (100, 50)),
        ((400, 200), Params(height=50), (100, 50)),
        # both: fit inside the box, the tighter side decides
        ((400, 200), Params(width=100, height=100), (100, 50)),
        ((400, 200), Params(width=300, height=50), (100, 50)),
        ((200, 400), Params(width=100, height=100), (50, 100)),
        # neither: the size is kept
        ((400, 200), Params(), (400, 200)),
        # no upscaling unless asked
        ((400, 200), Params(width=800), (400, 200)),
        ((400, 200), Params(height=1000), (400, 200)),
        ((400, 200), Params(width=800, height=800), (400, 200)),
        ((400, 200), Params(width=800, enlarge=True), (800, 400)),
        ((400, 200), Params(height=300, enlarge=True), (600, 300)),
        ((400, 200), Params(width=800, height=300, enlarge=True), (600, 300)),
        # the exact size asked: nothing to do
        ((400, 200), Params(width=400), (400, 200)),
        # never a 0-px side
        ((2, 1), Params(width=1), (1, 1)),
        ((1, 2), Params(height=1), (1, 1)),
        ((1000, 1), Params(width=10), (10, 1)),
        ((1, 1000), Params(height=3), (1, 3)),
        ((3, 1), Params(width=1), (1, 1)),
    ],
)
def test_target_size(size: tuple[int, int], params: Params, expected: tuple[int, int]) -> None:
    assert target_size(size, params, 8192) == expected


@pytest.mark.parametrize(
    ("size", "params", "max_dimension", "expected"),
    [
        # the cap applies without any request, to the longer side
        ((10000, 5000), Params(), 8192, (8192, 4096)),
        ((5000, 10000), Params(), 8192, (4096, 8192)),
        ((400, 200), Params(), 100, (100, 50)),
        # and to an enlargement
        ((400, 200), Params(width=1000, enlarge=True), 500, (500, 250)),
        # and to a box that the other side would overflow
        ((100, 1000), Params(width=100), 500, (50, 500)),
        # an extreme aspect ratio under the cap keeps a 1-px side
        ((100000, 1), Params(), 8192, (8192, 1)),
    ],
)
def test_target_size_max_dimension(
    size: tuple[int, int], params: Params, max_dimension: int, expected: tuple[int, int]
) -> None:
    assert target_size(size, params, max_dimension) == expected


sides = st.integers(min_value=1, max_value=20_000)
box_sides = st.none() | st.integers(min_value=1, max_value=10_000)


@settings(max_examples=400, deadline=None, database=None)
@given(
    size=st.tuples(sides, sides),
    box=st.tuples(box_sides, box_sides),
    enlarge=st.booleans(),
    max_dimension=st.integers(min_value=1, max_value=10_000),
)
def test_target_size_properties(
    size: tuple[int, int], box: tuple[int | None, int | None], enlarge: bool, max_dimension: int
) -> None:
    (width, height), (box_width, box_height) = size, box
    params = Params(width=box_width, height=box_height, enlarge=enlarge)
    new_w, new_h = target_size((width, height), params, max_dimension)

    assert new_w >= 1
    assert new_h >= 1
    assert max(new_w, new_h) <= max_dimension
    if box_width is not None:
        assert new_w <= box_width
    if box_height is not None:
        assert new_h <= box_height
    if not enlarge:
        assert new_w <= width
        assert new_h <= height

    # The aspect ratio is kept: both sides are the source's times one scale, within rounding (a side
    # that would be under one pixel is clamped to one). The scale, as documented: fit inside the box,
    # never above 1 unless enlarging, never past the max dimension.
    box_scales = [side / old for side, old in ((box_width, width), (box_height, height)) if side is not None]
    scale = min(box_scales, default=1.0)
    if not enlarge:
        scale = min(scale, 1.0)
    scale = min(scale, max_dimension / max(width, height))
    for new, old in ((new_w, width), (new_h, height)):
        exact = old * scale
        assert abs(new - exact) <= 0.5 + 1e-6 or (new == 1 and exact < 1)
    # The side that decided the scale comes out exactly as asked.
    if scale < 1.0 or enlarge:
        if box_width is not None and scale == box_width / width:
            assert new_w == box_width
        elif box_height is not None and scale == box_height / height:
            assert new_h == box_height


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    width=st.integers(min_value=1, max_value=120),
    height=st.integers(min_value=1, max_value=120),
    box_width=st.none() | st.integers(min_value=1, max_value=150),
    box_height=st.none() | st.integers(min_value=1, max_value=150),
    enlarge=st.booleans(),
)
def test_optimize_output_size_is_target_size(
    width: int, height: int, box_width: int | None, box_height: int | None, enlarge: bool
) -> None:
    params = Params(width=box_width, height=box_height, enlarge=enlarge, format="png")
    out, image = run(encoded(gradient((width, height)), "PNG"), params)
    assert (out.width, out.height) == target_size((width, height), params, LIMITS.max_dimension)
    assert image.size == (out.width, out.height)
    assert (out.source_width, out.source_height) == (width, height)


def test_max_dimension_caps_the_output() -> None:
    limits = Limits(max_pixels=LIMITS.max_pixels, max_dimension=50, input_formats=LIMITS.input_formats)
    out, image = run(image_bytes((200, 100)), Params(), limits)
    assert image.size == (out.width, out.height) == (50, 25)


def test_tiny_rotated_image_never_gets_a_zero_side(corpus: Path) -> None:
    data = corpus_file(corpus, "valid/exif-orientation-8-2x1.jpg")
    for params in (Params(width=1), Params(height=1), Params(width=1, height=1), Params(width=300)):
        out, image = run(data, params)
        assert image.width >= 1
        assert image.height >= 1
        assert image.size == (out.width, out.height)
    out, image = run(data, Params(height=1))
    assert image.size == (1, 1)


# ------------------------------------------------------------------------------------------ orientation


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_matches_exif_transpose(orientation: int) -> None:
    source = gradient((6, 4))
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    tagged = Image.open(io.BytesIO(encoded(source, "PNG", exif=exif)))
    tagged.load()
    assert read_orientation(tagged, loaded=True) == orientation
    expected = ImageOps.exif_transpose(tagged)
    assert orient(source, orientation).tobytes() == expected.convert("RGB").tobytes()
    assert orient(source, orientation).size == (expected.width, expected.height)


def test_read_orientation_ignores_broken_or_missing_exif(corpus: Path) -> None:
    with Image.open(io.BytesIO(corpus_file(corpus, "valid/exif-corrupt.jpg"))) as image:
        assert read_orientation(image, loaded=False) == 0
    with Image.open(io.BytesIO(image_bytes())) as image:
        assert read_orientation(image, loaded=False) == 0
    exif = Image.Exif()
    exif[ORIENTATION] = 9  # out of range
    with Image.open(io.BytesIO(encoded(gradient(), "JPEG", exif=exif))) as image:
        assert read_orientation(image, loaded=False) == 0


@pytest.mark.parametrize("name", exif_orientation_files())
@pytest.mark.parametrize("width", [None, 100])
def test_exif_orientation_is_applied(corpus: Path, name: str, width: int | None) -> None:
    data = corpus_file(corpus, name)
    with Image.open(io.BytesIO(data)) as source:
        source.load()
        orientation = source.getexif()[ORIENTATION]
        stored = source.size
        upright = ImageOps.exif_transpose(source)
        assert upright is not None
        reference_upright = to_srgb_reference(upright) if source.info.get("icc_profile") else upright
        reference_stored = to_srgb_reference(source)
    assert 2 <= orientation <= 8

    out, image = run(data, Params(width=width, quality=90))

    # Dimensions: 5 to 8 swap width and height relative to the stored size.
    expected_upright = (stored[1], stored[0]) if orientation >= 5 else stored
    assert (out.source_width, out.source_height) == expected_upright
    if width is None or width >= expected_upright[0]:
        assert image.size == expected_upright
    else:
        assert image.width == width
        assert abs(image.height - expected_upright[1] * width / expected_upright[0]) <= 1
    if stored[0] != stored[1] and image.width != image.height:
        assert (image.width > image.height) == (expected_upright[0] > expected_upright[1])

    # No orientation is left for a viewer to apply a second time.
    assert image.getexif().get(ORIENTATION, 1) == 1

    # Pixels: close to the upright source, clearly further from the source as stored.
    output = image.convert("RGB")
    good = mad(output, reference_upright.convert("RGB").resize(image.size, Image.Resampling.LANCZOS))
    assert good < 10
    if stored[0] * stored[1] > 4:  # the 2x1 file is one flat colour: only its size can show the rotation
        bad = mad(output, reference_stored.resize(image.size, Image.Resampling.LANCZOS))
        assert bad > good + 10
        assert bad > 2 * good


def test_png_exif_chunk_after_the_image_data_is_honoured() -> None:
    """A PNG's eXIf may follow IDAT: its orientation is only known after load(), and must still apply."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    chunks = list(png_chunks(encoded(gradient((60, 30)), "PNG", exif=exif)))
    kinds = [kind for kind, _ in chunks]
    assert kinds.index(b"eXIf") < kinds.index(b"IDAT")
    exif_chunk = chunks.pop(kinds.index(b"eXIf"))
    chunks.insert(len(chunks) - 1, exif_chunk)  # just before IEND
    data = png_from_chunks(chunks)
    with Image.open(io.BytesIO(data)) as probe:
        assert "exif" not in probe.info  # not seen before the image data is read

    out, image = run(data, Params(format="png"))
    assert (out.source_width, out.source_height) == (30, 60)
    assert image.size == (30, 60)
    assert image.convert("RGB").tobytes() == orient(gradient((60, 30)), 6).tobytes()

    out, image = run(data, Params(format="png", width=15))
    assert image.size == (15, 30)


@pytest.mark.parametrize("width", [400, 1200])
def test_large_png_output_is_compressed_at_zlibs_default_level(width: int) -> None:
    """zlib's level 9 costs depend on the pixels: a 7 KB GIF enlarged to a 4000x3000 PNG took 18.7 s of
    CPU (a review's fuzzing). Above ``PNG_OPTIMIZE_MAX_PIXELS`` the output is written at level 6, which
    its zlib header says (FLEVEL 2; level 9 says 3)."""
    noise = Image.effect_noise((64, 48), 80).convert("RGB")
    buffer = io.BytesIO()
    noise.save(buffer, "PNG")
    out, image = run(buffer.getvalue(), Params(format="png", width=width, enlarge=True))
    assert image.size == (width, width * 48 // 64)
    idat = out.data.index(b"IDAT") + 4
    level = out.data[idat + 1] >> 6
    large = image.width * image.height > PNG_OPTIMIZE_MAX_PIXELS
    assert level == (2 if large else 3)


# ------------------------------------------------------------------------------------------------ alpha


def test_fully_transparent_png_is_flattened_onto_white_for_jpeg(corpus: Path) -> None:
    out, image = run(corpus_file(corpus, "valid/fully-transparent-300x300.png"), Params(width=100))
    assert out.media_type == "image/jpeg"
    assert image.mode == "RGB"
    assert all(low >= 250 for low, _high in ImageStat.Stat(image).extrema)


@pytest.mark.parametrize("fmt", ["png", "webp", "avif"])
def test_fully_transparent_png_stays_transparent(corpus: Path, fmt: str) -> None:
    _, image = run(corpus_file(corpus, "valid/fully-transparent-300x300.png"), Params(format=fmt))
    assert image.mode in ("RGBA", "LA")
    assert image.getchannel("A").getextrema() == (0, 0)


@pytest.mark.parametrize("width", [None, 40])
def test_half_transparent_png_is_flattened_for_jpeg(width: int | None) -> None:
    _, image = run(encoded(half_transparent(), "PNG"), Params(width=width))
    assert image.mode == "RGB"
    left, right = halves(image)
    assert mad(left, Image.new("RGB", left.size, (255, 0, 0))) < 8
    assert mad(right, Image.new("RGB", right.size, (255, 255, 255))) < 8


def test_background_colour_is_used_for_jpeg() -> None:
    blue = (0, 0, 255)
    _, image = run(encoded(half_transparent(), "PNG"), Params(background=blue))
    left, right = halves(image)
    assert mad(left, Image.new("RGB", left.size, (255, 0, 0))) < 8
    assert mad(right, Image.new("RGB", right.size, blue)) < 8


def test_background_colour_on_the_corpus_transparent_png(corpus: Path) -> None:
    params = Params(background=(0, 0, 255))
    _, image = run(corpus_file(corpus, "valid/fully-transparent-300x300.png"), params)
    assert mad(image, Image.new("RGB", image.size, (0, 0, 255))) < 4


@pytest.mark.parametrize("fmt", ["png", "webp", "avif"])
@pytest.mark.parametrize("width", [None, 40])
def test_alpha_is_kept_for_formats_with_alpha(fmt: str, width: int | None) -> None:
    _, image = run(encoded(half_transparent(), "PNG"), Params(format=fmt, width=width))
    assert image.mode == "RGBA"
    left, right = halves(image.getchannel("A"))
    assert mean(left)[0] > 245
    assert mean(right)[0] < 10
    colour_left, _ = halves(image.convert("RGB"))
    assert mad(colour_left, Image.new("RGB", colour_left.size, (255, 0, 0))) < 12


@pytest.mark.parametrize("name", ["valid/palette-trns.png", "photos/gulp-mate-1920x1200-alpha.png"])
def test_partial_alpha_from_the_corpus_is_kept_for_png(corpus: Path, name: str) -> None:
    data = corpus_file(corpus, name)
    with Image.open(io.BytesIO(data)) as source:
        source_alpha = source.convert("RGBA").getchannel("A")
    _, image = run(data, Params(format="png", width=64))
    assert image.mode == "RGBA"
    expected = source_alpha.resize(image.size, Image.Resampling.LANCZOS)
    assert mad(image.getchannel("A"), expected) < 6


def test_opaque_alpha_is_dropped() -> None:
    opaque = Image.new("RGBA", (20, 10), (10, 20, 30, 255))
    for fmt in OUTPUT_FORMATS:
        _, image = run(encoded(opaque, "PNG"), Params(format=fmt))
        assert image.mode == "RGB", fmt


# ------------------------------------------------------------------------------------------ colour, ICC


def test_cmyk_jpeg_comes_out_rgb(corpus: Path) -> None:
    data = corpus_file(corpus, "valid/cmyk-adobe.jpg")
    with Image.open(io.BytesIO(data)) as source:
        assert source.mode == "CMYK"
        reference = source.convert("RGB")
    for fmt in ("jpeg", "png"):
        _, image = run(data, Params(format=fmt))
        assert image.mode == "RGB"
        assert mad(image, reference) < 10
        # and it is not an inverted image (a classic Adobe CMYK mistake)
        assert mad(image, ImageChops.invert(reference)) > 50


def test_xyb_jpeg_is_converted_through_its_icc_profile(corpus: Path) -> None:
    data = corpus_file(corpus, "valid/xyb-needs-icc.jpg")
    with Image.open(io.BytesIO(data)) as source:
        source.load()
        raw = source.convert("RGB")
        reference = to_srgb_reference(source)
    assert mad(raw, reference) > 15  # the profile matters for this file

    _, image = run(data, Params(format="png"))
    assert image.mode == "RGB"
    assert mad(image, reference) < 1
    assert mad(image, raw) > 15

    _, image = run(data, Params(format="jpeg", quality=90))
    assert mad(image, reference) < 4
    assert mad(image, raw) > 15


def test_wide_gamut_png_is_converted(corpus: Path) -> None:
    data = corpus_file(corpus, "valid/prophoto-icc-1x1.png")
    with Image.open(io.BytesIO(data)) as source:
        source.load()
        reference = to_srgb_reference(source)
        raw = source.convert("RGB")
    _, image = run(data, Params(format="png"))
    assert image.convert("RGB").getpixel((0, 0)) == reference.getpixel((0, 0))
    assert image.convert("RGB").getpixel((0, 0)) != raw.getpixel((0, 0))


def test_bogus_icc_profile_is_ignored(corpus: Path) -> None:
    data = corpus_file(corpus, "valid/icc-bogus-after-sof.jpg")
    with Image.open(io.BytesIO(data)) as source:
        source.load()
        assert source.info["icc_profile"]  # Pillow sees the marker...
        reference = source.copy()
    for fmt in OUTPUT_FORMATS:
        out, image = run(data, Params(format=fmt))
        assert (out.width, out.height) == (10, 10)
        assert mad(image.convert("L"), reference.convert("L")) < 8


@pytest.mark.parametrize("icc", [b"profile", b"", b"\x00" * 200])
def test_to_srgb_ignores_an_unparsable_profile_on_rgb(icc: bytes) -> None:
    image = gradient((16, 8))
    assert to_srgb(image, icc).tobytes() == image.tobytes()


def test_to_srgb_ignores_a_truncated_profile() -> None:
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()
    image = gradient((16, 8))
    assert to_srgb(image, profile[: len(profile) // 2]).tobytes() == image.tobytes()


def test_to_srgb_keeps_alpha_and_converts_colour(corpus: Path) -> None:
    with Image.open(corpus / "valid/xyb-needs-icc.jpg") as source:
        source.load()
        icc = source.info["icc_profile"]
        rgb = source.convert("RGB").crop((0, 0, 32, 32))
    alpha = Image.linear_gradient("L").resize((32, 32))
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    out = to_srgb(rgba, icc)
    assert out.mode == "RGBA"
    assert out.getchannel("A").tobytes() == alpha.tobytes()
    assert mad(out.convert("RGB"), rgb) > 15


def test_to_srgb_leaves_srgb_and_gray_alone() -> None:
    srgb = SRGB.tobytes()
    image = gradient((16, 8))
    assert to_srgb(image, srgb).tobytes() == image.tobytes()
    gray = image.convert("L")
    assert to_srgb(gray, srgb).mode == "L"


def test_to_srgb_turns_cmyk_into_rgb() -> None:
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    out = to_srgb(cmyk, None)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 0, 0)


# ------------------------------------------------------------------------------------------- metadata

FORBIDDEN_INFO = ("exif", "xmp", "icc_profile", "comment", "XML:com.adobe.xmp")


def assert_no_metadata(data: bytes, *payloads: bytes) -> None:
    image = Image.open(io.BytesIO(data))
    image.load()
    for key in FORBIDDEN_INFO:
        assert key not in image.info, key
    assert dict(image.getexif()) == {}
    assert b"Exif" not in data
    assert b"<x:xmpmeta" not in data
    assert b"http://ns.adobe.com/xap" not in data
    for payload in payloads:
        assert payload not in data


def tagged_source(fmt: str) -> tuple[bytes, list[bytes]]:
    """A generated image carrying EXIF, XMP, ICC and a comment, plus marker bytes that must not leak."""
    exif = Image.Exif()
    exif[0x010F] = "SecretCameraMaker"  # Make
    exif[ORIENTATION] = 1
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><SecretXmpValue/></x:xmpmeta>'
    icc = SRGB.tobytes()
    markers = [b"SecretCameraMaker", b"SecretXmpValue", b"SecretComment"]
    if fmt == "JPEG":
        data = encoded(gradient(), "JPEG", exif=exif, xmp=xmp, icc_profile=icc, comment=b"SecretComment")
        markers.append(icc[128:192])  # JPEG stores the profile uncompressed
    else:
        info = PngInfo()
        info.add_text("Comment", "SecretComment")
        info.add_itxt("XML:com.adobe.xmp", xmp.decode())
        data = encoded(gradient(), "PNG", exif=exif, pnginfo=info, icc_profile=icc)
    return data, markers


@pytest.mark.parametrize("source_format", ["JPEG", "PNG"])
@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
@pytest.mark.parametrize("width", [None, 40])
def test_generated_metadata_is_stripped(source_format: str, fmt: str, width: int | None) -> None:
    data, markers = tagged_source(source_format)
    with Image.open(io.BytesIO(data)) as source:  # the source really carries it all
        assert {"exif", "icc_profile"} <= set(source.info)
        for marker in markers:
            assert marker in data
    out = optimize(data, Params(format=fmt, width=width), LIMITS)
    assert_no_metadata(out.data, *markers)


METADATA_FILES = [
    "valid/progressive-icc-exif-colorfulcups-2560x1600.jpg",  # EXIF, XMP, ICC and a comment
    "valid/cmyk-adobe.jpg",
    "valid/gray.jpg",
    "valid/exif-orientation-6.png",
    "valid/exif-orientation-6.webp",
    "valid/prophoto-icc-1x1.png",
    "valid/mpo-stereo-sugarshack.jpg",
    "valid/gainmap-ultrahdr-3840x2160.jpg",
    "hostile/polyglot-jpeg-mp3-in-comment.jpg",
]


@pytest.mark.parametrize("name", METADATA_FILES)
@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
def test_corpus_metadata_is_stripped(corpus: Path, name: str, fmt: str) -> None:
    data = corpus_file(corpus, name)
    with Image.open(io.BytesIO(data)) as source:
        payloads = [
            value[:48]
            for key, value in source.info.items()
            if key in FORBIDDEN_INFO and isinstance(value, bytes) and len(value) >= 48
        ]
        large = source.width * source.height > 640 * 480
    # Large photos are resized to keep the test fast; small ones go through unresized too, which is the
    # path where the decoded image itself (with its ``info``) reaches the encoder.
    out = optimize(data, Params(format=fmt, width=160 if large else None), LIMITS)
    assert_no_metadata(out.data, *payloads)


def test_polyglot_mp3_payload_is_gone(corpus: Path) -> None:
    data = corpus_file(corpus, "hostile/polyglot-jpeg-mp3-in-comment.jpg")
    with Image.open(io.BytesIO(data)) as source:
        comment = source.info["comment"]
    assert isinstance(comment, bytes)
    assert len(comment) > 10_000
    mp3_frame = comment[:32]
    assert mp3_frame.startswith(b"\xff\xfb")  # an MPEG audio frame header
    for fmt in OUTPUT_FORMATS:
        out = optimize(data, Params(format=fmt), LIMITS)
        assert mp3_frame not in out.data
        assert len(out.data) < len(comment)
        assert (out.width, out.height) == (6, 2)


def test_encode_drops_info_of_the_image_it_is_given() -> None:
    image = gradient((20, 10))
    image.info = {"exif": b"Exif\x00\x00junk", "icc_profile": SRGB.tobytes(), "comment": b"SecretComment"}
    for fmt in OUTPUT_FORMATS:
        data = encode(image, Params(format=fmt))
        assert_no_metadata(data, b"SecretComment")


def test_jpeg_encode_is_the_same_without_a_memory_file(monkeypatch: pytest.MonkeyPatch) -> None:
    # The JPEG is written to a memfd so that libjpeg runs without the GIL; where memfd_create is
    # missing or refused, a BytesIO takes its place and the bytes must not change.
    image = gradient((640, 360))
    params = Params(format="jpeg", quality=75)
    through_memfd = encode(image, params)

    def refused(*_args: object) -> int:
        raise PermissionError("memfd_create refused by a seccomp profile")

    monkeypatch.setattr("optimizer.pipeline.os.memfd_create", refused, raising=False)
    assert encode(image, params) == through_memfd
    with Image.open(io.BytesIO(through_memfd)) as out:
        assert (out.format, out.size) == ("JPEG", (640, 360))


def test_a_jpeg_cut_short_in_the_memory_file_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pillow ignores a short write() into the descriptor (a memfd at a cgroup's memory limit): the
    # output must not be served as if it were whole.
    def cut_short(self: Image.Image, fp: io.RawIOBase, *_args: object, **_kwargs: object) -> None:
        fp.write(b"\xff\xd8\xff\xdb" + bytes(100))  # a JPEG's start, no end-of-image marker

    monkeypatch.setattr(Image.Image, "save", cut_short)
    with pytest.raises(OSError, match="cut short"):
        encode(gradient((64, 48)), Params(format="jpeg"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd to count descriptors")
def test_jpeg_encode_leaves_no_descriptor_open(monkeypatch: pytest.MonkeyPatch) -> None:
    image = gradient((64, 48))
    params = Params(format="jpeg")
    before = len(list(Path("/proc/self/fd").iterdir()))
    for _ in range(20):
        encode(image, params)

    def broken(*_args: object, **_kwargs: object) -> None:
        raise OSError("encoder error -2")

    monkeypatch.setattr(Image.Image, "save", broken)
    for _ in range(5):
        with pytest.raises(OSError, match="encoder error"):
            encode(image, params)
    assert len(list(Path("/proc/self/fd").iterdir())) == before


# ----------------------------------------------------------------------------------------- deep images


def test_16bit_gray_png_is_not_white(corpus: Path) -> None:
    data = corpus_file(corpus, "valid/png16-gray-trns.png")
    with Image.open(io.BytesIO(data)) as source:
        source.load()
        assert source.mode == "I;16"
        source_mean = mean(source)[0] / 257
    _, image = run(data, Params(format="png"))
    assert image.mode == "LA"  # the tRNS transparency survives
    assert abs(mean(image.getchannel("L"))[0] - source_mean) < 1.5
    assert ImageStat.Stat(image.getchannel("L")).extrema[0][1] < 250


def test_16bit_gray_png_is_scaled_not_clipped() -> None:
    values = [0, 257 * 64, 257 * 128, 40000, 65535]
    source = Image.new("I;16", (len(values), 1))
    for x, value in enumerate(values):
        source.putpixel((x, 0), value)
    _, image = run(encoded(source, "PNG"), Params(format="png"))
    assert image.mode == "L"
    assert [image.getpixel((x, 0)) for x in range(len(values))] == [0, 64, 128, 155, 255]


@pytest.mark.parametrize(
    ("transparent_value", "expected_alpha"),
    [(255, [255, 0, 255, 255]), (40000, [255, 255, 0, 255])],
)
def test_16bit_gray_trns_marks_only_the_matching_value(
    transparent_value: int, expected_alpha: list[int]
) -> None:
    values = [100, 255, 40000, 65535]
    source = Image.new("I;16", (len(values), 1))
    for x, value in enumerate(values):
        source.putpixel((x, 0), value)
    _, image = run(encoded(source, "PNG", transparency=transparent_value), Params(format="png"))
    alpha = image.convert("LA").getchannel("A")
    assert [alpha.getpixel((x, 0)) for x in range(len(values))] == expected_alpha


def test_16bit_rgb_png(corpus: Path) -> None:
    _, image = run(corpus_file(corpus, "valid/png16-rgb-900x600.png"), Params(width=300, format="png"))
    assert image.size == (300, 200)
    assert image.mode == "RGB"
    # the Dutch flag: red, white, blue bands
    top, middle, bottom = (image.getpixel((150, y)) for y in (30, 100, 170))
    assert isinstance(top, tuple)
    assert isinstance(middle, tuple)
    assert isinstance(bottom, tuple)
    assert top[0] > 150 > top[2]
    assert min(middle) > 230
    assert bottom[2] > 100 > bottom[0]


# ----------------------------------------------------------------------------------------- normalise_mode


@pytest.mark.parametrize(
    ("mode", "colour", "transparency", "expected"),
    [
        ("1", 1, None, "L"),
        ("L", 7, None, "L"),
        ("L", 7, 7, "LA"),
        ("LA", (7, 100), None, "LA"),
        ("RGB", (1, 2, 3), None, "RGB"),
        ("RGB", (1, 2, 3), (1, 2, 3), "RGBA"),
        ("RGBA", (1, 2, 3, 4), None, "RGBA"),
        ("CMYK", (1, 2, 3, 4), None, "CMYK"),
        ("P", 0, None, "RGB"),
        ("P", 0, 0, "RGBA"),
        ("PA", (0, 100), None, "RGBA"),
        ("I;16", 30000, None, "L"),
        ("I", 30000, None, "L"),
        ("F", 30000.0, None, "L"),
        ("YCbCr", (100, 128, 128), None, "RGB"),
        ("La", (7, 100), None, "LA"),
        ("RGBa", (1, 2, 3, 4), None, "RGBA"),
    ],
)
def test_normalise_mode(
    mode: str, colour: float | tuple[int, ...], transparency: object, expected: str
) -> None:
    image = Image.new(mode, (4, 4), colour)
    if transparency is not None:
        image.info["transparency"] = transparency
    assert normalise_mode(image).mode == expected


def test_normalise_mode_scales_deep_gray() -> None:
    image = Image.new("I;16", (2, 2), 257 * 200)
    assert normalise_mode(image).getpixel((0, 0)) == 200


# ------------------------------------------------------------------------------------ fit_mode_to_format


@pytest.mark.parametrize(
    ("mode", "colour", "fmt", "expected_mode"),
    [
        ("RGBA", (1, 2, 3, 255), "png", "RGB"),
        ("RGBA", (1, 2, 3, 255), "jpeg", "RGB"),
        ("LA", (9, 255), "png", "L"),
        ("RGBA", (1, 2, 3, 10), "png", "RGBA"),
        ("RGBA", (1, 2, 3, 10), "webp", "RGBA"),
        ("RGBA", (1, 2, 3, 10), "avif", "RGBA"),
        ("RGBA", (1, 2, 3, 10), "jpeg", "RGB"),
        ("LA", (9, 10), "jpeg", "RGB"),
        ("LA", (9, 10), "png", "LA"),
        ("LA", (9, 10), "webp", "RGBA"),
        ("LA", (9, 10), "avif", "RGBA"),
        ("L", 9, "webp", "RGB"),
        ("L", 9, "avif", "RGB"),
        ("L", 9, "jpeg", "L"),
        ("L", 9, "png", "L"),
    ],
)
def test_fit_mode_to_format(mode: str, colour: int | tuple[int, ...], fmt: str, expected_mode: str) -> None:
    assert fit_mode_to_format(Image.new(mode, (3, 3), colour), Params(format=fmt)).mode == expected_mode


def test_fit_mode_to_format_composites_onto_the_background() -> None:
    image = Image.new("RGBA", (2, 2), (200, 0, 0, 0))
    image.putpixel((0, 0), (200, 0, 0, 255))
    image.putpixel((1, 0), (200, 0, 0, 128))
    out = fit_mode_to_format(image, Params(format="jpeg", background=(0, 0, 255)))
    assert out.getpixel((0, 0)) == (200, 0, 0)
    assert out.getpixel((0, 1)) == (0, 0, 255)
    half = out.getpixel((1, 0))
    assert isinstance(half, tuple)
    assert abs(half[0] - 100) <= 2
    assert abs(half[2] - 127) <= 2


# ------------------------------------------------------------------------------------------ output formats


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
def test_output_formats(fmt: str) -> None:
    out, image = run(encoded(gradient((120, 80)), "PNG"), Params(format=fmt, width=60))
    assert out.media_type == MEDIA_TYPES[fmt] == f"image/{fmt}"
    assert image.format == PILLOW_NAMES[fmt]
    assert image.size == (out.width, out.height) == (60, 40)
    assert (out.source_width, out.source_height) == (120, 80)
    assert out.source_format == "PNG"
    assert mad(image.convert("RGB"), gradient((120, 80)).resize((60, 40), Image.Resampling.LANCZOS)) < 8


@pytest.mark.parametrize("fmt", OUTPUT_FORMATS)
def test_gray_input_to_every_format(corpus: Path, fmt: str) -> None:
    data = corpus_file(corpus, "valid/gray.jpg")
    with Image.open(io.BytesIO(data)) as source:
        reference = source.convert("L")
    _, image = run(data, Params(format=fmt))
    assert image.format == PILLOW_NAMES[fmt]
    assert mad(image.convert("L"), reference) < 6


def test_jpeg_quality_changes_the_size(corpus: Path) -> None:
    data = corpus_file(corpus, "photos/picosdeeuropa-aitzol-berasategi-3264x2448.jpg")
    low = optimize(data, Params(width=400, quality=30), LIMITS)
    high = optimize(data, Params(width=400, quality=95), LIMITS)
    assert (low.width, low.height) == (high.width, high.height) == (400, 300)
    assert len(low.data) < len(high.data) * 0.6


@pytest.mark.parametrize(("quality", "sampling"), [(89, 2), (90, 0), (100, 0)])
def test_near_lossless_jpeg_keeps_full_colour_resolution(quality: int, sampling: int) -> None:
    """From quality 90 up the colour is not halved (4:4:4, libvips's automatic choice): a red pixel
    beside a green and a blue one stays red, where 4:2:0 mixed them at quality 100 (a review)."""
    source = Image.new("RGB", (3, 1))
    source.putdata([(255, 0, 0), (0, 255, 0), (0, 0, 255)])
    _, image = run(encoded(source, "PNG"), Params(quality=quality))
    assert JpegImagePlugin.get_sampling(image) == sampling
    if sampling == 0:
        difference = ImageChops.difference(image.convert("RGB"), source)
        extrema = difference.getextrema()
        assert isinstance(extrema[0], tuple) and max(high for _low, high in extrema) <= 8


@pytest.mark.parametrize("quality", [94, 100])
def test_noise_that_overflows_libjpegs_buffer_still_comes_out(quality: int) -> None:
    """Random black and white at quality 94 codes to more than the byte a pixel Pillow's buffer holds for
    libjpeg's optimized, progressive writing: a 500 until a baseline JPEG was written instead (a review)."""
    noise = Image.effect_noise((400, 300), 255).point(lambda value: 255 if value > 127 else 0)
    _, image = run(
        encoded(Image.merge("RGB", (noise, noise.transpose(Image.Transpose.ROTATE_180), noise)), "PNG"),
        Params(quality=quality),
    )
    assert image.size == (400, 300)


def test_large_jpeg_output_is_progressive() -> None:
    _, small = run(encoded(gradient((100, 100)), "PNG"))
    _, large = run(encoded(gradient((400, 300)), "PNG"))
    assert not small.info.get("progressive")
    assert large.info.get("progressive")


def test_the_operator_can_choose_baseline_jpeg() -> None:
    baseline_limits = dataclasses.replace(LIMITS, jpeg_progressive=False)
    data = encoded(gradient((400, 300)), "PNG")
    _, large = run(data, limits=baseline_limits)
    assert not large.info.get("progressive")
    assert large.size == (400, 300)
    progressive, _ = run(data)
    # The same pixels either way: only the order of the coefficients in the file differs.
    with Image.open(io.BytesIO(progressive.data)) as other:
        assert mad(large.convert("RGB"), other.convert("RGB")) < 0.5


def test_animated_input_yields_the_first_frame(corpus: Path) -> None:
    for name in (
        "valid/animated-42frames.gif",
        "valid/animated-apng-41frames.png",
        "valid/animated-loop3.webp",
    ):
        for fmt in ("png", "webp"):
            _, image = run(corpus_file(corpus, name), Params(format=fmt, width=100))
            assert getattr(image, "n_frames", 1) == 1, (name, fmt)
            assert image.width == 100


def test_jpeg_draft_decodes_at_a_reduced_scale() -> None:
    data = encoded(gradient((640, 480)), "JPEG")
    with open_image(data, LIMITS) as image:
        decode(image, (100, 75))
        assert image.size == (160, 120)  # 1/4: the smallest DCT scale that still covers 100x75
    with open_image(data, LIMITS) as image:
        decode(image, (640, 480))
        assert image.size == (640, 480)


def test_mpo_is_read_as_its_first_frame(corpus: Path) -> None:
    out, image = run(corpus_file(corpus, "valid/mpo-stereo-sugarshack.jpg"), Params(width=320))
    assert out.source_format == "MPO"
    assert image.format == "JPEG"
    assert image.size == (320, 240)


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "name",
    ["hostile/document.pdf", "hostile/photoshop.psd", "hostile/postscript.eps", "hostile/xbm-c-source.xbm"],
)
def test_non_images_are_unsupported(corpus: Path, name: str) -> None:
    with pytest.raises(UnsupportedFormat) as caught:
        optimize(corpus_file(corpus, name), Params(), LIMITS)
    assert caught.value.status == 415


def test_corrupt_header_is_corrupt(corpus: Path) -> None:
    with pytest.raises(CorruptImage) as caught:
        optimize(corpus_file(corpus, "hostile/corrupt-header.jpg"), Params(), LIMITS)
    assert caught.value.status == 422


def pixel_bombs() -> list[str]:
    excluded = {"bomb-gif-second-frame.gif", "bomb-png-ztxt-text.png"}
    return sorted(
        f"hostile/{path.name}"
        for path in (CORPUS / "hostile").glob("bomb-*")
        if path.suffix in (".gif", ".png", ".jpg") and path.name not in excluded
    )


@pytest.mark.parametrize("name", pixel_bombs())
def test_pixel_bombs_are_refused(corpus: Path, name: str) -> None:
    with pytest.raises(TooManyPixels) as caught:
        optimize(corpus_file(corpus, name), Params(width=300), LIMITS)
    assert caught.value.status == 413


def test_pixel_limit_is_checked_from_the_header() -> None:
    # 56 Mpx: above the service's 50 Mpx default but below Pillow's own bomb warning (89.5 Mpx), so this
    # is the service's check. The file has no pixel data at all: it must be refused before decoding.
    with pytest.raises(TooManyPixels) as caught:
        optimize(png_header_only(8000, 7000), Params(width=300), LIMITS)
    assert "8000x7000" in caught.value.detail


def test_pixel_limit_is_inclusive() -> None:
    data = image_bytes((100, 100))
    limits = Limits(max_pixels=10_000, max_dimension=8192, input_formats=KNOWN_INPUT_FORMATS)
    assert optimize(data, Params(), limits).width == 100
    limits = Limits(max_pixels=9_999, max_dimension=8192, input_formats=KNOWN_INPUT_FORMATS)
    with pytest.raises(TooManyPixels):
        optimize(data, Params(), limits)


def test_format_outside_the_allowlist_is_unsupported() -> None:
    limits = Limits(max_pixels=LIMITS.max_pixels, max_dimension=8192, input_formats=frozenset({"png"}))
    with pytest.raises(UnsupportedFormat) as caught:
        optimize(image_bytes(fmt="JPEG"), Params(), limits)
    assert "JPEG" in caught.value.detail
    assert optimize(image_bytes(fmt="PNG"), Params(), limits).source_format == "PNG"


@pytest.mark.parametrize("data", [b"\x00", b"hello world, not an image at all", b"\xff\xd8"])
def test_unknown_bytes_are_unsupported(data: bytes) -> None:
    with pytest.raises(UnsupportedFormat):
        optimize(data, Params(), LIMITS)


def test_empty_bytes_are_an_empty_body() -> None:
    with pytest.raises(EmptyBody) as caught:
        optimize(b"", Params(), LIMITS)
    assert caught.value.status == 400


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xd8\xff" + b"\x00" * 100,
        b"\x89PNG\r\n\x1a\n",
        image_bytes(fmt="PNG")[:60],
        image_bytes(fmt="JPEG")[:-200],
        b"GIF89a" + b"\x00" * 3,
        b"RIFF\x00\x00\x00\x00WEBPVP8 ",
        b"BM" + b"\x00" * 30,
    ],
)
def test_damaged_allowed_formats_are_corrupt(data: bytes) -> None:
    with pytest.raises(CorruptImage) as caught:
        optimize(data, Params(), LIMITS)
    assert caught.value.status == 422


def _noisy_photo_jpeg(progressive: bool) -> bytes:
    """A 640x480 JPEG whose scans are long enough to cut inside, ending with its EOI marker."""
    gradient = Image.linear_gradient("L").resize((640, 480))
    photo = Image.merge(
        "RGB", (gradient, gradient.transpose(Image.Transpose.ROTATE_180), gradient.effect_spread(4))
    )
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=90, progressive=progressive)
    data = buffer.getvalue()
    assert data.endswith(b"\xff\xd9")
    return data


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
@pytest.mark.parametrize("missing", [1, 2])
@pytest.mark.parametrize("width", [None, 160, 80], ids=["full size", "1/4", "1/8"])
def test_a_jpeg_missing_its_end_marker_is_served_whole(
    progressive: bool, missing: int, width: int | None
) -> None:
    """Every scan there but the EOI marker, as an interrupted write leaves it: refused whole with 422,
    where browsers draw the whole picture (a review)."""
    data = _noisy_photo_jpeg(progressive)
    whole = Image.open(io.BytesIO(optimize(data, Params(format="png", width=width), LIMITS).data))
    cut = Image.open(io.BytesIO(optimize(data[:-missing], Params(format="png", width=width), LIMITS).data))
    assert cut.size == whole.size
    assert ImageChops.difference(cut.convert("RGB"), whole.convert("RGB")).getbbox() is None


def test_a_jpeg_cut_inside_a_scan_keeps_what_arrived() -> None:
    """As browsers draw it: the rows that arrived, the rest grey (libjpeg's fill)."""
    data = _noisy_photo_jpeg(progressive=False)
    whole = Image.open(io.BytesIO(optimize(data, Params(format="png"), LIMITS).data)).convert("RGB")
    cut = Image.open(io.BytesIO(optimize(data[: len(data) * 3 // 4], Params(format="png"), LIMITS).data))
    assert cut.size == whole.size
    changed = ImageChops.difference(cut.convert("RGB"), whole).getbbox()
    assert changed is not None and 0 < changed[1] < whole.height  # the top is the photo's, the end is not
    bottom = cut.convert("L").crop((0, whole.height - 8, whole.width, whole.height))
    assert ImageStat.Stat(bottom).stddev[0] < 1  # one flat fill


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_a_jpeg_header_without_its_image_is_corrupt(progressive: bool, mode: str) -> None:
    """Cut right after its first scan's header, or with its end marker right there, a JPEG declaring
    4000x4000 decoded into grey at the cost of a whole decode: a thousand times the work per byte of
    any real image (a review)."""
    buffer = io.BytesIO()
    Image.new(mode, (4000, 4000), 90).save(buffer, "JPEG", progressive=progressive, optimize=True)
    data = buffer.getvalue()
    scan = data.index(b"\xff\xda")
    header_end = scan + 2 + struct.unpack_from(">H", data, scan + 2)[0]
    for header in (data[:header_end], data[:header_end] + b"\xff\xd9"):
        with pytest.raises(CorruptImage) as caught:
            optimize(header, Params(format="png", width=300), LIMITS)
        assert caught.value.status == 422
    # One flat colour that size, the least any real JPEG of it codes, is served, even without its end.
    for whole in (data, data[:-2]):
        out = optimize(whole, Params(format="png", width=300), LIMITS)
        assert (out.width, out.height) == (300, 300)


# ---------------------------------------------------------------------------------------- whole corpus

ALLOWED_STATUSES: dict[str, set[int]] = {
    "reject-400-empty": {400},
    "reject-413-too-many-pixels": {413},
    "reject-413-or-ok-first-frame": {413, 200},
    "reject-413-or-415": {413, 415},
    "reject-415-unsupported": {415},
    "reject-415-or-422": {415, 422},
    "reject-422-corrupt": {422},
    "ok-or-415": {200, 415},
    "ok-or-422": {200, 422},
}


def manifest_params() -> list[object]:
    params: list[object] = []
    for row in manifest():
        params.append(pytest.param(row, id=row["file"]))
    return params


@pytest.mark.parametrize("row", manifest_params())
def test_every_corpus_file_gets_an_acceptable_answer(corpus: Path, row: dict[str, str]) -> None:
    expected = row["expected"]
    allowed = (
        {200}
        if expected.startswith("ok") and expected not in ALLOWED_STATUSES
        else ALLOWED_STATUSES[expected]
    )
    data = corpus_file(corpus, row["file"])
    try:
        out = optimize(data, Params(width=300), LIMITS)
    except OptimizerError as error:
        status = error.status
        assert status in allowed, f"{row['file']}: {status} {error.detail}; expected {expected}"
        assert error.detail
        return
    assert 200 in allowed, f"{row['file']}: 200; expected {expected}"
    assert out.media_type == "image/jpeg"
    assert 1 <= out.width <= 300
    assert out.height >= 1
    image = Image.open(io.BytesIO(out.data))
    image.load()
    assert image.format == "JPEG"
    assert image.size == (out.width, out.height)
    if row["width"] and not row["format"].startswith("["):
        stored = (int(row["width"]), int(row["height"]))
        assert out.source_format == row["format"]
        if expected.startswith("ok-rotate-exif-") and int(expected.rsplit("-", 1)[1]) >= 5:
            stored = (stored[1], stored[0])
        assert (out.source_width, out.source_height) == stored


# ------------------------------------------------- quality against a full-resolution Lanczos reference

# The pipeline decodes large JPEGs at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) before its Lanczos
# resize. That must not cost visible quality: its pixels are compared with a Lanczos resize of the fully
# decoded photo. For scale, a JPEG at quality 80 of the reference itself is ~38-39 dB away from it.
# Measured with the Pillow / the libvips resize: 48.0 / 47.9 dB (S2 photo, 800 px), 54.1 / 53.5 (S1, 300 px).
MIN_PSNR_DB = 46.0
# The error only 0.1 % of the pixel values exceed: 8 (S2) and 2 (S1) with either engine; the negative
# control below measures 26.
MAX_TAIL_ERROR = 10
QUALITY_CASES = [
    ("photos/kleiber-lukas-baubkus-6028x3391.jpg", 800),  # S2: decoded at 1/4, then 1507 -> 800
    ("photos/seed-loadtest-5760x3840.jpg", 300),  # S1: progressive 4:4:4, decoded at 1/8
]


def psnr(a: Image.Image, b: Image.Image) -> float:
    rms = ImageStat.Stat(ImageChops.difference(a, b)).rms
    mse = sum(r * r for r in rms) / len(rms)
    return 10 * math.log10(255**2 / mse) if mse else math.inf


def tail_error(a: Image.Image, b: Image.Image, share: float = 0.001) -> int:
    """The smallest per-channel error that at most ``share`` of the channel values exceed."""
    histogram = ImageChops.difference(a, b).histogram()  # 256 bins per band, bands concatenated
    counts = [sum(histogram[level::256]) for level in range(256)]
    allowed, above = share * sum(counts), 0
    for level in range(255, -1, -1):
        above += counts[level]
        if above > allowed:
            return level
    return 0


def full_resolution_reference(data: bytes, size: tuple[int, int]) -> Image.Image:
    with Image.open(io.BytesIO(data)) as source:
        return source.convert("RGB").resize(size, Image.Resampling.LANCZOS)


@pytest.mark.parametrize("resizer", RESIZERS)
@pytest.mark.parametrize(("name", "width"), QUALITY_CASES)
def test_scaled_decoding_matches_a_full_resolution_lanczos(
    corpus: Path, name: str, width: int, resizer: str
) -> None:
    data = (corpus / name).read_bytes()
    if resizer == "vips":
        vips_or_skip()
    # PNG output: the pipeline's own pixels, without JPEG's error on top.
    _, image = run(data, Params(width=width, format="png"), dataclasses.replace(LIMITS, resizer=resizer))
    reference = full_resolution_reference(data, image.size)
    assert psnr(image.convert("RGB"), reference) >= MIN_PSNR_DB
    assert tail_error(image.convert("RGB"), reference) <= MAX_TAIL_ERROR


def test_the_quality_check_fails_a_decode_scaled_too_far(corpus: Path) -> None:
    # The check must be able to fail: decoding at 1/8 (754 px wide) and enlarging to 800, which is what
    # choosing the DCT scale from the wrong size would do, is far below the thresholds.
    data = (corpus / QUALITY_CASES[0][0]).read_bytes()
    with Image.open(io.BytesIO(data)) as source:
        source.draft("RGB", (700, 400))  # libjpeg gives 754x424 at 1/8
        degraded = source.convert("RGB").resize((800, 450), Image.Resampling.LANCZOS)
    reference = full_resolution_reference(data, degraded.size)
    assert psnr(degraded, reference) < MIN_PSNR_DB
    assert tail_error(degraded, reference) > MAX_TAIL_ERROR


def tiled_tiff(size: tuple[int, int], tile: int, *, whole: bool) -> bytes:
    """An RGB TIFF of one deflate tile of ``tile`` x ``tile`` (Pillow writes strips only); ``whole``: with
    the tile's pixels, otherwise 64 bytes of them."""
    payload = zlib.compress(bytes(tile * tile * 3 if whole else 64))
    tags = [(256, size[0]), (257, size[1]), (258, None), (259, 8), (262, 2), (277, 3), (284, 1)]
    tags += [(322, tile), (323, tile), (324, None), (325, len(payload))]
    header = 8
    ifd_size = 2 + 12 * len(tags) + 4
    bits_at = header + ifd_size
    data_at = bits_at + 6
    entries = []
    for tag, value in tags:
        if tag == 258:  # BitsPerSample 8,8,8, stored after the IFD
            entries.append(struct.pack("<HHII", tag, 3, 3, bits_at))
        elif tag in (256, 257, 322, 323, 325):
            entries.append(struct.pack("<HHII", tag, 4, 1, value))
        elif tag == 324:
            entries.append(struct.pack("<HHII", tag, 4, 1, data_at))
        else:
            entries.append(struct.pack("<HHIHH", tag, 3, 1, value, 0))
    ifd = struct.pack("<H", len(tags)) + b"".join(entries) + bytes(4)
    return b"II*\0" + struct.pack("<I", header) + ifd + struct.pack("<HHH", 8, 8, 8) + payload


def test_a_tiff_whose_tile_dwarfs_the_image_is_refused_at_the_header() -> None:
    """libtiff allocates one whole tile: 164 bytes declaring a 26752 px tile for a 16x16 image took 2 GiB.
    A tile is decoded pixels, under the same limit."""
    bomb = tiled_tiff((16, 16), 26752, whole=False)
    with pytest.raises(TooManyPixels, match="26752x26752"):
        inspect(bomb, Params(width=8), LIMITS)
    # Tiles larger than their image are valid (tiling tools write 256 px tiles for small images, and
    # some 2048 px ones), and are counted.
    for size, tile in (((100, 70), 256), ((600, 400), 2048)):
        data = tiled_tiff(size, tile, whole=True)
        _out, image = run(data, Params(width=50))
        assert image.size == (50, round(50 * size[1] / size[0]))
        assert inspect(data, Params(width=50), LIMITS) >= tile * tile * 8


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("width", [None, 100])
def test_a_tiffs_orientation_is_applied_once(orientation: int, width: int | None) -> None:
    """Pillow turns a TIFF upright itself; the pipeline must not turn it again. The same picture with the
    same orientation in a PNG's EXIF is the reference."""
    stored = Image.new("RGB", (400, 200), (255, 0, 0))
    stored.paste((0, 0, 255), (0, 0, 200, 100))  # blue top-left quarter: every turn and flip differs
    exif = Image.Exif()
    exif[0x0112] = orientation
    as_png = encoded(stored, "PNG", exif=exif.tobytes())
    as_tiff = encoded(stored, "TIFF", tiffinfo={0x0112: orientation})
    params = Params(width=width, format="png")
    expected, reference = run(as_png, params)
    got, image = run(as_tiff, params)
    assert (got.width, got.height) == (expected.width, expected.height)
    assert mad(image.convert("RGB"), reference.convert("RGB")) < 2


@pytest.mark.parametrize(("depth", "key"), [(1, 0), (1, 1), (2, 1), (2, 3), (4, 5), (8, 85)])
@pytest.mark.parametrize("fmt", ["png", "webp", "jpeg"])
def test_a_grey_png_keeps_its_transparent_key_at_every_bit_depth(depth: int, key: int, fmt: str) -> None:
    """Pillow scales 1, 2 and 4-bit grey pixels to 0-255 but not the tRNS key: the left half, drawn in
    the key's value, must come out transparent (or the background, for JPEG), the right half not."""
    width, height, per_byte = 16, 8, 8 // depth
    other = 0 if key else (1 << depth) - 1
    row = [key] * (width // 2) + [other] * (width // 2)
    packed = bytearray()
    for start in range(0, width, per_byte):
        byte = 0
        for value in row[start : start + per_byte]:
            byte = (byte << depth) | value
        packed.append(byte)
    pixels = zlib.compress((b"\x00" + bytes(packed)) * height)
    ihdr = struct.pack(">IIBBBBB", width, height, depth, 0, 0, 0, 0)
    data = png_from_chunks(
        [(b"IHDR", ihdr), (b"tRNS", struct.pack(">H", key)), (b"IDAT", pixels), (b"IEND", b"")]
    )
    _out, image = run(data, Params(format=fmt, background=(255, 0, 255)))
    if fmt == "jpeg":
        left, right = image.convert("RGB").getpixel((2, 4)), image.convert("RGB").getpixel((13, 4))
        assert isinstance(left, tuple)
        assert abs(left[0] - 255) + left[1] + abs(left[2] - 255) < 30  # the background
        assert right != left
    else:
        rgba = image.convert("RGBA")
        assert rgba.getpixel((2, 4))[3] == 0  # type: ignore[index]
        assert rgba.getpixel((13, 4))[3] == 255  # type: ignore[index]


@pytest.mark.parametrize("interlace", [0, 1])
@pytest.mark.parametrize("key", [(0x1234, 0xABCD, 0x0F0F), (0x0012, 0x00AB, 0x000F)])
def test_a_16bit_rgb_png_key_is_compared_at_full_depth(key: tuple[int, int, int], interlace: int) -> None:
    """Pillow compared the 16-bit key with each sample's high byte: a key over 255 made nothing
    transparent, and one under 256 made pixels whose high bytes equal it transparent (a review). Columns:
    the key, the key's high bytes with other low bytes, the key's low bytes as high ones, another colour."""
    near = tuple(value ^ 0x0001 for value in key)
    shifted = tuple((value & 0xFF) << 8 | (value & 0xFF) for value in key)
    columns = [key, near, shifted, (0xFFFF, 0, 0)]
    width, height = 16, 4
    row = b"".join(struct.pack(">HHH", *columns[x // 4]) for x in range(width))
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, interlace)
    if interlace:  # Adam7 for a 16x4 image: each pass's rows, filter byte first
        passes = [
            (0, 8, 0, 8),
            (4, 8, 0, 8),
            (0, 4, 4, 8),
            (2, 4, 0, 4),
            (0, 2, 2, 4),
            (1, 2, 0, 2),
            (0, 1, 1, 2),
        ]
        raw = b""
        for x0, dx, y0, dy in passes:
            for _y in range(y0, height, dy):
                pixels = [row[6 * x : 6 * x + 6] for x in range(x0, width, dx)]
                raw += b"\x00" + b"".join(pixels) if pixels else b""
    else:
        raw = (b"\x00" + row) * height
    data = png_from_chunks(
        [(b"IHDR", ihdr), (b"tRNS", struct.pack(">HHH", *key)), (b"IDAT", zlib.compress(raw)), (b"IEND", b"")]
    )
    _out, image = run(data, Params(format="png"))
    alphas = [image.convert("RGBA").getpixel((x, 2))[3] for x in (1, 5, 9, 13)]  # type: ignore[index]
    assert alphas == [0, 255, 255, 255]
