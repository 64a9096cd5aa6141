"""optimizer: an image-optimization HTTP service (aiohttp + Pillow).

from optimizer import create_app, Settings
parent.add_subapp("/img", create_app(Settings(threads=4)))
"""

__version__ = "0.1.0"  # before the imports below: optimizer.openapi reads it

from optimizer.app import create_app, drain
from optimizer.gate import AdmissionGate
from optimizer.settings import Settings, SettingsError

__all__ = ["AdmissionGate", "Settings", "SettingsError", "__version__", "create_app", "drain"]
