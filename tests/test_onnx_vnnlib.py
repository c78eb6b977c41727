"""ONNX loading (certtrain.onnx_model) and VNN-LIB parsing (certtrain.vnnlib).

Real data: ``shared/vnncomp2021`` (``$CERTTRAIN_SHARED/vnncomp2021``): the VNN-COMP 2021 mnistfc and
oval21 benchmarks; those tests skip when it is absent.  Synthetic ONNX graphs (built with
onnx.helper) and VNN-LIB strings cover the ops and syntax the real files do not use.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnx2torch")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

from certtrain.bounds import BoundedModule, UnsupportedOperation  # noqa: E402
from certtrain.onnx_model import (OnnxModelError, UnsupportedOnnxOperation, load_onnx,  # noqa: E402
                                  onnx_input_shape)
from certtrain.vnnlib import (Conjunction, VnnlibError, load_instances, parse_vnnlib,  # noqa: E402
                              read_vnnlib)

SHARED = Path(os.environ.get("CERTTRAIN_SHARED", Path(__file__).resolve().parents[2] / "shared"))
VNNCOMP = SHARED / "vnncomp2021"
needs_data = pytest.mark.skipif(not (VNNCOMP / "mnistfc").is_dir(),
                                reason=f"VNN-COMP 2021 benchmarks not found at {VNNCOMP} (set CERTTRAIN_SHARED)")
NETS = ["mnistfc/mnist-net_256x2.onnx", "mnistfc/mnist-net_256x4.onnx", "oval21/cifar_base_kw.onnx",
        "oval21/cifar_wide_kw.onnx", "oval21/cifar_deep_kw.onnx"]
OVAL_STD = 0.225  # the oval21 boxes are in normalised space: (pixel - mean) / 0.225, mean (0.485, 0.456, 0.406)


def _reference(model_or_path, x: np.ndarray) -> np.ndarray:
    ev = ReferenceEvaluator(str(model_or_path) if isinstance(model_or_path, Path) else model_or_path)
    proto = onnx.load(str(model_or_path)) if isinstance(model_or_path, (str, Path)) else model_or_path
    inits = {i.name for i in proto.graph.initializer}
    name = next(i.name for i in proto.graph.input if i.name not in inits)
    return ev.run(None, {name: x})[0]


def _attack_check(model, dj, lb, shape, dtype, n=1000, seed=0, tol=1e-5):
    """lb <= C y at random points, corners and the centre of the box; returns the outputs."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = dj.input_box(shape, dtype=dtype)
    rest = lo.shape[1:]
    u = torch.rand((n, *rest), generator=g, dtype=dtype)
    corners = torch.randint(0, 2, (n // 2, *rest), generator=g).to(dtype)
    xs = torch.cat([(lo + hi) / 2, lo + (hi - lo) * u, lo + (hi - lo) * corners, lo, hi])
    xs = torch.minimum(torch.maximum(xs, lo), hi)
    with torch.no_grad():
        y = model(xs)
    C, d, _ = dj.spec(dtype=dtype)
    cy = y @ C[0].T
    scale = 1.0 + y.abs().max().item()
    assert torch.all(lb.reshape(1, -1) <= cy + tol * scale), (lb, cy.min(0).values)
    return xs, y


# ============================================================================== real VNN-LIB files
@needs_data
def test_parse_all_real_vnnlib_files():
    files = sorted(VNNCOMP.glob("*/*.vnnlib"))
    assert len(files) == 60  # 30 mnistfc (15 images x 2 eps, each used with both nets) + 30 oval21
    for f in files:
        prop = read_vnnlib(f)
        mnist = f.parent.name == "mnistfc"
        assert (prop.n_inputs, prop.n_outputs) == ((784 if mnist else 3072), 10), f
        assert len(prop.disjuncts) == 1, f
        dj = prop.disjuncts[0]
        assert dj.x_lo.dtype == torch.float64 and dj.x_lo.shape == (prop.n_inputs,)
        assert torch.all(dj.x_lo <= dj.x_hi)
        # 9 single-row conjunctions Y_t - Y_j <= 0, one per other class j
        assert len(dj.conjunctions) == 9
        trues, others = set(), set()
        for C, d in dj.conjunctions:
            assert C.shape == (1, 10) and d.shape == (1,) and d.item() == 0.0
            assert sorted(C[0].tolist()) == [-1.0] + [0.0] * 8 + [1.0]
            trues.add(int(C[0].argmax()))
            others.add(int(C[0].argmin()))
        assert len(trues) == 1 and others == set(range(10)) - trues, f
        head = f.read_text().splitlines()[0]
        eps = float(re.search(r"_([0-9.]+)\.vnnlib$" if mnist else r"eps([0-9.e-]+)\.vnnlib$", f.name).group(1))
        width = (dj.x_hi - dj.x_lo).max().item()
        if mnist:
            assert f"label: {trues.pop()}." in head
            assert dj.x_lo.min() >= 0.0 and dj.x_hi.max() <= 1.0
            assert width == pytest.approx(2 * eps, rel=1e-6)
        else:
            assert width == pytest.approx(2 * eps / OVAL_STD, rel=1e-5, abs=1e-6)  # float32 bounds
            lo_pixel = dj.x_lo.view(3, -1) * OVAL_STD + torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64)[:, None]
            assert lo_pixel.min() >= -1e-6


@needs_data
def test_load_instances():
    mn = load_instances(VNNCOMP / "mnistfc" / "mnistfc_instances.csv")
    ov = load_instances(VNNCOMP / "oval21" / "oval21_instances.csv")
    assert len(mn) == 60 and len(ov) == 30
    assert {i.timeout for i in mn} == {120.0, 300.0} and {i.timeout for i in ov} == {720.0}
    for inst in mn + ov:
        assert inst.onnx.is_file() and inst.vnnlib.is_file() and inst.onnx.suffix == ".onnx"
    # oval21's csv names nets/ and vnnlib/ subfolders that the flat copy does not have
    assert ov[0].onnx == VNNCOMP / "oval21" / "cifar_base_kw.onnx"
    assert mn[0].vnnlib == VNNCOMP / "mnistfc" / "prop_0_0.03.vnnlib"


def test_load_instances_errors(tmp_path):
    (tmp_path / "a.onnx").write_bytes(b"")
    (tmp_path / "p.vnnlib").write_text("")
    (tmp_path / "ok.csv").write_text("a.onnx, p.vnnlib, 60\n\n")
    (inst,) = load_instances(tmp_path / "ok.csv")
    assert inst.onnx == tmp_path / "a.onnx" and inst.timeout == 60.0
    (tmp_path / "bad.csv").write_text("a.onnx,p.vnnlib,60\na.onnx,p.vnnlib\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: expected 'onnx,vnnlib,timeout'"):
        load_instances(tmp_path / "bad.csv")
    (tmp_path / "missing.csv").write_text("b.onnx,p.vnnlib,60\n")
    with pytest.raises(FileNotFoundError, match="b.onnx"):
        load_instances(tmp_path / "missing.csv")
    assert load_instances(tmp_path / "missing.csv", check=False)[0].onnx == tmp_path / "b.onnx"


# ================================================================================= real networks
@needs_data
@pytest.mark.parametrize("name", NETS)
def test_real_network_matches_onnx_reference(name):
    path = VNNCOMP / name
    model = load_onnx(path)
    shape = (1, 784, 1) if "mnist" in name else (1, 3, 32, 32)
    assert onnx_input_shape(path) == shape and model.input_shape == shape and model.output_shape == (1, 10)
    assert set(model.onnx_ops) <= {"Flatten", "Gemm", "Relu", "Conv"}
    rng = np.random.default_rng(0)
    xs = rng.uniform(-1, 1, size=(3, *shape[1:])).astype(np.float32)
    with torch.no_grad():
        ours = model(torch.from_numpy(xs)).numpy()  # a batch of 3 although the graph says 1
    for k in range(3):
        ref = _reference(path, xs[k:k + 1])
        np.testing.assert_allclose(ours[k:k + 1], ref, rtol=1e-5, atol=1e-5)


@needs_data
def test_crown_on_mnistfc_property_is_sound():
    model = load_onnx(VNNCOMP / "mnistfc" / "mnist-net_256x2.onnx", dtype=torch.float64)
    prop = read_vnnlib(VNNCOMP / "mnistfc" / "prop_0_0.03.vnnlib", n_inputs=784, n_outputs=10)
    (dj,) = prop.disjuncts
    x = dj.bounded_input(model.input_shape, dtype=torch.float64)
    net = BoundedModule(model, x)
    C, d, groups = dj.spec(dtype=torch.float64)
    assert C.shape == (1, 9, 10) and groups.tolist() == list(range(9))
    with torch.no_grad():
        lb, _ = net.compute_bounds(x=(x,), C=C, method="CROWN", bound_upper=False)
        ibp, _ = net.compute_bounds(x=(x,), C=C, method="IBP", bound_upper=False)
    assert lb.shape == (1, 9) and torch.all(lb >= ibp - 1e-9)
    xs, y = _attack_check(model, dj, lb, model.input_shape, torch.float64, n=2000, tol=1e-9)
    # the clean image is classified correctly: the centre is no counterexample
    assert not prop.counterexample_holds(y[0], x=xs[0])
    margins = dj.margins(lb)
    assert margins.shape == (9,) and dj.is_proved(lb) == bool((margins > 0).all())
    if dj.is_proved(lb):
        assert not any(prop.counterexample_holds(yy) for yy in y)


@needs_data
def test_crown_on_oval21_instance_is_sound():
    inst = next(i for i in load_instances(VNNCOMP / "oval21" / "oval21_instances.csv")
                if "cifar_base_kw-img4549" in i.vnnlib.name)
    model = load_onnx(inst.onnx)
    prop = read_vnnlib(inst.vnnlib)
    (dj,) = prop.disjuncts
    x = dj.bounded_input(model.input_shape)  # float32, box rounded outward
    lo, hi = dj.input_box(model.input_shape, dtype=torch.float32)
    assert torch.all(lo.double() <= dj.x_lo.view(lo.shape)) and torch.all(hi.double() >= dj.x_hi.view(hi.shape))
    net = BoundedModule(model, x)
    C, d, _ = dj.spec(dtype=torch.float32)
    with torch.no_grad():
        lb, _ = net.compute_bounds(x=(x,), C=C, method="CROWN", bound_upper=False)
    _attack_check(model, dj, lb, model.input_shape, torch.float32, n=300, tol=1e-5)
    # oval21's ε lies where a convex relaxation fails: plain CROWN proves 8 of the 9 margins here
    assert dj.margins(lb).shape == (9,)


# =============================================================================== synthetic ONNX
def _model(nodes, inputs, outputs, inits, name="g", opset=13):
    graph = helper.make_graph(nodes, name, inputs, outputs,
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 9 if opset >= 19 else 8
    onnx.checker.check_model(m)
    return m


def _f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _normalised_mlp():
    """(x - mean) / std, Reshape by a Constant shape, MatMul + Add, Relu, Gemm (transB=0, alpha,
    beta, a (1, n) bias), Mul and Neg: what exporters emit for a normalised MLP."""
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("Sub", ["x", "mean"], ["s"], name="sub_mean"),
        helper.make_node("Constant", [], ["std"], name="std_const",
                         value=numpy_helper.from_array(np.array([[[[0.3]]]], np.float32))),
        helper.make_node("Div", ["s", "std"], ["n"], name="div_std"),
        helper.make_node("Constant", [], ["shape"], name="shape_const",
                         value=numpy_helper.from_array(np.array([1, -1], np.int64))),
        helper.make_node("Reshape", ["n", "shape"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "W1"], ["mm"], name="mm1"),
        helper.make_node("Add", ["mm", "b1"], ["h"], name="add1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu1"),
        helper.make_node("Gemm", ["r", "W2", "b2"], ["g"], name="gemm2", alpha=0.5, beta=2.0, transB=0),
        helper.make_node("Mul", ["g", "scale"], ["m"], name="scale"),
        helper.make_node("Neg", ["m"], ["y"], name="neg"),
    ]
    inits = {"mean": np.array([0.25], np.float32), "W1": _f32(rng, 16, 8), "b1": _f32(rng, 8),
             "W2": _f32(rng, 8, 5), "b2": _f32(rng, 1, 5), "scale": _f32(rng, 5)}
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], inits, "mlp")


def _cnn_symbolic_batch():
    """Conv, BatchNormalization, Relu, Transpose, the PyTorch-export flatten
    (Shape -> Gather -> Unsqueeze -> Concat -> Reshape), Gemm (transB=1), Concat and Clip; the
    batch dim is symbolic."""
    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("Conv", ["x", "cw", "cb"], ["c"], name="conv", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("BatchNormalization", ["c", "g", "be", "mu", "var"], ["bn"], name="bn", epsilon=1e-3),
        helper.make_node("Relu", ["bn"], ["r"], name="relu"),
        helper.make_node("Transpose", ["r"], ["t"], name="nhwc", perm=[0, 2, 3, 1]),
        helper.make_node("Shape", ["t"], ["sh"], name="shape"),
        helper.make_node("Gather", ["sh", "zero"], ["n"], name="batch", axis=0),
        helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"], name="unsq"),
        helper.make_node("Concat", ["n1", "minus1"], ["newshape"], name="cat_shape", axis=0),
        helper.make_node("Reshape", ["t", "newshape"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "fw", "fb"], ["z"], name="fc", transB=1),
        helper.make_node("Concat", ["z", "flat"], ["zc"], name="cat_feat", axis=1),
        helper.make_node("Clip", ["zc", "lo", "hi"], ["y"], name="clip"),
    ]
    inits = {"cw": _f32(rng, 3, 2, 3, 3), "cb": _f32(rng, 3), "g": _f32(rng, 3) + 2, "be": _f32(rng, 3),
             "mu": _f32(rng, 3), "var": np.abs(_f32(rng, 3)) + 0.5, "zero": np.array(0, np.int64),
             "axes0": np.array([0], np.int64), "minus1": np.array([-1], np.int64),
             "fw": _f32(rng, 4, 27), "fb": _f32(rng, 4), "lo": np.array(-1.0, np.float32),
             "hi": np.array(1.5, np.float32)}
    # opset 20 (what torch.onnx.export writes; Shape and Reshape resolve to versions 19, newer than
    # onnx2torch's converters). Also, onnx.reference's BatchNormalization of opsets 9-13 fills in the
    # default momentum and then mixes in the batch's statistics; from opset 14 it is inference mode.
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 6, 6])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 31])], inits, "cnn", opset=20)


@pytest.mark.parametrize("build", [_normalised_mlp, _cnn_symbolic_batch], ids=["mlp", "cnn"])
def test_synthetic_onnx_matches_reference_and_bounds(build, tmp_path):
    proto = build()
    path = tmp_path / "net.onnx"
    onnx.save(proto, str(path))
    model = load_onnx(path)
    shape = onnx_input_shape(path)
    assert model.input_shape == shape and shape[0] == 1
    code = model.code
    assert "onnx2torch" not in code and "Onnx" not in code
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((4, *shape[1:])).astype(np.float32)
    with torch.no_grad():
        ours = model(torch.from_numpy(xs)).numpy()
    for k in range(4):
        np.testing.assert_allclose(ours[k:k + 1], _reference(path, xs[k:k + 1]), rtol=1e-5, atol=1e-5)
    # CROWN on a box around a point, attacked
    n_in = int(np.prod(shape))
    x0 = torch.from_numpy(xs[:1]).double().reshape(-1)
    n_out = model.output_shape[1]
    rows = [f"(assert (<= X_{i} {x0[i].item() + 0.1!r}))\n(assert (>= X_{i} {x0[i].item() - 0.1!r}))"
            for i in range(n_in)]
    text = "".join(f"(declare-const X_{i} Real)\n" for i in range(n_in)) + \
        "".join(f"(declare-const Y_{j} Real)\n" for j in range(n_out)) + "\n".join(rows) + \
        "\n(assert (or (and (>= Y_0 Y_1)) (and (<= Y_2 (- Y_3 0.5)) (>= Y_0 -1))))"
    (dj,) = parse_vnnlib(text).disjuncts
    model64 = load_onnx(path, dtype=torch.float64)
    x = dj.bounded_input(shape, dtype=torch.float64)
    net = BoundedModule(model64, x)
    C, d, groups = dj.spec(dtype=torch.float64)
    assert groups.tolist() == [0, 1, 1]
    with torch.no_grad():
        lb, _ = net.compute_bounds(x=(x,), C=C, method="CROWN", bound_upper=False)
    _attack_check(model64, dj, lb, shape, torch.float64, n=500, tol=1e-9)


def test_unsupported_onnx_ops_are_named(tmp_path):
    def one_op(op, name, **attrs):
        return _model([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                       helper.make_node(op, ["r"], ["y"], name=name, **attrs)],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])], {})

    # onnx2torch converts Softplus, but the bound engine has no rule for it
    with pytest.raises(UnsupportedOnnxOperation, match=r"ONNX op Softplus at node 'my_softplus'.*no rule"):
        load_onnx(one_op("Softplus", "my_softplus"))
    # onnx2torch has no converter for Hardmax
    with pytest.raises(UnsupportedOnnxOperation, match=r"ONNX op Hardmax .*node 'hm'"):
        load_onnx(one_op("Hardmax", "hm"))
    assert issubclass(UnsupportedOnnxOperation, UnsupportedOperation)
    # a Reshape that drops the batch dim
    m = _model([helper.make_node("Reshape", ["x", "s"], ["y"], name="to_vector")],
               [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6])], {"s": np.array([6], np.int64)})
    with pytest.raises(UnsupportedOnnxOperation, match=r"Reshape at node 'to_vector'.*batch dim"):
        load_onnx(m)
    # no batch dim at all
    m = _model([helper.make_node("Relu", ["x"], ["y"])], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5])], {})
    with pytest.raises(OnnxModelError, match=r"shape \(5,\).*leading batch dim"):
        load_onnx(m)
    path = tmp_path / "sym.onnx"
    onnx.save(_model([helper.make_node("Relu", ["x"], ["y"])],
                     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "H"])],
                     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "H"])], {}), str(path))
    with pytest.raises(OnnxModelError, match=r"symbolic or unknown dim 1 \(H\)"):
        onnx_input_shape(path)


# ============================================================================ synthetic VNN-LIB
def _decl(nx, ny):
    return "".join(f"(declare-const X_{i} Real)\n" for i in range(nx)) + \
        "".join(f"(declare-const Y_{j} Real)\n" for j in range(ny))


def test_vnnlib_and_or_nesting_and_terms():
    text = _decl(2, 3) + """
    ; a comment (with parentheses) and assert inside: (assert (<= X_0 9))
    (assert (<= X_0 1.5))  ; trailing comment
    (assert (>= X_0 -0.5))
    (assert (and (<= X_1 2e-1) (>= (* 2 X_1) (- 0.2))))
    (assert (or (and (>= Y_0 Y_1) (<= (+ Y_0 (* 2 Y_2)) 3))
                (or (> Y_2 (- Y_1 Y_0 1))
                    (and (= Y_1 0.25)))))
    (assert (or (<= Y_0 10) (>= Y_1 (/ 1 4))))
    (check-sat)
    """
    prop = parse_vnnlib(text)
    assert (prop.n_inputs, prop.n_outputs) == (2, 3)
    (dj,) = prop.disjuncts
    assert dj.x_lo.tolist() == [-0.5, -0.1] and dj.x_hi.tolist() == [1.5, 0.2]
    # (3 conjunctions) x (2 conjunctions), in order
    assert len(dj.conjunctions) == 6
    exp = [
        ([[-1, 1, 0], [1, 0, 2], [1, 0, 0]], [0, 3, 10]),
        ([[-1, 1, 0], [1, 0, 2], [0, -1, 0]], [0, 3, -0.25]),
        ([[-1, 1, -1], [1, 0, 0]], [1, 10]),           # Y_2 >= Y_1 - Y_0 - 1
        ([[-1, 1, -1], [0, -1, 0]], [1, -0.25]),
        ([[0, 1, 0], [0, -1, 0], [1, 0, 0]], [0.25, -0.25, 10]),
        ([[0, 1, 0], [0, -1, 0], [0, -1, 0]], [0.25, -0.25, -0.25]),
    ]
    for (C, d), (eC, ed) in zip(dj.conjunctions, exp):
        assert C.dtype == torch.float64 and C.tolist() == eC and d.tolist() == ed
    assert prop.counterexample_holds(torch.tensor([1.0, 0.5, 0.5]))        # conj 0
    assert not prop.counterexample_holds(torch.tensor([0.0, 0.5, -2.0]))
    assert prop.counterexample_holds([20.0, 0.25, 0.0])                   # Y_1 = 1/4 (conj 5)
    assert prop.counterexample_holds([1.0, 0.5, 0.5], x=[0.0, 0.0])
    assert not prop.counterexample_holds([1.0, 0.5, 0.5], x=[2.0, 0.0])   # outside the box


def test_vnnlib_several_boxes_and_spec():
    # the acasxu style: a disjunction of (input box, output condition)
    text = _decl(2, 2) + """
    (assert (>= X_1 0)) (assert (<= X_1 1))
    (assert (or (and (>= X_0 0) (<= X_0 1) (<= Y_0 Y_1))
                (and (>= X_0 2) (<= X_0 3) (<= Y_0 Y_1))
                (and (>= X_0 2) (<= X_0 3) (>= Y_0 5) (>= Y_1 5))))
    """
    prop = parse_vnnlib(text)
    assert len(prop.disjuncts) == 2
    a, b = prop.disjuncts
    assert a.x_lo.tolist() == [0, 0] and a.x_hi.tolist() == [1, 1] and len(a.conjunctions) == 1
    assert b.x_lo.tolist() == [2, 0] and b.x_hi.tolist() == [3, 1] and len(b.conjunctions) == 2
    C, d, groups = b.spec(dtype=torch.float32)
    assert C.shape == (1, 3, 2) and C.dtype == torch.float32 and groups.tolist() == [0, 1, 1]
    assert C[0].tolist() == [[1, -1], [-1, 0], [0, -1]] and d.tolist() == [0, -5, -5]
    # conjunction 0 needs row 0 > 0; conjunction 1 needs one of rows 1, 2 > -5
    assert b.margins(torch.tensor([0.5, -6.0, -4.0])).tolist() == [0.5, 1.0]
    assert b.is_proved(torch.tensor([[0.5, -6.0, -4.0]]))
    assert not b.is_proved(torch.tensor([0.5, -6.0, -5.5]))
    assert not b.is_proved(torch.tensor([0.0, -4.0, -4.0]))
    with pytest.raises(ValueError, match="expected 3 lower bounds"):
        b.margins(torch.zeros(2))
    lo, hi = b.input_box((1, 2), dtype=torch.float32)
    assert lo.shape == (1, 2) and lo.dtype == torch.float32
    assert isinstance(b.conjunctions[0], Conjunction) and b.conjunctions[0].holds([0.0, 1.0])


def test_vnnlib_float32_box_rounds_outward():
    prop = parse_vnnlib(_decl(1, 1) + "(assert (>= X_0 0.1)) (assert (<= X_0 0.30000000000000004))"
                        "(assert (<= Y_0 0))")
    lo, hi = prop.disjuncts[0].input_box(dtype=torch.float32)
    assert lo.double().item() <= 0.1 and hi.double().item() >= 0.30000000000000004
    x = prop.disjuncts[0].bounded_input((1, 1))
    assert x.ptb.x_L.item() == lo.item() and x.ptb.x_U.item() == hi.item()


@pytest.mark.parametrize("body, msg", [
    ("(assert (<= X_0 1)) (assert (>= X_0 0)) (assert (<= Y_0 Z_1))", r":3: expected a number or a declared variable, got 'Z_1'"),
    ("(assert (<= X_0 1)) (assert (>= X_0 0)) (assert (<= Y_0 Y_7))", r":3: unknown variable 'Y_7'"),
    ("(assert (<= X_0 1)) (assert (>= X_0 0)) (assert (<= (* Y_0 Y_1) 1))", r":3: non-linear term \(\* Y_0 Y_1\)"),
    ("(assert (<= X_0 1)) (assert (>= X_0 0)) (assert (<= (/ 1 Y_0) 1))", r":3: non-linear term"),
    ("(assert (<= X_0 1)) (assert (>= X_0 0)) (assert (<= Y_0 1)", r":3: '\(' is never closed"),
    ("(assert (<= X_0 1)) (assert (>= X_0 0)) (assert (<= Y_0 1)))", r":3: unbalanced '\)'"),
    ("(assert (<= X_0 1)) (assert (>= X_0 0)) (assert (foo Y_0 1))", r":3: expected and / or / <= / >= / < / > / =, got 'foo'"),
    ("(assert (<= X_0 1)) (assert (>= X_0 0)) (assert (not (<= Y_0 1)))", r":3: 'not' is not supported"),
    ("(assert (<= X_0 1)) (assert (>= X_0 0)) (assert (<= Y_0))", r":3: '<=' needs two terms"),
    ("(assert (<= X_0 1)) (assert (>= X_0 0)) (assert (<= Y_0 X_0))", r":3: .*mixes inputs \(X\) and outputs \(Y\)"),
    ("(assert (<= X_0 1)) (assert (>= X_0 0)) (assert (<= (+ X_0 X_1) 1))", r":3: input constraint .* several inputs"),
    ("(assert (<= X_0 1)) (assert (<= Y_0 1))", r"input X_0 has no lower bound"),
    ("(assert (<= X_0 1)) (assert (>= X_0 0)) (assert (<= Y_0 1))\n(push 1)", r":4: expected declare-const or assert, got 'push'"),
    ("(assert (<= X_0 1)) (assert (>= X_0 0)) (assert (<= Y_0 1))\nstray", r":4: expected a command in parentheses"),
    ("(declare-const Y_0 Int)", r":3: expected sort Real"),
    ("(declare-const Z_0 Real)", r":3: expected a variable named X_<i> .* got 'Z_0'"),
    ("(declare-const X_0 Real)", r":3: variable 'X_0' declared twice"),
    ("(declare-const X_5 Real)", r"X variables must be X_0 .. X_\{n-1\}; missing X_2, X_3, X_4"),
])
def test_vnnlib_errors(body, msg):
    # two declarations per line: the body starts on line 3
    text = "(declare-const X_0 Real) (declare-const X_1 Real)\n(declare-const Y_0 Real) (declare-const Y_1 Real)\n" + body
    with pytest.raises(VnnlibError, match=msg):
        parse_vnnlib(text, name="spec.vnnlib")
    try:
        parse_vnnlib(text, name="spec.vnnlib")
    except VnnlibError as e:
        assert str(e).startswith("spec.vnnlib")


def test_vnnlib_size_checks_and_gzip(tmp_path):
    import gzip
    text = _decl(1, 2) + "(assert (<= X_0 1)) (assert (>= X_0 0)) (assert (<= Y_0 Y_1))"
    p = tmp_path / "p.vnnlib.gz"
    with gzip.open(p, "wt") as f:
        f.write(text)
    assert read_vnnlib(p, n_inputs=1, n_outputs=2).n_outputs == 2
    with pytest.raises(VnnlibError, match="declares 1 inputs, expected 784"):
        read_vnnlib(p, n_inputs=784)
