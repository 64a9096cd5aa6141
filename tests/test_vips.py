"""The optional libvips resize engine (``OPTIMIZER_RESIZER=vips``): same pixels as Pillow's Lanczos to
within rounding, the exact size asked for, alpha handled like Pillow, no file loader reachable, and a
clear refusal at start when libvips is missing."""

from __future__ import annotations

import dataclasses
import io
import logging
import random
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from PIL import Image, ImageChops, ImageStat

from optimizer import vips
from optimizer.errors import OptimizerError
from optimizer.pipeline import Params, inspect, optimize, resize
from optimizer.settings import Settings, SettingsError
from tests.conftest import image_bytes, manifest, vips_or_skip
from tests.test_pipeline import LIMITS, psnr

VIPS_LIMITS = dataclasses.replace(LIMITS, resizer="vips")
GAP = 3.0  # the pipeline's REDUCING_GAP


@pytest.fixture(scope="module")
def pyvips() -> ModuleType:
    return vips_or_skip()


def detailed(size: tuple[int, int], mode: str, seed: int = 1) -> Image.Image:
    """Edges, gradients and noise in every channel: what a resampler can get wrong."""
    rng = random.Random(seed)
    width, height = size
    bands = len(Image.new(mode, (1, 1)).getbands())
    channels = []
    for band in range(bands):
        plane = Image.linear_gradient("L").resize(size).rotate(band * 70, expand=False)
        noise = Image.frombytes("L", size, rng.randbytes(width * height))
        channels.append(Image.blend(plane, noise, 0.3))
    return Image.merge(mode, channels)


def premultiplied(im: Image.Image) -> Image.Image:
    return im.convert("RGBA").convert("RGBa")


def mean_error(a: Image.Image, b: Image.Image) -> float:
    means = ImageStat.Stat(ImageChops.difference(a, b)).mean
    return sum(means) / len(means)


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "CMYK"])
@pytest.mark.parametrize("target", [(800, 450), (300, 169), (97, 55)])
def test_same_pixels_as_pillows_lanczos(pyvips: ModuleType, mode: str, target: tuple[int, int]) -> None:
    source = detailed((1507, 848), mode)
    ours = resize(source, target, "vips")
    pillows = source.resize(target, Image.Resampling.LANCZOS, reducing_gap=GAP)
    assert ours.mode == mode
    assert ours.size == target
    # Two implementations of one filter: they differ only in rounding (measured 51-55 dB, 0.3-0.6 per
    # value). Compared as seen, premultiplied: under a nearly transparent pixel any colour looks the same.
    assert mean_error(premultiplied(ours), premultiplied(pillows)) < 1.0
    assert psnr(premultiplied(ours), premultiplied(pillows)) > 48


def test_the_exact_size_for_every_ratio(pyvips: ModuleType) -> None:
    # libvips rounds scale x width itself; the engine must still return exactly the size asked for.
    rng = random.Random(7)
    for _ in range(300):
        size = (rng.randint(2, 700), rng.randint(2, 700))
        target = (rng.randint(1, size[0]), rng.randint(1, size[1]))
        assert resize(Image.new("RGB", size, "teal"), target, "vips").size == target


def test_a_solid_colour_stays_that_colour(pyvips: ModuleType) -> None:
    out = resize(Image.new("RGB", (1000, 700), (12, 200, 99)), (123, 77), "vips")
    assert out.getextrema() == ((12, 12), (200, 200), (99, 99))


def test_transparent_pixels_do_not_bleed(pyvips: ModuleType) -> None:
    # Left half opaque blue, right half fully transparent red: premultiplied, no red reaches the edge.
    source = Image.new("RGBA", (400, 100), (255, 0, 0, 0))
    source.paste((0, 0, 255, 255), (0, 0, 200, 100))
    out = resize(source, (40, 10), "vips")
    for x in range(40):
        red, _green, blue, alpha = out.getpixel((x, 5))  # type: ignore[misc]
        if alpha > 8:
            assert red <= 2, (x, red, blue, alpha)


@pytest.mark.parametrize("size", [(4000, 3000), (4003, 3001)])
def test_large_reductions_use_the_reducing_gap_like_pillow(pyvips: ModuleType, size: tuple[int, int]) -> None:
    # 4000 -> 150 is shrunk by a box first (gap 3: by 8); the result must stay as close to Pillow's
    # (measured 0.22; without the gap libvips is 1.4 away, with gap 2 0.4). Odd sizes leave a partial block.
    source = detailed(size, "RGB", seed=3)
    target = (150, round(150 * size[1] / size[0]))
    ours = resize(source, target, "vips")
    pillows = source.resize(target, Image.Resampling.LANCZOS, reducing_gap=GAP)
    assert mean_error(ours, pillows) < 0.35


@pytest.mark.parametrize("width", [300, 150, 97])
def test_large_reductions_of_a_photo_match_a_full_lanczos(
    pyvips: ModuleType, corpus: Path, width: int
) -> None:
    # A whole 13 Mpx photo reduced 14-44x: the box shrink before the Lanczos step must not cost visible
    # quality (measured 49-54 dB; a reduce() done by Pillow and scaled by libvips gave 33-39).
    with Image.open(corpus / "photos/dragonfly-bolly-4224x3168.jpg") as photo:
        source = photo.convert("RGB")
    target = (width, round(width * source.height / source.width))
    reference = source.resize(target, Image.Resampling.LANCZOS)
    assert psnr(resize(source, target, "vips"), reference) > 45


def test_enlarging_stays_with_pillow(pyvips: ModuleType) -> None:
    source = detailed((50, 40), "RGB")
    assert not vips.supports(source, (100, 80))
    assert not vips.supports(source, (40, 80))  # one axis enlarged is an enlargement
    assert vips.supports(source, (50, 39))
    assert not vips.supports(source.convert("P"), (10, 8))
    assert resize(source, (100, 80), "vips").tobytes() == resize(source, (100, 80)).tobytes()


def test_libvips_does_not_write_its_resize_plans_into_the_log(
    pyvips: ModuleType, caplog: pytest.LogCaptureFixture
) -> None:
    # libvips sends "residual reducev by ..." and the like as info messages for every resize.
    caplog.set_level(logging.DEBUG)
    resize(detailed((900, 600), "RGB"), (300, 200), "vips")
    assert [r.getMessage() for r in caplog.records if r.name.startswith("pyvips")] == []
    assert logging.getLogger("pyvips").getEffectiveLevel() == logging.WARNING


def _run_probe(code: str) -> str:
    """``code`` in a fresh interpreter, whose libvips settings this test process does not share."""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_standalone_servers_libvips_opens_no_file_and_keeps_nothing(pyvips: ModuleType) -> None:
    # The service hands libvips pixels only; a loader reached by mistake would parse hostile bytes.
    probe = """
import asyncio, io, pyvips
from PIL import Image
from optimizer import server
from optimizer.settings import Settings

async def serve(settings):
    return 0

server.serve = serve  # everything the process does before it serves, then stop
server.run(Settings(resizer="vips"))
jpeg = io.BytesIO()
Image.new("RGB", (32, 32)).save(jpeg, "JPEG")
try:
    pyvips.Image.new_from_buffer(jpeg.getvalue(), "").avg()
except pyvips.Error:
    print("blocked", pyvips.concurrency_get(), pyvips.cache_get_max(), pyvips.cache_get_max_mem())
"""
    assert _run_probe(probe) == "blocked 1 0 0"


def test_an_embedding_hosts_libvips_is_left_as_it_was(pyvips: ModuleType) -> None:
    """Found in review: building ``Settings(resizer="vips")`` blocked the host's own pyvips loaders."""
    probe = """
import io, pyvips
from PIL import Image
from optimizer import Settings, create_app

png = io.BytesIO()
Image.new("RGB", (32, 32), "red").save(png, "PNG")
before = (pyvips.concurrency_get(), pyvips.cache_get_max())
create_app(Settings(resizer="vips", threads=1))
after = (pyvips.concurrency_get(), pyvips.cache_get_max())
print(before == after, pyvips.Image.new_from_buffer(png.getvalue(), "").width)
"""
    assert _run_probe(probe) == "True 32"


def test_the_pipeline_answers_the_same_with_either_engine(pyvips: ModuleType) -> None:
    data = image_bytes((1200, 900), fmt="PNG", color=(40, 90, 160))
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        busy = detailed(im.size, "RGB")
    buffer = io.BytesIO()
    busy.save(buffer, "JPEG", quality=95)
    for params in (Params(width=300), Params(width=640, format="png"), Params(height=200, format="webp")):
        ours = optimize(buffer.getvalue(), params, VIPS_LIMITS)
        pillows = optimize(buffer.getvalue(), params, LIMITS)
        assert (ours.width, ours.height, ours.media_type) == (
            pillows.width,
            pillows.height,
            pillows.media_type,
        )


@pytest.mark.parametrize("name", [pytest.param(row["file"], id=row["file"]) for row in manifest()])
def test_every_corpus_file_gets_the_same_answer_as_with_pillow(
    pyvips: ModuleType, corpus: Path, name: str
) -> None:
    # Orientation, CMYK, ICC, 16-bit, alpha, palettes, animations, and the hostile files: the engine
    # replaces the resize only, so every answer, and every refusal, must be Pillow's.
    data = (corpus / name).read_bytes()
    params = Params(width=200, format="png")
    try:
        pillows = optimize(data, params, LIMITS)
    except OptimizerError as refusal:
        with pytest.raises(type(refusal)):
            optimize(data, params, VIPS_LIMITS)
        return
    ours = optimize(data, params, VIPS_LIMITS)
    assert (ours.width, ours.height) == (pillows.width, pillows.height)
    with Image.open(io.BytesIO(ours.data)) as a, Image.open(io.BytesIO(pillows.data)) as b:
        assert a.mode == b.mode
        assert psnr(premultiplied(a), premultiplied(b)) > 45


def test_memory_estimate_counts_the_copies_in_and_out(pyvips: ModuleType, corpus: Path) -> None:
    data = (corpus / "photos/kleiber-lukas-baubkus-6028x3391.jpg").read_bytes()
    pillow_estimate = inspect(data, Params(width=800), LIMITS)
    assert inspect(data, Params(width=800), VIPS_LIMITS) >= pillow_estimate + 1507 * 848 * 3


def test_an_unknown_resizer_is_refused() -> None:
    with pytest.raises(SettingsError, match=r"OPTIMIZER_RESIZER='gpu': choose one of pillow, vips"):
        Settings(resizer="gpu")


def test_a_missing_libvips_is_refused_at_start_with_the_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(vips, "_module", None)
    monkeypatch.setitem(sys.modules, "pyvips", None)  # import pyvips -> ImportError
    with pytest.raises(
        SettingsError, match=r"OPTIMIZER_RESIZER='vips': libvips cannot be loaded .*optimizer\[vips\]"
    ):
        Settings(resizer="vips")
    assert Settings().resizer == "pillow"  # the default never needs it


def test_a_too_old_libvips_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    pyvips = vips_or_skip()
    monkeypatch.setattr(vips, "_module", None)
    monkeypatch.setattr(pyvips, "at_least_libvips", lambda major, minor: False)
    with pytest.raises(vips.VipsUnavailable, match=r"libvips \d+\.\d+\.\d+ is too old \(at least 8\.13"):
        vips.load()


def test_a_libvips_that_cannot_resize_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    pyvips = vips_or_skip()
    monkeypatch.setattr(vips, "_module", None)

    def broken(*args: object, **kwargs: object) -> object:
        raise pyvips.Error("resize does not support optional argument gap")

    monkeypatch.setattr(pyvips.Image, "resize", broken)
    with pytest.raises(SettingsError, match=r"OPTIMIZER_RESIZER='vips': libvips cannot resize"):
        Settings(resizer="vips")


def test_a_supervisor_checks_libvips_in_a_child_and_does_not_load_it() -> None:
    vips_or_skip()
    probe = (
        "import sys; from optimizer.settings import Settings; "
        "Settings(resizer='vips', processes=2); print('pyvips' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "False"


def test_a_failed_check_in_a_child_stops_the_start_with_its_message(monkeypatch: pytest.MonkeyPatch) -> None:
    vips.check_in_child.cache_clear()  # a success earlier in this process would be remembered
    monkeypatch.setattr(vips, "_CHECK_CODE", "import sys; sys.exit('libvips cannot be loaded (gone)')")
    with pytest.raises(SettingsError, match=r"OPTIMIZER_RESIZER='vips': libvips cannot be loaded \(gone\)"):
        Settings(resizer="vips", processes=2)
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    with pytest.raises(SettingsError, match=r"libvips could not be checked .*optimizer\[vips\]"):
        Settings(resizer="vips", processes=2)


def test_the_check_in_a_child_imports_this_package_not_one_of_the_same_name(tmp_path: Path) -> None:
    vips_or_skip()
    impostor = tmp_path / "optimizer"
    impostor.mkdir()
    (impostor / "__init__.py").write_text("raise SystemExit('the wrong optimizer')")
    root = str(Path(vips.__file__).resolve().parents[1])
    probe = (
        f"import sys; sys.path.insert(0, {root!r}); from optimizer.settings import Settings; "
        "Settings(resizer='vips', processes=2); print('checked')"
    )
    # The probe imports the real package; its check child starts in tmp_path too, where the impostor
    # comes first on a plain "python -c" path.
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "checked"


async def test_the_service_serves_with_the_vips_engine(pyvips: ModuleType, make_client) -> None:  # type: ignore[no-untyped-def]
    client = await make_client(resizer="vips")
    source = detailed((1600, 1000), "RGB")
    buffer = io.BytesIO()
    source.save(buffer, "JPEG", quality=90)
    response = await client.post(
        "/optimize?width=400", data=buffer.getvalue(), headers={"Content-Type": "image/jpeg"}
    )
    assert response.status == 200, await response.text()
    with Image.open(io.BytesIO(await response.read())) as out:
        assert out.size == (400, 250)
        expected = source.resize((400, 250), Image.Resampling.LANCZOS)
        assert psnr(out.convert("RGB"), expected) > 30  # JPEG q80 on top of the resize
