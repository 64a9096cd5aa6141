"""``python -m optimizer``: the same as the ``optimizer`` console script."""

from optimizer.server import run

raise SystemExit(run())
