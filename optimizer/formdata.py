"""Pick one file part out of a streamed multipart/form-data body, copying its bytes once.

Why not aiohttp's ``MultipartReader``: to find the boundary it glues every chunk to the one before it
(``prev + chunk``) and slices what it returns, so each byte of an upload is copied three to four times
on the event loop. Measured with the pipeline stubbed out, a 4.4 MB upload cost the server 3.4-3.7 ms
of CPU as a form against 1.5-1.7 ms as a raw body, and on two cores that loop time is taken from the
workers (docs/benchmarks.md, "The event loop's share"). Here the chunks the HTTP parser produced are
kept as they are (a ``memoryview`` where a part starts or ends inside one), the boundary is searched
in place (``optimizer.search``), and the only copy is the final ``join``; from a source that can hand
over the rest of the body in one piece (``RestSource``, ``optimizer.takeover``), the usual layout needs
no join either.

What is parsed (RFC 7578 and RFC 2046 section 5.1.1): a preamble, then parts each introduced by
``--boundary`` plus optional transport padding and CRLF, their header block up to an empty line, and
a close delimiter ``--boundary--`` after which the epilogue is read (it counts against the byte cap)
and dropped. Part headers other than ``Content-Disposition`` and ``Content-Type`` are ignored,
``Content-Transfer-Encoding`` included, as RFC 7578 deprecates it; a part's bytes are what lies
between its header block and the next delimiter. The transfer and content encodings of the request
itself are undone by aiohttp below this.

Stricter than aiohttp's reader, on purpose: lines end in CRLF; a folded header line, a space before
a colon, two Content-Disposition headers or two ``name`` parameters are refused, since a proxy in
front could read such a part differently; a boundary is printable ASCII; at most ``MAX_PARTS`` parts.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from email.parser import HeaderParser
from email.utils import collapse_rfc2231_value
from typing import Protocol, runtime_checkable

from optimizer import search
from optimizer.errors import MalformedUpload, MissingImage

# RFC 2046: a boundary is 1 to 70 characters.
MAX_BOUNDARY = 70
# A part's header block; browsers send ~100-300 bytes. Bounded so that a body of one endless header
# line is refused early instead of being gathered in memory.
MAX_PART_HEADERS = 16 * 1024
# Transport padding after a delimiter (RFC 2046 allows linear white space before the CRLF).
MAX_PADDING = 1024
# A form here is one image and perhaps a few fields; parts beyond this are refused rather than parsed.
MAX_PARTS = 64

# One ``; name=value`` parameter of Content-Disposition: a token, then a quoted string, or one with a
# bare quote inside (some clients send filename="a"b.jpg" unescaped: it ends at the first quote that
# is followed by ';' or the end), or a token.
_PARAMETER = re.compile(
    r"""\s*;\s*([!#$%&'*+.^_`|~0-9A-Za-z-]+)\s*=\s*"""
    r"""(?:"((?:[^"\\]|\\.)*)"(?=\s*(?:;|$))|"(.*?)"(?=\s*(?:;|$))|([^;"\s]*))\s*"""
)
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_QUOTED_PAIR = re.compile(r"\\(.)")


class ChunkSource(Protocol):
    """What the parser reads: aiohttp's ``StreamReader`` is one."""

    def readany(self) -> Awaitable[bytes]: ...


@runtime_checkable
class RestSource(ChunkSource, Protocol):
    """A source that can also hand over the rest of the body in one piece (``optimizer.takeover``)."""

    @property
    def unread(self) -> int:
        """Bytes of the body not yet handed out."""

    def read_rest(self, prefix: bytes | memoryview, size: int) -> Awaitable[tuple[bytes, bytes]]:
        """``prefix`` and the rest of the body as two ``bytes``: its first ``size`` bytes, and the
        others."""


def boundary_of(content_type: str) -> bytes:
    """The boundary named by a multipart ``Content-Type`` header, or ``MalformedUpload``."""
    try:
        value = HeaderParser().parsestr("Content-Type: " + content_type).get_param("boundary")
        boundary = collapse_rfc2231_value(value) if value is not None else ""
    except (IndexError, ValueError, TypeError, LookupError):  # UnicodeError is a ValueError
        raise MalformedUpload("the Content-Type header cannot be parsed") from None
    # RFC 2046: 1 to 70 characters, all of them printable ASCII.
    if not 0 < len(boundary) <= MAX_BOUNDARY or not boundary.isascii() or not boundary.isprintable():
        raise MalformedUpload(
            f"a multipart body needs a boundary of 1 to {MAX_BOUNDARY} printable ASCII characters"
        )
    return boundary.encode("ascii")


class FormReader:
    """Reads a whole form body from ``source`` and keeps the bytes of the part named ``field``.

    ``received`` is called after every chunk (the caller's byte cap)."""

    def __init__(self, source: ChunkSource, boundary: bytes, received: Callable[[], None]) -> None:
        self._source = source
        self._rest_source = source if isinstance(source, RestSource) else None
        self._received = received
        self._dash_boundary = b"--" + boundary
        self._delimiter = b"\r\n--" + boundary
        # The unread data: a chunk and an offset into it, so that nothing is sliced to move along.
        self._buf = b""
        self._pos = 0
        self._pending = b""  # a chunk to read before the source's next one (see _rest_in_one)

    async def read_field(self, field: str) -> bytes:
        kept: bytes | None = None
        await self._skip_preamble()
        parts = 0
        while not await self._at_close_delimiter():
            parts += 1
            if parts > MAX_PARTS:
                raise MalformedUpload(f"the form has more than {MAX_PARTS} parts")
            name, content_type = await self._part_headers()
            if content_type.startswith("multipart/"):
                raise MalformedUpload("nested multipart bodies are not accepted")
            chunks = Pieces() if name == field else None
            if chunks is not None and kept is None and (whole := await self._rest_in_one()) is not None:
                kept = whole
                continue
            # Other fields are read too (they count against the cap) and dropped.
            await self._to_delimiter(chunks)
            if chunks is not None:
                if kept is not None:
                    raise MalformedUpload(f"the form has more than one '{field}' part")
                kept = chunks.join()
        # The epilogue is read so that the connection can carry the next request; it is not kept.
        while await self._next_chunk(required=False):
            pass
        if kept is None:
            raise MissingImage(f"the form has no file part named '{field}'")
        return kept

    async def _rest_in_one(self) -> bytes | None:
        """The kept part's bytes as one ``bytes`` received in place, with no join, from a source that
        can hand over the rest of the body so; ``None`` to read the part as usual.

        The part's length is not known before its delimiter is found, so this bets on the usual layout:
        the part is the form's last, and the close delimiter and CRLF end the body (curl, Go, browsers,
        Python's clients). The bet is checked on what arrives; on any other layout the rest of the body,
        now read, is parsed as usual from memory, as two chunks (the join copies the part, as always)."""
        source = self._rest_source
        if source is None or not source.unread:
            return None
        delimiter = self._delimiter
        if search.find(self._buf, delimiter, self._pos) >= 0:
            return None  # the part ends in the chunk at hand: nothing to gain
        close = delimiter + b"--\r\n"
        prefix = memoryview(self._buf)[self._pos :]
        size = len(prefix) + source.unread - len(close)
        if size < len(prefix):
            return None
        data, rest = await source.read_rest(prefix, size)
        overlap = min(len(delimiter) - 1, size)
        # The bet holds if the part's first delimiter starts right after ``data``: none inside it, and
        # none that starts in its last bytes. What follows that delimiter is parsed as usual.
        if search.find(data, delimiter) < 0 and (data[size - overlap :] + rest).find(delimiter) == overlap:
            self._buf, self._pos = rest, len(delimiter)
            return data
        self._buf, self._pos, self._pending = data, 0, rest
        return None

    async def _next_chunk(self, *, required: bool = True) -> bool:
        """Moves to the next chunk of the body; at its end, ``MalformedUpload`` if more was due."""
        if self._pending:
            chunk, self._pending = self._pending, b""
        else:
            chunk = await self._source.readany()
        if not chunk:
            if required:
                raise MalformedUpload("the multipart/form-data body ends in the middle of a part")
            return False
        self._received()
        self._buf, self._pos = chunk, 0
        return True

    async def _ensure(self, size: int) -> bytes:
        """At least ``size`` unread bytes in the buffer (fewer only at the end of the body): its head.

        Asked for two bytes after a delimiter, or the boundary's length at the start of the body. When
        a chunk ends that close to a delimiter, the next chunk is copied whole to join them: rare, and
        one copy more for that chunk."""
        while len(self._buf) - self._pos < size:
            rest = self._buf[self._pos :]
            if not await self._next_chunk(required=False):
                self._buf, self._pos = rest, 0
                break
            self._buf, self._pos = rest + self._buf, 0
        return self._buf[self._pos : self._pos + size]

    async def _skip_preamble(self) -> None:
        # A body normally starts with the boundary itself, which has no CRLF in front of it.
        if await self._ensure(len(self._dash_boundary)) == self._dash_boundary:
            self._pos += len(self._dash_boundary)
        else:
            await self._to_delimiter(None)

    async def _at_close_delimiter(self) -> bool:
        """After a delimiter: ``--`` ends the form; else padding and CRLF introduce a part."""
        if await self._ensure(2) == b"--":
            self._pos += 2
            return True
        padding = await self._until(b"\r\n", MAX_PADDING, "a multipart boundary line")
        if padding.strip(b" \t"):
            raise MalformedUpload("a multipart boundary line must end with CRLF, after at most white space")
        return False

    async def _part_headers(self) -> tuple[str, str]:
        """The part's field name and media type (lower case), from its header block."""
        if await self._ensure(2) == b"\r\n":  # a part without headers
            self._pos += 2
            return "", ""
        block = await self._until(b"\r\n\r\n", MAX_PART_HEADERS, "a multipart part's header block")
        name: str | None = None
        content_type = ""
        for line in block.decode("utf-8", "surrogateescape").split("\r\n"):
            key, colon, value = line.partition(":")
            # No folded lines and no space before the colon (RFC 9112 5.1-5.2): a header this parser
            # read differently from a proxy in front of it could smuggle a part past that proxy.
            if not colon or not _TOKEN.fullmatch(key):
                raise MalformedUpload("a multipart part has a malformed header line")
            key = key.lower()
            if key == "content-disposition":
                if name is not None:
                    raise MalformedUpload("a multipart part has two Content-Disposition headers")
                name = _field_name(value)
            elif key == "content-type":
                content_type = value.strip().lower()
        return name or "", content_type

    async def _until(self, marker: bytes, limit: int, what: str) -> bytes:
        """The bytes before the next ``marker``, which is consumed too; at most ``limit`` of them
        (the marker must start within ``limit`` bytes, however the body is cut into chunks)."""
        seen = b""
        while True:
            room = limit + len(marker) - len(seen)
            window = seen + self._buf[self._pos : self._pos + room]
            found = window.find(marker, max(0, len(seen) - len(marker) + 1))
            if found >= 0:
                self._pos += found + len(marker) - len(seen)
                return window[:found]
            if len(window) >= limit + len(marker):
                raise MalformedUpload(f"{what} is longer than {limit} bytes")
            seen = window
            await self._next_chunk()

    async def _to_delimiter(self, chunks: Pieces | None) -> None:
        """Reads up to and past the next delimiter, adding the bytes before it to ``chunks``.

        Each chunk is searched in place. Only its last ``len(delimiter) - 1`` bytes, which may be the
        start of a delimiter that the next chunk completes, are copied and looked at again with the
        head of that next chunk."""
        delimiter = self._delimiter
        overlap = len(delimiter) - 1
        while True:
            buf, pos = self._buf, self._pos
            found = search.find(buf, delimiter, pos)
            if found >= 0:
                _keep(chunks, buf, pos, found)
                self._pos = found + len(delimiter)
                return
            cut = max(pos, len(buf) - overlap)
            _keep(chunks, buf, pos, cut)
            tail = buf[cut:]
            await self._next_chunk()
            if not tail:
                continue
            head = self._buf[:overlap]
            joint = tail + head
            found = joint.find(delimiter)
            if found >= 0:
                # A delimiter across the two chunks; it cannot lie in ``head`` alone, which is shorter.
                _keep(chunks, tail, 0, found)
                self._pos = found + len(delimiter) - len(tail)
                return
            if len(head) == overlap:
                _keep(chunks, tail, 0, len(tail))
            else:
                # The new chunk is too short to rule a delimiter out: look again with the next one.
                self._buf = joint


def _keep(chunks: Pieces | None, buf: bytes, start: int, end: int) -> None:
    if chunks is not None and end > start:
        chunks.add(buf if start == 0 and end == len(buf) else memoryview(buf)[start:end])


class Pieces:
    """The pieces of one upload, joined once at the end.

    Large pieces are kept as they came, without a copy. Small ones are gathered into one buffer:
    a client that trickles its body gets one chunk per recv(), and a list entry per byte would cost
    ~40-190 bytes of bookkeeping for every byte uploaded."""

    SMALL = 64 * 1024

    def __init__(self) -> None:
        self._pieces: list[bytes | memoryview | bytearray] = []
        self._small = bytearray()

    def add(self, piece: bytes | memoryview) -> None:
        if len(piece) >= self.SMALL:
            self._flush()
            self._pieces.append(piece)
            return
        self._small += piece
        if len(self._small) >= self.SMALL:
            self._flush()

    def join(self) -> bytes:
        self._flush()
        return b"".join(self._pieces)  # one piece of bytes comes back as it is, without a copy

    def _flush(self) -> None:
        if self._small:
            self._pieces.append(self._small)
            self._small = bytearray()


def _field_name(header: str) -> str:
    """The ``name`` parameter of a ``form-data`` disposition, or ``""`` for any other disposition.

    Parsed here rather than with aiohttp's ``parse_content_disposition``, which reports a bad header
    with ``warnings.warn``: each distinct warning text stays in the module's warning registry for the
    life of the process, so a body of many bad headers grew the server's memory by its own size.
    ``name*`` (RFC 2231 encoding) is not read: RFC 7578 sends non-ASCII names as raw UTF-8."""
    disposition, _, rest = header.strip().partition(";")
    rest = rest.rstrip()
    if rest.endswith(";"):
        rest = rest[:-1]
    parameters: dict[str, str] = {}
    position, text = 0, ";" + rest if rest else ""
    while position < len(text):
        match = _PARAMETER.match(text, position)
        if match is None:
            raise MalformedUpload("a multipart part's Content-Disposition cannot be parsed")
        key, quoted, loose, token = match.groups()[0:4]
        if key.lower() in parameters:
            raise MalformedUpload(f"a multipart part's Content-Disposition has two '{key}' parameters")
        value = (
            _QUOTED_PAIR.sub(r"\1", quoted) if quoted is not None else loose if loose is not None else token
        )
        parameters[key.lower()] = value
        position = match.end()
    return parameters.get("name", "") if disposition.strip().lower() == "form-data" else ""
