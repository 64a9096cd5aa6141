"""The largest frame an AV1 stream may code, from its sequence header (AV1 specification, 5.5).

An AVIF declares its size in boxes (``ispe`` for an item, ``tkhd`` for a track), and that is the size
Pillow reports and the memory estimate is made from; but the decoder allocates for the frames the AV1
data codes, up to 16384x16384, and libavif then scales the result to the declared size. A review's
1.2 KB file declaring 64x64 and coding 8192x8192 took 163 MB at load, against an estimate of 2. The
sequence header says how large any frame of the stream may be, so it is read before Pillow is asked.
"""

from __future__ import annotations

import functools

from optimizer.errors import StructureLimit

_SEQUENCE_HEADER = 1  # obu_type
# OBUs in one item's or sample's data: a temporal delimiter, a sequence header, metadata and a frame or
# a frame header and its tile groups; a stream of very many tiny ones is made to keep the walk busy.
MAX_OBUS = 1024
_HEADER_BYTES = 1024  # more than the largest sequence header (32 operating points with every option)


class UnreadableStream(StructureLimit):
    """The AV1 data has a sequence header that cannot be read, or more OBUs than a frame needs."""


class _Bits:
    """A big-endian bit reader over one integer: shifts, not a Python step per bit."""

    def __init__(self, data: bytes) -> None:
        self.value = int.from_bytes(data, "big")
        self.left = len(data) * 8  # bits not read yet

    def read(self, count: int) -> int:
        if count > self.left:
            raise IndexError("the sequence header is cut short")
        self.left -= count
        return (self.value >> self.left) & ((1 << count) - 1)

    def uvlc(self) -> int:
        zeros = 0
        while not self.read(1):
            zeros += 1
            if zeros >= 32:
                return (1 << 32) - 1
        return self.read(zeros) + (1 << zeros) - 1


def scan(stream: bytes, headers: set[bytes] | None = None) -> tuple[tuple[int, int] | None, int]:
    """The widest and the tallest frame any sequence header in ``stream`` allows (the decoder uses the
    latest before each frame, so all count), or ``None`` when there is none (the decoder has no frame
    then); and the OBUs read to find it. ``UnreadableStream`` for a header the walk cannot read or more
    than ``MAX_OBUS`` OBUs. The distinct headers read are added to ``headers``."""
    pos, width, height = 0, 0, 0
    for count in range(MAX_OBUS):
        if pos >= len(stream):
            return ((width, height) if width else None), count
        header = stream[pos]
        obu_type, extension, has_size = header >> 3 & 15, header >> 2 & 1, header >> 1 & 1
        pos += 1 + extension
        size = len(stream) - pos  # without a size field the OBU runs to the end
        if has_size:
            size, pos = _leb128(stream, pos)
        if obu_type == _SEQUENCE_HEADER:
            try:
                # A header takes a few hundred bytes; what follows in the OBU is not read.
                payload = bytes(stream[pos : pos + min(size, _HEADER_BYTES)])
                if headers is not None:
                    headers.add(payload)
                frame = _sequence_header(payload)
            except IndexError:
                raise UnreadableStream("an AV1 sequence header in the AVIF cannot be read") from None
            width, height = max(width, frame[0]), max(height, frame[1])
        pos += size
    if pos < len(stream):
        raise UnreadableStream(f"the AVIF's AV1 data holds more than {MAX_OBUS} OBUs in one frame's data")
    return ((width, height) if width else None), MAX_OBUS


def _leb128(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for i in range(8):
        if pos + i >= len(data):
            return len(data), len(data)  # cut short: nothing more to read
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value, pos + i + 1
    return value, pos + 8


@functools.lru_cache(maxsize=256)  # items and samples repeat one header: each distinct one is read once
def _sequence_header(payload: bytes) -> tuple[int, int]:
    bits = _Bits(payload)
    bits.read(3)  # seq_profile
    bits.read(1)  # still_picture
    if bits.read(1):  # reduced_still_picture_header
        bits.read(5)  # seq_level_idx[0]
    else:
        decoder_model = False
        delay_length = 0
        if bits.read(1):  # timing_info_present_flag
            bits.read(32)  # num_units_in_display_tick
            bits.read(32)  # time_scale
            if bits.read(1):  # equal_picture_interval
                bits.uvlc()  # num_ticks_per_picture_minus_1
            decoder_model = bool(bits.read(1))
            if decoder_model:
                delay_length = bits.read(5) + 1  # buffer_delay_length_minus_1
                bits.read(32)  # num_units_in_decoding_tick
                bits.read(5)  # buffer_removal_time_length_minus_1
                bits.read(5)  # frame_presentation_time_length_minus_1
        initial_display_delay = bool(bits.read(1))
        for _ in range(bits.read(5) + 1):  # operating_points_cnt_minus_1
            bits.read(12)  # operating_point_idc
            if bits.read(5) > 7:  # seq_level_idx
                bits.read(1)  # seq_tier
            if decoder_model and bits.read(1):  # decoder_model_present_for_this_op
                bits.read(delay_length)  # decoder_buffer_delay
                bits.read(delay_length)  # encoder_buffer_delay
                bits.read(1)  # low_delay_mode_flag
            if initial_display_delay and bits.read(1):  # initial_display_delay_present_for_this_op
                bits.read(4)  # initial_display_delay_minus_1
    width_bits = bits.read(4) + 1
    height_bits = bits.read(4) + 1
    return bits.read(width_bits) + 1, bits.read(height_bits) + 1
