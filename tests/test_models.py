"""Tests for the architecture zoo in ``models/`` (CPU, fast). The text models (``TEXT_MODELS``: lstm,
transformer) have their own tests in ``tests/test_text_models.py``; the yaml checks below cover both.

Parameter counts of the default models (checked in ``test_default_parameter_counts``):

=============  =================  ==========
model          in_shape           parameters
=============  =================  ==========
mlp            (1, 28, 28)           269,322
mlp            (3, 32, 32)           855,050
cnn_small      (1, 28, 28)           166,406
cnn_small      (3, 32, 32)           214,918
cnn_7layer     (3, 32, 32)        17,190,602
cnn_7layer_bn  (3, 32, 32)        17,192,650
dm_large       (3, 32, 32)        17,190,602
resnet         (3, 32, 32)            43,466
resnext        (3, 32, 32)        17,611,018
densenet       (3, 32, 32)         7,902,058
wide_resnet    (3, 32, 32)        21,542,250
=============  =================  ==========
"""

from __future__ import annotations

import importlib
import inspect
import operator
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

import certtrain_models as models
from certtrain.normalize import Normalize
from certtrain_models import IMAGE_MODELS, MODELS, TEXT_MODELS, get_model

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf" / "model"

# Small widths so that every forward / trace below is cheap.
SMALL: dict[str, dict] = {
    "mlp": dict(hidden=(32, 16)),
    "cnn_small": dict(width=4, linear_size=16),
    "cnn_7layer": dict(width=4, linear_size=16),
    "cnn_7layer_bn": dict(width=4, linear_size=16),
    "dm_large": dict(width=4, linear_size=16),
    "resnet": dict(),  # the default is already small
    "resnext": dict(bottleneck_width=4, stem_width=8, linear_size=16),
    "densenet": dict(growth_rate=4, linear_size=16),
    "wide_resnet": dict(widen_factor=1, linear_size=16),
}

CASES: list[tuple[str, tuple[int, int, int], int, dict]] = [
    (name, shape, 10, SMALL[name]) for name in IMAGE_MODELS for shape in [(1, 28, 28), (3, 32, 32)]
]
CASES += [
    ("resnext", (3, 64, 64), 200, SMALL["resnext"]),
    ("resnext", (3, 64, 64), 200, dict(num_blocks=(2, 2, 2), bottleneck_width=2, stem_width=4, linear_size=16)),
    ("cnn_7layer_bn", (3, 64, 64), 200, SMALL["cnn_7layer_bn"]),
    ("cnn_7layer_bn", (3, 64, 64), 200, dict(SMALL["cnn_7layer_bn"], last_stride=2)),
    ("mlp", (3, 32, 32), 10, dict(hidden=())),
    ("resnet", (3, 32, 32), 10, dict(bn=False, num_blocks=(1, 1, 1), widths=(4, 8, 8))),
    ("resnext", (3, 32, 32), 10, dict(SMALL["resnext"], bn=False)),
    ("densenet", (3, 32, 32), 10, dict(SMALL["densenet"], bn=False, pool=True)),
    ("wide_resnet", (3, 32, 32), 10, dict(SMALL["wide_resnet"], bn=False, depth=16)),
]

ALLOWED_MODULES = (
    nn.Linear,
    nn.Conv2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.ReLU,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.Identity,
)
ALLOWED_FUNCTIONS = {torch.flatten, operator.add, torch.cat}


def _randomize_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _check_graph(gm: torch.fx.GraphModule, x: torch.Tensor, extra_functions: set = frozenset()) -> None:
    """Every node uses an allowed op, pools tile their input exactly, residual adds need no broadcasting."""
    ShapeProp(gm).propagate(x)
    mods = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = mods[node.target]
            assert isinstance(mod, ALLOWED_MODULES), f"{node.target}: {type(mod).__name__} not allowed"
            if isinstance(mod, nn.ReLU):
                assert not mod.inplace, f"{node.target}: inplace ReLU"
            in_shape = node.args[0].meta["tensor_meta"].shape
            if isinstance(mod, nn.AvgPool2d):
                k, s = _pair(mod.kernel_size), _pair(mod.stride)
                assert k == s and _pair(mod.padding) == (0, 0) and not mod.ceil_mode, node.target
                assert in_shape[2] % k[0] == 0 and in_shape[3] % k[1] == 0, (node.target, in_shape)
            if isinstance(mod, nn.AdaptiveAvgPool2d):
                oh, ow = _pair(mod.output_size)
                assert in_shape[2] % oh == 0 and in_shape[3] % ow == 0, (node.target, in_shape)
        elif node.op == "call_function":
            assert node.target in ALLOWED_FUNCTIONS | set(extra_functions), f"function {node.target} not allowed"
            if node.target is operator.add:
                a, b = node.args
                assert a.meta["tensor_meta"].shape == b.meta["tensor_meta"].shape, "broadcasting add"
            if node.target is torch.flatten:
                assert tuple(node.args[1:]) == (1,) and not node.kwargs, "flatten must be torch.flatten(x, 1)"
            if node.target is torch.cat:
                dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
                assert dim == 1, "cat must be along channels"
        elif node.op == "call_method":
            raise AssertionError(f"tensor method {node.target!r} in graph; use modules / torch functions")


@pytest.mark.parametrize(
    "name,in_shape,num_classes,kwargs",
    CASES,
    ids=[f"{n}-{'x'.join(map(str, s))}-{c}-{i}" for i, (n, s, c, _) in enumerate(CASES)],
)
def test_build_forward_trace(name, in_shape, num_classes, kwargs):
    torch.manual_seed(0)
    model = MODELS[name](in_shape=in_shape, num_classes=num_classes, **kwargs)
    x = torch.rand(3, *in_shape)

    model.train()
    assert model(x).shape == (3, num_classes)  # train mode (batch statistics) works too

    model.eval()
    _randomize_bn(model)
    with torch.no_grad():
        y = model(x)
        assert y.shape == (3, num_classes)
        assert torch.isfinite(y).all()
        gm = torch.fx.symbolic_trace(model)
        torch.testing.assert_close(gm(x), y)
    _check_graph(gm, x)


def test_builds_from_list_shapes():
    # Hydra hands over ListConfig / lists rather than tuples.
    m = get_model("resnet", [3, 32, 32], 10, num_blocks=[1, 1], widths=[4, 8])
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    m = get_model("mlp", [1, 28, 28], 10, hidden=[8])
    assert m(torch.rand(2, 1, 28, 28)).shape == (2, 10)


EXPECTED_PARAMS = {
    ("mlp", (1, 28, 28)): 269_322,
    ("mlp", (3, 32, 32)): 855_050,
    ("cnn_small", (1, 28, 28)): 166_406,
    ("cnn_small", (3, 32, 32)): 214_918,
    ("cnn_7layer", (3, 32, 32)): 17_190_602,
    ("cnn_7layer_bn", (3, 32, 32)): 17_192_650,
    ("dm_large", (3, 32, 32)): 17_190_602,
    ("resnet", (3, 32, 32)): 43_466,
    ("resnext", (3, 32, 32)): 17_611_018,
    ("densenet", (3, 32, 32)): 7_902_058,
    ("wide_resnet", (3, 32, 32)): 21_542_250,
}


def test_default_parameter_counts():
    assert {n for n, _ in EXPECTED_PARAMS} == set(IMAGE_MODELS)
    for (name, shape), expected in EXPECTED_PARAMS.items():
        with torch.device("meta"):  # no allocation / init cost for the 17-21M parameter models
            model = MODELS[name](in_shape=shape)
        n = sum(p.numel() for p in model.parameters())
        assert n == expected, f"{name} at {shape}: {n:,} parameters, expected {expected:,}"


def test_cnn_7layer_bn_structure():
    m = models.cnn_7layer_bn()
    convs = [l for l in m.features if isinstance(l, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [
        (3, 64, 1), (64, 64, 1), (64, 128, 2), (128, 128, 1), (128, 128, 1)
    ]
    assert sum(isinstance(l, nn.BatchNorm2d) for l in m.features) == 5
    lin1, bn1d, relu, lin2 = m.classifier
    assert (lin1.in_features, lin1.out_features) == (128 * 16 * 16, 512)
    assert isinstance(bn1d, nn.BatchNorm1d) and isinstance(relu, nn.ReLU)
    assert (lin2.in_features, lin2.out_features) == (512, 10)
    # TinyImageNet variant of Shi et al.: stride-2 last conv -> 32768 flattened features
    with torch.device("meta"):
        tin = models.cnn_7layer_bn((3, 64, 64), 200, last_stride=2)
    assert tin.classifier[0].in_features == 32768


def test_conf_model_yamls():
    files = sorted(CONF_DIR.glob("*.yaml"))
    assert {f.stem for f in files} == set(MODELS)
    for f in files:
        cfg = yaml.safe_load(f.read_text())
        module_name, _, attr = cfg["_target_"].rpartition(".")
        assert module_name == "certtrain_models", f
        fn = getattr(importlib.import_module(module_name), attr)
        assert callable(fn) and fn is MODELS[f.stem], f
        # image models take the dataset's in_shape, text models its vocabulary and sentence length
        from_data = ("vocab_size", "num_classes", "max_len") if f.stem in TEXT_MODELS else ("in_shape", "num_classes")
        for key in from_data:
            assert cfg[key] == "${dataset.%s}" % key, f"{f.name}: {key}"
        params = inspect.signature(fn).parameters
        for key, value in cfg.items():
            if key.startswith("_") or key in from_data:
                continue
            assert key in params, f"{f.name}: {key} is not an argument of {fn.__name__}"
            default = params[key].default
            if isinstance(default, tuple):
                value = tuple(value)
            assert value == default, f"{f.name}: {key}={value!r} differs from the default {default!r}"
        # every width option is spelled out
        missing = set(params) - set(cfg)
        assert not missing, f"{f.name} does not spell out {sorted(missing)}"


def test_conf_model_hydra_instantiate():
    hydra_utils = pytest.importorskip("hydra.utils")
    omegaconf = pytest.importorskip("omegaconf")
    for f in sorted(CONF_DIR.glob("*.yaml")):
        cfg = omegaconf.OmegaConf.create(
            {"dataset": {"in_shape": [3, 32, 32], "num_classes": 10, "vocab_size": 100, "max_len": 8},
             "model": yaml.safe_load(f.read_text())}
        )
        with torch.device("meta"):
            model = hydra_utils.instantiate(cfg.model)
        assert isinstance(model, nn.Module) and model.num_classes == 10, f


def test_get_model():
    m = get_model("cnn_small", (1, 28, 28), 10)
    assert m(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert get_model("mlp").in_shape == (1, 28, 28)  # None keeps the constructor defaults
    with pytest.raises(ValueError) as err:
        get_model("resnet999", (3, 32, 32), 10)
    msg = str(err.value)
    assert "resnet999" in msg
    for name in MODELS:
        assert name in msg


def test_invalid_arguments():
    with pytest.raises(ValueError, match="in_shape"):
        models.mlp(in_shape=(28, 28))
    with pytest.raises(ValueError, match="6n\\+4"):
        models.wide_resnet(depth=12)
    with pytest.raises(ValueError, match="odd"):
        models.densenet((3, 30, 30), growth_rate=2)


def test_normalize():
    mean, std = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
    norm = Normalize(mean, std)
    assert norm.mean.shape == norm.std.shape == (1, 3, 1, 1)
    assert {"mean", "std"} <= set(norm.state_dict())
    x = torch.rand(2, 3, 8, 8)
    expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(norm(x), expected)
    assert Normalize(0.1307, 0.3081).mean.shape == (1, 1, 1, 1)
    with pytest.raises(ValueError):
        Normalize((0.5, 0.5), (0.0, 1.0))

    model = nn.Sequential(norm, models.cnn_small((3, 32, 32), width=2, linear_size=8)).eval()
    gm = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(gm(x.repeat(1, 1, 4, 4)), model(x.repeat(1, 1, 4, 4)))
    _check_graph(gm, x.repeat(1, 1, 4, 4), extra_functions={operator.sub, operator.truediv})
    targets = [n.target for n in gm.graph.nodes if n.op == "get_attr"]
    assert any(t.endswith("mean") for t in targets) and any(t.endswith("std") for t in targets)


def test_models_import_only_torch():
    for path in (ROOT / "models").glob("*.py"):
        for line in path.read_text().splitlines():
            s = line.strip()
            if s.startswith(("import ", "from ")) and not s.startswith("from __future__"):
                mod = s.split()[1]
                assert mod.startswith((".", "torch", "collections", "math", "typing")), f"{path.name}: {s}"
