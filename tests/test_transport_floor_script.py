"""scripts/transport_floor.py, the floor under the benchmark's goodput / ceiling ratio, run for a moment
so that it cannot rot: each of its three floors must come out as a row, not any speed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import ROOT


@pytest.mark.slow
def test_transport_floor_script_measures_each_floor(tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    Image.linear_gradient("L").resize((640, 480)).convert("RGB").save(photo, quality=90)
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "transport_floor.py"), "--file", str(photo), "--reps", "3",
         "--ceiling", "25"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [line.split()[0] for line in result.stdout.splitlines() if "ms per upload" in line]
    assert rows == ["kernel", "aiohttp", "optimizer"], result.stdout
    assert result.stdout.count("of an image") == 3, result.stdout
