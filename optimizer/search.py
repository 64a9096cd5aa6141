"""Find a multipart delimiter in a large buffer with the C library's ``memmem``, not ``bytes.find``.

Why: checking that an uploaded part holds no delimiter means reading all of it, and on the S2 photo
(4.4 MB) that search was the event loop's largest single cost: ``perf`` put a fifth of the loop's CPU
in CPython's two-way search (``stringlib__two_way``), ~0.3 ms an upload, with the GIL held. glibc's
``memmem`` skips ahead on the needle's byte pairs and read the same 4.4 MB in 0.11-0.20 ms here
against ``bytes.find``'s 0.19-0.35 ms (best of 30, four real clients' boundary lengths). Small
buffers keep ``bytes.find``: a ctypes call costs about a microsecond before it reads anything. (musl's
``memmem``, on Alpine, is a two-way search like CPython's: as correct, not measured for speed.)

Where ctypes or ``memmem`` is missing (an interpreter built without libffi, a C library without it)
``bytes.find`` is used throughout; the answers are the same.
"""

from __future__ import annotations

from collections.abc import Callable

_memmem: Callable[[int, int, bytes, int], int | None] | None
try:
    import ctypes

    # PyDLL: the GIL stays held during the call, as during bytes.find. Released, the event loop would
    # have to take it back from a worker after each search (a review measured 3 of 40 searches over
    # 1 ms, one of 14 ms, with another thread running Python), for a search of 0.1-0.2 ms.
    _function = ctypes.PyDLL(None).memmem
    _function.restype = ctypes.c_void_p
    _function.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t)
    _memmem = _function
except (ImportError, OSError, AttributeError):  # pragma: no cover - no ctypes (another build), no memmem
    _memmem = None

# Below this many bytes to search, bytes.find is as fast as the call into C.
MEMMEM_FROM = 64 * 1024


def find(buf: bytes, needle: bytes, start: int = 0) -> int:
    """``buf.find(needle, start)``, through ``memmem`` where ``buf`` is large."""
    if _memmem is None or type(buf) is not bytes or not needle or start < 0 or len(buf) - start < MEMMEM_FROM:
        return buf.find(needle, start)
    # The address of the bytes object's own data (c_char_p wraps it without a copy); ``buf`` keeps it.
    base = ctypes.cast(ctypes.c_char_p(buf), ctypes.c_void_p).value
    assert base is not None
    found = _memmem(base + start, len(buf) - start, needle, len(needle))
    return -1 if found is None else found - base
