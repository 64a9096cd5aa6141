"""The README documents every setting under its real name, and nothing that does not exist."""

from __future__ import annotations

import re

from optimizer.settings import OTHER_VARIABLES, setting_fields
from tests.conftest import ROOT


def test_readme_lists_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"`(OPTIMIZER_[A-Z_]+)`", readme))
    real = {str(spec.metadata["env"]) for spec in setting_fields()}
    assert real - documented == set(), "settings missing from the README"
    assert documented - real - set(OTHER_VARIABLES) == set(), "the README names settings that do not exist"


def test_readme_quick_start_is_what_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 scripts/dev.py test" in readme
    assert "python3 scripts/dev.py test" in ci
