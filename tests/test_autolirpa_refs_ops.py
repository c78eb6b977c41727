"""Peer references (auto_LiRPA 0.7.1's stored test results, ../shared/autolirpa_refs/) for the ops
of issue 10: powers, HardTanh, Conv1d, matmul chains, max of two tensors, softmax; plus soundness
of every case we compare (a reference that we beat must be beaten soundly)."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from bound_checks import assert_sound
from certtrain.bounds import BoundedModule, BoundedTensor, PerturbationLpNorm


def _refs_dir() -> Path:
    env = os.environ.get("CERTTRAIN_AUTOLIRPA_REFS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "autolirpa_refs"


REFS = _refs_dir()
pytestmark = pytest.mark.skipif(not (REFS / "data").is_dir(), reason=f"auto_LiRPA references not found at {REFS}")
F32 = pytest.param("data", torch.float32, id="float32")
F64 = pytest.param("data_64", torch.float64, id="float64")


@functools.lru_cache(maxsize=None)
def _load(rel: str):
    return torch.load(REFS / rel, weights_only=True, map_location="cpu")


def _close(ours, ref, rtol, atol, what):
    ref = ref.to(ours.dtype).view_as(ours)
    assert torch.allclose(ours, ref, rtol=rtol, atol=atol), \
        f"{what}: max |ours - ref| = {(ours - ref).abs().max().item():.3e}"


class _Pow(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return x ** self.p


POW = [(0.5, 1, 4), (0.3, 1, 5), (1.5, 1, 4), (2.5, 1, 3), (0.5, 0, 4), (1.5, 0, 4)]
POW_ALPHA = [(0.5, 1, 4), (1.5, 1, 4), (2.5, 1, 3)]


@pytest.mark.parametrize("folder,dtype", [F32, F64])
def test_pow_noninteger(folder, dtype):
    """IBP and CROWN equal auto_LiRPA's; α-CROWN (tangent points optimized, 20 steps, lr 0.1) is at
    least as tight as its optimized bound and never looser than our CROWN."""
    ref = _load(f"{folder}/pow_noninteger_test_data")
    i = 0
    for p, lo, hi in POW:
        x = torch.full((1, 10), (lo + hi) / 2.0, dtype=dtype)
        ptb = PerturbationLpNorm(eps=(hi - lo) / 2.0)
        net = BoundedModule(_Pow(p), x)
        for method in ("IBP", "CROWN"):
            with torch.no_grad():
                lb, ub = net.compute_bounds(x=(BoundedTensor(x, ptb),), method=method)
            _close(lb, ref[i][0], 1e-5, 1e-6, f"p={p} [{lo},{hi}] {method} lb")
            _close(ub, ref[i][1], 1e-5, 1e-6, f"p={p} [{lo},{hi}] {method} ub")
            i += 1
    for p, lo, hi in POW_ALPHA:
        x = torch.full((1, 10), (lo + hi) / 2.0, dtype=dtype)
        ptb = PerturbationLpNorm(eps=(hi - lo) / 2.0)
        net = BoundedModule(_Pow(p), x)
        with torch.no_grad():
            lb, ub = net.compute_bounds(x=(BoundedTensor(x, ptb),), method="alpha-CROWN",
                                        optimize_bound_args={"lr_alpha": 0.1})
            cl, cu = net.compute_bounds(x=(BoundedTensor(x, ptb),), method="CROWN")
        rl, ru = (t.to(dtype).view_as(lb) for t in ref[i])
        i += 1
        assert (lb >= rl - 1e-4).all() and (ub <= ru + 1e-4).all(), (p, lo, hi, lb, ub, rl, ru)
        assert (lb >= cl - 1e-7).all() and (ub <= cu + 1e-7).all()
        assert_sound(_Pow(p), x, ptb, lb, ub)
