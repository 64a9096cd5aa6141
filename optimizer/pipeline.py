"""The image work itself: bytes and parameters in, encoded bytes and facts out.

Everything here is synchronous Pillow code that knows nothing of HTTP; the service runs ``optimize`` in
its thread pool (Pillow releases the GIL while decoding, resizing and, given a file descriptor,
encoding). It is a short list of named steps, each a small function that can be tested alone:

    open (allowlist, pixel limit) -> orientation -> target size -> draft + load -> normalise mode
    -> Lanczos resize -> orient -> ICC to sRGB -> flatten alpha (JPEG) -> strip metadata -> encode

Decoding happens in ``load()``, in the calling thread, so the whole function must run in the pool and
must hand back bytes, never an ``Image``. A progressive JPEG that the draft decodes at 1/8 is handed to
libjpeg without the AC scans that decode ignores (``optimizer.jpegscans``: same pixels, ~3x faster).
"""

from __future__ import annotations

import io
import os
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageChops, ImageCms, ImageFile, ImageMath, JpegImagePlugin, PngImagePlugin

from optimizer import avifboxes, avifdecode, gifblocks, vips, webpchunks
from optimizer.colour import LAB, SRGB, nclx_profile, png_profile, to_srgb
from optimizer.errors import CorruptImage, EmptyBody, StructureLimit, TooManyPixels, UnsupportedFormat
from optimizer.jpegscans import (
    DC_ONLY_SCALE,
    buffers_whole_image,
    check_headers,
    decode_dc_scans_only,
    huffman_coded,
    scans_to_decode,
)
from optimizer.pngchunks import PngChunks, check_chunks, hiding
from optimizer.sniff import PILLOW_FORMATS, sniff
from optimizer.tiffifd import check_directory, check_exif

# Every exception type Pillow's decoders are known to raise on bad data (measured over the corpus and
# Pillow's fuzz files); caught only around open() and load(), so that a bug of ours is not mistaken for a
# corrupt upload. DecompressionBombError is handled apart: it is a size problem, not corruption.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    TypeError,
    SyntaxError,
    NotImplementedError,
    EOFError,
    IndexError,
    KeyError,
    struct.error,
    ArithmeticError,
    RuntimeError,  # Pillow's AVIF decoder: "Decoding of color/alpha planes failed", "Not implemented"
)

_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transposition that makes the image upright (orientations 5-8 swap the axes).
_A_MIRROR, _A_QUARTER_TURN = 2, 6  # orientations whose turns keep the size, and swap its axes
_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


MEDIA_TYPES = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp", "avif": "image/avif"}

# Progressive JPEG is smaller from roughly this many pixels up; below it baseline wins and decodes faster.
PROGRESSIVE_MIN_PIXELS = 160 * 160
# PNG output up to this many pixels gets zlib's slowest, smallest compression (Pillow's optimize);
# larger, zlib's default level 6, as libvips and sharp use. Level 9's cost depends on the pixels: a
# 7 KB GIF enlarged to a 4000x3000 PNG took 18.7 s of CPU at level 9 against 1.5 at level 6, for 11 %
# smaller (a review's fuzzing); an 800x450 photo 0.21 against 0.10 s, for 0.8 %.
PNG_OPTIMIZE_MAX_PIXELS = 1_000_000
# Lanczos after a box reduce() by an integer factor, as long as the image stays 3x the target: visually
# the same as a full Lanczos from the source (Pillow's own thumbnail default is 2.0), much cheaper on
# large PNGs.
REDUCING_GAP = 3.0
# Compressed bytes handed to the decoder per call (Pillow's default is 64 KiB). Each call releases and
# retakes the GIL, and retaking it can wait a switch interval (5 ms) when the event loop is busy: 1 MiB
# makes that 5 crossings for a 4 MB photo instead of 67, for about 2 MiB more memory per worker
# (counted by estimate_memory).
DECODE_BLOCK = 1 << 20
# Scans a JPEG may have: libjpeg decodes repeated progressive scans with a warning, each one a pass over
# the whole image. libjpeg-turbo suggests 500 for its own scan limit (TJPARAM_SCANLIMIT), far above any
# encoder's script (jpegtran and mozjpeg write 6-20); but at 50 Mpx 489 scans took 8.6 s of CPU (a
# review: 0.36 ns per pixel and scan), so large images get fewer: scans x pixels within SCAN_WORK
# (100 scans at the default 50 Mpx, ~1.8 s), and never fewer than MIN_SCANS.
MAX_SCANS = 500
MIN_SCANS = 64
SCAN_WORK = 5_000_000_000


def scan_limit(pixels: int) -> int:
    """The most scans a JPEG of ``pixels`` (its full size, whatever the draft scale) may have."""
    return max(MIN_SCANS, min(MAX_SCANS, SCAN_WORK // max(pixels, 1)))


# Pillow decodes a BMP's RLE8 and RLE4 data in Python, a turn of a loop per run, per escape and per
# byte of padding: a 1 KB file of one 50 Mpx row took 4.4 s (a review). Such BMPs are icons and old
# screenshots.
RLE_MAX_PIXELS = 8_000_000
RLE_SLACK_BYTES = 4096  # headers and palette, and an end of bitmap
_BMP_RLE8, _BMP_RLE4 = 1, 2
# AVIF encodes are slow at libavif's default speed 6; 8 costs a little size for several times the speed.
# One encoder thread: parallelism comes from the service's pool, not from inside one request.
AVIF_SPEED = 8


@dataclass(frozen=True, slots=True)
class Limits:
    """What an upload may be and how it is processed: decided by the operator, the same for every
    request."""

    max_pixels: int
    max_dimension: int
    input_formats: frozenset[str]
    resizer: str = "pillow"
    jpeg_progressive: bool = True


@dataclass(frozen=True, slots=True)
class Params:
    """What one request asks for. ``width``/``height`` are a box to fit in; ``None`` means unconstrained."""

    width: int | None = None
    height: int | None = None
    format: str = "jpeg"
    quality: int = 80
    enlarge: bool = False
    background: tuple[int, int, int] = (255, 255, 255)


@dataclass(slots=True)
class Timings:
    """Seconds spent in each stage, reported to clients in ``Server-Timing``."""

    decode: float = 0.0
    resize: float = 0.0
    encode: float = 0.0


@dataclass(frozen=True, slots=True)
class Output:
    data: bytes
    media_type: str
    width: int
    height: int
    source_format: str
    source_width: int
    source_height: int
    timings: Timings = field(default_factory=Timings)


def inspect(data: bytes, params: Params, limits: Limits) -> int:
    """Read the header only (allowlist and pixel limit included): the bytes ``optimize`` will need at
    its peak, to reserve before any pixel is decoded."""
    with open_image(data, limits) as im:
        orientation = read_orientation(im, loaded=False)
        orientations = [orientation]
        if not orientation and im.format == "PNG" and b"eXIf" in data:
            # An eXIf chunk after the image data is only read with the pixels (see optimize): whichever
            # it says, upright or turned a quarter, with its copy (both went uncounted, found in review).
            orientations = [_A_MIRROR, _A_QUARTER_TURN]
        return max(
            estimate_memory(
                im,
                _unrotate(target_size(_upright_size(im.size, turn), params, limits.max_dimension), turn),
                params.format,
                compressed=len(data),
                resizer=limits.resizer,
                orientation=turn,
                quality=params.quality,
            )
            for turn in orientations
        )


# Bytes per pixel of Pillow's in-memory modes (RGB is stored as 4 bytes, like RGBA).
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_KEPT_MODES = frozenset({"L", "LA", "RGB", "RGBA", "CMYK"})  # normalise_mode copies all others
# Allocator and library overhead not proportional to the image (calibrated on the corpus).
_FIXED_OVERHEAD = 2 * 1024 * 1024


# Encoder working memory per output pixel: libjpeg buffers a progressive (optimized) JPEG's coefficients;
# libwebp and libavif convert to YUV planes beside an ARGB copy (libavif and its AV1 encoder keep several
# more: 21.6 bytes per pixel measured at 20 Mpx, 24 at 13 Mpx); zlib works in small windows, but a
# PNG encoder holds its output: as large as the pixels when they are noise (a 3000x2000 RGBA of noise peaked
# 22 MiB over an estimate without it, a review).
_ENCODER_BYTES_PER_PIXEL = {"jpeg": 3, "png": 4, "webp": 6, "avif": 24}
# An alpha plane's encoder beside the colour's: libwebp codes it losslessly, with its own hash chains
# and backward references (15.6 bytes a pixel more for a smooth alpha, 31 for noise, 3000x2000);
# libavif codes it as a second AV1 image (a 7001x7072 RGBA canvas peaked 4.5 bytes a pixel over the
# colour's 24). Both from a review's fuzzing. Counted whenever the mode has alpha, though an opaque one
# is dropped before the encoder (fit_mode_to_format): so not at noise's 31, which made a 5120x2880
# opaque screenshot 413 in a 512 MiB budget (593 MiB estimated, 236 peak; a later review). Noise in
# the alpha then peaks up to ~11 bytes a pixel over, about 30 % of such an image's estimate, which the
# memory limit's other half covers (the budget defaults to half of it).
_ALPHA_ENCODER_BYTES_PER_PIXEL = {"webp": 20, "avif": 8}
_JPEG_FULL_CHROMA_ENCODER_BYTES_PER_PIXEL = 9  # see estimate_memory


def estimate_memory(
    im: Image.Image,
    size: tuple[int, int],
    output_format: str = "jpeg",
    *,
    compressed: int = 0,
    resizer: str = "pillow",
    orientation: int = 0,
    quality: int = 80,
) -> int:
    """Peak bytes ``optimize`` will allocate for ``im`` (header read, nothing decoded) to reach ``size``.

    Two phases, and the peak is the larger: decoding (libjpeg's whole-image coefficient buffer for a
    progressive JPEG, 2 bytes per coefficient whatever the draft scale, plus the decoded frame, plus up
    to two blocks of the ``compressed`` bytes being fed to the decoder) and
    the work after it (the frame, a converted copy, Lanczos's intermediate, the output and the
    encoder's buffers). Calibrated against measured peaks: see tests/test_memory_estimate.py.
    """
    width, height = im.size
    target_w, target_h = size
    scale = _draft_scale(im, size)
    dec_w, dec_h = -(-width // scale), -(-height // scale)
    decoded = dec_w * dec_h * _BYTES_PER_PIXEL.get(im.mode, 4)
    coefficients = _progressive_coefficients(im)
    has_alpha = "A" in im.mode or "transparency" in im.info
    kept = im.mode in _KEPT_MODES and not ("transparency" in im.info and im.mode in ("L", "RGB"))
    work = decoded + (0 if kept else dec_w * dec_h * 4)  # the frame, and normalise_mode's copy
    if im.mode.startswith("I") or im.mode == "F":
        work += dec_w * dec_h * 12  # _deep_to_l: the 32-bit copy, its scaled copy, the key's comparison
    if _deep_rgb_key(im):
        work += dec_w * dec_h * 8  # _key_at_full_depth: the low bytes' frame, two bands and their masks
    stored = 1 if _packed_bands(im.mode, has_alpha) == 1 else 4  # bytes per pixel from here on
    if (dec_w, dec_h) != (target_w, target_h):
        work += dec_w * dec_h * 4 if has_alpha else 0  # resize premultiplies alpha into a copy
        if resizer == "vips" and target_w <= dec_w and target_h <= dec_h:  # see vips.supports
            # The packed copy handed to libvips (twice for a moment: tobytes() joins its chunks), and
            # libvips's output before Pillow takes it back. libvips itself works in strips.
            packed = _packed_bands(im.mode, has_alpha)
            work += 2 * dec_w * dec_h * packed + target_w * target_h * packed
        else:
            work += target_w * dec_h * stored  # the horizontal pass of Pillow's resize
            if has_alpha:
                # Pillow resizes premultiplied (RGBa) and converts the result back: a second target-size
                # copy (enlarging a 96x64 RGBA PNG to 8192 px peaked at 342 MiB against 175, a review).
                work += target_w * target_h * 4
        work += target_w * target_h * stored  # the output
    if orientation in _TRANSPOSE:
        work += target_w * target_h * stored  # orient's turned copy, beside the image it turns
    grey = im.mode in ("1", "L", "LA", "La", "F") or im.mode.startswith("I")
    if "icc_profile" in im.info or im.mode == "CMYK":
        # to_srgb: the converted copy (grey's comes out RGB, and one channel is kept); with alpha also the
        # alpha band, the colour without it, and the merge
        work += target_w * target_h * (11 if has_alpha else 5)
    if has_alpha and output_format == "jpeg":
        work += target_w * target_h * 6  # flattening: an RGB copy and the inverted alpha
    if grey and output_format in ("webp", "avif"):
        # fit_mode_to_format: grey made RGB(A) for the encoder (a 6000x4000 grey JPEG to WebP peaked at
        # 250 MiB against 162, a review)
        work += target_w * target_h * 4
    encoder = _ENCODER_BYTES_PER_PIXEL.get(output_format, 6)
    if output_format == "jpeg" and jpeg_subsampling(quality) == 0:
        # Full-resolution colour: twice the coefficients, and noise's output up to 4 bytes a pixel,
        # kept twice for a moment (the memory file and its bytes): 5.6-6.3 bytes a pixel measured.
        encoder = _JPEG_FULL_CHROMA_ENCODER_BYTES_PER_PIXEL
    work += target_w * target_h * encoder
    if has_alpha:
        work += target_w * target_h * _ALPHA_ENCODER_BYTES_PER_PIXEL.get(output_format, 0)
    extra, held = _decoder_buffers(im, decoded, compressed)
    decoded += extra
    held += _metadata_bytes(im)  # already in memory, and for as long as the image is open
    feeding = min(compressed, 2 * DECODE_BLOCK)  # a block read, and the unconsumed rest joined to it
    if coefficients and scale == DC_ONLY_SCALE:
        feeding += compressed  # the stream without its AC scans (optimizer.jpegscans), at most as long
    return max(coefficients + decoded + feeding, work) + held + _FIXED_OVERHEAD


def _decoder_buffers(im: Image.Image, decoded: int, compressed: int) -> tuple[int, int]:
    """What a format's decoder holds beside the ``decoded`` frame: bytes while it decodes, and bytes for
    as long as the image is open (through the resize and the encode)."""
    width, height = im.size
    during = held = 0
    if im.format == "TIFF":
        if (tile := _tiff_tile(im)) is not None:
            during += tile[0] * tile[1] * 8  # libtiff's buffer for one tile, up to 4 samples of 16 bits
        else:
            during += _tiff_strip_buffers(im, compressed)
        tags = getattr(im, "tag_v2", None)
        if tags is not None and tags.get(_ORIENTATION_TAG, 1) != 1:
            during += decoded + during  # Pillow turns the loaded frame into a copy (see read_orientation)
    fp = getattr(im, "fp", None)
    if im.format == "WEBP":
        # Pillow keeps libwebp's decoder, its canvases and its copy of the file until the image is
        # closed, through the resize and the encode (a 6 Mpx WebP to AVIF peaked at 216 MiB against 162
        # estimated when they counted in the decode alone, a review).
        held += _webp_buffers(im, width * height, compressed)
    if im.format == "PNG" and isinstance(fp, io.BytesIO):
        chunks = check_chunks(fp.getvalue())
        held += _late_png_text(chunks)
        # Pillow reads each chunk besides the image data whole, in 1 MiB blocks it then joins: twice the
        # largest for a moment (a 20 MB private chunk peaked 34 MiB over the estimate, a review); and it
        # keeps the private ones (im.private_chunks) for as long as the image is open (20 of 1.2 MB:
        # 23.8 MiB against 7.2, the next review).
        during += 2 * chunks.largest_ancillary
        held += chunks.private_bytes
    if _python_rle(im):
        during += 2 * width * height  # BmpRleDecoder's bytearray of the pixels, and its bytes() copy
    if im.format == "AVIF" and isinstance(fp, io.BytesIO):
        during += _avif_frames(avifboxes.check_boxes(fp.getvalue()), width * height)
    return during, held


def _late_png_text(chunks: PngChunks) -> int:
    """The text chunks after a PNG's image data, which Pillow reads with the pixels (so ``_metadata_bytes``
    cannot see them at open): each compressed one inflated up to Pillow's chunk limit, all of them up to
    its text memory limit. A 67 KB PNG of 63 zTXt chunks after its IDAT peaked at 64.5 MiB against 2.1
    estimated (a review's fuzzing)."""
    inflated = chunks.late_text_bytes + chunks.late_compressed_text * PngImagePlugin.MAX_TEXT_CHUNK
    return min(inflated, PngImagePlugin.MAX_TEXT_MEMORY)


def _webp_buffers(im: Image.Image, pixels: int, compressed: int) -> int:
    """Pillow decodes a WebP through libwebp's animation decoder: its canvas and the previous frame's,
    and the frame handed over as bytes, beside Pillow's own (measured: 15.6 bytes per pixel in all); the
    file twice more, since Pillow reads it whole into one bytes object and the decoder keeps a copy (a
    review: lossless WebPs of 25-50 MB peaked their size over the estimate without it, an animated
    lossless one 1.45 times its size); and the demuxer's record of each chunk."""
    buffers = pixels * 4 * 3 + 2 * compressed
    if isinstance(fp := getattr(im, "fp", None), io.BytesIO):
        buffers += webpchunks.check_chunks(fp.getvalue()) * webpchunks.BYTES_PER_CHUNK
    return buffers


_AV1_DECODER_BYTES = 5 * 1024 * 1024
_WORST_SAMPLING = avifdecode.Sampling(sample_bytes=2, planes=3.0)  # 12 bits, 4:4:4


def _avif_frames(boxes: avifboxes.Summary, pixels: int) -> int:
    """libavif's frames beyond the image: its decoder's frame and its RGB copy; a grid's tiles, each
    decoded into a frame of its own, then into the image (150 MiB for a 4032x4160 grid of 4095 tiles
    against 75 estimated, a review); tracks decoded at their coded sizes, then scaled to the declared
    one: what they code beyond it, each track's, at the worst sampling."""
    frames = pixels * 4 if boxes.grid_tiles else 0
    # Pillow's AVIFs of 1 Mpx and less peaked 3-5 MiB over an estimate without the decoder's set-up.
    frames += int(pixels * avif_decode_bytes_per_pixel(boxes.decoded)) + _AV1_DECODER_BYTES
    return frames + int(boxes.decoded.track_excess_pixels * _av1_frame_bytes(None))


def avif_decode_bytes_per_pixel(decoded: avifdecode.Decoded) -> float:
    """libavif's buffers for each pixel of the image beside Pillow's: the decoder's colour frame and
    libavif's RGB copy, and the alpha's frame and plane. Measured in review at 5000x5000: 8.8 bytes a
    pixel in all at 8 bits 4:2:0, 13.3 at 12 bits 4:4:4, against the 4 the estimate had counted."""
    total = _av1_frame_bytes(decoded.colour) + 4
    if decoded.alpha:
        total += _av1_frame_bytes(decoded.alpha_sampling) + 1
    return total


def _av1_frame_bytes(sampling: avifdecode.Sampling | None) -> float:
    """A decoded AV1 frame's bytes a pixel, with the decoder's borders (x1.5); the worst where the
    sampling is not known."""
    sampling = sampling or _WORST_SAMPLING
    return sampling.planes * sampling.sample_bytes * 1.5


# Copies of a metadata block Pillow holds at its peak: the segments or chunks read, the joined block,
# and a copy on its way (measured with a 16 MB ICC profile in JPEG, WebP, AVIF and TIFF, in review).
_METADATA_COPIES = 3
_PYTHON_INT_BYTES = 36  # an int in a tuple: the object and the pointer to it


def _metadata_bytes(im: Image.Image) -> int:
    """What Pillow read from the file's metadata on opening, and holds: PNG text chunks decompressed (up
    to 64 MiB of them), ICC profiles, EXIF and XMP, each in several copies at its peak, and a TIFF's
    directories (values as Python ints, and the tags' data). A 65 KiB PNG of 1 MiB zTXt chunks peaked at
    64 MiB against 2 estimated, a JPEG with a 22 MB ICC profile at 24 MiB against 4 (reviews)."""
    held = sum(
        len(value) if isinstance(value, bytes) else sys.getsizeof(value)  # a str of 4 bytes a character
        for value in im.info.values()
        if isinstance(value, (bytes, str))
    )
    held *= _METADATA_COPIES
    held += sum(len(segment) for _marker, segment in getattr(im, "applist", ()))  # a JPEG's APPn and COM
    if im.format == "TIFF" and isinstance(fp := getattr(im, "fp", None), io.BytesIO):
        directories = check_directory(fp.getvalue())  # within its limits: open_image checked them
        held += directories.values * _PYTHON_INT_BYTES + directories.data_bytes * _METADATA_COPIES
    return held


def _tiff_strip_buffers(im: Image.Image, compressed: int) -> int:
    """libtiff's buffers for one strip of a compressed, stripped TIFF: the strip decoded at the file's
    own depth (as RGBA where Pillow has libtiff convert: YCbCr, JPEG-in-TIFF), and its compressed bytes.
    A TIFF of one strip holds its whole image twice that way: a 7000x7000 16-bit CMYK file peaked at
    564 MB against 198 estimated (a review). An uncompressed TIFF is read by Pillow's own decoder, in
    place."""
    tags = getattr(im, "tag_v2", None)
    if tags is None or tags.get(_TIFF_COMPRESSION, 1) == 1:
        return 0
    width, height = im.size
    rows = _tag_numbers(tags, _TIFF_ROWS_PER_STRIP)  # absent: the whole image is one strip
    rows_per_strip = min(rows[0], height) if rows and rows[0] > 0 else height
    bits = _tag_numbers(tags, _TIFF_BITS_PER_SAMPLE) or [1]  # one per sample
    samples = _tag_numbers(tags, _TIFF_SAMPLES_PER_PIXEL) or [1]
    per_pixel = sum(bits) if len(bits) > 1 else bits[0] * samples[0]
    scanline = -(-width * per_pixel // 8)
    if tags.get(_TIFF_PHOTOMETRIC) == _TIFF_YCBCR or tags.get(_TIFF_COMPRESSION) in _TIFF_JPEG:
        scanline = max(scanline, width * 4)
    largest = max(_tag_numbers(tags, _TIFF_STRIP_BYTE_COUNTS), default=0)
    return rows_per_strip * scanline + min(largest, compressed)


def _tag_numbers(tags: Any, tag: int) -> list[int]:
    """A TIFF tag's values that are whole numbers. A file may give any tag any type: StripByteCounts
    typed UNDEFINED comes back as bytes, and comparing those with ints was a 500 (found in review)."""
    value = tags.get(tag)
    values = value if isinstance(value, tuple) else (value,)
    return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0]


_TIFF_BITS_PER_SAMPLE, _TIFF_COMPRESSION, _TIFF_PHOTOMETRIC = 258, 259, 262
_TIFF_SAMPLES_PER_PIXEL, _TIFF_ROWS_PER_STRIP, _TIFF_STRIP_BYTE_COUNTS = 277, 278, 279
_TIFF_YCBCR = 6
_TIFF_JPEG = frozenset({6, 7})  # old-style and new-style JPEG compression


def _packed_bands(mode: str, has_alpha: bool) -> int:
    """Bytes per pixel of the packed copy of the normalised image (see normalise_mode)."""
    grey = mode in ("1", "L", "LA", "La", "F") or mode.startswith("I")
    return (1 if grey else 4 if mode == "CMYK" else 3) + (1 if has_alpha and mode != "CMYK" else 0)


def _draft_scale(im: Image.Image, size: tuple[int, int]) -> int:
    """The DCT scale ``decode`` will ask libjpeg for (the rule of Pillow's JpegImageFile.draft)."""
    if im.format not in ("JPEG", "MPO") or size == im.size:
        return 1
    ratio = min(im.width // max(1, size[0]), im.height // max(1, size[1]))
    return max((scale for scale in (8, 4, 2) if ratio >= scale), default=1)


def _progressive_coefficients(im: Image.Image) -> int:
    """libjpeg's whole-image coefficient buffer: for a progressive JPEG, and for a sequential one whose
    components come in separate scans (27x the estimate when only the progressive flag counted)."""
    if im.format not in ("JPEG", "MPO"):
        return 0
    fp = getattr(im, "fp", None)  # the upload, as open_image wraps it
    if not (im.info.get("progressive") or im.info.get("progression")) and not (
        isinstance(fp, io.BytesIO) and buffers_whole_image(fp.getvalue())
    ):
        return 0
    layers = getattr(im, "layer", None) or [("", 1, 1, 0)]
    h_max = max(layer[1] for layer in layers) or 1
    v_max = max(layer[2] for layer in layers) or 1
    total = 0
    for _id, h_samp, v_samp, _table in layers:
        blocks_w = -(-im.width * h_samp // (h_max * 8))
        blocks_h = -(-im.height * v_samp // (v_max * 8))
        total += blocks_w * blocks_h * 64 * 2
    return total


def optimize(data: bytes, params: Params, limits: Limits) -> Output:
    """Decode ``data``, fit it to ``params`` and re-encode it, or raise an ``OptimizerError``."""
    timings = Timings()
    started = time.perf_counter()
    with open_image(data, limits) as im:
        source_format = str(im.format)
        orientation = read_orientation(im, loaded=False)
        upright = _upright_size(im.size, orientation)
        target = target_size(upright, params, limits.max_dimension)
        # The colour description as open_image settled it: an iCCP after a PNG's image data, which
        # Pillow reads with the pixels, is not one (browsers ignore it), and must not outrank a cICP.
        icc = im.info.get("icc_profile")
        decode(im, _unrotate(target, orientation))
        if not orientation and (orientation := read_orientation(im, loaded=True)) >= 5:
            # A PNG's eXIf chunk may follow the image data, so its orientation is only known now.
            upright = _upright_size(im.size, orientation)
            target = target_size(upright, params, limits.max_dimension)
        timings.decode = (mid := time.perf_counter()) - started

        try:
            out = normalise_mode(im)
        except ValueError:  # Pillow refusing what the file's own tables say, after the decode
            raise CorruptImage(f"the {source_format} image's colour tables are inconsistent") from None
        out = resize(out, _unrotate(target, orientation), limits.resizer)
        out = orient(out, orientation)
        out = to_srgb(out, icc if isinstance(icc, bytes) else None)
        out = fit_mode_to_format(out, params)
        timings.resize = (encode_started := time.perf_counter()) - mid

        payload = encode(out, params, progressive=limits.jpeg_progressive)
        timings.encode = time.perf_counter() - encode_started
        return Output(
            data=payload,
            media_type=MEDIA_TYPES[params.format],
            width=out.width,
            height=out.height,
            source_format=source_format,
            source_width=upright[0],
            source_height=upright[1],
            timings=timings,
        )


def open_image(data: bytes, limits: Limits) -> Image.Image:
    """Open (read the header only) with the allowlist, and refuse too many pixels before decoding."""
    if not data:
        raise EmptyBody("the uploaded image is empty")
    family = sniff(data[:64])
    if family is None or family not in limits.input_formats:
        named = f" ({family.upper()})" if family else ""
        raise UnsupportedFormat(
            f"the upload is not an accepted image type{named}; accepted: "
            + ", ".join(sorted(limits.input_formats))
        )
    try:
        # Before Pillow's parsers loop over them in Python, one by one.
        check = _STRUCTURE_CHECKS.get(family)
        walked = check(data) if check is not None else None
    except StructureLimit as exc:
        raise CorruptImage(str(exc)) from None
    if family == "gif" and isinstance(walked, int) and walked > limits.max_pixels:
        raise TooManyPixels(
            f"the GIF's first image makes a canvas of {walked} pixels; the limit is {limits.max_pixels}"
        )
    if isinstance(walked, avifboxes.Summary) and walked.decoded.track_frame_pixels > limits.max_pixels:
        raise TooManyPixels(
            f"the AVIF's AV1 data codes frames of {walked.decoded.track_frame_pixels} pixels; the limit is "
            f"{limits.max_pixels}"
        )
    try:
        # formats= restricts Pillow to the plugins of the sniffed family, so no other decoder ever runs.
        # A PNG's chunks libpng would drop (a wrong CRC, a wrong length) are hidden from Pillow, which
        # refused the whole file over them where browsers draw it.
        hidden = walked.hidden if isinstance(walked, PngChunks) else ()
        im = Image.open(hiding(data, hidden) if hidden else io.BytesIO(data), formats=PILLOW_FORMATS[family])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own guard, raised before the check below can run (over ~179 Mpx; its warning from
        # ~89 Mpx is an exception only where warnings are escalated, as in an embedding app's tests).
        raise TooManyPixels(
            f"the image declares more pixels than the decoder's safety limit ({limits.max_pixels} allowed)"
        ) from None
    except _DECODE_ERRORS:
        raise CorruptImage(f"the upload looks like {family.upper()} but its header cannot be read") from None
    # Colours described other than by an ICC profile are converted through a profile made from the
    # description, left in ``info`` where Pillow leaves an embedded one (encode() clears it).
    if isinstance(walked, avifboxes.Summary) and walked.nclx is not None and "icc_profile" not in im.info:
        if (described := nclx_profile(*walked.nclx)) is not None:  # None: sRGB's, unspecified, HDR
            im.info["icc_profile"] = described
    elif isinstance(walked, PngChunks):
        described = png_profile(walked.colours, grey=im.mode not in ("P", "RGB", "RGBA"))
        if described is None:
            im.info.pop("icc_profile", None)  # sRGB's: a cICP saying so outranks an iCCP
        else:
            im.info["icc_profile"] = described
    width, height = im.size
    if width < 1 or height < 1:
        im.close()
        raise CorruptImage("the image declares an empty size")
    if width * height > limits.max_pixels:
        im.close()
        raise TooManyPixels(
            f"the image is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}"
        )
    if _python_rle(im) and _rle_bytes(data) > 2 * width * height + 2 * height + RLE_SLACK_BYTES:
        # Runs of one pixel take two bytes, a row's end two more: a file longer than that holds escapes
        # that make no pixels, each a turn of Pillow's Python loop (24 MB of them took 3.2 s, in review).
        im.close()
        raise CorruptImage(
            f"the RLE-compressed BMP is {len(data)} bytes, longer than any encoding of its {width}x{height} "
            "pixels"
        )
    if _python_rle(im) and width * height > RLE_MAX_PIXELS:
        im.close()
        raise TooManyPixels(
            f"the image is an RLE-compressed BMP of {width}x{height} = {width * height} pixels; the "
            f"limit for such a BMP is {RLE_MAX_PIXELS} (Pillow decodes it in Python)"
        )
    if im.format == "TIFF" and (tile := _tiff_tile(im)) is not None and tile[0] * tile[1] > limits.max_pixels:
        # libtiff allocates one whole tile whatever the image's size: a 16x16 TIFF declaring one 26752 px
        # square tile took 2 GiB. A tile may be larger than its image; it is decoded pixels all the same.
        im.close()
        raise TooManyPixels(
            f"the TIFF's tiles are {tile[0]}x{tile[1]} = {tile[0] * tile[1]} pixels each; "
            f"the limit is {limits.max_pixels}"
        )
    return im


# The walks of a file's structure, by format family, that refuse what would keep a parser looping.
_STRUCTURE_CHECKS: dict[str, Callable[[bytes], object]] = {
    "jpeg": check_headers,
    "png": check_chunks,
    "tiff": check_directory,
    "gif": gifblocks.check_blocks,
    "webp": webpchunks.check_chunks,
    "avif": avifboxes.check_boxes,
}


def _python_rle(im: Image.Image) -> bool:
    """Whether ``im`` is a BMP whose RLE8 or RLE4 data Pillow decodes in Python (``BmpRleDecoder``)."""
    return im.format == "BMP" and im.info.get("compression") in (_BMP_RLE8, _BMP_RLE4)


def _rle_bytes(data: bytes) -> int:
    """A BMP's bytes from its pixel data on, less an embedded ICC profile's (BITMAPV5HEADER), which
    may follow the pixels."""
    if len(data) < 18:
        return len(data)
    pixels_at, header = struct.unpack_from("<II", data, 10)
    profile: int = struct.unpack_from("<I", data, 14 + 116)[0] if header >= 124 and len(data) >= 134 else 0
    rle: int = len(data) - pixels_at - min(profile, len(data))
    return max(0, rle)


def _tiff_tile(im: Image.Image) -> tuple[int, int] | None:
    """A tiled TIFF's tile size (TileWidth, TileLength), or ``None`` for strips."""
    tags = getattr(im, "tag_v2", None)
    width, height = (tags.get(322), tags.get(323)) if tags is not None else (None, None)
    if isinstance(width, int) and isinstance(height, int):
        return width, height
    return None


def read_orientation(im: Image.Image, *, loaded: bool) -> int:
    """The EXIF orientation (1-8), or 0 when there is none or it cannot be read.

    Broken metadata must not fail the request: a camera's EXIF is often malformed while its pixels are
    fine. Before ``load()`` a PNG is only asked when its eXIf chunk has been seen already, because PNG's
    ``getexif()`` would otherwise load the image itself, outside the error mapping of ``decode``, and a
    second ``load()`` after a failed one silently returns half an image.
    """
    if not loaded and im.format == "PNG" and "exif" not in im.info:
        return 0
    if im.format == "TIFF":
        # Pillow applies a TIFF's orientation itself: the size is upright from open(), and load() turns
        # the pixels (TiffImagePlugin's load_end). Applied again, every oriented TIFF came out wrong.
        return 0
    exif = im.info.get("exif")
    try:
        if isinstance(exif, bytes):
            check_exif(exif)  # before Pillow turns each of its values into an int
        value = im.getexif().get(_ORIENTATION_TAG, 0)
    except Exception:  # StructureLimit included: an EXIF block made to be large is not read
        return 0
    return value if isinstance(value, int) and 1 <= value <= 8 else 0


def target_size(size: tuple[int, int], params: Params, max_dimension: int) -> tuple[int, int]:
    """The output size for an upright ``size``: fit the box, keep the aspect ratio, never exceed the cap."""
    width, height = size
    scales = []
    if params.width is not None:
        scales.append(params.width / width)
    if params.height is not None:
        scales.append(params.height / height)
    scale = min(scales) if scales else 1.0
    if not params.enlarge:
        scale = min(scale, 1.0)
    scale = min(scale, max_dimension / max(width, height))
    if scale == 1.0:
        return width, height
    # The side the client named comes out exactly as asked; the other follows the aspect ratio.
    new_w = max(1, min(round(width * scale), max_dimension))
    new_h = max(1, min(round(height * scale), max_dimension))
    if params.width is not None and scale == params.width / width:
        new_w = params.width
    elif params.height is not None and scale == params.height / height:
        new_h = params.height
    return new_w, new_h


def decode(im: Image.Image, size: tuple[int, int]) -> None:
    """Decode the first frame, letting libjpeg scale a JPEG down by 1/2, 1/4 or 1/8 on the way."""
    try:
        if im.format in ("JPEG", "MPO"):
            limit = scan_limit(im.width * im.height)  # before the draft makes the size the scaled one
            _refuse_a_header_without_its_image(im)
            if size != im.size:
                # Picks the smallest DCT scale that still covers ``size``: about 5x faster on a large photo.
                im.draft(None, size)
                decode_dc_scans_only(im)
            _refuse_endless_scans(im, limit)  # in the stream libjpeg will read: a rewritten one is short
            _end_where_the_data_ends(im)
        if isinstance(im, ImageFile.ImageFile):  # always, for an image from Image.open()
            im.decodermaxblock = max(im.decodermaxblock, DECODE_BLOCK)
        key_scale = _grey_key_scale(im)
        # The upload, kept for a second decode (Pillow lets go of the file once loaded).
        deep_key = _again(getattr(im, "fp", None)) if _deep_rgb_key(im) else None
        im.load()
        if key_scale > 1:
            im.info["transparency"] = im.info["transparency"] * key_scale
        if deep_key is not None:
            _key_at_full_depth(im, im.info["transparency"], deep_key)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise TooManyPixels("the image frame is too large to decode") from None
    except _DECODE_ERRORS:
        raise CorruptImage(f"the {im.format} image data is damaged and cannot be decoded") from None


# Huffman coding spends at least a bit on each 8x8 block of each component: 64 x Hmax x Vmax pixels
# per sum of the components' H x V bits, a byte per 512 pixels for grey and 1024 at the most (two
# components sampled 4x1 and 1x4; cjpeg's 4x1,1x4,1x1 with a DC-first script reached 904, a review). A
# JPEG with a byte for more than four times that many of its pixels holds a header without its image:
# cut right after its scan header (236 bytes declaring 7071x7071), or with an empty scan before its end
# marker, it decoded into grey for 0.56 s of CPU (a review).
_PIXELS_PER_BYTE_AT_MOST = 4096


def _refuse_a_header_without_its_image(im: Image.Image) -> None:
    """``CorruptImage`` for a Huffman-coded JPEG too short to code its pixels: all it would give is grey,
    at the cost of a whole decode. (Arithmetic coding can code a flat image in less.)"""
    fp = getattr(im, "fp", None)
    if not isinstance(fp, io.BytesIO):
        return
    data = fp.getvalue()
    if len(data) * _PIXELS_PER_BYTE_AT_MOST < im.width * im.height and huffman_coded(data):
        raise CorruptImage(
            f"the JPEG is {len(data)} bytes for {im.width}x{im.height} pixels, fewer than coding them "
            "takes: a header without its image"
        )


def _end_where_the_data_ends(im: Image.Image) -> None:
    """Give libjpeg an end-of-image marker where a JPEG's data stops short of one, once, so that it
    finishes with what arrived: a file missing only its last two bytes (a phone or a copy interrupted at
    the very end) was refused whole, and one cut in a scan keeps what it has, the rest grey. Browsers,
    libvips and thumbor draw both. Pillow does this under its ``LOAD_TRUNCATED_IMAGES``, a global this
    must not set: it would change what an embedding host's own Pillow code accepts. The stream is
    replaced rather than the image's reader wrapped: a wrapper would hold the image in a cycle, freed
    only by the garbage collector (RSS after the corpus went from 47 to 134-208 MB)."""
    if type(im) is JpegImagePlugin.JpegImageFile and type(im.fp) is io.BytesIO:  # not an MPO: by offset
        im.fp = _EndedStream(im.fp.getvalue())  # the same bytes: a BytesIO of bytes shares them


class _EndedStream(io.BytesIO):
    """The upload, then an end-of-image marker once it has all been read."""

    _ended = False

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        if not data and size != 0 and not self._ended:
            self._ended = True
            return b"\xff\xd9"
        return data


def _png_header(im: Image.Image) -> tuple[int, int] | None:
    """A PNG's bit depth and colour type, from its IHDR (Pillow keeps neither), for an upload in memory."""
    fp = getattr(im, "fp", None)
    if im.format != "PNG" or not isinstance(fp, io.BytesIO):
        return None
    # The first chunk's type, then IHDR's width, height, depth, type. getvalue() hands over the upload
    # the BytesIO shares; getbuffer() made it copy the whole upload for as long as the image was open (a
    # review: +19 MiB for a 19 MiB keyed PNG).
    header = fp.getvalue()[12:26]
    if len(header) != 14 or header[:4] != b"IHDR":
        return None
    return header[12], header[13]


def _grey_key_scale(im: Image.Image) -> int:
    """For a greyscale PNG of 2 or 4 bits with a tRNS key: Pillow scales the pixels to 0-255 but leaves
    the key in the file's scale, so no pixel would match it; the factor that brings it along. (A 1-bit
    file opens as mode 1, whose key Pillow does scale.)"""
    if not isinstance(im.info.get("transparency"), int) or (header := _png_header(im)) is None:
        return 1
    depth, colour_type = header
    return 255 // (2**depth - 1) if colour_type == 0 and depth in (2, 4) else 1


def _deep_rgb_key(im: Image.Image) -> bool:
    """A 16-bit RGB PNG with a tRNS colour key: Pillow keeps each sample's high byte and compares the
    16-bit key with those, so a key over 255 matched no pixel and one under 256 matched pixels it is
    not (the PNG standard and browsers compare all 16 bits; a review)."""
    return isinstance(im.info.get("transparency"), tuple) and _png_header(im) == (16, 2)


def _again(fp: object) -> io.BytesIO:
    """The upload ``fp`` holds, to be read again from its start, as open_image presented it."""
    assert isinstance(fp, io.BytesIO)
    again = getattr(fp, "again", None)
    return again() if again is not None else io.BytesIO(fp.getvalue())


def _key_at_full_depth(im: Image.Image, key: tuple[int, int, int], upload: io.BytesIO) -> None:
    """Make ``im`` (a loaded 16-bit RGB PNG, high bytes) RGBA, transparent where all 16 bits of each
    sample equal ``key``'s. The low bytes come from decoding the file (``upload``) again with each
    sample read as little-endian, whose high byte is the big-endian sample's low byte."""
    with Image.open(upload) as low:
        (tile,) = low.tile
        low.tile = [tile._replace(args="RGB;16L")]
        low.load()
        match: Image.Image | None = None
        for band, value in enumerate(key):
            # 255 where this band's high and low bytes both equal the key's, else 0; multiplied in.
            high = im.getchannel(band).point([255 if v == value >> 8 else 0 for v in range(256)])
            both = ImageChops.multiply(
                high, low.getchannel(band).point([255 if v == value & 255 else 0 for v in range(256)])
            )
            match = both if match is None else ImageChops.multiply(match, both)
    assert match is not None
    del im.info["transparency"]
    im.putalpha(ImageChops.invert(match))


def _refuse_endless_scans(im: Image.Image, limit: int) -> None:
    """``CorruptImage`` for a JPEG of more than ``limit`` scans (see ``jpegscans.scans_to_decode``)."""
    fp = getattr(im, "fp", None)  # the upload, as open_image wraps it
    if not isinstance(fp, io.BytesIO):
        return
    try:
        scans = scans_to_decode(fp.getvalue(), limit)
    except StructureLimit as exc:  # a flood of segments between the scans
        raise CorruptImage(str(exc)) from None
    if scans > limit:
        raise CorruptImage(
            f"the JPEG has more than {limit} scans, the limit for its size; an encoder writes a few dozen "
            "at most, and each costs a pass over the whole image"
        )


def normalise_mode(im: Image.Image) -> Image.Image:
    """Bring any decoded mode to one of L, LA, RGB, RGBA or CMYK, keeping transparency."""
    mode = im.mode
    has_alpha = "transparency" in im.info
    if mode in ("L", "LA", "RGB", "RGBA", "CMYK") and not (has_alpha and mode in ("L", "RGB")):
        return im
    if mode in ("P", "PA") and im.palette is None:
        # A palette PNG without its PLTE chunk: libpng and browsers refuse it, and Pillow's conversion
        # asserted (a 500, found in review).
        raise CorruptImage(f"the {im.format} image is in palette mode but has no palette")
    if mode.startswith("I") or mode == "F":
        return _deep_to_l(im, has_alpha)
    if mode == "1":
        return im.convert("LA" if has_alpha else "L")
    transparency = im.info.get("transparency")
    if (
        mode == "P" and transparency is not None and im.format == "PNG"
    ):  # a GIF's index is valid past its table
        entries = len(im.getpalette() or ()) // 3 or 256  # none: Pillow's default palette of 256 greys
        if (isinstance(transparency, bytes) and len(transparency) > entries) or (
            isinstance(transparency, int) and transparency >= entries
        ):
            # More alpha entries than the palette has colours: libpng drops the whole tRNS chunk as
            # invalid, and browsers show the image opaque; Pillow's conversion raised (a 500, found in
            # review). A tRNS of one 0 among 255s arrives as that entry's index, past the palette here.
            del im.info["transparency"]
    if mode in ("P", "PA", "L", "RGB"):
        if mode == "PA" or im.has_transparency_data:
            return im.convert("LA" if mode == "L" else "RGBA")
        return im.convert("RGB")
    if mode == "La":
        return im.convert("LA")
    if mode == "RGBa":
        return im.convert("RGBA")
    if mode == "LAB":
        # Pillow's own LAB -> RGB conversion reinterprets the channels; LittleCMS converts them.
        converted = ImageCms.profileToProfile(im, LAB, SRGB, outputMode="RGB")
        assert converted is not None
        return converted
    return im.convert("RGB")


def _deep_to_l(im: Image.Image, has_alpha: bool) -> Image.Image:
    """16-bit (and 32-bit integer or float) grayscale to 8-bit L, or LA when a tRNS value is set."""
    if im.mode == "F":
        # Float images hold 0..1 by convention; anything larger is taken as already 0..255.
        _low, high = im.getextrema()
        scale = 255.0 if isinstance(high, float) and high <= 1.0 else 1.0
        return im.point(lambda value: value * scale).convert("L")
    wide = im.convert("I")
    # Pillow's convert("L") clips at 255 (a white image); scale 0..65535 down instead.
    gray = wide.point(lambda value: value * (1 / 257)).convert("L")
    transparent = im.info.get("transparency")
    if has_alpha and isinstance(transparent, int):
        # Compare at full depth: converting first would fold 16-bit values onto the 8-bit key.
        alpha = ImageMath.lambda_eval(lambda env: (env["v"] != transparent) * 255, v=wide)
        assert isinstance(alpha, Image.Image)
        return Image.merge("LA", (gray, alpha.convert("L")))
    return gray


def resize(im: Image.Image, size: tuple[int, int], resizer: str = "pillow") -> Image.Image:
    if im.size == size:
        return im
    if resizer == "vips" and vips.supports(im, size):
        return vips.resize(im, size, reducing_gap=REDUCING_GAP)
    # Pillow premultiplies alpha during the resize, so transparent pixels do not bleed their colour.
    return im.resize(size, Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP)


def orient(im: Image.Image, orientation: int) -> Image.Image:
    """Make the image upright. Done after the resize, on far fewer pixels."""
    method = _TRANSPOSE.get(orientation)
    return im.transpose(method) if method is not None else im


def fit_mode_to_format(im: Image.Image, params: Params) -> Image.Image:
    """Drop an alpha channel that is fully opaque; flatten real alpha onto the background for JPEG."""
    if im.mode in ("LA", "RGBA"):
        low, _high = im.getchannel("A").getextrema()
        if low == 255:
            im = im.convert("L" if im.mode == "LA" else "RGB")
        elif params.format == "jpeg":
            # One RGB copy, the background painted in where alpha is missing: out = rgb*a + bg*(1-a).
            # (alpha_composite onto a new RGBA canvas would make four full-size copies.)
            alpha = im.getchannel("A")
            flat = im.convert("RGB")
            flat.paste(params.background, mask=ImageChops.invert(alpha))
            im = flat
    if params.format in ("webp", "avif") and im.mode in ("L", "LA"):
        im = im.convert("RGBA" if im.mode == "LA" else "RGB")
    return im


def encode(im: Image.Image, params: Params, *, progressive: bool = True) -> bytes:
    """Encode freshly: no EXIF, XMP, ICC or trailing data of the upload can reach the output.

    ``progressive=False`` makes every JPEG baseline (the operator's choice, ``OPTIMIZER_JPEG_PROGRESSIVE``).
    """
    # resize()/convert() copy ``info`` to the new image, and the PNG and AVIF writers fall back to it for
    # the ICC profile and EXIF, so the metadata is dropped here explicitly.
    im.info = {}
    if params.format == "jpeg":
        subsampling = jpeg_subsampling(params.quality)
        try:
            return _save_without_gil(
                im,
                "JPEG",
                quality=params.quality,
                subsampling=subsampling,
                optimize=True,
                progressive=progressive and im.width * im.height >= PROGRESSIVE_MIN_PIXELS,
            )
        except EncoderOutputCutShort:
            raise  # the memory file refused the bytes (a cgroup's limit): another encode would too
        except OSError:
            # Optimized tables and progressive scans make libjpeg write the whole file at its end, into
            # the buffer Pillow gave it: one byte a pixel (two from quality 95), which noise overflows
            # ("broken data stream": random black and white at quality 94 was a 500, a review). A plain
            # baseline JPEG is written as it is coded, into any size.
            return _save_without_gil(
                im, "JPEG", quality=params.quality, subsampling=subsampling, optimize=False, progressive=False
            )
    buffer = io.BytesIO()
    if params.format == "png":
        if im.width * im.height <= PNG_OPTIMIZE_MAX_PIXELS:
            im.save(buffer, "PNG", optimize=True)
        else:
            im.save(buffer, "PNG", compress_level=6)
    elif params.format == "webp":
        im.save(buffer, "WEBP", quality=params.quality, method=4)
    else:
        im.save(buffer, "AVIF", quality=params.quality, speed=AVIF_SPEED, max_threads=1)
    return buffer.getvalue()


# From this quality up the JPEG keeps full-resolution colour (4:4:4), as libvips's automatic mode does:
# asked for near-lossless, a client means it for colour edges too (a red pixel beside a blue one came
# out a third green at quality 100, a review); below, 4:2:0's halved colour is the usual trade.
JPEG_FULL_CHROMA_QUALITY = 90


def jpeg_subsampling(quality: int) -> int:
    """Pillow's ``subsampling`` for a JPEG at ``quality``: 0 is 4:4:4, 2 is 4:2:0."""
    return 0 if quality >= JPEG_FULL_CHROMA_QUALITY else 2


class EncoderOutputCutShort(OSError):
    """The memory file an encoder wrote into kept fewer bytes than written (see ``_save_without_gil``)."""


def _save_without_gil(im: Image.Image, format: str, **options: object) -> bytes:
    """``im.save()`` into a memory file rather than a ``BytesIO``: the encoded bytes are the same.

    Given an object without a file descriptor, Pillow runs a JPEG encode in one call that holds the
    GIL throughout (~4 ms for S2's 800 px output); given a real descriptor, it encodes with the GIL
    released and writes there itself. Held, it kept the other worker (which needs the GIL between its
    decoder's calls) and the event loop waiting, and on S2 the cores sat idle 2.4 % of the time; with
    the memory file 1.0 % (docs/benchmarks.md). Where memfd_create is missing (not Linux) or refused
    (a seccomp profile), the ``BytesIO`` path is taken."""
    try:
        fd = os.memfd_create("optimizer-encode", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        buffer = io.BytesIO()
        im.save(buffer, format, **options)
        return buffer.getvalue()
    try:
        file = os.fdopen(fd, "w+b", buffering=0)
    except BaseException:
        os.close(fd)
        raise
    with file:  # closes the descriptor, whatever happens
        im.save(file, format, **options)
        size = os.fstat(fd).st_size
        data = os.pread(fd, size, 0)
    # Pillow's encode_to_file ignores a short write(), which a memfd can give at a cgroup's memory
    # limit (ENOMEM) or under RLIMIT_FSIZE: the file then holds a JPEG cut short, without its EOI.
    if len(data) != size or (format == "JPEG" and not data.endswith(b"\xff\xd9")):
        raise EncoderOutputCutShort(f"the {format} encoder's output was cut short ({size} bytes written)")
    return data


def _upright_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    return (size[1], size[0]) if orientation >= 5 else size


def _unrotate(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """The size in the stored (not yet rotated) orientation for an upright ``size``."""
    return _upright_size(size, orientation)
