"""``optimizer.jpegscans``: a progressive JPEG decoded at 1/8 from its DC scans gives the same pixels.

The rewrite is only worth having if it is exact, so every test compares pixels with libjpeg's decode of
the untouched file, for each sampling layout libjpeg scales differently, and the corpus's own files.
"""

from __future__ import annotations

import io
import random

import pytest
from multidict import MultiDict
from PIL import Image, ImageChops

from optimizer import jpegscans, pipeline
from optimizer.params import RouteDefaults, parse_params
from optimizer.settings import Settings
from optimizer.state import ServiceState
from tests.conftest import corpus_dir, manifest

UPLOAD_DEFAULTS = RouteDefaults(width=300, format="jpeg", quality=80)


def photo(size: tuple[int, int], mode: str = "RGB", seed: int = 1) -> Image.Image:
    """Detail at every scale (noise over gradients), so that the AC scans carry real data."""
    rng = random.Random(seed)
    width, height = size
    base = Image.linear_gradient("L").resize(size).convert(mode)
    noise = Image.effect_noise(size, 60).convert(mode)
    shapes = Image.new(mode, size)
    for _ in range(40):
        x, y = rng.randrange(width), rng.randrange(height)
        colour = tuple(rng.randrange(256) for _ in mode) if len(mode) > 1 else rng.randrange(256)
        shapes.paste(
            colour, (x, y, min(width, x + rng.randrange(8, 200)), min(height, y + rng.randrange(8, 200)))
        )
    return Image.blend(Image.blend(base, noise, 0.35), shapes, 0.4)


def jpeg(image: Image.Image, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=88, **options)
    return out.getvalue()


def decoded_at_eighth(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        im.draft(None, (im.width // 8, im.height // 8))
        im.load()
        return im.copy()


def assert_same_pixels(original: bytes, rewritten: bytes) -> None:
    expected, got = decoded_at_eighth(original), decoded_at_eighth(rewritten)
    assert (got.mode, got.size) == (expected.mode, expected.size)
    assert ImageChops.difference(got, expected).getbbox() is None


@pytest.mark.parametrize(
    ("mode", "options"),
    [
        ("RGB", {"subsampling": 0}),  # 4:4:4: every component DC-only at 1/8
        ("RGB", {"subsampling": 1}),  # 4:2:2: chroma upsampled, still DC-only
        ("RGB", {"subsampling": 2}),  # 4:2:0: chroma gets a 2x2 IDCT, so its AC scans stay
        ("L", {}),
        ("CMYK", {}),
        ("RGB", {"subsampling": 2, "restart_marker_blocks": 7}),  # restart markers inside the scans
    ],
    ids=["444", "422", "420", "grey", "cmyk", "420-restarts"],
)
@pytest.mark.parametrize("size", [(640, 480), (803, 611)], ids=["even", "odd"])
def test_the_dc_scans_decode_to_the_same_pixels(
    mode: str, options: dict[str, object], size: tuple[int, int]
) -> None:
    original = jpeg(photo(size, mode), progressive=True, **options)
    rewritten = jpegscans.dc_scans_only(original)
    assert rewritten is not None
    assert len(rewritten) < len(original)
    assert_same_pixels(original, rewritten)


def test_the_corpus_jpegs_decode_to_the_same_pixels() -> None:
    folder = corpus_dir()
    rewritten_files = 0
    for row in manifest():
        if row["format"] != "JPEG" or not row["expected"].startswith("ok"):
            continue
        original = (folder / row["file"]).read_bytes()
        rewritten = jpegscans.dc_scans_only(original)
        if rewritten is None:
            continue
        rewritten_files += 1
        assert_same_pixels(original, rewritten)
    assert rewritten_files >= 5  # the progressive photos, the seed photo among them


@pytest.mark.parametrize(
    "data",
    [
        jpeg(photo((320, 240))),  # baseline: DC and AC share each scan
        jpeg(photo((320, 240)), progressive=True)[:-20_000],  # truncated: decodes (or fails) as before
        b"\xff\xd8\xff\xd9",
        b"not a jpeg at all",
        b"",
    ],
    ids=["baseline", "truncated", "empty-jpeg", "not-jpeg", "nothing"],
)
def test_streams_it_is_not_sure_of_are_left_alone(data: bytes) -> None:
    assert jpegscans.dc_scans_only(data) is None


def test_tables_shared_with_a_component_that_reads_ac_are_left_alone() -> None:
    """4:2:0 with one quantization table for all components: zeroing its entry would change chroma."""
    image = photo((640, 480))
    table = list(range(1, 65))
    data = jpeg(image, progressive=True, subsampling=2, qtables=[table, table])
    shared = data.replace(b"\x02\x11\x01\x03\x11\x01", b"\x02\x11\x00\x03\x11\x00")  # Cb, Cr -> table 0
    assert shared != data
    decoded_at_eighth(shared)  # a valid file, just not one to rewrite
    assert jpegscans.dc_scans_only(shared) is None


def test_damaged_streams_never_raise() -> None:
    data = jpeg(photo((256, 192)), progressive=True)
    rng = random.Random(7)
    for _ in range(400):
        damaged = bytearray(data)
        for _ in range(rng.randrange(1, 6)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        cut = bytes(damaged[: rng.randrange(2, len(damaged) + 1)])
        for sample in (bytes(damaged), cut):
            result = jpegscans.dc_scans_only(sample)
            assert result is None or result.startswith(b"\xff\xd8")


def test_the_pipeline_decodes_the_dc_scans_and_answers_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """/upload's 300 px from a 2560 px progressive photo: decoded at 1/8 from the DC scans, same image."""
    data = jpeg(photo((2560, 1700)), progressive=True, subsampling=0)
    settings = Settings()
    params = parse_params(MultiDict(), settings, UPLOAD_DEFAULTS, frozenset())
    limits = ServiceState.from_settings(settings).limits
    rewrites: list[bytes] = []
    real = jpegscans.dc_scans_only

    def spy(stream: bytes) -> bytes | None:
        result = real(stream)
        if result is not None:
            rewrites.append(result)
        return result

    monkeypatch.setattr(jpegscans, "dc_scans_only", spy)
    fast = pipeline.optimize(data, params, limits)
    assert len(rewrites) == 1
    monkeypatch.setattr(jpegscans, "dc_scans_only", lambda stream: None)
    full = pipeline.optimize(data, params, limits)
    assert (fast.width, fast.height) == (full.width, full.height) == (300, 199)
    assert fast.data == full.data


def test_other_scales_are_decoded_as_they_are() -> None:
    data = jpeg(photo((640, 480)), progressive=True)
    with Image.open(io.BytesIO(data)) as im:
        im.draft(None, (im.width // 4, im.height // 4))  # 1/4: AC coefficients are read
        before = im.fp
        jpegscans.decode_dc_scans_only(im)
        assert im.fp is before
    with Image.open(io.BytesIO(data)) as im:
        im.draft(None, (im.width // 8, im.height // 8))
        before = im.fp
        jpegscans.decode_dc_scans_only(im)
        assert im.fp is not before
