"""scripts/engines.py, the per-engine pipeline comparison, run for a moment so that it cannot rot: it
must print a row per variant (libvips ones included, the test extra installs them), not any speed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests.conftest import ROOT, vips_or_skip


def test_engines_script_compares_the_variants(tmp_path: Path) -> None:
    vips_or_skip()
    photo = tmp_path / "photo.jpg"
    Image.linear_gradient("L").resize((640, 480)).convert("RGB").save(photo, quality=90)
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "engines.py"), "--file", str(photo), "--width", "100",
         "--seconds", "0.2", "--rounds", "1", "--threads", "1", "--baseline"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    table = result.stdout.split("\n\n")[-1]
    assert "baseline JPEG" in result.stdout
    for variant in ("pillow ", "pillow+vips", "libvips"):
        assert variant in table, result.stdout


def test_engines_script_refuses_nothing_to_measure(tmp_path: Path) -> None:
    for flags in (["--rounds", "0"], ["--seconds", "0"], ["--threads", "0"]):
        result = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "engines.py"), *flags],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert "must be" in result.stderr
