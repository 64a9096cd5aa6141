"""``python -m optimizer``: the same as the ``optimizer`` console script."""

from optimizer.entry import run

raise SystemExit(run())
