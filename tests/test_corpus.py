"""The corpus must be there under CI: the tests parametrised over it would otherwise all skip quietly."""

from __future__ import annotations

from tests.conftest import corpus_dir, manifest


def test_corpus_is_present() -> None:
    root = corpus_dir()  # skips locally without the corpus, fails under CI=true
    rows = manifest()
    assert rows, "MANIFEST.csv is empty"
    missing = [row["file"] for row in rows if not (root / row["file"]).is_file()]
    assert missing == []
