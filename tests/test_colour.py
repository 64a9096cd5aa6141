"""Colours to sRGB (``optimizer.colour``): a profile is judged by what it does, not by its name, and grey
images are converted through their grey profiles too."""

from __future__ import annotations

import io
import random
import struct
import zlib

import pytest
from PIL import Image, ImageChops, ImageCms

from optimizer import colour, pngchunks
from optimizer.colour import to_srgb
from optimizer.errors import CorruptImage
from optimizer.pipeline import Params, open_image, optimize
from tests.test_pipeline import LIMITS

D50 = (0.9642, 1.0, 0.8249)
SRGB_PRIMARIES_D50 = ((0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141))


def _fixed(value: float) -> bytes:
    return struct.pack(">i", round(value * 65536))


def _xyz(x: float, y: float, z: float) -> bytes:
    return b"XYZ " + bytes(4) + _fixed(x) + _fixed(y) + _fixed(z)


def _description(text: str) -> bytes:
    ascii_text = text.encode("ascii") + b"\0"
    return (
        b"desc" + bytes(4) + struct.pack(">I", len(ascii_text)) + ascii_text + bytes(8) + bytes(3) + bytes(67)
    )


def profile(space: str, description: str, gamma: float, levels: list[int] | None = None) -> bytes:
    """A minimal ICC v2 profile: a grey curve (``GRAY``), or sRGB's primaries with one curve (``RGB``),
    a gamma or a table of 16-bit ``levels``."""
    if levels is None:
        curve = b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256)) + bytes(2)
    else:
        curve = b"curv" + bytes(4) + struct.pack(f">I{len(levels)}H", len(levels), *levels)
    tags = [(b"desc", _description(description)), (b"wtpt", _xyz(*D50))]
    if space == "GRAY":
        tags.append((b"kTRC", curve))
    else:
        tags += [
            (name, _xyz(*xyz))
            for name, xyz in zip((b"rXYZ", b"gXYZ", b"bXYZ"), SRGB_PRIMARIES_D50, strict=True)
        ]
        tags += [(name, curve) for name in (b"rTRC", b"gTRC", b"bTRC")]
    return colour.icc_profile(tags, b"GRAY" if space == "GRAY" else b"RGB ")


def reference(image: Image.Image, icc: bytes) -> Image.Image:
    source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    # Unoptimised: LittleCMS's optimised 8-bit grey transform is up to 10 levels off in the shadows.
    converted = ImageCms.profileToProfile(
        image, source, colour.SRGB, outputMode="RGB", flags=ImageCms.Flags.NOOPTIMIZE
    )
    assert converted is not None
    return converted


def largest_difference(a: Image.Image, b: Image.Image) -> int:
    extrema = ImageChops.difference(a, b).getextrema()
    if isinstance(extrema[0], tuple):
        return max(int(high) for _low, high in extrema)
    return int(extrema[1])


GREY_RAMP = Image.linear_gradient("L").resize((256, 32))


@pytest.mark.parametrize(("fmt", "gamma"), [("JPEG", 1.0), ("PNG", 1.8)])
def test_a_grey_image_is_converted_through_its_grey_profile_and_stays_grey(fmt: str, gamma: float) -> None:
    """Grey images kept their pixels and lost their profile: 48 levels too dark on average for a gamma 1.0
    grey, 12 for Apple's gamma 1.8 (a review)."""
    icc = profile("GRAY", "Gray Gamma", gamma)
    buffer = io.BytesIO()
    GREY_RAMP.save(buffer, fmt, icc_profile=icc, **({"quality": 100} if fmt == "JPEG" else {}))
    out = Image.open(io.BytesIO(optimize(buffer.getvalue(), Params(format="png"), LIMITS).data))
    assert out.mode == "L"
    expected = reference(GREY_RAMP, icc).getchannel("G")
    assert largest_difference(out, expected) <= (3 if fmt == "JPEG" else 1)
    assert largest_difference(out, GREY_RAMP) > 10  # the conversion did something


def test_a_grey_images_alpha_survives_its_conversion() -> None:
    icc = profile("GRAY", "Gray Gamma 1.0", 1.0)
    alpha = GREY_RAMP.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out = to_srgb(Image.merge("LA", (GREY_RAMP, alpha)), icc)
    assert out.mode == "LA"
    assert out.getchannel("A").tobytes() == alpha.tobytes()
    assert largest_difference(out.getchannel("L"), reference(GREY_RAMP, icc).getchannel("G")) <= 1


def test_a_profile_named_srgb_that_is_not_is_converted() -> None:
    """A linear profile on sRGB's primaries, named "sRGB linear" as Krita's and darktable's are, was taken
    for sRGB by its name and not converted (a review)."""
    ramp = Image.merge("RGB", (GREY_RAMP, GREY_RAMP.transpose(Image.Transpose.FLIP_LEFT_RIGHT), GREY_RAMP))
    icc = profile("RGB", "sRGB linear (g10)", 1.0)
    assert largest_difference(to_srgb(ramp, icc), reference(ramp, icc)) <= 1
    assert largest_difference(to_srgb(ramp, icc), ramp) > 20


def transforms_built(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that gets an item for each LittleCMS transform built from now on."""
    built: list[int] = []
    real = ImageCms.buildTransform

    def counted(*args: object, **kwargs: object) -> ImageCms.ImageCmsTransform:
        built.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ImageCms, "buildTransform", counted)
    return built


def test_srgb_by_any_name_changes_nothing_and_is_judged_once(monkeypatch: pytest.MonkeyPatch) -> None:
    image = Image.linear_gradient("L").resize((64, 64)).convert("RGB")
    srgb = colour.SRGB.tobytes()
    assert to_srgb(image, srgb) is image  # no copy of the pixels
    built = transforms_built(monkeypatch)
    assert to_srgb(image, srgb) is image
    assert built == []  # remembered by its digest: no transform built again


def test_a_profile_of_another_colour_space_is_ignored() -> None:
    image = GREY_RAMP.convert("RGB")
    assert to_srgb(image, profile("GRAY", "Gray Gamma 1.0", 1.0)) is image
    assert to_srgb(GREY_RAMP, profile("RGB", "Linear RGB", 1.0)) is GREY_RAMP


def avif_tagged(colour: tuple[int, int, int], primaries: int, transfer: int) -> bytes:
    """A flat AVIF whose nclx colour box (Pillow writes BT.709 and sRGB's curve) says otherwise."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), colour).save(buffer, "AVIF", quality=100)
    data = bytearray(buffer.getvalue())
    at = data.find(b"colrnclx") + 8
    assert at > 8 and struct.unpack_from(">HH", data, at) == (1, 13)
    data[at : at + 4] = struct.pack(">HH", primaries, transfer)
    return bytes(data)


@pytest.mark.parametrize(
    ("primaries", "transfer", "expected"),
    [
        (12, 13, (255, 0, 0)),  # Display P3's (234, 51, 35) is sRGB's red
        (1, 13, (234, 51, 35)),  # sRGB: nothing to convert
        (2, 2, (234, 51, 35)),  # unspecified: taken as sRGB
        (12, 16, (234, 51, 35)),  # PQ (HDR) would need tone mapping: left as it is
    ],
)
def test_an_avifs_nclx_colours_are_converted_to_srgb(
    primaries: int, transfer: int, expected: tuple[int, int, int]
) -> None:
    """Without an ICC profile an AVIF names its colours with nclx code points, which Pillow drops: a
    Display P3 photo came out as if its colours were sRGB's, duller."""
    data = avif_tagged((234, 51, 35), primaries, transfer)
    out = Image.open(io.BytesIO(optimize(data, Params(format="png"), LIMITS).data)).convert("RGB")
    pixel = out.getpixel((32, 32))
    assert isinstance(pixel, tuple)
    assert max(abs(a - b) for a, b in zip(pixel, expected, strict=True)) <= 3


def test_the_nclx_profiles_match_their_colour_spaces() -> None:
    """BT.2020's and Display P3's primaries land where their definitions put sRGB's."""
    p3 = colour.nclx_profile(12, 13)
    assert p3 is not None and colour.nclx_profile(1, 13) is None and colour.nclx_profile(9, 18) is None
    # BT.709's curve is shown as sRGB's, as Chromium shows it (its camera curve's inverse made such files
    # up to 16 levels lighter than browsers do, a review): BT.709 primaries with it convert nothing.
    assert colour.nclx_profile(1, 1) is None
    # EBU 3213's primaries, SMPTE 240M's and DCI's curves are known too (a review found them skipped).
    assert all(colour.nclx_profile(*pair) is not None for pair in ((22, 13), (12, 7), (12, 17)))
    p3_bt709 = colour.nclx_profile(12, 1)
    assert p3_bt709 is not None and to_srgb(GREY_RAMP.convert("RGB"), p3_bt709).tobytes() == (
        to_srgb(GREY_RAMP.convert("RGB"), p3).tobytes()
    )
    srgb_in_p3 = Image.new("RGB", (3, 1))
    srgb_in_p3.putdata([(234, 51, 35), (117, 251, 76), (0, 0, 245)])
    out = to_srgb(srgb_in_p3, p3)
    for x, expected in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        pixel = out.getpixel((x, 0))
        assert isinstance(pixel, tuple)
        assert max(abs(a - b) for a, b in zip(pixel, expected, strict=True)) <= 4, (x, pixel)


def test_a_curve_off_between_the_probes_levels_is_not_taken_for_srgb() -> None:
    """sRGB's curve at every 17th level, brightened between them: the probe looked at those 16 levels only
    and skipped the profile as sRGB's, 40 levels off in between (a review)."""

    def srgb(level: int) -> float:
        value = level / 255
        return value / 12.92 if value <= 0.04045 else ((value + 0.055) / 1.055) ** 2.4

    table = [round(65535 * srgb(level)) for level in range(256)]
    for level in range(100, 161):
        if level % 17:
            table[level] = min(65535, round(65535 * srgb(level) * 1.6))
    icc = profile("RGB", "sRGB, nearly", 1.0, table)
    ramp = GREY_RAMP.convert("RGB")
    converted = to_srgb(ramp, icc)
    assert converted is not ramp
    assert largest_difference(converted, reference(ramp, icc)) <= 1


def test_an_avif_in_srgb_is_not_priced_for_a_conversion() -> None:
    """The nclx Pillow and libavif write (BT.709, sRGB's curve) converts nothing: the estimate counted a
    copy for it all the same (45 MB too much at 3000x3000, a review)."""
    with open_image(avif_tagged((234, 51, 35), 1, 13), LIMITS) as srgb:
        assert "icc_profile" not in srgb.info
    with open_image(avif_tagged((234, 51, 35), 12, 13), LIMITS) as p3:
        assert p3.info["icc_profile"] == colour.nclx_profile(12, 13)


def test_a_transform_is_built_once_for_a_profile_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """A phone's Display P3 JPEG parsed its profile and built its transform each time: ~2 ms."""
    icc = profile("RGB", "Linear RGB, cached", 1.0)
    ramp = GREY_RAMP.convert("RGB")
    first = to_srgb(ramp, icc)
    built = transforms_built(monkeypatch)
    assert to_srgb(ramp, icc).tobytes() == first.tobytes()
    assert built == []


def test_an_animated_avifs_colours_are_its_tracks() -> None:
    """libavif decodes an 'avis' file's track, whose sample description has a colour box of its own: the
    still image's was taken instead (a review)."""
    frames = [Image.new("RGB", (64, 64), (234, 51, 35)), Image.new("RGB", (64, 64), (234, 51, 36))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "AVIF", save_all=True, append_images=frames[1:], quality=100)
    data = bytearray(buffer.getvalue())
    assert data[8:12] == b"avis"
    boxes = [at for at in range(len(data)) if data.startswith(b"colrnclx", at)]
    assert len(boxes) == 2  # the still image's, then the track's
    struct.pack_into(">HH", data, boxes[1] + 8, 12, 13)  # the track's says Display P3
    out = Image.open(io.BytesIO(optimize(bytes(data), Params(format="png"), LIMITS).data)).convert("RGB")
    pixel = out.getpixel((32, 32))
    assert isinstance(pixel, tuple) and pixel[0] >= 252 and pixel[1] <= 4


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_tagged(image: Image.Image, *chunks: tuple[bytes, bytes], icc: bytes | None = None) -> bytes:
    """``image`` as a PNG with ``chunks`` (kind, payload) after its header, before the image data."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **({"icc_profile": icc} if icc else {}))
    data = buffer.getvalue()
    after_header = 8 + 25
    return data[:after_header] + b"".join(png_chunk(*chunk) for chunk in chunks) + data[after_header:]


def gama(gamma: float) -> tuple[bytes, bytes]:
    return b"gAMA", struct.pack(">I", round(gamma * 100000))


def chrm(white: tuple[float, float], *primaries: tuple[float, float]) -> tuple[bytes, bytes]:
    values = [white, *primaries]
    return b"cHRM", struct.pack(">8I", *(round(v * 100000) for xy in values for v in xy))


def cicp(primaries: int, transfer: int, matrix: int = 0, full_range: int = 1) -> tuple[bytes, bytes]:
    return b"cICP", bytes((primaries, transfer, matrix, full_range))


SRGB_CHUNK = (b"sRGB", b"\0")
SRGB_XY = ((0.3127, 0.3290), (0.64, 0.33), (0.30, 0.60), (0.15, 0.06))
P3_RED = (234, 51, 35)  # Display P3's, as sRGB's red is stored in it
LINEAR_ICC = profile("RGB", "Linear RGB", 1.0)


def optimized_pixel(data: bytes) -> tuple[int, ...]:
    out = Image.open(io.BytesIO(optimize(data, Params(format="png"), LIMITS).data))
    pixel = out.getpixel((8, 8))
    return pixel if isinstance(pixel, tuple) else (int(pixel),)  # type: ignore[arg-type]


def near(pixel: tuple[int, ...], expected: tuple[int, ...], within: int = 3) -> bool:
    return (
        len(pixel) == len(expected)
        and max(abs(a - b) for a, b in zip(pixel, expected, strict=True)) <= within
    )


LINEAR_GREY_128 = 188  # 128/255 as linear light, in sRGB's curve


@pytest.mark.parametrize(
    ("chunks", "icc", "colour_in", "expected"),
    [
        # gAMA alone: a linear PNG is shown as linear, its shadows lifted; a gamma near 1/2.2 is sRGB's
        ([gama(1.0)], None, (128, 128, 128), (LINEAR_GREY_128,) * 3),
        ([gama(1 / 2.2)], None, (128, 128, 128), (128, 128, 128)),
        ([gama(0.44)], None, (128, 128, 128), (128, 128, 128)),
        # gAMA with cHRM: the primaries are read as well
        ([gama(1.0), chrm(*SRGB_XY)], None, (128, 128, 128), (LINEAR_GREY_128,) * 3),
        (
            [gama(1 / 2.2), chrm((0.3127, 0.3290), (0.68, 0.32), (0.265, 0.69), (0.15, 0.06))],
            None,
            P3_RED,
            (255, 0, 0),
        ),
        # what outranks gAMA: sRGB, then iCCP
        ([gama(1.0), SRGB_CHUNK], None, (128, 128, 128), (128, 128, 128)),
        ([gama(1 / 2.2)], LINEAR_ICC, (128, 128, 128), (LINEAR_GREY_128,) * 3),
        # cHRM alone is not read (its curve would be a guess), nor a gAMA of 0, nor primaries on a line
        ([chrm((0.3127, 0.3290), (0.68, 0.32), (0.265, 0.69), (0.15, 0.06))], None, P3_RED, P3_RED),
        ([(b"gAMA", bytes(4))], None, (128, 128, 128), (128, 128, 128)),
        (
            [gama(1.0), chrm((0.3, 0.3), (0.3, 0.3), (0.3, 0.3), (0.3, 0.3))],
            None,
            (128, 128, 128),
            (128, 128, 128),
        ),
        (
            [gama(1.0), chrm((0.0, 0.0), (0.64, 0.0), (0.3, 0.6), (0.15, 0.06))],
            None,
            (128, 128, 128),
            (128, 128, 128),
        ),
        # cICP outranks everything, when known and not HDR's
        ([cicp(12, 13)], None, P3_RED, (255, 0, 0)),
        ([cicp(12, 13), gama(1.0)], LINEAR_ICC, P3_RED, (255, 0, 0)),
        ([cicp(1, 13)], LINEAR_ICC, (128, 128, 128), (128, 128, 128)),
        ([cicp(1, 8)], None, (128, 128, 128), (LINEAR_GREY_128,) * 3),
        ([cicp(9, 16)], LINEAR_ICC, (128, 128, 128), (LINEAR_GREY_128,) * 3),  # PQ: the iCCP, as without cICP
        ([cicp(12, 13, matrix=1)], None, P3_RED, P3_RED),  # not RGB's: not a PNG's description
        ([cicp(12, 13, full_range=0)], None, P3_RED, P3_RED),  # narrow range, as Chromium: not read
        ([cicp(2, 2)], None, P3_RED, P3_RED),
    ],
)
def test_a_pngs_colour_chunks_are_read_as_browsers_read_them(
    chunks: list[tuple[bytes, bytes]],
    icc: bytes | None,
    colour_in: tuple[int, int, int],
    expected: tuple[int, ...],
) -> None:
    """Pillow reads gAMA and cHRM and drops them, and does not read cICP: a linear PNG, shown by browsers
    with its shadows where its author put them, came out with them crushed."""
    data = png_tagged(Image.new("RGB", (16, 16), colour_in), *chunks, icc=icc)
    assert near(optimized_pixel(data), expected)


def test_a_grey_png_with_a_gamma_is_converted_and_stays_grey() -> None:
    data = png_tagged(Image.new("L", (16, 16), 128), gama(1.0))
    assert near(optimized_pixel(data), (LINEAR_GREY_128,))
    p3_grey = png_tagged(Image.new("L", (16, 16), 128), cicp(12, 13))  # P3's greys are sRGB's greys
    assert optimized_pixel(p3_grey) == (128,)


@pytest.mark.parametrize("gamma", [1, 5, 2**31 - 1, 2**32 - 1])
def test_any_gamma_a_png_declares_gives_an_image(gamma: int) -> None:
    data = png_tagged(Image.new("RGB", (16, 16), (128, 128, 128)), (b"gAMA", struct.pack(">I", gamma)))
    assert len(optimized_pixel(data)) == 3


def test_a_png_in_srgb_is_not_priced_for_a_conversion() -> None:
    """The common gAMA of 1/2.2 (and cICP's sRGB over a stray profile) convert nothing."""
    with open_image(png_tagged(Image.new("RGB", (16, 16)), gama(1 / 2.2)), LIMITS) as im:
        assert "icc_profile" not in im.info
    with open_image(png_tagged(Image.new("RGB", (16, 16)), cicp(1, 13), icc=LINEAR_ICC), LIMITS) as im:
        assert "icc_profile" not in im.info


@pytest.mark.parametrize("chunks", [[gama(1.0)], [cicp(1, 8)]], ids=["gAMA 1.0", "cICP linear"])
def test_a_linear_grey_png_is_shown_as_browsers_show_it(chunks: list[tuple[bytes, bytes]]) -> None:
    """LittleCMS's optimised 8-bit grey transform resampled a linear curve coarsely: level 2 came out as
    12 where browsers show 22 (sRGB's encoding of 2/255), up to 10 levels dark (a review)."""
    ramp = Image.frombytes("L", (16, 16), bytes(range(256)))
    out = Image.open(io.BytesIO(optimize(png_tagged(ramp, *chunks), Params(format="png"), LIMITS).data))
    assert out.mode == "L"

    def srgb(v: float) -> int:
        return round(255 * (12.92 * v if v <= 0.0031308 else 1.055 * v ** (1 / 2.4) - 0.055))

    got = list(out.tobytes())
    assert max(abs(g - srgb(v / 255)) for v, g in zip(range(256), got, strict=True)) <= 1


def test_a_linear_grey_icc_profile_is_exact_in_the_shadows() -> None:
    ramp = Image.frombytes("L", (256, 1), bytes(range(256)))
    linear = [
        round(255 * (12.92 * v if v <= 0.0031308 else 1.055 * v ** (1 / 2.4) - 0.055))
        for v in (i / 255 for i in range(256))
    ]
    out = to_srgb(ramp, profile("GRAY", "Linear grey", 1.0))
    assert out.mode == "L"
    assert max(abs(a - b) for a, b in zip(out.tobytes(), linear, strict=True)) <= 1


@pytest.mark.parametrize("before", [[cicp(1, 13)], []], ids=["cICP sRGB", "untagged"])
def test_an_iccp_after_the_image_data_is_not_read(before: list[tuple[bytes, bytes]]) -> None:
    """Pillow reads an iCCP that follows the IDAT chunks with the pixels, after open_image has settled
    the colours: it outranked a cICP saying sRGB, and turned 128 grey into 188 (browsers ignore it)."""
    data = png_tagged(Image.new("RGB", (16, 16), (128, 128, 128)), *before)
    at = data.rindex(b"IEND") - 4
    data = data[:at] + png_chunk(b"iCCP", b"linear\0\0" + zlib.compress(LINEAR_ICC)) + data[at:]
    assert near(optimized_pixel(data), (128, 128, 128), within=1)


def test_the_first_of_a_repeated_colour_chunk_is_read() -> None:
    """libpng and Chromium keep a PNG's first gAMA and cHRM; Pillow keeps the last, and a linear PNG
    with a second gAMA of 0.5 came out 55 levels off on average (a review)."""
    data = png_tagged(Image.new("RGB", (16, 16), (128, 128, 128)), gama(1.0), gama(0.5))
    assert near(optimized_pixel(data), (LINEAR_GREY_128,) * 3)
    p3 = chrm((0.3127, 0.3290), (0.68, 0.32), (0.265, 0.69), (0.15, 0.06))
    data = png_tagged(Image.new("RGB", (16, 16), P3_RED), gama(1 / 2.2), p3, chrm(*SRGB_XY))
    assert near(optimized_pixel(data), (255, 0, 0))


def iccp(icc: bytes | None, name: bytes = b"icc") -> tuple[bytes, bytes]:
    """An iCCP chunk; ``None`` gives one whose stream does not inflate."""
    return b"iCCP", name + b"\0\0" + (zlib.compress(icc) if icc is not None else b"not zlib")


def cut_iccp(icc: bytes) -> tuple[bytes, bytes]:
    """An iCCP chunk whose stream lacks its checksum: all of the profile is there, the end is not."""
    kind, payload = iccp(icc)
    return kind, payload[:-4]


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([iccp(profile("RGB", "sRGB-ish, gamma 2.2", 2.2)), iccp(LINEAR_ICC)], (128, 128, 128)),
        ([iccp(LINEAR_ICC), iccp(None)], (LINEAR_GREY_128,) * 3),
        # one that does not inflate, or is cut short, is dropped, as libpng drops it
        ([iccp(None), iccp(LINEAR_ICC)], (LINEAR_GREY_128,) * 3),
        ([cut_iccp(LINEAR_ICC), iccp(LINEAR_ICC)], (LINEAR_GREY_128,) * 3),
        ([cut_iccp(LINEAR_ICC)], (128, 128, 128)),
    ],
    ids=["sRGB then linear", "linear then broken", "broken then linear", "cut then linear", "cut"],
)
def test_the_first_of_several_icc_profiles_is_read(
    chunks: list[tuple[bytes, bytes]], expected: tuple[int, ...]
) -> None:
    """Pillow keeps a PNG's last iCCP, and one that does not inflate wiped out a good first one; Chromium
    reads the first (a review)."""
    data = png_tagged(Image.new("RGB", (16, 16), (128, 128, 128)), *chunks)
    assert near(optimized_pixel(data), expected, within=4)


@pytest.mark.parametrize("raw", [1, 15, 625_000_001, 2**32 - 1])
def test_a_gamma_outside_libpngs_range_is_not_read(raw: int) -> None:
    """A gAMA of 1 (an exponent of 100 000) made every pixel black; libpng and Firefox ignore such a
    value."""
    data = png_tagged(Image.new("RGB", (16, 16), (128, 128, 128)), (b"gAMA", struct.pack(">I", raw)))
    assert near(optimized_pixel(data), (128, 128, 128), within=1)


def cmyk_profile() -> bytes:
    """A small CMYK printer profile (CMYK to Lab through an 8-bit lookup table) with steep input curves
    on a coarse grid: LittleCMS's precalculated 17-point grid is up to ~60 levels off it."""
    inputs = b"".join(bytes(round(255 * (i / 255) ** 0.35) for i in range(256)) for _ in range(4))
    points = [i / 4 for i in range(5)]
    nodes = bytearray()
    for c in points:
        for m in points:
            for y in points:
                for k in points:
                    r, g, b = (1 - c) * (1 - k), (1 - m) * (1 - k), (1 - y) * (1 - k)
                    lightness = round(255 * (0.3 * r + 0.59 * g + 0.11 * b))
                    nodes += bytes(
                        (lightness, round(128 + 80 * (r - g)), round(128 + 80 * ((r + g) / 2 - b)))
                    )
    identity = struct.pack(">9i", 65536, 0, 0, 0, 65536, 0, 0, 0, 65536)
    table = b"mft1" + bytes(4) + bytes((4, 3, 5, 0)) + identity + inputs + bytes(nodes)
    table += b"".join(bytes(range(256)) for _ in range(3))
    icc = bytearray(
        colour.icc_profile(
            [(b"desc", _description("CMYK test")), (b"wtpt", _xyz(*D50)), (b"A2B0", table)], b"CMYK"
        )
    )
    icc[12:16], icc[20:24] = b"prtr", b"Lab "  # an output device's profile, Lab its connection space
    return bytes(icc)


def light_inks() -> Image.Image:
    """Light inks, where cmyk_profile()'s curves are steepest: every mix of 16 levels up to 60 of C, M
    and Y, as 64x64 pixels."""
    steps = range(0, 64, 4)
    mixes = bytes(v for c in steps for m in steps for y in steps for v in (c, m, y, 0))
    return Image.frombytes("CMYK", (64, 64), mixes)


def test_a_cmyk_profile_is_evaluated_rather_than_sampled() -> None:
    """LittleCMS's optimised CMYK transform interpolates a grid it precalculates from the profile: off by
    up to 18-31 levels at the gamut's edge for common CMYK profiles (a review), where browsers evaluate
    the profile itself."""
    icc = cmyk_profile()
    inks = light_inks()
    buffer = io.BytesIO()
    inks.save(buffer, "JPEG", quality=100, icc_profile=icc)
    with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
        decoded.load()
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        exact = ImageCms.buildTransform(source, colour.SRGB, "CMYK", "RGB", flags=ImageCms.Flags.NOOPTIMIZE)
        expected = exact.apply(decoded)
        sampled = ImageCms.buildTransform(source, colour.SRGB, "CMYK", "RGB").apply(decoded)
    assert largest_difference(sampled, expected) > 20  # the grid is far off for this profile
    out = Image.open(io.BytesIO(optimize(buffer.getvalue(), Params(format="png"), LIMITS).data))
    assert out.size == (64, 64)
    assert largest_difference(out.convert("RGB"), expected) <= 1


def test_a_large_cmyk_output_is_converted_through_the_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    """Evaluating the profile costs ~6 times the grid a pixel: past a bound, the grid is used."""
    monkeypatch.setattr(colour, "_EXACT_CMYK_PIXELS", 64 * 64 - 1)
    icc = cmyk_profile()
    inks = light_inks()
    source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    sampled = ImageCms.buildTransform(source, colour.SRGB, "CMYK", "RGB").apply(inks)
    assert largest_difference(to_srgb(inks, icc), sampled) <= 1


def bad_crc(chunk: tuple[bytes, bytes]) -> bytes:
    """The chunk as stored, with a CRC one off."""
    kind, payload = chunk
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", (zlib.crc32(kind + payload) + 1) % 2**32)
    )


def png_with_raw(image: Image.Image, raw: bytes) -> bytes:
    """``image`` as a PNG with the stored chunk(s) ``raw`` after its header."""
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    data = buffer.getvalue()
    return data[:33] + raw + data[33:]


GREY = Image.new("RGB", (16, 16), (128, 128, 128))


@pytest.mark.parametrize(
    "raw",
    [
        bad_crc(gama(1.0)),
        bad_crc(iccp(LINEAR_ICC)),
        bad_crc((b"tEXt", b"Comment\0edited by hand")),
        png_chunk(b"gAMA", struct.pack(">I", 100000) + b"\0"),  # five bytes
        png_chunk(b"gAMA", b"\1\0"),  # two
        png_chunk(b"sRGB", b""),
        png_chunk(b"cHRM", bytes(16)),
        png_chunk(b"pHYs", bytes(8)),
        png_chunk(b"iCCP", b"icc\0\1" + zlib.compress(LINEAR_ICC)),  # compression method 1
        png_chunk(b"iCCP", b"no separator" + zlib.compress(LINEAR_ICC)),
        png_chunk(b"iCCP", b"big\0\0" + zlib.compress(bytes(1 << 20) + LINEAR_ICC)),  # inflates past 1 MiB
    ],
    ids=[
        "gAMA bad CRC",
        "iCCP bad CRC",
        "tEXt bad CRC",
        "gAMA of 5 bytes",
        "gAMA of 2",
        "sRGB empty",
        "cHRM of 16",
        "pHYs of 8",
        "iCCP method 1",
        "iCCP without separator",
        "iCCP over 1 MiB",
    ],
)
def test_a_chunk_libpng_drops_is_dropped_not_the_image(raw: bytes) -> None:
    """Pillow refused the whole PNG (422) over an ancillary chunk libpng drops alone, with a warning,
    and that browsers draw the image without (a review)."""
    assert near(optimized_pixel(png_with_raw(GREY, raw)), (128, 128, 128), within=1)


def test_a_critical_chunk_with_a_bad_crc_is_still_refused() -> None:
    data = bytearray(png_tagged(Image.new("P", (16, 16))))
    at = data.index(b"PLTE")
    length = struct.unpack_from(">I", data, at - 4)[0]
    data[at + 4 + length] ^= 1  # the first byte of PLTE's CRC
    with pytest.raises(CorruptImage):
        optimize(bytes(data), Params(format="png"), LIMITS)


def test_a_dropped_chunk_leaves_the_16_bit_key_comparison_alone() -> None:
    """A 16-bit RGB PNG with a tRNS key is decoded twice (for the low bytes): the second decode reads the
    upload as the first did, its dropped chunk dropped too."""
    pixels = struct.pack(">3H", 1000, 2000, 3000) * 8 + struct.pack(">3H", 1000, 2000, 3001) * 8
    rows = b"".join(b"\0" + pixels for _ in range(16))
    header = struct.pack(">IIBBBBB", 16, 16, 16, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + bad_crc((b"tEXt", b"a\0b"))
    data += png_chunk(b"tRNS", struct.pack(">3H", 1000, 2000, 3000)) + png_chunk(b"IDAT", zlib.compress(rows))
    data += png_chunk(b"IEND", b"")
    out = Image.open(io.BytesIO(optimize(data, Params(format="png"), LIMITS).data))
    assert out.mode == "RGBA"
    assert out.getpixel((0, 0))[3] == 0 and out.getpixel((15, 0))[3] == 255  # type: ignore[index]


def test_the_upload_with_hidden_chunks_reads_as_if_patched() -> None:
    """``hiding``'s stream against the patched bytes themselves, for reads of any size and place."""
    rng = random.Random(5)
    data = bytes(rng.randrange(256) for _ in range(4000))
    chunks = [(at, rng.randrange(0, 40)) for at in range(0, 3900, 97)]  # (offset, length), none overlapping
    stream = pngchunks.hiding(data, chunks)
    expected = bytearray(data)
    for at, length in chunks:
        crc = zlib.crc32(b"sKIp" + data[at + 8 : at + 8 + length])
        expected[at + 4 : at + 8] = b"sKIp"
        expected[at + 8 + length : at + 12 + length] = struct.pack(">I", crc)
    for _ in range(2000):
        start, size = rng.randrange(0, 4100), rng.choice([-1, 0, 1, 3, 7, 64, 1000])
        stream.seek(start)
        assert stream.read(size) == bytes(expected[start : None if size < 0 else start + size])


def test_an_icc_profile_that_does_not_parse_gives_way_to_the_gamma() -> None:
    """Chromium passes over an iCCP it cannot parse and reads the gAMA next; the service converted
    nothing (helper-75)."""
    data = png_tagged(GREY, gama(1.0), iccp(b"not a profile, though it inflates" * 8))
    assert near(optimized_pixel(data), (LINEAR_GREY_128,) * 3)
