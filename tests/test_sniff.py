"""``optimizer.sniff``: the format family an upload claims, from its first bytes only."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from optimizer.sniff import PILLOW_FORMATS, sniff
from tests.conftest import image_bytes, manifest

FAMILIES = {*PILLOW_FORMATS, "heif"}


def ftyp(major: bytes, *compatible: bytes, minor: int = 0, size: int | None = None) -> bytes:
    """An ISO-BMFF ``ftyp`` box (as AVIF and HEIF files start), followed by the start of a ``meta`` box."""
    body = b"ftyp" + major + struct.pack(">I", minor) + b"".join(compatible)
    box = struct.pack(">I", size if size is not None else 4 + len(body)) + body
    return box + b"\x00\x00\x00\x21meta\x00\x00\x00\x00"


# ------------------------------------------------------------------------------------------- families


@pytest.mark.parametrize(
    ("head", "family"),
    [
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "jpeg"),
        (b"\xff\xd8\xff\xe1\x00\x10Exif\x00", "jpeg"),
        (b"\xff\xd8\xff\xdb", "jpeg"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "png"),
        (b"GIF87a\x01\x00\x01\x00", "gif"),
        (b"GIF89a\x01\x00\x01\x00", "gif"),
        (b"RIFF\x24\x00\x00\x00WEBPVP8 ", "webp"),
        (b"RIFF\x24\x00\x00\x00WEBPVP8L", "webp"),
        (b"II*\x00\x08\x00\x00\x00", "tiff"),
        (b"MM\x00*\x00\x00\x00\x08", "tiff"),
        (b"BM" + b"\x00" * 16, "bmp"),
    ],
)
def test_magic_bytes(head: bytes, family: str) -> None:
    assert sniff(head) == family


@pytest.mark.parametrize(
    ("fmt", "family"),
    [
        ("JPEG", "jpeg"),
        ("PNG", "png"),
        ("GIF", "gif"),
        ("WEBP", "webp"),
        ("TIFF", "tiff"),
        ("BMP", "bmp"),
        ("AVIF", "avif"),
    ],
)
def test_files_written_by_pillow(fmt: str, family: str) -> None:
    data = image_bytes(fmt=fmt)
    assert sniff(data[:64]) == family
    assert sniff(data) == family
    assert fmt in PILLOW_FORMATS[family]


def test_lossless_webp() -> None:
    data = image_bytes(fmt="WEBP", lossless=True)
    assert data[12:16] == b"VP8L"
    assert sniff(data[:64]) == "webp"


def test_every_family_names_pillow_plugins() -> None:
    assert set(PILLOW_FORMATS) == {"jpeg", "png", "webp", "gif", "avif", "tiff", "bmp"}
    assert PILLOW_FORMATS["jpeg"] == ("JPEG", "MPO")  # a camera MPO is a JPEG to the client
    registered = Image.registered_extensions().values()
    for plugins in PILLOW_FORMATS.values():
        for plugin in plugins:
            assert plugin in registered


# ------------------------------------------------------------------------------------- ISO-BMFF brands


@pytest.mark.parametrize(
    ("head", "family"),
    [
        (ftyp(b"avif", b"mif1", b"miaf"), "avif"),
        (ftyp(b"avis", b"avif", b"msf1"), "avif"),
        # the major brand is generic, AVIF is only among the compatible brands
        (ftyp(b"mif1", b"avif", b"miaf"), "avif"),
        (ftyp(b"mif1", b"miaf", b"MA1B", b"avif"), "avif"),
        (ftyp(b"heic", b"mif1", b"heic"), "heif"),
        (ftyp(b"heix", b"mif1"), "heif"),
        (ftyp(b"mif1", b"heic"), "heif"),
        (ftyp(b"mif1"), "heif"),
        (ftyp(b"msf1", b"hevc"), "heif"),
        # AVIF wins when both are claimed: Pillow can decode it
        (ftyp(b"heic", b"avif"), "avif"),
        # other ISO-BMFF files are not images
        (ftyp(b"isom", b"iso2", b"avc1", b"mp41"), None),
        (ftyp(b"qt  "), None),
        (ftyp(b"M4A ", b"M4A ", b"mp42"), None),
    ],
)
def test_isobmff_brands(head: bytes, family: str | None) -> None:
    assert sniff(head) == family


def test_brands_outside_the_ftyp_box_do_not_count() -> None:
    # the box says it is 16 bytes long (major brand and minor version only); "avif" follows it, in the
    # next box, and is not a compatible brand
    head = struct.pack(">I", 16) + b"ftypisom" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x0cavif"
    assert sniff(head) is None


def test_ftyp_box_larger_than_the_head() -> None:
    # a box that declares more bytes than were given: only the bytes present are read
    head = ftyp(b"mif1", b"miaf", b"avif", size=4096)
    assert sniff(head) == "avif"
    assert sniff(head[:20]) == "heif"  # cut before the "avif" brand: only mif1 is seen


def test_corpus_heic_and_avif(corpus: Path) -> None:
    assert sniff((corpus / "valid/heic-hopper.heic").read_bytes()[:64]) == "heif"
    assert sniff((corpus / "valid/avif-alpha.avif").read_bytes()[:64]) == "avif"
    assert "heif" not in PILLOW_FORMATS  # recognised so that the refusal can name it, never decoded


# ------------------------------------------------------------------------------------- unknown, short


@pytest.mark.parametrize(
    "head",
    [
        b"%PDF-1.4\n%\xe2\xe3\xcf\xd3",
        b"%!PS-Adobe-3.0 EPSF-3.0",
        b"8BPS\x00\x01\x00\x00",
        b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1",  # OLE2 (.doc)
        b"<?php echo 'hi'; ?>",
        b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)">',
        b"<!DOCTYPE html><html>",
        b"#define hopper_width 128\n",  # XBM
        b"\x01\xda\x01\x01\x00\x03",  # SGI
        b"BLP2\x01\x00\x00\x00",
        b"DDS |\x00\x00\x00",
        b"RIFF\x24\x00\x00\x00WAVEfmt ",  # RIFF, but not WebP
        b"RIFF\x24\x00\x00\x00AVI LIST",
        b"GIF88a\x01\x00\x01\x00",
        b"\x00\x00\x01\x00\x01\x00",  # ICO
        b"\x00" * 64,
        b"\xff" * 64,
        b"hello world, this is plain text and certainly not an image",
    ],
)
def test_unknown_bytes(head: bytes) -> None:
    assert sniff(head) is None


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"\xff",
        b"\xff\xd8",  # JPEG SOI without the next marker
        b"\x89",
        b"\x89PN",
        b"GIF8",
        b"GIF89",
        b"RIFF",
        b"RIFF\x24\x00\x00\x00WEB",
        b"II*",
        b"MM\x00",
        b"BM",
        b"BM" + b"\x00" * 15,  # a BMP header is longer: "BM" alone is too common a start for text
        b"\x00\x00\x00\x18ftyp",
        b"\x00\x00\x00\x18fty",
    ],
)
def test_short_input(head: bytes) -> None:
    assert sniff(head) is None


# ------------------------------------------------------------------------------------------- loose PNG


@pytest.mark.parametrize(
    "head",
    [
        b"\x89PNG\r\n\x1a\n",  # the full signature
        b"\x89PNG\r\r\n\x1a\r\n",  # LF -> CRLF (a text-mode transfer)
        b"\x89PNG\n\x1a\n",  # CRLF -> LF
        b"\x89PNG",  # the signature cut short
        b"\x89PNG\x00\x00\x00\x00",
    ],
)
def test_png_check_is_loose(head: bytes) -> None:
    """Any ``\\x89PNG`` start claims PNG, so a mangled PNG is reported as corrupt (422), not unknown."""
    assert sniff(head) == "png"


@pytest.mark.parametrize(
    "head", [b"\x89PNX\r\n\x1a\n", b"\x88PNG\r\n\x1a\n", b"PNG\r\n\x1a\n", b"\x89png\r\n"]
)
def test_png_check_needs_its_four_bytes(head: bytes) -> None:
    assert sniff(head) is None


def test_corpus_text_mode_png_still_claims_png(corpus: Path) -> None:
    data = (corpus / "hostile/broken-textmode.png").read_bytes()
    assert sniff(data[:64]) == "png"


# ----------------------------------------------------------------------------------------------- corpus

# MANIFEST.csv's "format" column (what Pillow reports, or [magic] when Pillow cannot open the file) ->
# the family sniff() must report from the first 64 bytes, as the pipeline calls it.
CORPUS_FAMILIES: dict[str, str | None] = {
    "JPEG": "jpeg",
    "MPO": "jpeg",
    "[jpeg]": "jpeg",
    "PNG": "png",
    "[png]": "png",
    "GIF": "gif",
    "[gif]": "gif",
    "WEBP": "webp",
    "AVIF": "avif",
    "TIFF": "tiff",
    "[tiff]": "tiff",
    "BMP": "bmp",
    "[heic]": "heif",
}


@pytest.mark.parametrize("row", [pytest.param(row, id=row["file"]) for row in manifest()])
def test_corpus_files(corpus: Path, row: dict[str, str]) -> None:
    head = (corpus / row["file"]).read_bytes()[:64]
    if head.startswith((b"II+\x00", b"MM\x00+")):
        # BigTIFF (hostile/tiff-seek-too-large.tif): Pillow's TIFF plugin reads it, sniff() does not claim
        # it, so it is refused as 415; either answer is acceptable for that file.
        assert sniff(head) in ("tiff", None)
        return
    assert sniff(head) == CORPUS_FAMILIES.get(row["format"])


# --------------------------------------------------------------------------------------------- property


@settings(max_examples=300, deadline=None, database=None)
@given(st.binary(max_size=80))
def test_any_bytes_give_a_known_family_or_none(data: bytes) -> None:
    assert sniff(data) in FAMILIES | {None}


@settings(max_examples=100, deadline=None, database=None)
@given(st.binary(max_size=60))
def test_magic_prefix_decides(rest: bytes) -> None:
    assert sniff(b"\xff\xd8\xff" + rest) == "jpeg"
    assert sniff(b"\x89PNG" + rest) == "png"
    assert sniff(b"GIF89a" + rest) == "gif"
    assert sniff(b"II*\x00" + rest) == "tiff"
