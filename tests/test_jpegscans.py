"""``optimizer.jpegscans``: a progressive JPEG decoded at 1/8 from its DC scans gives the same pixels.

The rewrite is only worth having if it is exact, so every test compares pixels with libjpeg's decode of
the untouched file, for each sampling layout libjpeg scales differently, and the corpus's own files.
"""

from __future__ import annotations

import io
import random
import subprocess
import sys
from collections.abc import Callable

import pytest
from multidict import MultiDict
from PIL import Image, ImageChops

from optimizer import jpegscans, pipeline
from optimizer.errors import CorruptImage, OptimizerError
from optimizer.handlers import UPLOAD_DEFAULTS
from optimizer.params import RouteDefaults, parse_params
from optimizer.settings import Settings
from optimizer.state import ServiceState
from tests.conftest import corpus_dir, manifest


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


def scans(data: bytes) -> list[tuple[int, int, int, int, int, int]]:
    """Each scan of ``data``: (start, end of its data, first component, Ss, Se, Ah)."""
    found = []
    pos = data.find(b"\xff\xda")
    while pos >= 0:
        count = data[pos + 4]
        start, stop, approximation = data[pos + 5 + 2 * count : pos + 8 + 2 * count]
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        while not (data[end] == 0xFF and data[end + 1] not in (0, *range(0xD0, 0xD8))):
            end += 1
        found.append((pos, end, data[pos + 5], start, stop, approximation >> 4))
        pos = data.find(b"\xff\xda", end)
    return found


def without_scans(data: bytes, drop: Callable[[int, int, int, int], bool]) -> bytes:
    """``data`` without the scans for which ``drop(component, Ss, Se, Ah)`` is true."""
    out, last = [], 0
    for start, end, component, first, last_coefficient, high in scans(data):
        if drop(component, first, last_coefficient, high):
            out.append(data[last:start])
            last = end
    return b"".join([*out, data[last:]])


def first_scan_header(data: bytes, which: Callable[[int, int, int], bool]) -> int:
    """The offset of the first scan's SOS marker for which ``which(component, Ss, Ah)`` is true."""
    return next(
        start for start, _end, component, first, _stop, high in scans(data) if which(component, first, high)
    )


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


def outcome_at_eighth(data: bytes) -> tuple[str, bytes | str]:
    """The pixels of the 1/8 decode, or the kind of failure."""
    try:
        image = decoded_at_eighth(data)
    except Exception as exc:
        return "failed", type(exc).__name__
    return image.mode + str(image.size), image.tobytes()


def test_files_that_leave_coefficients_unrefined_are_left_alone() -> None:
    """libjpeg smooths such files as they are (changing DC too); the rewrite could not be, so it would
    differ. Here the chroma's refinement scans are missing, as in a cut and re-terminated upload."""
    data = jpeg(photo((640, 480)), progressive=True, subsampling=2)
    unrefined = without_scans(data, lambda component, first, stop, high: component != 1 and high > 0)
    assert unrefined != data
    decoded_at_eighth(unrefined)  # a valid file
    assert jpegscans.dc_scans_only(unrefined) is None


@pytest.mark.parametrize("edit", ["stop-64", "undefined-table", "header-length", "no-dc-scan"])
def test_scans_libjpeg_would_refuse_are_not_dropped_silently(edit: str) -> None:
    """A file that fails (or decodes) as it is must do the same: the scans dropped are checked as libjpeg
    checks them, and a component must have its DC scan before its AC scans."""
    data = bytearray(jpeg(photo((640, 480)), progressive=True, subsampling=0))
    ac_scan = first_scan_header(bytes(data), lambda component, first, high: first > 0)
    if edit == "stop-64":
        data[ac_scan + 7] = 64  # Se of a one-component scan
    elif edit == "undefined-table":
        data[ac_scan + 6] = (data[ac_scan + 6] & 0xF0) | 3  # AC table 3, never defined
    elif edit == "header-length":
        data[ac_scan + 3] += 2
    else:
        data = bytearray(without_scans(bytes(data), lambda component, first, stop, high: first == 0))
    assert jpegscans.dc_scans_only(bytes(data)) is None


def test_trailing_bytes_and_many_tables_cost_nothing_more() -> None:
    """What follows the EOI is not copied (libjpeg never reads it), and many DQT segments are one pass."""
    data = jpeg(photo((640, 480)), progressive=True, subsampling=0)
    rewritten = jpegscans.dc_scans_only(data + b"\0" * 1_000_000)
    assert rewritten is not None
    assert rewritten.endswith(b"\xff\xd9") and len(rewritten) < len(data)
    first_dqt = data.find(b"\xff\xdb")
    segment = data[first_dqt : first_dqt + 2 + int.from_bytes(data[first_dqt + 2 : first_dqt + 4], "big")]
    many = data[:first_dqt] + segment * 2000 + data[first_dqt:]
    rewritten = jpegscans.dc_scans_only(many)
    assert rewritten is not None
    assert_same_pixels(many, rewritten)


def test_damaged_files_decode_or_fail_as_before() -> None:
    """Seeded mutations of progressive files (bytes changed, cut, a scan header altered): wherever the
    rewrite applies, the 1/8 decode gives the same pixels, or fails the same way."""
    sources = [
        jpeg(photo((256, 192), seed=2), progressive=True, subsampling=0),
        jpeg(photo((256, 192), seed=3), progressive=True, subsampling=2),
        jpeg(photo((200, 136), "L", seed=4), progressive=True),
    ]
    rng = random.Random(11)
    rewritten = 0
    for _ in range(600):
        damaged = bytearray(rng.choice(sources))
        for _ in range(rng.randrange(1, 4)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        if rng.random() < 0.3:
            damaged = damaged[: rng.randrange(2, len(damaged))] + b"\xff\xd9"
        sample = bytes(damaged)
        stream = jpegscans.dc_scans_only(sample)
        if stream is None:
            continue
        rewritten += 1
        assert outcome_at_eighth(stream) == outcome_at_eighth(sample)
    assert rewritten > 100  # most damage falls in scans the decode never needed


def test_only_with_libjpeg_turbo(monkeypatch: pytest.MonkeyPatch) -> None:
    """IJG libjpeg sizes the IDCTs differently (4:2:2 chroma reads AC there): no rewrite."""
    monkeypatch.setattr(jpegscans, "_IS_TURBO", False)
    data = jpeg(photo((640, 480)), progressive=True)
    with Image.open(io.BytesIO(data)) as im:
        im.draft(None, (im.width // 8, im.height // 8))
        before = im.fp
        jpegscans.decode_dc_scans_only(im)
        assert im.fp is before


def with_a_scan_repeated(data: bytes, times: int) -> bytes:
    """``data`` with its last scan (an AC refinement) sent ``times`` more times: libjpeg only warns."""
    start, end, *_ = scans(data)[-1]
    return data[:end] + data[start:end] * times + data[end:]


def test_scans_are_counted_without_walking_a_sequential_single_scan() -> None:
    image = photo((96, 64))
    assert jpegscans.scans_to_decode(jpeg(image), pipeline.MAX_SCANS) == 1
    assert not jpegscans.buffers_whole_image(jpeg(image))
    progressive = jpeg(image, progressive=True)
    assert jpegscans.scans_to_decode(progressive, pipeline.MAX_SCANS) == len(scans(progressive))
    assert jpegscans.buffers_whole_image(progressive)
    bomb = with_a_scan_repeated(progressive, 20)
    assert jpegscans.scans_to_decode(bomb, 10) == 11  # stops one past the limit
    for damaged in (b"", b"\xff\xd8", progressive[:300], b"\xff\xd8\xff\xda\x00"):
        jpegscans.scans_to_decode(damaged, 10)  # never raises


@pytest.mark.parametrize("width", [None, 48, 12])  # as it is, at 1/2, at 1/8 (not rewritten: bogus scans)
def test_a_jpeg_of_endless_scans_is_refused_before_it_is_decoded(width: int | None) -> None:
    """Each repeated scan is a pass over the whole image: 5000 of them in a 0.5 MB file took 17 s."""
    progressive = jpeg(photo((96, 64)), progressive=True)
    bomb = with_a_scan_repeated(progressive, pipeline.MAX_SCANS)
    limits = ServiceState.from_settings(Settings()).limits
    params = parse_params(
        MultiDict({} if width is None else {"width": str(width)}), Settings(), UPLOAD_DEFAULTS
    )
    with pytest.raises(CorruptImage, match="scans"):
        pipeline.optimize(bomb, params, limits)
    # At the limit it is still an image (libjpeg warns about the repeats and decodes them).
    fine = with_a_scan_repeated(progressive, pipeline.MAX_SCANS - len(scans(progressive)))
    assert pipeline.optimize(fine, params, limits).data


def test_a_header_cut_short_is_a_damaged_image_not_a_crash() -> None:
    """The walk reads an SOF's and an SOS's component counts: a file cut inside either is refused as
    damaged (422), never an IndexError (500)."""
    data = jpeg(photo((64, 48)))
    limits = ServiceState.from_settings(Settings()).limits
    params = parse_params(MultiDict(), Settings(), UPLOAD_DEFAULTS)
    sos, sof = data.find(b"\xff\xda"), data.find(b"\xff\xc0")
    short = (data[: sos + 2] + b"\x00\x02", data[: sof + 2] + b"\x00\x02")  # segments of no fields
    for cut in (*short, data[: sof + 4], data[: sof + 9], data[: sos + 5]):
        assert jpegscans.scans_to_decode(cut, 10) <= 1
        jpegscans.buffers_whole_image(cut)
        with pytest.raises(OptimizerError):
            pipeline.inspect(cut, params, limits)
            pipeline.optimize(cut, params, limits)


def test_junk_between_segments_does_not_hide_the_scans() -> None:
    """libjpeg skips bytes where a marker should be (with a warning) and decodes on: so does the count."""
    progressive = jpeg(photo((96, 64)), progressive=True)
    bomb = with_a_scan_repeated(progressive, pipeline.MAX_SCANS)
    after_app0 = 4 + int.from_bytes(bomb[4:6], "big")  # SOI, then APP0's marker and its length
    junked = bomb[:after_app0] + b"\x00\x17" + bomb[after_app0:]
    assert jpegscans.scans_to_decode(junked, pipeline.MAX_SCANS) > pipeline.MAX_SCANS
    limits = ServiceState.from_settings(Settings()).limits
    with pytest.raises(CorruptImage, match="scans"):
        pipeline.optimize(junked, parse_params(MultiDict(), Settings(), UPLOAD_DEFAULTS), limits)


@pytest.mark.parametrize("marker", [b"\xfe", b"\xe1", b"\xef", b"\xdc"])  # COM, APP1, APP15, DNL
@pytest.mark.parametrize("length", [b"\x00\x00", b"\x00\x01"])
def test_a_segment_too_short_for_its_length_does_not_hide_the_scans(marker: bytes, length: bytes) -> None:
    """libjpeg skips what a length under 2 leaves (nothing) and reads on: the count must too. A walk
    that stopped there let a review hide 1000 scans behind one (17.6 s of CPU for 364 KB)."""
    progressive = jpeg(photo((96, 64)), progressive=True)
    bomb = with_a_scan_repeated(progressive, pipeline.MAX_SCANS)
    after_first_scan = scans(bomb)[0][1]
    hidden = bomb[:after_first_scan] + b"\xff" + marker + length + bomb[after_first_scan:]
    assert jpegscans.scans_to_decode(hidden, pipeline.MAX_SCANS) > pipeline.MAX_SCANS
    limits = ServiceState.from_settings(Settings()).limits
    with pytest.raises(CorruptImage, match="scans"):
        pipeline.optimize(hidden, parse_params(MultiDict(), Settings(), UPLOAD_DEFAULTS), limits)


def test_the_scan_limit_shrinks_with_the_image() -> None:
    assert pipeline.scan_limit(96 * 64) == pipeline.MAX_SCANS
    assert pipeline.scan_limit(50_000_000) == 100  # the default pixel limit: ~1.8 s at most
    assert pipeline.scan_limit(178_000_000) == pipeline.MIN_SCANS


@pytest.mark.slow
def test_a_large_jpeg_gets_fewer_scans() -> None:
    """At 50 Mpx 489 scans took 8.6 s of CPU (a review): a 12 Mpx image may have 416."""
    size = (4000, 3000)
    progressive = jpeg(Image.linear_gradient("L").resize(size).convert("RGB"), progressive=True)
    limit = pipeline.scan_limit(size[0] * size[1])
    assert limit < pipeline.MAX_SCANS
    limits = ServiceState.from_settings(Settings()).limits
    params = parse_params(MultiDict({"width": "100"}), Settings(), RouteDefaults())
    over = with_a_scan_repeated(progressive, limit + 1 - len(scans(progressive)))
    with pytest.raises(CorruptImage, match=f"more than {limit} scans"):
        pipeline.optimize(over, params, limits)
    at = with_a_scan_repeated(progressive, limit - len(scans(progressive)))
    assert pipeline.optimize(at, params, limits).width == 100


@pytest.mark.parametrize("where", ["before the first scan", "between scans"])
def test_a_flood_of_segments_is_refused_before_any_parser_loops_over_it(where: str) -> None:
    """26 MB of empty COM segments took Pillow 15.8 s and 420 MB (a review)."""
    progressive = jpeg(photo((96, 64)), progressive=True)
    at = 2 if where == "before the first scan" else scans(progressive)[0][1]
    flood = b"\xff\xfe\x00\x02" * (jpegscans.MAX_SEGMENTS + 1)
    flooded = progressive[:at] + flood + progressive[at:]
    limits = ServiceState.from_settings(Settings()).limits
    params = parse_params(MultiDict(), Settings(), UPLOAD_DEFAULTS)
    with pytest.raises(CorruptImage, match="marker segments"):
        pipeline.inspect(flooded, params, limits)
        pipeline.optimize(flooded, params, limits)
    # Below the limit it is still an image.
    fine = progressive[:at] + b"\xff\xfe\x00\x02" * 1000 + progressive[at:]
    assert pipeline.optimize(fine, params, limits).data


@pytest.mark.parametrize(
    ("junk", "refused"),
    [
        pytest.param(b"\x00" * 1000, False, id="some-junk"),
        pytest.param(b"\x00" * (jpegscans.MAX_JUNK + 1), True, id="zeros"),
        pytest.param(b"\xff\x00" * (jpegscans.MAX_JUNK // 2 + 1), True, id="stuffed-pairs"),
        pytest.param(b"\xff" * (jpegscans.MAX_JUNK + 1), True, id="fill-bytes"),
    ],
)
def test_junk_between_the_headers_is_bounded(junk: bytes, refused: bool) -> None:
    """Pillow reads junk before the first scan one byte at a time, in Python: 24 MB took 5.7 s (a review)."""
    data = jpeg(photo((64, 48)))
    after_app0 = 4 + int.from_bytes(data[4:6], "big")
    junked = data[:after_app0] + junk + data[after_app0:]
    limits = ServiceState.from_settings(Settings()).limits
    params = parse_params(MultiDict(), Settings(), UPLOAD_DEFAULTS)
    if refused:
        with pytest.raises(CorruptImage, match="junk"):
            pipeline.inspect(junked, params, limits)
    else:
        assert pipeline.optimize(junked, params, limits).data


def test_the_marker_search_is_linear_in_a_run_of_fill_bytes() -> None:
    """A run of 0xFF that leads to no marker made the search try again from each of its bytes: 40 000
    took 4.4 s, holding the GIL (a review). A child process, with a liveness bound only: 8 MB of them
    would take hours that way, and a few milliseconds now."""
    script = (
        "from optimizer import jpegscans\n"
        "list(jpegscans._segments(b'\\xff\\xd8' + b'\\xff' * 8_000_000 + b'\\x00'))\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
