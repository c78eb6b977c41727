"""Property-based soundness: random graphs over the whole op set, random engine options, every
bound attacked by random points, corners and PGD (tests/random_graphs.py builds the models).

CI runs ``CERTTRAIN_FUZZ_CASES`` cases (default 48) from seed ``CERTTRAIN_FUZZ_SEED`` (default
0); set them to run many more, e.g. ``CERTTRAIN_FUZZ_CASES=2000 python -m pytest -q
tests/test_fuzz_soundness.py -n 2``.  A failure prints the case's seed, options and model; every
failure found so far is a named test in tests/test_regressions.py.
"""
from __future__ import annotations

import copy
import math
import os
import random
import warnings

import pytest
import torch

from bound_checks import assert_sound, rounding_scale
from certtrain.bounds import BoundedModule, BoundedTensor, PerturbationLpNorm
from random_graphs import build, degenerate_bn, describe, freeze_bn, random_spec

N_CASES = int(os.environ.get("CERTTRAIN_FUZZ_CASES", "48"))
SEED0 = int(os.environ.get("CERTTRAIN_FUZZ_SEED", "0"))
METHODS = ["IBP", "CROWN-IBP", "CROWN", "alpha-CROWN"]


def draw_case(seed: int) -> dict:
    """Model spec and engine/perturbation options of one case (all from ``seed``)."""
    rng = random.Random(10_000 + seed)
    spec = random_spec(seed, conv=rng.random() < 0.8)
    norm = rng.choice([math.inf, math.inf, 2, 1])
    case = dict(
        spec=spec, norm=norm,
        dtype=rng.choice([torch.float32, torch.float64]),
        method=rng.choice(METHODS),
        batch=rng.choice([2, 3]) if spec.bn_train else rng.choice([1, 2, 3]),
        eps_form=rng.choice(["scalar", "per_example", "per_element"] if norm == math.inf
                            else ["scalar", "per_example"]),
        domain=rng.random() < 0.5,
        spec_C=rng.choice([None, "margin", "random"]),
        opts=dict(conv_mode=rng.choice(["patches", "matrix"]),
                  relu=rng.choice(["adaptive", "same-slope", "zero"]),
                  sparse_intermediate_bounds=rng.random() < 0.7,
                  ibp_skip_clean=rng.random() < 0.7,
                  memory_budget=rng.choice([1 << 30, 1 << 30, 20_000])),  # small: chunking
        alpha=dict(iteration=rng.choice([2, 4]), optimize_intermediate=rng.random() < 0.4,
                   lr_alpha=rng.choice([0.1, 0.5])),
    )
    scale = {math.inf: rng.choice([0.02, 0.1, 0.3]), 2: rng.choice([0.2, 1.0]), 1: rng.choice([0.5, 2.0])}
    case["eps"] = scale[norm]
    return case


def case_inputs(case: dict):
    """(x0, perturbation, C) of a case."""
    spec, dtype, B = case["spec"], case["dtype"], case["batch"]
    g = torch.Generator().manual_seed(case["spec"].seed)
    x0 = torch.rand(B, *spec.in_shape, generator=g, dtype=torch.float64).to(dtype)
    eps = case["eps"]
    if case["eps_form"] == "per_example":
        eps = (torch.rand(B, generator=g, dtype=torch.float64) * eps).to(dtype)
        if case["norm"] == math.inf:
            eps = eps.view(B, *([1] * len(spec.in_shape)))
    elif case["eps_form"] == "per_element":
        eps = (torch.rand(1, *spec.in_shape, generator=g, dtype=torch.float64) * eps).to(dtype)
    kw = dict(x_L=0.0, x_U=1.0) if case["domain"] else {}
    if case["domain"] and case["norm"] == math.inf and case["eps_form"] == "scalar":
        kw = dict(x_L=torch.zeros_like(x0), x_U=torch.full_like(x0, 0.9).clamp(min=x0))
    ptb = PerturbationLpNorm(norm=case["norm"], eps=eps, **kw)
    n = spec.n_out
    C = None
    if case["spec_C"] == "margin":
        y = torch.randint(0, n, (B,), generator=g)
        eye = torch.eye(n, dtype=dtype)
        C = (eye[y].unsqueeze(1) - eye.unsqueeze(0))
        C = C[torch.arange(n)[None] != y[:, None]].view(B, n - 1, n)
    elif case["spec_C"] == "random":
        C = torch.randn(B, 2, n, generator=g, dtype=torch.float64).to(dtype)
    return x0, ptb, C


def case_text(seed: int, case: dict) -> str:
    keys = ("method", "norm", "dtype", "batch", "eps", "eps_form", "domain", "spec_C", "opts", "alpha")
    return (f"fuzz case seed={seed}: " + ", ".join(f"{k}={case[k]}" for k in keys) + "\n"
            + describe(case["spec"]))


def run_case(seed: int, n_random: int = 64, pgd_steps: int = 12) -> None:
    case = draw_case(seed)
    model, twin = build(case["spec"], case["dtype"])
    x0, ptb, C = case_inputs(case)
    if case["spec"].bn_train and degenerate_bn(twin, x0):  # ill-conditioned: test BN in eval mode
        for m in (*model.modules(), *twin.modules()):
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
        case["spec"].bn_train = False
    keep = x0.clone()
    params = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = BoundedModule(model, x0, bound_opts=dict(case["opts"]))
        kw = dict(optimize_bound_args=case["alpha"]) if case["method"] == "alpha-CROWN" else {}
        with torch.no_grad():
            lb, ub = net.compute_bounds(x=(BoundedTensor(x0, ptb),), C=C, method=case["method"], **kw)
    assert torch.equal(x0, keep), "compute_bounds changed the caller's input tensor"
    for k, v in model.state_dict().items():
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(v, params[k]), f"compute_bounds changed the model's {k}"
    assert torch.isfinite(lb).all() and torch.isfinite(ub).all()
    check = freeze_bn(twin, x0) if case["spec"].bn_train else twin
    with torch.no_grad():  # the twin is the traced model's semantics, out of place
        ref = freeze_bn(model, x0) if case["spec"].bn_train else model
        y_model = ref(x0.clone())
        y_twin = check(x0)
    assert torch.allclose(y_model, y_twin, atol=1e-5, rtol=1e-4), "twin differs from the model"
    # float32: the network's own rounding (measured against its float64 copy) is allowed.
    ref64 = copy.deepcopy(check).double() if case["dtype"] == torch.float32 else None
    assert_sound(check, x0, ptb, lb, ub, C=C, n_random=n_random, pgd_steps=pgd_steps,
                 rounding_scale=rounding_scale(check, x0), reference=ref64)


@pytest.mark.parametrize("seed", range(SEED0, SEED0 + N_CASES))
def test_random_graph_sound(seed, one_thread):
    try:
        run_case(seed)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{case_text(seed, draw_case(seed))}") from None
