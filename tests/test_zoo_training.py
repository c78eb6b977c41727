"""A short certified-training run of every method on every model of the zoo (small widths)."""
from __future__ import annotations

import math

import pytest

from test_training import run_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {
    "mlp": ["model.hidden=[16]"],
    "cnn_small": ["model.width=4", "model.linear_size=16"],
    "cnn_7layer": ["model.width=4", "model.linear_size=16"],
    "cnn_7layer_bn": ["model.width=4", "model.linear_size=16"],
    "dm_large": ["model.width=4", "model.linear_size=16"],
    "resnet": ["model.widths=[4,8]", "model.num_blocks=[1,1]"],
    "resnext": ["model.bottleneck_width=2", "model.stem_width=4", "model.linear_size=16"],
    "densenet": ["model.growth_rate=4", "model.num_blocks=[1,1,1]", "model.linear_size=16"],
    "wide_resnet": ["model.widen_factor=1", "model.linear_size=16"],
}
METHODS = {"natural": ["method=natural"], "ibp": ["method=ibp"], "crown_ibp": ["method=crown_ibp"],
           "crown_ibp_fused": ["method=crown_ibp", "method.loss_fusion=true"]}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("model", list(SMALL))
def test_each_model_each_method(tmp_path, model, method):
    res = run_cfg(tmp_path, [f"model={model}", *SMALL[model], *METHODS[method], "trainer.max_epochs=1",
                             "dataset.train_subset=32", "dataset.val_size=32", "dataset.test_subset=32",
                             "dataset.batch_size=16", "eval.crown=false", "eval.pgd_steps=2"])
    t = res["test"]
    assert math.isfinite(t["test/clean_acc"]) and t["test/unsound"] == 0.0
    # a misclassified sample has a negative margin, so a sound bound never verifies it
    assert t["test/verified_acc_ibp"] <= t["test/clean_acc"] + 1e-9
