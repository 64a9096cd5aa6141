"""The multipart/form-data parser on its own: every way a body can be cut into chunks, and bad bodies."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optimizer.errors import MalformedUpload, MissingImage, OptimizerError
from optimizer.formdata import MAX_PART_HEADERS, MAX_PARTS, FormReader, Pieces, boundary_of

BOUNDARY = b"bench-0123456789abcdef0123456789abcdef"


class Chunks:
    """A ``readany()`` source that hands out the body in the given pieces."""

    def __init__(self, pieces: Sequence[bytes]) -> None:
        self.pieces = list(pieces)
        self.reads = 0

    async def readany(self) -> bytes:
        self.reads += 1
        return self.pieces.pop(0) if self.pieces else b""


def split(body: bytes, cuts: Sequence[int]) -> list[bytes]:
    points = sorted({0, len(body), *(c % (len(body) + 1) for c in cuts)})
    return [body[a:b] for a, b in itertools.pairwise(points)]


def part(name: str, content: bytes, boundary: bytes = BOUNDARY, extra: str = "") -> bytes:
    head = f'Content-Disposition: form-data; name="{name}"; filename="x.bin"\r\n{extra}\r\n'
    return b"--" + boundary + b"\r\n" + head.encode() + content + b"\r\n"


def form(*parts: bytes, boundary: bytes = BOUNDARY, preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    return preamble + b"".join(parts) + b"--" + boundary + b"--" + epilogue


def read(pieces: Sequence[bytes], boundary: bytes = BOUNDARY, field: str = "image") -> bytes:
    received: list[int] = []
    source = Chunks(pieces)
    reader = FormReader(source, boundary, lambda: received.append(1))
    data = asyncio.run(reader.read_field(field))
    # the whole body is read, epilogue included, and every chunk was reported to the byte counter
    assert not source.pieces
    assert len(received) == len([p for p in pieces if p])
    return data


# Content that looks like the delimiter's start, so that the search must not stop early.
TRICKY = st.lists(
    st.sampled_from([b"\r", b"\n", b"-", b"\r\n", b"\r\n--", b"\r\n--bench", b"--" + BOUNDARY, b"\xff\xd8"])
    | st.binary(max_size=40),
    max_size=30,
).map(b"".join)
DELIMITER = b"\r\n--" + BOUNDARY


def clean(content: bytes) -> bool:
    """Content that does not itself hold a delimiter (a client must pick a boundary that is not in it)."""
    return (content + DELIMITER).find(DELIMITER) == len(content)


CONTENT = TRICKY.filter(clean)


@settings(max_examples=300, deadline=None)
@given(
    image=CONTENT,
    other=CONTENT,
    preamble=st.sampled_from([b"", b"junk before the form\r\n", b"\r\n"]),
    epilogue=st.sampled_from([b"", b"\r\n", b"\r\ntrailing words\r\n"]),
    order=st.sampled_from([(0, 1), (1, 0)]),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
)
def test_any_chunking_gives_the_image_back(
    *, image: bytes, other: bytes, preamble: bytes, epilogue: bytes, order: tuple[int, int], cuts: list[int]
) -> None:
    parts = [part("image", image), part("note", other)]
    body = form(*(parts[i] for i in order), preamble=preamble, epilogue=epilogue)
    assert read(split(body, cuts)) == image


class RestChunks(Chunks):
    """Chunks, and the rest of the body in one piece when asked, as ``optimizer.takeover.DirectBody``
    hands it over."""

    def __init__(self, pieces: Sequence[bytes]) -> None:
        super().__init__(pieces)
        self.rest: tuple[bytes, bytes] | None = None

    @property
    def unread(self) -> int:
        return sum(len(piece) for piece in self.pieces)

    async def read_rest(self, prefix: bytes | memoryview, size: int) -> tuple[bytes, bytes]:
        assert self.rest is None, "the rest of a body is taken once"
        whole = bytes(prefix) + b"".join(self.pieces)
        assert len(prefix) <= size <= len(whole)
        self.pieces.clear()
        self.rest = whole[:size], whole[size:]
        return self.rest


def read_rest(pieces: Sequence[bytes]) -> tuple[bytes, RestChunks]:
    source = RestChunks(pieces)
    data = asyncio.run(FormReader(source, BOUNDARY, lambda: None).read_field("image"))
    assert not source.pieces  # the whole body is read, epilogue included
    return data, source


@settings(max_examples=300, deadline=None)
@given(
    image=CONTENT,
    other=CONTENT,
    epilogue=st.sampled_from([b"", b"\r\n", b"\r", b"\r\n\r\n", b"\r\ntrailing words\r\n"]),
    order=st.sampled_from([(0, 1), (1, 0), (0,)]),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=4),
)
def test_the_rest_in_one_piece_gives_the_image_back_whatever_the_layout(
    *, image: bytes, other: bytes, epilogue: bytes, order: tuple[int, ...], cuts: list[int]
) -> None:
    # The one-piece read bets that the image is the last part and the body ends with the close delimiter
    # and CRLF; any other layout must still give the image, read as usual.
    parts = [part("image", image), part("note", other)]
    body = form(*(parts[i] for i in order), epilogue=epilogue)
    data, _source = read_rest(split(body, cuts))
    assert data == image


@pytest.mark.parametrize("into_image", [0, 1, 50_000, 102_399])
def test_the_usual_layout_is_received_in_place(into_image: int) -> None:
    # The image is the form's last part, followed by the close delimiter and CRLF (curl, Go, the bench
    # harness): the bytes handed over are the image itself, not a copy.
    image = bytes(range(256)) * 400 + b"\r\n--" + BOUNDARY[:-1]
    body = form(part("note", b"n"), part("image", image), epilogue=b"\r\n")
    start = body.index(image)
    data, source = read_rest([body[: start + into_image], body[start + into_image :]])
    assert data == image
    assert source.rest is not None
    assert data is source.rest[0]


def test_a_field_after_the_image_is_not_taken_for_part_of_it() -> None:
    # The body ends as the bet expects, but the image is not the last part: its bytes stop at the first
    # delimiter.
    image = bytes(range(256)) * 40
    body = form(part("image", image), part("note", b"a note"), epilogue=b"\r\n")
    data, source = read_rest([body[:200], body[200:]])
    assert data == image
    assert source.rest is not None


def test_a_part_that_ends_in_the_chunk_at_hand_is_read_as_usual() -> None:
    body = form(part("image", b"small"), epilogue=b"\r\n")
    data, source = read_rest([body[:20], body[20:]])
    assert data == b"small"
    assert source.rest is None


def test_one_byte_chunks() -> None:
    image = bytes(range(256)) * 300 + b"\r\n--bench-0123"
    body = form(part("note", b"hello"), part("image", image), epilogue=b"\r\n")
    assert read([body[i : i + 1] for i in range(len(body))]) == image


def test_large_chunks_are_kept_without_a_copy() -> None:
    image = bytes(range(256)) * 4096  # 1 MiB
    body = form(part("image", image))
    cut = len(body) // 2
    assert read([body[:cut], body[cut:]]) == image


@pytest.mark.parametrize(
    "boundary",
    [b"a", b"X" * 70, b"with space inside", b"'()+_,-./:=?"],
)
def test_boundaries_of_every_allowed_length_and_character(boundary: bytes) -> None:
    image = b"\r\n--" + boundary[:-1] + b"\r\n-- \r\n"
    body = form(part("image", image, boundary), boundary=boundary)
    assert read(split(body, [3, 50, 51]), boundary) == image


def test_transport_padding_after_a_boundary_is_allowed() -> None:
    padded = b"--" + BOUNDARY + b" \t\r\n" + part("image", b"data")[len(BOUNDARY) + 4 :]
    body = padded + b"--" + BOUNDARY + b"--"
    assert read([body]) == b"data"


def test_part_headers_in_any_case_and_other_headers_ignored() -> None:
    body = (
        b"--" + BOUNDARY + b"\r\ncontent-type: image/png\r\nX-Other: 1\r\n"
        b"CONTENT-DISPOSITION: form-data; name=image\r\n\r\npng!\r\n--" + BOUNDARY + b"--\r\n"
    )
    assert read(split(body, [10, 60])) == b"png!"


def bad(pieces: Sequence[bytes], error: type[OptimizerError] = MalformedUpload) -> str:
    with pytest.raises(error) as caught:
        asyncio.run(FormReader(Chunks(pieces), BOUNDARY, lambda: None).read_field("image"))
    return str(caught.value)


@settings(max_examples=200, deadline=None)
@given(
    image=CONTENT,
    at=st.integers(min_value=0),
    cuts=st.lists(st.integers(min_value=0, max_value=500), max_size=6),
)
def test_a_body_cut_short_is_malformed(image: bytes, at: int, cuts: list[int]) -> None:
    body = form(part("note", b"n"), part("image", image))
    cut = body[: at % (len(body) - 1)]  # anything short of the close delimiter's last dash
    bad(split(cut, cuts))


def test_bad_forms() -> None:
    image = part("image", b"one")
    assert "more than one" in bad([form(image, image)])
    assert "nested" in bad([form(part("image", b"x", extra="Content-Type: multipart/mixed; boundary=z\r\n"))])
    assert "must end with CRLF" in bad([b"--" + BOUNDARY + b"x\r\n" + image])
    assert "malformed header line" in bad(
        [b"--" + BOUNDARY + b"\r\nno colon here\r\n\r\nx\r\n--" + BOUNDARY + b"--"]
    )
    disposition = b'--%s\r\nContent-Disposition: form-data; name="a"; name="b"\r\n\r\nx\r\n--%s--'
    assert "Content-Disposition" in bad([disposition % (BOUNDARY, BOUNDARY)])
    bad([form(part("file", b"x"))], MissingImage)
    bad([form()], MissingImage)
    bad([b""])


def test_header_lines_a_proxy_might_read_otherwise_are_refused() -> None:
    disposition = b'Content-Disposition: form-data; name="image"'
    for headers in [
        b"X-A: 1\r\n " + disposition,  # folded onto the line before
        disposition.replace(b":", b" :", 1),  # space before the colon
        disposition + b"\r\n" + disposition,  # two of them
        b'Content-Disposition: form-data; name="image"; name="other"',
        b"Content-Disposition: form-data; name=image file",
    ]:
        body = b"--" + BOUNDARY + b"\r\n" + headers + b"\r\n\r\nx\r\n--" + BOUNDARY + b"--"
        bad([body])


def test_only_a_form_data_disposition_names_a_field() -> None:
    for disposition, found in [
        (b'form-data; name="image"', True),
        (b'FORM-DATA ; NAME = "image" ;', True),
        (b"form-data;name=image", True),
        (b'form-data; filename="a;b\\".jpg"; name="image"', True),
        (b'form-data; filename="bare"quote;.jpg"; name="image"', True),  # an unescaped quote
        (b'attachment; name="image"', False),
        (b"form-data; name*=UTF-8''image", False),  # RFC 7578 names are raw UTF-8, never RFC 2231
    ]:
        body = (
            b"--"
            + BOUNDARY
            + b"\r\nContent-Disposition: "
            + disposition
            + b"\r\n\r\nx\r\n--"
            + BOUNDARY
            + b"--"
        )
        if found:
            assert read([body]) == b"x"
        else:
            bad([body], MissingImage)


def test_a_line_ending_in_a_bare_lf_is_refused() -> None:
    body = b"--" + BOUNDARY + b'\nContent-Disposition: form-data; name="image"\n\nx\r\n--' + BOUNDARY + b"--"
    assert "must end with CRLF" in bad([body])


def test_too_many_parts() -> None:
    body = form(*(part("note", b"n") for _ in range(MAX_PARTS)), part("image", b"x"))
    assert f"more than {MAX_PARTS} parts" in bad([body])
    assert read([form(*(part("note", b"n") for _ in range(MAX_PARTS - 1)), part("image", b"x"))]) == b"x"


@pytest.mark.parametrize("cut", [None, 10, 5_000, MAX_PART_HEADERS - 5, MAX_PART_HEADERS + 40])
def test_the_header_limit_holds_however_the_body_is_cut(cut: int | None) -> None:
    def body(size: int) -> bytes:
        filler = b"X-Fill: " + b"a" * (size - len(b"X-Fill: ") - 2) + b"\r\n"
        headers = filler + b'Content-Disposition: form-data; name="image"'
        return b"--" + BOUNDARY + b"\r\n" + headers + b"\r\n\r\nx\r\n--" + BOUNDARY + b"--"

    fits = body(MAX_PART_HEADERS - len(b'Content-Disposition: form-data; name="image"'))
    over = body(MAX_PART_HEADERS - len(b'Content-Disposition: form-data; name="image"') + 1)
    pieces = [[whole] if cut is None else [whole[:cut], whole[cut:]] for whole in (fits, over)]
    assert read(pieces[0]) == b"x"
    assert "longer than" in bad(pieces[1])


def test_endless_part_headers_are_refused_without_gathering_them() -> None:
    source = Chunks([b"--" + BOUNDARY + b"\r\n"] + [b"X-Long: " + b"a" * 4000] * 100)
    with pytest.raises(MalformedUpload, match="header block is longer than"):
        asyncio.run(FormReader(source, BOUNDARY, lambda: None).read_field("image"))
    assert source.reads <= MAX_PART_HEADERS // 4000 + 3


def test_a_part_without_headers_is_not_the_image() -> None:
    body = b"--" + BOUNDARY + b"\r\n\r\nanonymous\r\n" + form(part("image", b"img"))
    assert read([body]) == b"img"


@pytest.mark.parametrize(
    ("header", "boundary"),
    [
        ("multipart/form-data; boundary=abc", b"abc"),
        ('multipart/form-data; boundary="a b;c"', b"a b;c"),
        ("multipart/form-data; charset=utf-8; BOUNDARY=xyz", b"xyz"),
        ("multipart/form-data; boundary*=UTF-8''r%2Ds", b"r-s"),
    ],
)
def test_boundary_of(header: str, boundary: bytes) -> None:
    assert boundary_of(header) == boundary


@pytest.mark.parametrize(
    "header",
    [
        "multipart/form-data",
        "multipart/form-data; boundary=",
        'multipart/form-data; boundary=""',
        "multipart/form-data; boundary=" + "b" * 71,
        "multipart/form-data; boundary=caf\u00e9",
        # RFC 2231 pieces that decode to a lone surrogate (found by a review: it was a 500)
        "multipart/form-data; boundary*0*=utf-7''a; boundary*1=+2AA-",
        "multipart/form-data; boundary*0*=unicode_escape''abc; boundary*1=\"\\\\ud800\"",
    ],
)
def test_boundary_of_refuses(header: str) -> None:
    with pytest.raises(MalformedUpload):
        boundary_of(header)


def test_pieces_gather_small_chunks_and_keep_large_ones() -> None:
    pieces = Pieces()
    large = bytes(Pieces.SMALL)
    chunks: list[bytes | memoryview] = [b"a", b"b", large, memoryview(b"xcdx")[1:3], large]
    for chunk in chunks:
        pieces.add(chunk)
    assert pieces.join() == b"ab" + large + b"cd" + large
    single = Pieces()
    single.add(large)
    assert single.join() is large
