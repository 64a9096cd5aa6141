"""The delimiter search through memmem answers as ``bytes.find`` does, on buffers large enough to use it."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optimizer import search

DELIMITER = b"\r\n--bench-0123456789abcdef0123456789abcdef"


@settings(max_examples=300, deadline=None)
@given(
    pattern=st.binary(min_size=1, max_size=300),
    size=st.integers(min_value=0, max_value=3 * search.MEMMEM_FROM),
    needle=st.sampled_from([DELIMITER, b"\r\n--", b"-", b"\r\n--bench-0123"])
    | st.binary(min_size=1, max_size=8),
    inserts=st.lists(st.integers(min_value=0), max_size=3),
    start=st.integers(min_value=-10, max_value=4 * search.MEMMEM_FROM),
)
def test_the_same_answer_as_bytes_find(
    *, pattern: bytes, size: int, needle: bytes, inserts: list[int], start: int
) -> None:
    buf = (pattern * (size // len(pattern) + 1))[:size]
    for insert in inserts:  # the needle, or its start only, at places anywhere in the buffer
        at = insert % (len(buf) + 1)
        buf = buf[:at] + needle[: 1 + at % len(needle)] + buf[at:]
    start = min(start, len(buf) + 2)
    assert search.find(buf, needle, start) == buf.find(needle, start)


@pytest.mark.parametrize("where", ["first", "last", "straddling the start", "none"])
def test_a_delimiter_at_the_edges_of_a_large_buffer(where: str) -> None:
    body = bytes(range(256)) * (2 * search.MEMMEM_FROM // 256)
    start = 1000
    buf = {
        "first": DELIMITER + body,
        "last": body + DELIMITER,
        "straddling the start": body[: start - 5] + DELIMITER + body,
        "none": body + DELIMITER[:-1],
    }[where]
    assert len(buf) - start >= search.MEMMEM_FROM  # the memmem path
    assert search.find(buf, DELIMITER) == buf.find(DELIMITER)
    assert search.find(buf, DELIMITER, start) == buf.find(DELIMITER, start)


def test_other_buffers_are_searched_as_they_are() -> None:
    data = bytearray(b"x" * (2 * search.MEMMEM_FROM) + DELIMITER)
    assert search.find(data, DELIMITER) == len(data) - len(DELIMITER)  # type: ignore[arg-type]


def test_without_ctypes_the_service_imports_and_finds_with_bytes_find() -> None:
    # An interpreter built without libffi has no _ctypes (found in review: the import failed).
    script = (
        "import sys; sys.modules['_ctypes'] = None\n"
        "import optimizer.intake\n"
        "from optimizer import search\n"
        "assert search._memmem is None\n"
        "buf = bytes(200_000) + b'--x'\n"
        "assert search.find(buf, b'--x') == 200_000\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
