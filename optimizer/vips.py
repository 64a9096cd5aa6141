"""Lanczos resizing through libvips: the optional resize engine (``OPTIMIZER_RESIZER=vips``).

Pillow's resampler is scalar C; libvips's lanczos3 reduce is vectorised. On the S2 photo (decoded at 1/4
to 1507x848, resized to 800x450) Pillow's resize takes 17.4 ms and this one 5.2 ms including both copies,
which makes the whole pipeline (Pillow decode + this + Pillow encode) faster than libvips's own
thumbnail pipeline. The pixels agree with Pillow's to ~54 dB PSNR (tests/test_vips.py).

Pillow still decodes, converts and encodes everything: libvips is handed decoded pixels in memory and
never an upload's bytes, so none of its file parsers is reachable from a request; the standalone server
blocks every libvips loader besides (``configure_process``). It comes from wheels (``pip install
'optimizer[vips]'``: pyvips and pyvips-binary, which bundles libvips; no system packages) and is
imported only when chosen.
"""

from __future__ import annotations

import functools
import logging
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    # Only for annotations: settings import this module, and a --processes supervisor, which resizes
    # nothing, should not load Pillow's native libraries (~10 MB of its RSS) to read its settings.
    from PIL import Image

# Pillow mode -> (the mode whose raw bytes libvips resizes, its bands). Alpha is premultiplied first, as
# Pillow's own resize does, so transparent pixels do not bleed their colour into their neighbours.
_WORKING_MODES: dict[str, tuple[str, int]] = {
    "L": ("L", 1),
    "LA": ("La", 2),
    "RGB": ("RGB", 3),
    "RGBA": ("RGBa", 4),
    "CMYK": ("CMYK", 4),
}
INSTALL_HINT = "pip install 'optimizer[vips]'"
# Operation blocking and resize's gap option both arrived in libvips 8.13.
MIN_LIBVIPS = (8, 13)

_lock = threading.Lock()
_module: ModuleType | None = None


class VipsUnavailable(RuntimeError):
    """libvips cannot be loaded: the message says why and how to install it."""


def load() -> ModuleType:
    """Import and try out pyvips once per process (idempotent, thread-safe).

    It changes none of libvips's process-wide settings, which belong to the process: an application
    that embeds the service may use libvips itself. ``configure_process`` makes them the service's."""
    global _module  # noqa: PLW0603 - one libvips per process: its settings are process-wide anyway
    with _lock:
        if _module is not None:
            return _module
        # libvips reports every resize's plan ("residual reducev by 0.53", ...) as GLib info messages,
        # which pyvips forwards to this logger: seven lines per image in the service's log at info level.
        # Its warnings and errors still come through. A level the host has set is kept.
        pyvips_log = logging.getLogger("pyvips")
        if pyvips_log.level == logging.NOTSET:
            pyvips_log.setLevel(logging.WARNING)
        try:
            import pyvips  # noqa: PLC0415 - optional: only a process that chose the engine loads libvips
        except Exception as exc:  # ImportError, OSError (a shared library), pyvips's own "unable to init"
            raise VipsUnavailable(
                f"libvips cannot be loaded ({exc}); install it with: {INSTALL_HINT}"
            ) from None
        if not pyvips.at_least_libvips(*MIN_LIBVIPS):
            # Older releases cannot block loaders (pyvips then silently does nothing) and lack resize's gap.
            found = ".".join(str(pyvips.version(part)) for part in range(3))
            raise VipsUnavailable(
                f"libvips {found} is too old (at least {'.'.join(map(str, MIN_LIBVIPS))} needed); "
                f"install the bundled one with: {INSTALL_HINT}"
            )
        try:
            # The very call every request makes, once: a broken libvips stops the start, not each request.
            from PIL import Image  # noqa: PLC0415 - see the import at the top

            _resize_with(pyvips, Image.new("RGB", (6, 4), "white"), (3, 2), reducing_gap=2.0)
        except Exception as exc:
            raise VipsUnavailable(f"libvips cannot resize ({exc}); reinstall it: {INSTALL_HINT}") from None
        module: ModuleType = pyvips
        _module = module
        return module


def configure_process() -> None:
    """libvips's process-wide settings for a process that uses it only for the service: the standalone
    server calls this; a host that embeds the app and uses libvips for nothing else may call it too.

    Until a review found it, ``load()`` did this, so a host that built ``Settings(resizer="vips")`` could
    no longer open a file with pyvips.
    """
    pyvips = load()
    # No operation cache: every request's pixels are different, and a cache would only hold memory.
    pyvips.cache_set_max(0)
    pyvips.cache_set_max_mem(0)
    pyvips.cache_set_max_files(0)
    # One thread per resize: parallelism comes from the service's pool, sized to the cores.
    pyvips.concurrency_set(1)
    # Only pixels in memory ever reach libvips; refuse every file loader outright, so that none of its
    # parsers can be reached even by a mistake in this code.
    pyvips.operation_block_set("VipsForeignLoad", True)


# What a check in a child may take: an interpreter start, the import and one tiny resize (~0.1 s).
CHECK_SECONDS = 60.0
# The child imports this very package (its folder first on the path), not whatever "optimizer" its own
# path would find first (the current directory, PYTHONPATH).
_CHECK_CODE = """
import sys
sys.path.insert(0, {root!r})
from optimizer import vips
try:
    vips.load()
except vips.VipsUnavailable as exc:
    sys.exit(str(exc))
"""


@functools.cache  # once per process: a failure raises, and is not cached
def check_in_child() -> None:
    """``load()`` in a short-lived interpreter, for a process that will not resize itself (the
    ``--processes`` supervisor): libvips takes ~14 MB once loaded, and cannot be unloaded."""
    code = _CHECK_CODE.format(root=str(Path(__file__).resolve().parents[1]))
    try:
        result = subprocess.run(
            [sys.executable, "-c", code],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CHECK_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise VipsUnavailable(f"the libvips check did not finish within {CHECK_SECONDS:g} s") from None
    except OSError as exc:
        raise VipsUnavailable(
            f"libvips could not be checked ({exc}); install it with: {INSTALL_HINT}"
        ) from None
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        raise VipsUnavailable(lines[-1] if lines else f"the libvips check exited with {result.returncode}")


def supports(im: Image.Image, size: tuple[int, int]) -> bool:
    """Whether ``resize`` handles this image: the modes above, and reductions only (enlarging, rare
    here, stays with Pillow, whose Lanczos the tests hold as the reference)."""
    return im.mode in _WORKING_MODES and size[0] <= im.width and size[1] <= im.height


def resize(im: Image.Image, size: tuple[int, int], *, reducing_gap: float) -> Image.Image:
    """Lanczos-3 resize of ``im`` to exactly ``size`` (see ``supports``).

    ``reducing_gap`` has Pillow's meaning, and libvips's ``gap`` the same: a box shrink by an integer
    factor first, as long as the image stays that many times the target. (Doing that step with Pillow's
    ``reduce()`` instead, to hand libvips fewer pixels, was measured and is worse: large reductions of a
    photo came out at 33-39 dB against a full Lanczos instead of 49-54.)
    """
    return _resize_with(load(), im, size, reducing_gap=reducing_gap)


def _resize_with(vips: Any, im: Image.Image, size: tuple[int, int], *, reducing_gap: float) -> Image.Image:
    from PIL import Image  # noqa: PLC0415 - see the import at the top; already loaded by the caller's image

    mode, band_count = _WORKING_MODES[im.mode]
    working = im if mode == im.mode else im.convert(mode)
    source = vips.Image.new_from_memory(working.tobytes(), im.width, im.height, band_count, "uchar")
    del working  # the packed copy is all libvips needs; the premultiplied one can go now
    target_w, target_h = size
    scaled = source.resize(
        target_w / im.width, vscale=target_h / im.height, kernel="lanczos3", gap=reducing_gap
    )
    if (scaled.width, scaled.height) != size:
        # libvips rounds width x scale to the nearest pixel, which gives back the target exactly (checked
        # on 20 000 random sizes); anything else is a bug to hear about, not an image to serve.
        raise RuntimeError(f"libvips made {scaled.width}x{scaled.height} for a {target_w}x{target_h} target")
    out = Image.frombytes(mode, size, scaled.write_to_memory())
    return out if mode == im.mode else out.convert(im.mode)
