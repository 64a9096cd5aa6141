"""Shared fixtures: the corpus, small generated images, and test clients around ``create_app``."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from optimizer import Settings, create_app, vips

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(os.environ.get("OPTIMIZER_CORPUS", ROOT.parent / "shared" / "corpus"))

ClientFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


def corpus_dir() -> Path:
    """The shared corpus; skips the test where it is absent, but fails under CI, where it must be."""
    if (CORPUS / "MANIFEST.csv").is_file():
        return CORPUS
    reason = f"the image corpus is not at {CORPUS} (set OPTIMIZER_CORPUS to its folder)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason + "; CI must provide it")
    pytest.skip(reason)


def manifest() -> list[dict[str, str]]:
    """MANIFEST.csv rows, or [] when the corpus is absent (parametrised tests then skip via corpus)."""
    path = CORPUS / "MANIFEST.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def corpus() -> Path:
    return corpus_dir()


def vips_or_skip() -> ModuleType:
    """libvips, loaded as the service loads it (OPTIMIZER_RESIZER=vips). The test extra installs it, so
    it is skipped where absent but fails under CI."""
    try:
        return vips.load()
    except vips.VipsUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{exc}; CI installs the test extra, which includes it")
        pytest.skip(str(exc))


def image_bytes(
    size: tuple[int, int] = (64, 48),
    mode: str = "RGB",
    color: tuple[int, ...] | int = (200, 30, 30),
    fmt: str = "JPEG",
    **save: object,
) -> bytes:
    """A small generated image, encoded as ``fmt``."""
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, fmt, **save)
    return buffer.getvalue()


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def multipart(data: bytes, field: str = "image", filename: str = "upload.jpg") -> aiohttp.FormData:
    """A form with one file part. The bytes go in a BytesIO: aiohttp warns about large raw bytes bodies,
    and the suite turns warnings into errors."""
    form = aiohttp.FormData()
    form.add_field(field, io.BytesIO(data), filename=filename, content_type="application/octet-stream")
    return form


def test_settings(**overrides: object) -> Settings:
    """Settings for tests: two threads, a small queue, short timeouts, unless overridden."""
    values: dict[str, object] = {"threads": 2, "queue": 2, "read_timeout": 5.0, "drain_seconds": 5.0}
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


test_settings.__test__ = False  # type: ignore[attr-defined]  # not a test, despite its name


class _Server(TestServer):
    """aiohttp's ``TestServer`` always cancels handlers whose clients leave, and quietly drops a
    ``handler_cancellation`` given to it (through pytest-aiohttp's ``server_kwargs`` too): tests that meant
    to cover aiohttp's default, as a host gets it, ran with cancellation on (found in review)."""

    def __init__(self, app: web.Application, *, cancellation: bool) -> None:
        super().__init__(app)
        self.cancellation = cancellation

    async def _make_runner(self, **kwargs: object) -> web.BaseRunner:
        kwargs["handler_cancellation"] = self.cancellation
        return web.AppRunner(self.app, **kwargs)  # type: ignore[arg-type]


def served(app: web.Application, *, cancellation: bool) -> TestServer:
    """A test server for ``app`` that cancels a handler when its client leaves, or (aiohttp's default
    outside tests) does not."""
    return _Server(app, cancellation=cancellation)


@pytest.fixture
async def make_client(
    aiohttp_client: ClientFactory,
) -> Callable[..., Awaitable[TestClient[web.Request, web.Application]]]:
    """``await make_client(**settings)``: a test client around a fresh ``create_app``."""

    async def factory(**overrides: object) -> TestClient[web.Request, web.Application]:
        return await aiohttp_client(create_app(test_settings(**overrides)))

    return factory
