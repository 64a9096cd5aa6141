"""Recognise an upload's format from its first bytes, before any decoder runs.

The magic bytes decide between 415 and 422: bytes that claim no allowed format are refused without
Pillow ever trying one of its ~40 decoders (PSD, EPS via Ghostscript, XBM C source, ...); bytes that do
claim an allowed format but then fail to decode are corrupt (422).
"""

from __future__ import annotations

# Which Pillow plugins may open each input format. A camera MPO is a JPEG with extra frames; Pillow
# reports it as "MPO", so the JPEG family admits both.
PILLOW_FORMATS: dict[str, tuple[str, ...]] = {
    "jpeg": ("JPEG", "MPO"),
    "png": ("PNG",),
    "webp": ("WEBP",),
    "gif": ("GIF",),
    "avif": ("AVIF",),
    "tiff": ("TIFF",),
    "bmp": ("BMP",),
}

_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"})


def sniff(head: bytes) -> str | None:
    """The format family that ``head`` (at least the first 32 bytes, when there are that many) claims.

    Returns one of the keys of ``PILLOW_FORMATS``, ``"heif"`` for HEIF/HEIC, or ``None``. The PNG check is
    deliberately loose (``\\x89PNG`` only): a PNG mangled by a text-mode transfer still claims to be a PNG
    and so is reported as corrupt, not as an unknown type.
    """
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG"):
        return "png"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")):  # classic and BigTIFF
        return "tiff"
    if head.startswith(b"BM") and len(head) >= 18:
        return "bmp"
    if head[4:8] == b"ftyp":
        return _isobmff_brand(head)
    return None


def _isobmff_brand(head: bytes) -> str | None:
    # An ISO-BMFF 'ftyp' box: size (4), 'ftyp', major brand (4), minor version (4), compatible brands.
    size = int.from_bytes(head[:4], "big")
    end = min(len(head), max(size, 16))
    brands = {head[8:12]} | {head[i : i + 4] for i in range(16, end - 3, 4)}
    if brands & _AVIF_BRANDS:
        return "avif"
    if brands & _HEIF_BRANDS:
        return "heif"
    return None
