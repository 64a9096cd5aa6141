"""The HTTP contract, request by request: statuses, headers, problem bodies and decoded output."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from PIL import Image, ImageOps

from tests.conftest import decode, image_bytes, multipart

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]

SEED = "photos/seed-loadtest-5760x3840.jpg"


async def problem(response: aiohttp.ClientResponse, status: int, code: str) -> dict[str, object]:
    """Assert an RFC 9457 problem response with this status and code; return its body."""
    assert response.status == status, (await response.read())[:300]
    assert response.headers["Content-Type"].startswith("application/problem+json")
    body = json.loads(await response.read())
    assert body["status"] == status
    assert body["code"] == code
    assert isinstance(body["type"], str) and body["type"]
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    return dict(body)


async def test_upload_is_the_go_contract(make_client: MakeClient, corpus: Path) -> None:
    client = await make_client()
    response = await client.post("/upload", data=multipart((corpus / SEED).read_bytes()))
    assert response.status == 200
    assert response.headers["Content-Type"] == "image/jpeg"
    body = await response.read()
    assert int(response.headers["Content-Length"]) == len(body)
    image = decode(body)
    assert image.format == "JPEG"
    assert image.size == (300, 200)
    assert (response.headers["X-Image-Width"], response.headers["X-Image-Height"]) == ("300", "200")
    stages = {part.split(";")[0].strip() for part in response.headers["Server-Timing"].split(",")}
    assert {"queue", "decode", "resize", "encode"} <= stages


@pytest.mark.parametrize(
    ("route", "query", "size"),
    [
        ("/upload", {}, (300, 150)),  # the Go service's Lanczos to 300 px enlarged small images too
        ("/upload", {"enlarge": "0"}, (128, 64)),
        ("/optimize", {"width": "300"}, (128, 64)),  # elsewhere enlarging is asked for
    ],
)
async def test_upload_makes_small_images_300_px_wide_like_the_go_service(
    make_client: MakeClient, route: str, query: dict[str, str], size: tuple[int, int]
) -> None:
    client = await make_client()
    response = await client.post(route, params=query, data=multipart(image_bytes((128, 64))))
    assert response.status == 200
    assert decode(await response.read()).size == size


async def test_optimize_raw_body_with_parameters(make_client: MakeClient) -> None:
    client = await make_client()
    source = image_bytes((400, 200), fmt="PNG")
    response = await client.post(
        "/optimize",
        params={"width": "100", "format": "webp", "quality": "70"},
        data=source,
        headers={"Content-Type": "image/png"},
    )
    assert response.status == 200
    assert response.headers["Content-Type"] == "image/webp"
    image = decode(await response.read())
    assert (image.format, image.size) == ("WEBP", (100, 50))


@pytest.mark.parametrize(
    ("query", "size"),
    [
        ({}, (400, 200)),
        ({"width": "100"}, (100, 50)),
        ({"height": "50"}, (100, 50)),
        ({"width": "100", "height": "10"}, (20, 10)),
        ({"width": "1000"}, (400, 200)),  # no upscaling by default
        ({"width": "800", "enlarge": "1"}, (800, 400)),
        ({"format": "png"}, (400, 200)),
        ({"format": "avif", "width": "40"}, (40, 20)),
    ],
)
async def test_size_and_format_parameters(
    make_client: MakeClient, query: dict[str, str], size: tuple[int, int]
) -> None:
    client = await make_client()
    response = await client.post("/optimize", params=query, data=multipart(image_bytes((400, 200))))
    assert response.status == 200
    image = decode(await response.read())
    assert image.size == size
    expected_format = {"png": "PNG", "avif": "AVIF"}.get(query.get("format", ""), "JPEG")
    assert image.format == expected_format


async def test_max_dimension_caps_the_output(make_client: MakeClient) -> None:
    client = await make_client(max_dimension=64)
    response = await client.post("/optimize", data=multipart(image_bytes((400, 200))))
    assert decode(await response.read()).size == (64, 32)
    response = await client.post("/optimize", params={"width": "65"}, data=multipart(image_bytes()))
    body = await problem(response, 400, "invalid_parameter")
    assert "width" in str(body["detail"])


@pytest.mark.parametrize("route", ["/optimize", "/upload"])
@pytest.mark.parametrize(
    ("query", "name"),
    [
        ({"widht": "300"}, "widht"),
        ({"width": "0"}, "width"),
        ({"width": "abc"}, "width"),
        ({"width": "3_00"}, "width"),
        ({"width": "\u0663\u0660\u0660"}, "width"),  # Arabic-Indic digits: int() reads 300
        ({"width": "0" * 40 + "300"}, "width"),
        ({"height": "-5"}, "height"),
        ({"quality": "101"}, "quality"),
        ({"format": "gif"}, "format"),
        ({"enlarge": "maybe"}, "enlarge"),
    ],
)
async def test_bad_parameters_are_named(
    make_client: MakeClient, route: str, query: dict[str, str], name: str
) -> None:
    client = await make_client()
    response = await client.post(route, params=query, data=multipart(image_bytes()))
    body = await problem(response, 400, "invalid_parameter")
    assert str(body["detail"]).startswith(name)


async def test_repeated_parameter_is_refused(make_client: MakeClient) -> None:
    client = await make_client()
    response = await client.post("/optimize?width=10&width=20", data=multipart(image_bytes()))
    await problem(response, 400, "invalid_parameter")


async def test_wrong_method_and_unknown_path(make_client: MakeClient) -> None:
    client = await make_client()
    response = await client.get("/upload")
    await problem(response, 405, "method_not_allowed")
    assert response.headers["Allow"] == "POST"
    await problem(await client.get("/nothing-here"), 404, "not_found")


async def test_health_and_readiness(make_client: MakeClient) -> None:
    client = await make_client()
    health = await client.get("/healthz")
    assert health.status == 200
    ready = await client.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["status"] == "ready"


async def test_body_over_cap_refused_from_content_length(make_client: MakeClient) -> None:
    client = await make_client(max_body_bytes=1000)
    data = image_bytes((300, 300), fmt="PNG", compress_level=0)
    assert len(data) > 1000
    response = await client.post("/optimize", data=data, headers={"Content-Type": "image/png"})
    await problem(response, 413, "body_too_large")


async def test_body_over_cap_refused_while_streaming(make_client: MakeClient) -> None:
    client = await make_client(max_body_bytes=100_000)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(50):  # 50 x 16 KiB, no Content-Length: chunked transfer encoding
            yield b"\xff\xd8\xff" + bytes(16 * 1024 - 3)

    response = await client.post("/optimize", data=chunks(), headers={"Content-Type": "image/jpeg"})
    await problem(response, 413, "body_too_large")
    # the same cap holds inside a multipart body
    form = aiohttp.FormData()
    form.add_field("image", chunks(), filename="big.jpg", content_type="image/jpeg")
    response = await client.post("/upload", data=form)
    await problem(response, 413, "body_too_large")


async def test_empty_uploads(make_client: MakeClient) -> None:
    client = await make_client()
    response = await client.post("/optimize", data=b"", headers={"Content-Type": "image/jpeg"})
    await problem(response, 400, "empty_body")
    response = await client.post("/upload", data=multipart(b""))
    await problem(response, 400, "empty_body")


async def test_multipart_problems(make_client: MakeClient) -> None:
    client = await make_client()
    no_boundary = await client.post(
        "/upload", data=image_bytes(), headers={"Content-Type": "multipart/form-data"}
    )
    await problem(no_boundary, 400, "malformed_upload")

    wrong_field = await client.post("/upload", data=multipart(image_bytes(), field="file"))
    await problem(wrong_field, 400, "missing_image")

    form = aiohttp.FormData()
    form.add_field("image", image_bytes(), filename="a.jpg")
    form.add_field("image", image_bytes(), filename="b.jpg")
    await problem(await client.post("/upload", data=form), 400, "malformed_upload")

    cut = (
        b'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
        + image_bytes()[:100]
    )
    response = await client.post(
        "/upload", data=cut, headers={"Content-Type": "multipart/form-data; boundary=XyZ"}
    )
    await problem(response, 400, "malformed_upload")


@pytest.mark.parametrize("content_type", ["image/jpeg;a*", "multipart/form-data; a*"])
async def test_an_unparseable_content_type_is_a_400(make_client: MakeClient, content_type: str) -> None:
    # CPython's email parser, behind aiohttp's request.content_type, raises IndexError on these.
    client = await make_client()
    response = await client.post("/optimize", data=image_bytes(), headers={"Content-Type": content_type})
    await problem(response, 400, "malformed_upload")


async def test_other_form_fields_are_ignored(make_client: MakeClient) -> None:
    client = await make_client()
    form = aiohttp.FormData()
    form.add_field("note", "hello")
    form.add_field("image", image_bytes((100, 100)), filename="a.jpg")
    response = await client.post("/upload", data=form)
    assert response.status == 200
    assert decode(await response.read()).size == (300, 300)  # the Go contract: 300 px wide, enlarged


@pytest.mark.parametrize("name", ["document.pdf", "postscript.eps", "photoshop.psd", "xbm-c-source.xbm"])
async def test_non_allowed_formats_are_415(make_client: MakeClient, corpus: Path, name: str) -> None:
    client = await make_client()
    response = await client.post("/upload", data=multipart((corpus / "hostile" / name).read_bytes()))
    await problem(response, 415, "unsupported_format")


async def test_allowlist_is_configurable(make_client: MakeClient) -> None:
    client = await make_client(formats="png")
    response = await client.post("/optimize", data=multipart(image_bytes(fmt="JPEG")))
    await problem(response, 415, "unsupported_format")
    response = await client.post("/optimize", data=multipart(image_bytes(fmt="PNG")))
    assert response.status == 200


async def test_corrupt_header_is_422(make_client: MakeClient, corpus: Path) -> None:
    client = await make_client()
    data = (corpus / "hostile" / "corrupt-header.jpg").read_bytes()
    await problem(await client.post("/upload", data=multipart(data)), 422, "corrupt_image")


@pytest.mark.parametrize("name", ["bomb-gif-4gpx.gif", "bomb-png-65536x65536.png", "bomb-jpeg-280mpx.jpg"])
async def test_pixel_bombs_are_413(make_client: MakeClient, corpus: Path, name: str) -> None:
    client = await make_client()
    data = (corpus / "hostile" / name).read_bytes()
    await problem(await client.post("/upload", data=multipart(data)), 413, "too_many_pixels")


async def test_pixel_limit_is_configurable(make_client: MakeClient) -> None:
    client = await make_client(max_pixels=999)
    response = await client.post("/optimize", data=multipart(image_bytes((100, 10))))
    await problem(response, 413, "too_many_pixels")


async def test_stalled_upload_is_408(make_client: MakeClient) -> None:
    client = await make_client(read_timeout=0.3)
    app_state = client.app  # the gate must be empty again afterwards
    assert app_state is not None

    async def trickle() -> AsyncIterator[bytes]:
        yield b"\xff\xd8\xff"
        await asyncio.sleep(3)  # far past the deadline; the server answers before this ends
        yield b"\x00"

    response = await client.post("/optimize", data=trickle(), headers={"Content-Type": "image/jpeg"})
    await problem(response, 408, "upload_stalled")


async def test_output_is_freshly_encoded(make_client: MakeClient, corpus: Path) -> None:
    client = await make_client()
    source = (corpus / "photos" / "kleiber-lukas-baubkus-6028x3391.jpg").read_bytes()
    assert b"Exif" in source[:4096]
    response = await client.post("/optimize?width=200", data=multipart(source))
    body = await response.read()
    assert b"Exif" not in body
    assert "exif" not in decode(body).info


async def test_body_not_matching_its_content_encoding_is_400(make_client: MakeClient) -> None:
    client = await make_client()
    response = await client.post(
        "/optimize",
        data=b"this is not gzip",
        headers={"Content-Type": "image/jpeg", "Content-Encoding": "gzip"},
    )
    await problem(response, 400, "malformed_upload")


async def test_gzip_encoded_upload_is_accepted_and_capped_after_decoding(make_client: MakeClient) -> None:
    import gzip

    client = await make_client(max_body_bytes=50_000)
    small = image_bytes((64, 48))
    response = await client.post(
        "/optimize",
        data=gzip.compress(small),
        headers={"Content-Type": "image/jpeg", "Content-Encoding": "gzip"},
    )
    assert response.status == 200
    # A gzip bomb: 40 KB on the wire, 4 MB once decoded. The cap counts decoded bytes.
    bomb = gzip.compress(b"\xff\xd8\xff" + bytes(4_000_000))
    assert len(bomb) < 50_000
    response = await client.post(
        "/optimize", data=bomb, headers={"Content-Type": "image/jpeg", "Content-Encoding": "gzip"}
    )
    await problem(response, 413, "body_too_large")


@pytest.mark.parametrize(
    ("name", "orientation"),
    [
        ("exif-orientation-2-landscape.jpg", 2),
        ("exif-orientation-3.jpg", 3),
        ("exif-orientation-5.jpg", 5),
        ("exif-orientation-6.jpg", 6),
        ("exif-orientation-7-portrait.jpg", 7),
        ("exif-orientation-8.jpg", 8),
        ("exif-orientation-6.png", 6),
        ("exif-orientation-6.webp", 6),
        ("exif-orientation-8-2x1.jpg", 8),
    ],
)
async def test_exif_orientation_over_http(
    make_client: MakeClient, corpus: Path, name: str, orientation: int
) -> None:
    assert decode((corpus / "valid" / name).read_bytes()).getexif().get(0x0112) == orientation

    source = (corpus / "valid" / name).read_bytes()
    stored = decode(source)
    upright = ImageOps.exif_transpose(stored)
    client = await make_client()
    response = await client.post("/optimize?format=png", data=multipart(source))
    assert response.status == 200
    image = decode(await response.read())
    assert image.size == upright.size  # 5-8 swap width and height
    assert image.getexif().get(0x0112, 1) == 1
    if min(upright.size) >= 8:
        # The pixels are upright too: closer to the transposed source than to the stored one.
        reference = upright.convert("RGB")
        stored_rgb = stored.convert("RGB").resize(reference.size)
        got = image.convert("RGB")

        def distance(a: Image.Image, b: Image.Image) -> float:
            small = (32, 32)
            pairs = zip(a.resize(small).tobytes(), b.resize(small).tobytes(), strict=True)
            return sum(abs(x - y) for x, y in pairs) / (32 * 32 * 3)

        assert distance(got, reference) < distance(got, stored_rgb)
