"""optimizer: an image-optimization HTTP service (aiohttp + Pillow).

from optimizer import create_app, Settings
parent.add_subapp("/img", create_app(Settings(threads=4)))

The names below are imported on first use (PEP 562): the ``optimizer`` command restarts itself once for
the allocator (``optimizer.entry``), and a package that imported aiohttp and Pillow up front would make
it load them twice, doubling the start-up time.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from optimizer.app import create_app, drain
    from optimizer.gate import AdmissionGate
    from optimizer.settings import Settings, SettingsError

__all__ = ["AdmissionGate", "Settings", "SettingsError", "__version__", "create_app", "drain"]

_HOMES = {
    "create_app": "optimizer.app",
    "drain": "optimizer.app",
    "AdmissionGate": "optimizer.gate",
    "Settings": "optimizer.settings",
    "SettingsError": "optimizer.settings",
}


if not TYPE_CHECKING:  # type checkers see the imports above, and still catch a misspelt name

    def __getattr__(name: str) -> object:
        home = _HOMES.get(name)
        if home is not None:
            value = getattr(importlib.import_module(home), name)
        elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            # ``import optimizer; optimizer.settings`` worked while the package imported everything up
            # front; importing the submodule here keeps it working.
            value = importlib.import_module(f"{__name__}.{name}")
        else:
            raise AttributeError(f"module 'optimizer' has no attribute {name!r}")
        globals()[name] = value  # later lookups skip this function
        return value


def __dir__() -> list[str]:
    return sorted(__all__)
