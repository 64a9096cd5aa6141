"""scripts/transport_floor.py, the floor under the benchmark's goodput / ceiling ratio, run for a moment
so that it cannot rot: each of its three rows must come out, not any speed, and no server it started may
be left running."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import ROOT


def processes_naming(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_transport_floor_script_measures_each_row(tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    Image.linear_gradient("L").resize((640, 480)).convert("RGB").save(photo, quality=90)
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "transport_floor.py"), "--file", str(photo), "--reps", "3",
         "--rounds", "2", "--ceiling", "25"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = [line.split()[0] for line in result.stdout.splitlines() if "ms per upload" in line]
    assert rows == ["kernel", "aiohttp", "optimizer"], result.stdout
    assert result.stdout.count("of an image") == 3, result.stdout
    assert processes_naming(str(photo)) == []  # both servers were stopped


def test_transport_floor_script_refuses_no_rounds() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "transport_floor.py"), "--rounds", "0"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "at least 1" in result.stderr
