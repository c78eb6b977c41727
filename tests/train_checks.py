"""Shared checks of training runs (train.run results)."""
from __future__ import annotations


def check_test_metrics(res: dict) -> None:
    """The logged test metrics equal an independent recomputation from the test checkpoint: clean
    accuracy, and IBP / CROWN-IBP verified accuracy at the evaluation ε (certtrain.verification)."""
    from certtrain.verification import load_for_verification, verify_dataset

    module, dm, config = load_for_verification(res["test_ckpt"])
    threat = module.threat
    r = verify_dataset(module.net.eval(), dm.test_dataloader(), threat.at(threat.eval_eps), ["IBP", "CROWN-IBP"],
                       alone=True, pgd_steps=0, progress=False)
    t, n = res["test"], r.n
    assert abs(t["test/clean_acc"] - r.clean_correct.float().mean().item()) < 0.5 / n
    for key, m in (("verified_acc_ibp", "IBP"), ("verified_acc_crown_ibp", "CROWN-IBP")):
        assert abs(t[f"test/{key}"] - r.summary()["alone_acc"][m]) < 0.5 / n, key
