"""The word-substitution attack: every sentence it returns is in the set (at most `budget`
substitutions, each by a candidate of its position), its margins are the model's, and with a wide
beam it finds the exact worst case that exhaustive enumeration finds."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from certtrain.word_attack import margins, word_substitution_attack


class BagOfWords(nn.Module):
    def __init__(self, vocab=14, d=5, out=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc = nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, out))

    def forward(self, ids):
        return self.fc(torch.tanh(self.emb(ids)).mean(1) * 3)


def case(B=6, T=4, K=2, vocab=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (B, T), generator=g)
    cands = torch.randint(2, vocab, (B, T, K), generator=g)
    cands[torch.rand(B, T, K, generator=g) < 0.3] = -1
    y = torch.randint(0, 3, (B,), generator=g)
    return ids, cands, y


def worst_by_enumeration(model, ids, cands, y, budget):
    out = []
    for b in range(len(ids)):
        T, K = cands.shape[1:]
        sents = [ids[b]]
        for r in range(1, budget + 1):
            for pos in itertools.combinations(range(T), r):
                opts = [[c for c in cands[b, t].tolist() if c >= 0] for t in pos]
                for choice in itertools.product(*opts):
                    s = ids[b].clone()
                    s[list(pos)] = torch.tensor(choice)
                    sents.append(s)
        out.append(margins(model(torch.stack(sents)), y[b].expand(len(sents))).min())
    return torch.stack(out)


def n_changes(a, b):
    return (a != b).sum(1)


@pytest.mark.parametrize("budget", [1, 2, 3])
def test_wide_beam_finds_the_exact_worst_case(budget):
    torch.manual_seed(0)
    model = BagOfWords().double()
    ids, cands, y = case(seed=budget)
    with torch.no_grad():
        res = word_substitution_attack(model, ids, cands, y, budget, beam=10_000)
        exact = worst_by_enumeration(model, ids, cands, y, budget)
    # examples broken early stop searching; the others explored everything
    done = res.broken_at > budget
    torch.testing.assert_close(res.margin[done].double(), exact[done], rtol=0, atol=1e-9)
    assert (exact[~done] < 0).all()
    assert ((exact < 0) == (res.broken_at <= budget)).all()


@pytest.mark.parametrize("beam", [1, 3])
def test_returned_sentences_are_in_the_set(beam):
    torch.manual_seed(1)
    model = BagOfWords()
    ids, cands, y = case(B=16, T=6, K=3, seed=5)
    budget = 3
    res = word_substitution_attack(model, ids, cands, y, budget, beam=beam)
    ch = n_changes(res.ids, ids)
    assert (ch <= budget).all()
    changed = res.ids != ids
    b, t = changed.nonzero(as_tuple=True)
    assert (cands[b, t] == res.ids[b, t].unsqueeze(1)).any(1).all()  # each change is a candidate
    with torch.no_grad():
        m = margins(model(res.ids), y)
    torch.testing.assert_close(m, res.margin)
    broken = res.broken_at <= budget
    assert (res.margin[broken] < 0).all() and (res.margin[~broken] >= 0).all()
    assert (ch[broken] <= res.broken_at[broken]).all()
    # a budget's robustness is the prefix of the search
    assert (res.robust(1) >= res.robust(2)).all() and (res.robust(2) >= res.robust(3)).all()


def test_no_candidates_means_nothing_to_attack():
    model = BagOfWords()
    ids, cands, y = case()
    res = word_substitution_attack(model, ids, torch.full_like(cands, -1), y, 3)
    assert torch.equal(res.ids, ids)
    with torch.no_grad():
        clean = margins(model(ids), y) >= 0
    assert torch.equal(res.robust(3), clean)


@pytest.mark.parametrize("kw, match", [(dict(budget=-1), "budget"), (dict(budget=1, beam=0), "beam")])
def test_bad_arguments(kw, match):
    ids, cands, y = case()
    with pytest.raises(ValueError, match=match):
        word_substitution_attack(BagOfWords(), ids, cands, y, **kw)
