"""certtrain.bounds against the stored results of auto_LiRPA's own test suite.

The oracle is ``shared/autolirpa_refs`` (override with ``$CERTTRAIN_AUTOLIRPA_REFS``): auto_LiRPA
0.7.1's ``tests/data`` (float32) and ``tests/data_64`` (float64) reference files, plus "bundles"
recorded from its test runs (exact weights, inputs, perturbations and bounds).  Its README
documents every file; the models are rebuilt in ``autolirpa_models.py``.  Every reference whose
ops and method certtrain supports (IBP, CROWN, CROWN-IBP; no alpha-CROWN, forward mode, Jacobian,
weight perturbation, ...) is reproduced here with the reference test's own tolerance.

Inputs and weights come from the reference files or bundles; where a float64 file has only a seed
recipe, the recipe is replayed with float64 as default dtype (``test_seed_recipes_match_bundles``
checks that the same replay in float32 gives exactly the bundle's weights and inputs).

Findings recorded below (see each test's docstring):

* auto_LiRPA builds BatchNorm nodes with ``training=False`` whatever the wrapped model's mode, so
  the "training-mode" references (rectangle/ResNet18) are bounds with the running statistics
  (the freshly initialised 0/1); they are reproduced with the model in eval mode.
* MaxPool2d with padding: auto_LiRPA's relaxation misplaces its slopes (xfail, diagnosed).
* Sigmoid on boxes that contain 0: auto_LiRPA uses the tangent at the midpoint when its tabulated
  tangent point lies beyond it ("smoothness enhancement"); matched exactly, plus a soundness check.

The three heaviest cases (float64 ResNet18, dense-mode AvgPool on 8x32x32 in both dtypes; under
4 GB since bounds run under torch.no_grad()) can be skipped with ``CERTTRAIN_AUTOLIRPA_FULL=0``.
"""
from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import autolirpa_models as am
from bound_checks import assert_sound
from certtrain.bounds import BoundedModule, BoundedTensor, PerturbationLpNorm


def _refs_dir() -> Path:
    env = os.environ.get("CERTTRAIN_AUTOLIRPA_REFS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "autolirpa_refs"


REFS = _refs_dir()
pytestmark = pytest.mark.skipif(
    not (REFS / "data").is_dir(),
    reason=f"auto_LiRPA references not found at {REFS} (set CERTTRAIN_AUTOLIRPA_REFS)")

INF = float("inf")
F32 = pytest.param("data", torch.float32, id="float32")
F64 = pytest.param("data_64", torch.float64, id="float64")
DATASETS = [F32, F64]
CONV_MODES = ["patches", "matrix"]

# The three heaviest cases (5-7 s each on 2 idle cores) run by default; CERTTRAIN_AUTOLIRPA_FULL=0
# skips them (each has a cheaper sibling: the same model in float32, or the same dtype in patches
# mode).
FULL = os.environ.get("CERTTRAIN_AUTOLIRPA_FULL", "1") not in ("", "0")


def _heavy(what: str):
    return pytest.mark.skipif(not FULL, reason=f"heavy ({what}); CERTTRAIN_AUTOLIRPA_FULL=0")


@functools.lru_cache(maxsize=None)
def _load(rel: str):
    return torch.load(REFS / rel, weights_only=True, map_location="cpu")


def _bundle(name: str) -> dict:
    return _load(f"bundles/{name}.pt")


def _top_calls(bundle: dict) -> list:
    """compute_bounds calls made by the test itself (not auto_LiRPA's internal ones)."""
    return [c for c in bundle["calls"] if c["depth"] == 0]


@contextmanager
def _default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _cifar_image(dtype) -> torch.Tensor:
    """CIFAR-10 test image 0 as the tests load it: HWC bytes *reshaped* (not transposed) to
    (1, 3, 32, 32), then /255."""
    img = np.load(REFS / "samples" / "cifar10_test_1.npy")
    return torch.tensor(img.reshape(1, 3, 32, 32)).to(dtype) / 255.0


def _box(x: torch.Tensor, x_L: torch.Tensor, x_U: torch.Tensor) -> PerturbationLpNorm:
    """The box [x_L, x_U] (auto_LiRPA's PerturbationLpNorm(x_L=, x_U=) without eps): our eps is
    intersected with the domain, so take one that covers the whole box around x."""
    return PerturbationLpNorm(norm=INF, eps=torch.maximum(x - x_L, x_U - x), x_L=x_L, x_U=x_U)


# auto_LiRPA replaces an intermediate bound by its CROWN bound; ours keeps CROWN ∩ IBP by default
# (tighter). Equality with the references needs auto_LiRPA's rule.
PEER = {"intersect_intermediate": False}


def _bounds(model, x, ptb, method="CROWN", **opts):
    net = BoundedModule(model, x, bound_opts={**PEER, **opts})
    with torch.no_grad():  # values only: autograd would keep every coefficient matrix alive
        return net.compute_bounds(x=(BoundedTensor(x, ptb),), method=method)


def _check(ours, ref, rtol, atol, what, sse=None):
    ref = ref.detach().to(ours.dtype)
    ours = ours.detach()
    err = (ours - ref).abs().max().item()
    assert torch.allclose(ours, ref, rtol=rtol, atol=atol), f"{what}: max |ours - ref| = {err:.3e}"
    if sse is not None:
        s = (ours - ref).pow(2).sum().item()
        assert s < sse, f"{what}: sum of squared errors {s:.3e} >= {sse:g}"


# ------------------------------------------------------------------ seed recipes used for float64

def _constant_recipe():
    torch.manual_seed(1)
    model = am.cnn_MNIST()
    return model, torch.randn(2, 1, 28, 28) / 255.0


AVGPOOL_CONFIGS = [(5, 8, 3, 1, 1), (32, 16, 2, 2, 0)]  # (side, hidden, kernel, stride, padding)


def _avgpool_recipe(config: int):
    torch.manual_seed(1234)
    for i in range(config + 1):
        d = AVGPOOL_CONFIGS[i][0]
        model = am.avgpool_model(*AVGPOOL_CONFIGS[i])
        x = torch.randn(8, 1, d, d)
    return model, x


def _rectangle_recipe():
    torch.manual_seed(1234)
    return am.cnn_4layer_resnet()


def _resnet_recipe():
    torch.manual_seed(1234)
    return am.model_resnet(width=1, mult=2), am.ResNet18(in_planes=2)


def _same_state(model, state_dict) -> bool:
    own = model.state_dict()
    return own.keys() == state_dict.keys() and all(torch.equal(own[k], v) for k, v in state_dict.items())


def test_seed_recipes_match_bundles():
    """The float64 references only have seed recipes; replayed in float32 they give exactly the
    weights and inputs recorded in the bundles, and the rebuilt architectures print like the
    recorded ``model_repr`` (up to torch's newer ``bias=True`` in BatchNorm's repr)."""
    def same_repr(model, rec):
        return repr(model).replace("affine=True, bias=True,", "affine=True,") == rec["model_repr"]

    b = _bundle("test_constant.py__TestConstant__test")
    model, x = _constant_recipe()
    assert torch.equal(x, _top_calls(b)[0]["roots"][0]["value"])
    assert same_repr(model, b["modules"][0])

    b = _bundle("test_avgpool.py__TestAvgPool__test")
    for config in (0, 1):
        model, x = _avgpool_recipe(config)
        assert _same_state(model, b["modules"][2 * config]["state_dict"])
        assert _same_state(model, b["modules"][2 * config + 1]["state_dict"])
        assert same_repr(model, b["modules"][2 * config])
        assert torch.equal(x, _top_calls(b)[2 * config]["roots"][0]["value"])

    b = _bundle("test_rectangle_patches.py__TestResnetPatches__test")
    model = _rectangle_recipe()
    assert _same_state(model, b["modules"][0]["state_dict"])
    assert same_repr(model, b["modules"][0])
    assert torch.equal(_cifar_image(torch.float32)[:, :, :28, :], _top_calls(b)[0]["roots"][0]["value"])

    b = _bundle("test_resnet_patches.py__TestResnetPatches__test")
    for model, rec in zip(_resnet_recipe(), b["modules"]):
        assert _same_state(model, rec["state_dict"])
        assert same_repr(model, rec)
    assert torch.equal(_cifar_image(torch.float32), _top_calls(b)[0]["roots"][0]["value"])


# ------------------------------------------------------------------ vision_test_data

# Calls of tests/test_vision_models.py in order (key, method, bound_opts); the CROWN-Optimized
# calls in between are out of scope.  x.grad is never zeroed, so each stored gradient is the
# running sum over the calls so far of the same norm block.
VISION_CALLS = [("IBP", "IBP", {}), ("CROWN-IBP", "CROWN-IBP", {}), ("CROWN", "CROWN", {}),
                ("CROWN-same-slope", "CROWN", {"relu": "same-slope"})]


@pytest.mark.parametrize("norm", ["inf", "2"])
@pytest.mark.parametrize("conv_mode", CONV_MODES)
@pytest.mark.parametrize("folder,dtype", DATASETS)
def test_vision(folder, dtype, conv_mode, norm):
    """cnn_4layer_test (eval BN, residual conv), Linf/L2 eps 0.01: IBP, CROWN-IBP, CROWN, CROWN
    with same-slope ReLU lower bounds; bounds (rtol 1e-4, atol 2e-7, SSE < 1.3e-9) and the
    accumulated input gradients of sum|ub - lb| (rtol 1e-4, atol 1e-6, SSE < 1e-6).

    Not checked: the float32 ``l_*_CROWN-same-slope_grad``.  In the float32 file (older test
    version, key order IBP, CROWN-IBP, CROWN, CROWN-Optimized, CROWN-same-slope) the CROWN-Optimized
    call sits before same-slope and its 20 alpha-CROWN iterations also backpropagate into x.grad,
    so that entry contains alpha-CROWN gradients (its residual after our same-slope gradient is
    ~17x a CROWN gradient, cosine 0.92-0.997 with it); auto_LiRPA's test does not check it either.
    The float64 file was made with same-slope before CROWN-Optimized, and is checked."""
    ref = _load(f"{folder}/vision_test_data")
    model = am.cnn_4layer_test()
    model.load_state_dict(ref["model"])
    model = model.to(dtype).eval()
    x0 = ref["data"].to(dtype)
    x = x0.clone().requires_grad_()
    ptb = PerturbationLpNorm(norm=INF if norm == "inf" else 2.0, eps=0.01)
    for key, method, opts in VISION_CALLS:
        net = BoundedModule(model, x0, bound_opts={"conv_mode": conv_mode, **PEER, **opts})
        lb, ub = net.compute_bounds(x=(BoundedTensor(x, ptb),), method=method)
        (ub - lb).abs().sum().backward()
        name = f"l_{norm}_{key}"
        _check(lb, ref[f"{name}_lb"], 1e-4, 2e-7, f"{name}_lb", sse=1.3e-9)
        _check(ub, ref[f"{name}_ub"], 1e-4, 2e-7, f"{name}_ub", sse=1.3e-9)
        if key == "CROWN-same-slope" and folder == "data":
            continue  # contains alpha-CROWN gradients, see the docstring
        _check(x.grad, ref[f"{name}_grad"], 1e-4, 1e-6, f"{name}_grad", sse=1e-6)


@pytest.mark.parametrize("relu", ["adaptive", "same-slope"])
@pytest.mark.parametrize("norm", ["inf", "2"])
@pytest.mark.parametrize("folder,dtype", DATASETS)
def test_vision_alpha_crown(folder, dtype, norm, relu, one_thread):
    """CROWN-Optimized (α-CROWN, lr_alpha 0.1, 20 iterations) on cnn_4layer_test.  Equality would
    need auto_LiRPA's exact optimizer trajectory, so (as the references' README advises) check that
    ours is at least as tight as auto_LiRPA's on every output (measured: looser by at most 8e-6 on
    bounds of magnitude 0.1, tighter on average; same-slope: tighter everywhere), never looser than
    our CROWN, and sound."""
    ref = _load(f"{folder}/vision_test_data")
    model = am.cnn_4layer_test()
    model.load_state_dict(ref["model"])
    model = model.to(dtype).eval()
    x0 = ref["data"].to(dtype)
    ptb = PerturbationLpNorm(norm=INF if norm == "inf" else 2.0, eps=0.01)
    net = BoundedModule(model, x0, bound_opts={"relu": relu})
    x = BoundedTensor(x0, ptb)
    with torch.no_grad():
        lc, uc = net.compute_bounds(x=(x,), method="CROWN")
        lb, ub = net.compute_bounds(x=(x,), method="alpha-CROWN", optimize_bound_args={"lr_alpha": 0.1})
    key = f"l_{norm}_CROWN-Optimized" + ("-same-slope" if relu == "same-slope" else "")
    rl, ru = ref[f"{key}_lb"].to(dtype), ref[f"{key}_ub"].to(dtype)
    assert (lb >= rl - 2e-5).all(), f"{key}_lb: ours looser by {(rl - lb).max().item():.3e}"
    assert (ub <= ru + 2e-5).all(), f"{key}_ub: ours looser by {(ub - ru).max().item():.3e}"
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert (lb >= lc - tol).all() and (ub <= uc + tol).all()
    if norm == "inf" and relu == "adaptive" and dtype == torch.float32:  # sound (one case: PGD is slow)
        # the traced graph: the model's in-place residual add, out of place (autograd attacks it)
        assert_sound(net.graph_module, x0[:2], ptb, lb[:2], ub[:2], n_random=50, pgd_steps=10)


# ------------------------------------------------------------------ constant_test_data

@pytest.mark.parametrize("conv_mode", CONV_MODES)
@pytest.mark.parametrize("folder,dtype", DATASETS)
def test_constant(folder, dtype, conv_mode):
    """cnn_MNIST with constant multiplications (x*2.0, out*0.5), pretrained weights
    (mnist_cnn_small.pth == the bundle's state dict), Linf eps 0.3, CROWN; rtol 5e-4, atol 1e-6."""
    b = _bundle("test_constant.py__TestConstant__test")
    if dtype == torch.float32:
        model, x = am.cnn_MNIST(), _top_calls(b)[0]["roots"][0]["value"]
    else:
        with _default_dtype(dtype):
            model, x = _constant_recipe()
    model.load_state_dict(b["modules"][0]["state_dict"])
    model = model.to(dtype)
    lb, ub = _bounds(model, x, PerturbationLpNorm(norm=INF, eps=0.3), conv_mode=conv_mode)
    ref_lb, ref_ub = _load(f"{folder}/constant_test_data")
    _check(lb, ref_lb, 5e-4, 1e-6, "lb")
    _check(ub, ref_ub, 5e-4, 1e-6, "ub")


# ------------------------------------------------------------------ avgpool_test_data

def _avgpool_cases():
    for ds in DATASETS:
        for config, cid in ((0, "k3s1p1"), (1, "k2s2p0")):
            for mode in CONV_MODES:
                # 8x1x32x32 input in dense (matrix) mode peaks at 5 GB (float32) / 7.6 GB (float64);
                # patches mode (same reference values to 1e-6) runs by default.
                heavy = (config, mode) == (1, "matrix")
                marks = [_heavy("dense CROWN on 8x32x32, 5-7.6 GB")] if heavy else []
                yield pytest.param(*ds.values, config, mode, id=f"{ds.id}-{cid}-{mode}", marks=marks)


@pytest.mark.parametrize("folder,dtype,config,conv_mode", list(_avgpool_cases()))
def test_avgpool(folder, dtype, config, conv_mode):
    """Conv/ReLU/AvgPool x4 + MLP, Linf eps 100, CROWN; reference list [lbP, ubP, lbM, ubM] per
    config (P: patches, M: matrix); rtol 1e-5, atol 1e-6."""
    if dtype == torch.float32:
        b = _bundle("test_avgpool.py__TestAvgPool__test")
        model = am.avgpool_model(*AVGPOOL_CONFIGS[config])
        model.load_state_dict(b["modules"][2 * config]["state_dict"])
        x = _top_calls(b)[2 * config]["roots"][0]["value"]
    else:
        with _default_dtype(dtype):
            model, x = _avgpool_recipe(config)
    model.eval()
    lb, ub = _bounds(model, x, PerturbationLpNorm(norm=INF, eps=100.0), conv_mode=conv_mode)
    ref = _load(f"{folder}/avgpool_test_data")
    i = 4 * config + (2 if conv_mode == "matrix" else 0)
    _check(lb, ref[i], 1e-5, 1e-6, "lb")
    _check(ub, ref[i + 1], 1e-5, 1e-6, "ub")


# ------------------------------------------------------------------ rectangle_patches_test_data

@pytest.mark.parametrize("conv_mode", CONV_MODES)
@pytest.mark.parametrize("folder,dtype", DATASETS)
def test_rectangle_patches(folder, dtype, conv_mode):
    """cnn_4layer_resnet on a 28x32 crop of CIFAR image 0, Linf eps 0.03, CROWN; rtol 1e-5, atol 1e-6.

    The original model is left in training mode, but auto_LiRPA 0.7.1 creates every
    BoundBatchNormalization with ``training=False`` ("avoid wrongly updating running mean/vars",
    bound_general._convert_nodes) and the test never calls ``BoundedModule.train()``: the reference
    bounds BN with its running statistics, still the initial 0/1 (checked: eval mode matches to
    1e-7, batch statistics differ by 1.18).  certtrain follows the wrapped model's mode, so the
    model is put in eval mode here."""
    if dtype == torch.float32:
        model = am.cnn_4layer_resnet()
        model.load_state_dict(_bundle("test_rectangle_patches.py__TestResnetPatches__test")
                              ["modules"][0]["state_dict"])
    else:
        with _default_dtype(dtype):
            model = _rectangle_recipe()
    model.eval()
    x = _cifar_image(dtype)[:, :, :28, :]
    lb, ub = _bounds(model, x, PerturbationLpNorm(norm=INF, eps=0.03), conv_mode=conv_mode)
    ref_lb, ref_ub = _load(f"{folder}/rectangle_patches_test_data")
    _check(lb, ref_lb, 1e-5, 1e-6, "lb")
    _check(ub, ref_ub, 1e-5, 1e-6, "ub")


# ------------------------------------------------------------------ resnet_patches_test_data

def _resnet_models(dtype):
    if dtype == torch.float32:
        b = _bundle("test_resnet_patches.py__TestResnetPatches__test")
        models = (am.model_resnet(width=1, mult=2), am.ResNet18(in_planes=2))
        for m, rec in zip(models, b["modules"]):
            m.load_state_dict(rec["state_dict"])
    else:
        with _default_dtype(dtype):
            models = _resnet_recipe()
    return models


def _resnet_cases():
    for ds in DATASETS:
        for which, wid in ((0, "dense_sequential"), (1, "resnet18")):
            # ResNet18 in float64 peaks at 5.8 GB (3.4 GB in float32, which runs by default).
            marks = [_heavy("float64 ResNet18, 5.8 GB")] if (ds.id, which) == ("float64", 1) else []
            yield pytest.param(*ds.values, which, id=f"{ds.id}-{wid}", marks=marks)


@pytest.mark.parametrize("folder,dtype,which", list(_resnet_cases()))
def test_resnet_patches(folder, dtype, which):
    """model_resnet(width=1, mult=2) (DenseSequential: Dense layers sum convs of earlier layer
    outputs) and ResNet18(in_planes=2) (BasicBlocks with BN, F.avg_pool2d(out, 4)) on CIFAR image
    0, Linf eps 0.03, CROWN in patches mode (the reference's mode); rtol 1e-5, atol 1e-6.
    ResNet18 is in eval mode for the reason given in test_rectangle_patches."""
    model = _resnet_models(dtype)[which].eval()
    x = _cifar_image(dtype)
    lb, ub = _bounds(model, x, PerturbationLpNorm(norm=INF, eps=0.03), conv_mode="patches")
    ref = _load(f"{folder}/resnet_patches_test_data")
    _check(lb, ref[2 * which], 1e-5, 1e-6, "lb")
    _check(ub, ref[2 * which + 1], 1e-5, 1e-6, "ub")


# ------------------------------------------------------------------ maxpool_test_data_K-P-K-CP

MAXPOOL_FILES = ["3-0-3-0", "3-0-3-1", "3-1-3-0", "3-1-3-1", "4-0-4-0", "4-0-4-1", "4-1-4-0", "4-1-4-1"]

# Padded MaxPool (files K-1-K-CP) -- diagnosis of the xfail below.  auto_LiRPA 0.7.1's
# BoundMaxPool.bound_backward gets the argmax of each window from
# F.max_pool2d(l, k, s, p, return_indices=True), i.e. flat positions in the UNpadded HxW input, and
# scatters them into a zero-padded (H+2p)x(W+2p) frame that it later crops: the slope-1 entries of
# the lower line (y >= x_i*) and of the upper line of dominated windows land on shifted pixels,
# and padding cells (upper bound 0) compete in the "largest upper bound of the others" test.  A
# test-local emulation of exactly that rule (matrix mode) reproduces all four padded references
# (to 1e-7 in float32, 1e-16 in float64).  certtrain uses the aligned window argmax and -inf
# padding.  Max |ours - ref| (float32 / float64): 3-1-3-0 9.5e-3 / 3.0e-2, 3-1-3-1 1.9e-1 / 3.3e-1,
# 4-1-4-0 5.7e-2 / 2.2e-1, 4-1-4-1 2.3e-2 / 0 (in float64 every neuron of 4-1-4-1 is dead, so it
# matches).  Neither side is uniformly tighter; ours is sound (test_maxpool_padded_sound).
_MAXPOOL_PADDING_XFAIL = pytest.mark.xfail(strict=True, reason=(
    "MaxPool2d padding>0: auto_LiRPA 0.7.1 scatters unpadded argmax indices into a padded frame "
    "(misplaced slopes); an emulation of its rule reproduces the reference exactly; see comment"))


def _maxpool_cases():
    for name in MAXPOOL_FILES:
        padded = name.split("-")[1] != "0"
        for ds in DATASETS:
            folder = ds.values[0]
            # 4-1-4-1 float64: every output neuron is dead, lb = ub = the bias on both sides.
            xfail = padded and not (name == "4-1-4-1" and folder == "data_64")
            yield pytest.param(name, *ds.values, id=f"{name}-{ds.id}",
                               marks=[_MAXPOOL_PADDING_XFAIL] if xfail else [])


def _maxpool_model(name, folder, dtype):
    ref = _load(f"{folder}/maxpool_test_data_{name}.plain.pt")
    k, p, _, cp = map(int, name.split("-"))
    model = am.MaxPoolModel(k, p, cp, ref["model"]["n_n_dense.weight"].shape[1])
    model.load_state_dict(ref["model"])
    return model.to(dtype), ref["input"].to(dtype), ref


@pytest.mark.parametrize("conv_mode", CONV_MODES)
@pytest.mark.parametrize("name,folder,dtype", list(_maxpool_cases()))
def test_maxpool(name, folder, dtype, conv_mode):
    """Conv -> ReLU -> MaxPool(K, stride K, padding P) -> Conv -> ReLU -> permute/flatten/unsqueeze
    -> 1x1 conv, Linf eps 0.3, CROWN; reference made in matrix mode, patches must agree; rtol 1e-4
    (atol 1e-8)."""
    model, x, ref = _maxpool_model(name, folder, dtype)
    lb, ub = _bounds(model, x, PerturbationLpNorm(norm=INF, eps=0.3), conv_mode=conv_mode)
    _check(lb, ref["lb"], 1e-4, 1e-8, "lb")
    _check(ub, ref["ub"], 1e-4, 1e-8, "ub")


@pytest.mark.parametrize("name", [n for n in MAXPOOL_FILES if n.split("-")[1] != "0"])
def test_maxpool_padded_sound(name):
    """Where our padded-MaxPool bounds differ from auto_LiRPA's (xfail above), they are sound:
    random points and corners of the Linf ball stay inside [lb, ub] (float64)."""
    model, x, _ = _maxpool_model(name, "data_64", torch.float64)
    lb, ub = _bounds(model, x, PerturbationLpNorm(norm=INF, eps=0.3))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i in range(x.shape[0]):
            d = torch.rand(400, *x.shape[1:], generator=gen, dtype=x.dtype) * 2 - 1
            d[200:] = d[200:].sign()
            out = model(x[i:i + 1] + 0.3 * d)
            assert (out >= lb[i] - 1e-9).all() and (out <= ub[i] + 1e-9).all()


# ------------------------------------------------------------------ test_perturbation_data

@pytest.mark.parametrize("folder,dtype", DATASETS)
def test_perturbation_box(folder, dtype):
    """Second entry: Linear(4,8) -> ReLU -> Linear(8,4) over the plain box (x_L, x_U) that the
    first entry's PerturbationLinear concretizes to (x is its centre, eps its half-width); CROWN,
    rtol 1e-5, atol 1e-6.  The first entry (PerturbationLinear) is out of scope."""
    if folder == "data_64":
        pytest.skip("data_64 has no test_perturbation_data")
    b = _bundle("test_perturbation.py__TestPerturbation__test")
    call = _top_calls(b)[1]
    p = call["roots"][0]["perturbation"]
    x = call["roots"][0]["value"].to(dtype)
    model = am.ToyModel()
    model.load_state_dict(b["modules"][1]["state_dict"])
    model = model.to(dtype)
    lb, ub = _bounds(model, x, _box(x, p["x_L"].to(dtype), p["x_U"].to(dtype)))
    ref_lb, ref_ub = _load(f"{folder}/test_perturbation_data")[1]
    _check(lb, ref_lb, 1e-5, 1e-6, "lb")
    _check(ub, ref_ub, 1e-5, 1e-6, "ub")


# ------------------------------------------------------------------ test_constrained_concretize

@pytest.mark.parametrize("folder,dtype", DATASETS)
def test_constrained_concretize_box(folder, dtype):
    """First pair: 2-2-1 ReLU net with fixed weights, x = [1, 1] in the box x_L = [-1, -2],
    x_U = [2, 1] (x is not the box centre), CROWN -> [-3, 3]; rtol 1e-5, atol 1e-6.  The second
    pair (box plus the linear input constraint x0 + x1 + 2 <= 0) is out of scope."""
    b = _bundle("test_constrained_concretize.py__TestConstrainedConcretize__test")
    root = _top_calls(b)[0]["roots"][0]
    x = root["value"].to(dtype)
    p = root["perturbation"]
    model = am.ConstrainedConcretizeModel().to(dtype)
    lb, ub = _bounds(model, x, _box(x, p["x_L"].to(dtype), p["x_U"].to(dtype)))
    ref = _load(f"{folder}/test_constrained_concretize")
    _check(lb, ref[0], 1e-5, 1e-6, "lb")
    _check(ub, ref[1], 1e-5, 1e-6, "ub")


# ------------------------------------------------------------------ s_shape_test_data (sigmoid)

def _sigmoid_case(folder, dtype):
    """Entry 4 of s_shape_test_data: CROWN of sigmoid over x_L = [-2, -0.1], x_U = [0.1, 2]
    (entries 0-3 are sin, entry 5 is CROWN-Optimized: out of scope)."""
    b = _bundle("test_s_shaped.py__TestSShaped__test")
    call = next(c for c in _top_calls(b) if c["module_idx"] == 2 and c["method"] == "CROWN")
    p = call["roots"][0]["perturbation"]
    x = call["roots"][0]["value"].to(dtype)
    x_L, x_U = p["x_L"].to(dtype), p["x_U"].to(dtype)
    lb, ub = _bounds(am.SigmoidModel(), x, _box(x, x_L, x_U))
    ref_lb, ref_ub = _load(f"{folder}/s_shape_test_data")[4]
    return lb.detach(), ub.detach(), ref_lb, ref_ub, x_L, x_U


# Sigmoid.  For l < 0 < u, on [-2, 0.1] (lower line) and [-0.1, 2] (upper line), auto_LiRPA
# 0.7.1's BoundSShaped.bound_relax_impl first takes the tangent at its tabulated point d_lower
# (tangent through (u, f(u)), about -0.05 here), then applies its default "smoothness enhancement":
# when d_lower >= m = (l+u)/2 (resp. d_upper < m) it uses the tangent at the midpoint m = -0.95
# (resp. +0.95) instead, giving lb 0.0677213 / ub 0.9322787 (the midpoint tangent reproduces them
# to 1e-16 in float64).  A certtrain that keeps the tangent through (u, f(u)) is sound but differs
# by 0.0674 there (lb 0.00031 / ub 0.99969); the other two entries are exact end values.
@pytest.mark.parametrize("folder,dtype", DATASETS)
def test_s_shape_sigmoid_crown(folder, dtype):
    """CROWN of sigmoid on the boxes [-2, 0.1] and [-0.1, 2] (entry 4); rtol 1e-5, atol 1e-6."""
    lb, ub, ref_lb, ref_ub, _, _ = _sigmoid_case(folder, dtype)
    _check(lb, ref_lb, 1e-5, 1e-6, "lb")
    _check(ub, ref_ub, 1e-5, 1e-6, "ub")


@pytest.mark.parametrize("folder,dtype", DATASETS)
def test_s_shape_sigmoid_alpha_crown(folder, dtype):
    """CROWN-Optimized of sigmoid on the same boxes (entry 5): optimizing the tangent points makes
    ours at least as tight as auto_LiRPA's (measured: lb 0.1192 = sigmoid(-2) against its 0.1180,
    ub 0.8808 against 0.8820), and it contains sigmoid on a dense grid."""
    _, _, _, _, x_L, x_U = _sigmoid_case(folder, dtype)
    x = (x_L + x_U) / 2
    net = BoundedModule(am.SigmoidModel(), x)
    with torch.no_grad():
        lb, ub = net.compute_bounds(x=(BoundedTensor(x, _box(x, x_L, x_U)),), method="alpha-CROWN")
    ref_lb, ref_ub = (t.to(dtype) for t in _load(f"{folder}/s_shape_test_data")[5])
    assert (lb >= ref_lb - 1e-6).all() and (ub <= ref_ub + 1e-6).all(), (lb, ub, ref_lb, ref_ub)
    assert (lb > ref_lb + 1e-4).any() and (ub < ref_ub - 1e-4).any()
    t = torch.linspace(0, 1, 200001, dtype=dtype).unsqueeze(1)
    y = torch.sigmoid(x_L + t * (x_U - x_L))
    tol = 8 * torch.finfo(dtype).eps  # the optimal lines touch sigmoid at the box's ends: rounding
    assert (y >= lb - tol).all() and (y <= ub + tol).all()


@pytest.mark.parametrize("folder,dtype", DATASETS)
def test_s_shape_sigmoid_crown_sound(folder, dtype):
    """Our CROWN bounds of entry 4 contain sigmoid on a dense grid of each box."""
    lb, ub, _, _, x_L, x_U = _sigmoid_case(folder, dtype)
    t = torch.linspace(0, 1, 200001, dtype=dtype).unsqueeze(1)
    y = torch.sigmoid(x_L + t * (x_U - x_L))  # (points, 2)
    assert (y >= lb).all() and (y <= ub).all()


# ------------------------------------------------------------------ α-CROWN on the bundles' models

def test_simple_verification_alpha_crown(one_thread):
    """tests/test_simple_verification.py: MNIST CNN (Conv16-Conv32-FC100-FC10, pretrained), L∞ eps
    0.3, CROWN-Optimized with 20 iterations, lr_alpha 0.1 (float32 bundle).  Ours, with the
    intermediate layers optimized by default, is at least as tight on every output (measured: by
    0.018 to 0.056 on bounds of magnitude 2 to 20) and sound."""
    b = _bundle("test_simple_verification.py__TestSimpleVerification__test")
    call = _top_calls(b)[0]
    model = nn.Sequential(nn.Conv2d(1, 16, 4, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 4, 2, 1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(1568, 100), nn.ReLU(), nn.Linear(100, 10)).eval()
    model.load_state_dict(b["modules"][0]["state_dict"])
    x = call["roots"][0]["value"]
    ptb = PerturbationLpNorm(norm=INF, eps=0.3)
    net = BoundedModule(model, x)
    with torch.no_grad():
        lb, ub = net.compute_bounds(x=(BoundedTensor(x, ptb),), method="alpha-CROWN",
                                    optimize_bound_args={"lr_alpha": 0.1})
    assert (lb >= call["lb"]).all(), f"lb looser by {(call['lb'] - lb).max().item():.3e}"
    assert (ub <= call["ub"]).all(), f"ub looser by {(ub - call['ub']).max().item():.3e}"
    assert_sound(model, x, ptb, lb, ub, n_random=50, pgd_steps=10)


def test_jacobian_mlp_alpha_crown(one_thread):
    """The MLP of tests/test_jacobian.py (Linear-ReLU-Linear-Tanh-Linear-Sigmoid-Linear), CROWN-Optimized
    lower bounds at L∞ eps 1/255 and 4/255 (auto_LiRPA's defaults: 20 iterations, lr 0.5): ours
    at least as tight on every output, and sound."""
    b = _bundle("test_jacobian.py__TestJacobian__test")
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 100), nn.ReLU(), nn.Linear(100, 100), nn.Tanh(),
                          nn.Linear(100, 100), nn.Sigmoid(), nn.Linear(100, 10)).eval()
    model.load_state_dict({k.removeprefix("model."): v for k, v in b["modules"][0]["state_dict"].items()})
    calls = [c for c in _top_calls(b) if c["module_idx"] == 0 and c["method"] == "CROWN-Optimized"
             and c["roots"][0]["perturbation"]["eps"]]
    assert len(calls) == 2
    for call in calls:
        x = call["roots"][0]["value"]
        ptb = PerturbationLpNorm(norm=INF, eps=call["roots"][0]["perturbation"]["eps"])
        net = BoundedModule(model, x)
        with torch.no_grad():
            lb, _ = net.compute_bounds(x=(BoundedTensor(x, ptb),), method="alpha-CROWN", bound_upper=False)
        assert (lb >= call["lb"] - 1e-6).all(), f"lb looser by {(call['lb'] - lb).max().item():.3e}"
        assert_sound(model, x, ptb, lb, torch.full_like(lb, INF), n_random=50, pgd_steps=10)
