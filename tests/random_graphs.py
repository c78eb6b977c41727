"""Random models over the whole op set, for the property-based soundness suite.

A model is a list of steps drawn from a seeded generator; each step reads tensors of a pool
(often the same one twice, or one read by several steps) and appends its result.  The same spec
builds two modules: the *traced* one, with in-place ops where the spec says so (what the engine
must handle), and a *functional twin* with every op out of place but the same semantics (an
in-place step replaces the tensor it overwrote in the pool), which the checks attack with
gradients.  ``describe(spec)`` prints the spec so a failing case can be read.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

CONV_STEPS = ["conv", "conv", "conv", "bn", "act", "act", "act", "maxpool", "avgpool", "add", "sub",
              "cat", "scale", "identity", "gap"]
DENSE_STEPS = ["linear", "linear", "act", "act", "bn1d", "add", "sub", "cat", "scale", "reduce", "explog",
               "product", "matmul", "softmax", "gelu", "layernorm", "clamp", "pick", "div"]
ACTS = ["relu", "relu", "leaky", "sigmoid", "tanh"]
RELU_FORMS = ["module", "function", "method", "module_inplace", "function_inplace", "method_inplace"]


@dataclass
class Step:
    kind: str
    inputs: list[int]
    params: dict = field(default_factory=dict)


@dataclass
class Spec:
    in_shape: tuple
    steps: list[Step]
    head: list[int]        # pool entries flattened into the dense stage
    dense: list[Step]
    n_out: int
    bn_train: bool
    seed: int


def _conv_out(n, k, s, p, d=1):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def random_spec(seed: int, conv: bool = True, max_steps: int = 7) -> Spec:
    """A random model: a conv stage on (C, H, W) tensors (if ``conv``), then a dense stage."""
    rng = random.Random(seed)
    if conv:
        in_shape = (rng.choice([1, 2, 3]), rng.randint(5, 9), rng.randint(5, 9))
    else:
        in_shape = (rng.randint(3, 8),)
    shapes = [in_shape]
    steps: list[Step] = []

    # Tensors that may share memory with another (nn.Identity / eval Dropout return their input):
    # an in-place op on one of them is refused by the engine (tested on its own), so none here.
    aliased = {0}

    def pick(pred=lambda s: True, avoid_input=False):
        idx = [i for i, s in enumerate(shapes) if pred(s) and not (avoid_input and i == 0)]
        return rng.choice(idx) if idx else None

    def act_params(i):
        p = {"act": rng.choice(ACTS)}
        form = rng.choice(RELU_FORMS)
        if i in aliased or p["act"] not in ("relu", "leaky"):
            form = form.replace("_inplace", "")  # the input is a leaf that PGD differentiates
        if p["act"] in ("sigmoid", "tanh") and form.startswith("method"):
            form = "method"
        p["form"] = form
        p["slope"] = rng.choice([0.01, 0.1, 0.3])
        return p

    if conv:
        n = rng.randint(3, max_steps)
        for _ in range(n):
            kind = rng.choice(CONV_STEPS)
            if kind == "conv":
                i = pick()
                c, h, w = shapes[i]
                kh, kw = rng.choice([1, 2, 3]), rng.choice([1, 2, 3])
                sh, sw = rng.choice([1, 1, 2]), rng.choice([1, 1, 2])
                ph, pw = rng.randint(0, kh - 1) if kh > 1 else 0, rng.randint(0, kw - 1) if kw > 1 else 0
                d = rng.choice([1, 1, 2])
                if _conv_out(h, kh, sh, ph, d) < 1 or _conv_out(w, kw, sw, pw, d) < 1:
                    d = 1
                if _conv_out(h, kh, sh, ph, d) < 1 or _conv_out(w, kw, sw, pw, d) < 1:
                    kh = kw = 1
                out = rng.choice([2, 3, 4])
                g = rng.choice([g for g in (1, 2, 3) if c % g == 0 and out % g == 0])
                p = dict(cin=c, cout=out, k=(kh, kw), s=(sh, sw), p=(ph, pw), d=d, g=g,
                         bias=rng.random() < 0.7, functional=rng.random() < 0.2)
                steps.append(Step("conv", [i], p))
                shapes.append((out, _conv_out(h, kh, sh, ph, d), _conv_out(w, kw, sw, pw, d)))
            elif kind == "bn":
                i = pick(avoid_input=True)
                if i is None:
                    continue
                steps.append(Step("bn", [i], {"c": shapes[i][0]}))
                shapes.append(shapes[i])
            elif kind == "act":
                i = pick()
                p = act_params(i)
                steps.append(Step("act", [i], p))
                shapes.append(shapes[i])
            elif kind in ("maxpool", "avgpool"):
                i = pick(lambda s: min(s[1:]) >= 2)
                if i is None:
                    continue
                c, h, w = shapes[i]
                k = rng.choice([2, 3]) if min(h, w) >= 3 else 2
                s = rng.randint(1, k)  # s < k: overlapping windows
                pad = rng.randint(0, k // 2)
                steps.append(Step(kind, [i], dict(k=k, s=s, p=pad, functional=rng.random() < 0.3)))
                shapes.append((c, _conv_out(h, k, s, pad), _conv_out(w, k, s, pad)))
            elif kind == "gap":
                i = pick(lambda s: s[1] % 2 == 0 and s[2] % 2 == 0)
                if i is None:
                    continue
                c, h, w = shapes[i]
                steps.append(Step("gap", [i], {"out": (h // 2, w // 2)}))
                shapes.append((c, h // 2, w // 2))
            elif kind in ("add", "sub"):
                i = pick()
                same = [j for j, s in enumerate(shapes) if s == shapes[i]]
                j = i if rng.random() < 0.4 else rng.choice(same)  # the same node twice, often
                inplace = rng.random() < 0.3 and i not in aliased
                form = rng.choice(["op", "torch"])
                steps.append(Step(kind, [i, j], {"inplace": inplace, "form": form}))
                shapes.append(shapes[i])
            elif kind == "cat":
                i = pick()
                same = [j for j, s in enumerate(shapes) if s[1:] == shapes[i][1:]]
                parts = [i] + [rng.choice(same + [i]) for _ in range(rng.randint(1, 2))]
                steps.append(Step("cat", parts))
                shapes.append((sum(shapes[j][0] for j in parts), *shapes[i][1:]))
            elif kind == "scale":
                i = pick()
                steps.append(Step("scale", [i], {"a": rng.choice([-1.5, 0.5, 2.0]), "b": rng.choice([0.0, 0.3]),
                                                  "neg": rng.random() < 0.3}))
                shapes.append(shapes[i])
            elif kind == "identity":
                i = pick()
                which = rng.choice(["identity", "dropout", "clone"])
                steps.append(Step("identity", [i], {"which": which}))
                if which != "clone":
                    aliased.update({i, len(shapes)})
                shapes.append(shapes[i])
        # Usually the newest tensor, sometimes two tensors concatenated (fan-in at the head).
        head = [len(shapes) - 1]
        if rng.random() < 0.4:
            head.append(rng.randrange(len(shapes)))
    else:
        head = [0]
    flat = [math.prod(shapes[i]) for i in head]
    dshapes = [sum(flat)]
    dense: list[Step] = []
    dviews = {0}  # dense-pool entries that are views (the flattened head, slices): no in-place op on them
    for _ in range(rng.randint(1, 4)):
        kind = rng.choice(DENSE_STEPS)
        i = rng.randrange(len(dshapes))
        if kind == "linear":
            out = rng.choice([4, 6, 8])
            dense.append(Step("linear", [i], {"in": dshapes[i], "out": out, "bias": rng.random() < 0.8}))
            dshapes.append(out)
        elif kind == "act":
            dense.append(Step("act", [i], act_params(0 if i in dviews else i + 1)))
            dshapes.append(dshapes[i])
        elif kind == "bn1d":
            dense.append(Step("bn1d", [i], {"c": dshapes[i]}))
            dshapes.append(dshapes[i])
        elif kind in ("add", "sub"):
            same = [j for j, s in enumerate(dshapes) if s == dshapes[i]]
            j = i if rng.random() < 0.4 else rng.choice(same)
            dense.append(Step(kind, [i, j], {"inplace": False, "form": rng.choice(["op", "torch"])}))
            dshapes.append(dshapes[i])
        elif kind == "cat":
            j = rng.choice([i, rng.randrange(len(dshapes))])
            dense.append(Step("cat", [i, j]))
            dshapes.append(dshapes[i] + dshapes[j])
        elif kind == "scale":
            dense.append(Step("scale", [i], {"a": rng.choice([-1.0, 0.5, 2.0]), "b": 0.1, "neg": False}))
            dshapes.append(dshapes[i])
        elif kind == "reduce":
            dense.append(Step("reduce", [i], {"mean": rng.random() < 0.5}))
            dshapes.append(dshapes[i])
        elif kind == "explog":
            dense.append(Step("explog", [i], {"which": rng.choice(["exp", "log", "logsumexp"])}))
            dshapes.append(dshapes[i])
        elif kind in ("product", "div"):  # of two bounded tensors (often the same one: a square)
            same = [j for j, s in enumerate(dshapes) if s == dshapes[i]]
            j = i if rng.random() < 0.4 else rng.choice(same)
            dense.append(Step(kind, [i, j]))
            dshapes.append(dshapes[i])
        elif kind == "matmul":  # (B, a, b) @ (B, b, a) of two bounded tensors of n = a·b features
            n = dshapes[i]
            divs = [a for a in range(1, n + 1) if n % a == 0 and a * a <= max(n, 16)]  # no n² blow-up
            a = rng.choice(divs)
            same = [j for j, s in enumerate(dshapes) if s == n]
            dense.append(Step("matmul", [i, rng.choice(same)], {"a": a, "b": n // a}))
            dshapes.append(a * a)
        elif kind in ("softmax", "gelu", "layernorm", "clamp"):
            dense.append(Step(kind, [i], {"lo": rng.choice([-1.0, -0.2]), "hi": rng.choice([0.5, 2.0])}))
            dshapes.append(dshapes[i])
        elif kind == "pick" and dshapes[i] >= 2:
            dense.append(Step("pick", [i], {"start": rng.randint(0, 1)}))
            dviews.update({i, len(dshapes)})  # the slice and the tensor it views
            dshapes.append(len(range(dense[-1].params["start"], dshapes[i], 2)))
    last = len(dshapes) - 1
    n_out = rng.choice([2, 3, 4])
    dense.append(Step("linear", [last], {"in": dshapes[last], "out": n_out, "bias": True}))
    return Spec(in_shape, steps, head, dense, n_out, bn_train=rng.random() < 0.3, seed=seed)


def describe(spec: Spec) -> str:
    lines = [f"input {spec.in_shape}, BN {'train' if spec.bn_train else 'eval'} mode"]
    for k, s in enumerate(spec.steps):
        lines.append(f"  t{k + 1} = {s.kind}({', '.join(f't{i}' for i in s.inputs)}) {s.params}")
    lines.append(f"  head = flatten-cat({', '.join(f't{i}' for i in spec.head)}) -> d0")
    for k, s in enumerate(spec.dense):
        lines.append(f"  d{k + 1} = {s.kind}({', '.join(f'd{i}' for i in s.inputs)}) {s.params}")
    return "\n".join(lines)


class RandomNet(nn.Module):
    """The model of a `Spec`; ``functional=True`` builds the out-of-place twin."""

    def __init__(self, spec: Spec, functional: bool = False):
        super().__init__()
        self.spec, self.functional = spec, functional
        self.layers = nn.ModuleList()
        self.dlayers = nn.ModuleList()
        for s in spec.steps:
            self.layers.append(self._module(s))
        for s in spec.dense:
            self.dlayers.append(self._module(s))

    def _module(self, s: Step) -> nn.Module:
        p = s.params
        if s.kind == "conv":
            return nn.Conv2d(p["cin"], p["cout"], p["k"], p["s"], p["p"], p["d"], p["g"], bias=p["bias"])
        if s.kind == "linear":
            return nn.Linear(p["in"], p["out"], bias=p["bias"])
        if s.kind == "bn":
            return nn.BatchNorm2d(p["c"])
        if s.kind == "bn1d":
            return nn.BatchNorm1d(p["c"])
        if s.kind == "act" and p["form"].startswith("module"):
            inplace = p["form"] == "module_inplace" and not self.functional
            return {"relu": lambda: nn.ReLU(inplace=inplace),
                    "leaky": lambda: nn.LeakyReLU(p["slope"], inplace=inplace),
                    "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}[p["act"]]()
        if s.kind == "maxpool" and not p["functional"]:
            return nn.MaxPool2d(p["k"], p["s"], p["p"])
        if s.kind == "avgpool" and not p["functional"]:
            return nn.AvgPool2d(p["k"], p["s"], p["p"])
        if s.kind == "gap":
            return nn.AdaptiveAvgPool2d(p["out"])
        if s.kind == "identity" and p["which"] == "identity":
            return nn.Identity()
        if s.kind == "identity" and p["which"] == "dropout":
            return nn.Dropout(0.5)
        return nn.Identity()  # placeholder (functional step)

    def _act(self, s: Step, m: nn.Module, x):
        p = s.params
        form = p["form"]
        inplace = form.endswith("_inplace") and not self.functional
        if form.startswith("module"):
            return m(x)
        a = p["act"]
        if form.startswith("function"):
            if a == "relu":
                return F.relu(x, inplace=inplace)
            if a == "leaky":
                return F.leaky_relu(x, p["slope"], inplace)
            return torch.sigmoid(x) if a == "sigmoid" else torch.tanh(x)
        if a == "relu":
            return x.relu_() if inplace else x.relu()
        if a == "leaky":  # no tensor method: functional
            return F.leaky_relu(x, p["slope"], inplace)
        return x.sigmoid() if a == "sigmoid" else x.tanh()

    def _step(self, s: Step, m: nn.Module, pool: list):
        p = s.params
        xs = [pool[i] for i in s.inputs]
        x = xs[0]
        if s.kind in ("conv",):
            if p["functional"]:
                return F.conv2d(x, m.weight, m.bias, p["s"], p["p"], p["d"], p["g"])
            return m(x)
        if s.kind in ("linear", "bn", "bn1d", "gap"):
            return m(x)
        if s.kind == "act":
            return self._act(s, m, x)
        if s.kind == "maxpool":
            return F.max_pool2d(x, p["k"], p["s"], p["p"]) if p["functional"] else m(x)
        if s.kind == "avgpool":
            return F.avg_pool2d(x, p["k"], p["s"], p["p"]) if p["functional"] else m(x)
        if s.kind in ("add", "sub"):
            y = xs[1]
            if p["inplace"] and not self.functional:
                if s.kind == "add":
                    x += y
                else:
                    x -= y
                return x
            if p["form"] == "torch":
                return torch.add(x, y) if s.kind == "add" else torch.sub(x, y)
            return x + y if s.kind == "add" else x - y
        if s.kind == "cat":
            return torch.cat(xs, 1)
        if s.kind == "scale":
            y = x * p["a"] + p["b"]
            return -y if p["neg"] else y
        if s.kind == "identity":
            return x.clone() if p["which"] == "clone" else m(x)
        if s.kind == "explog":
            if p["which"] == "exp":
                return torch.exp(torch.tanh(x))
            if p["which"] == "log":
                return torch.log(torch.sigmoid(x) + 0.1)
            return x - torch.logsumexp(x, 1, keepdim=True)  # log-softmax: broadcast (B, 1)
        if s.kind == "reduce":
            r = x.mean(1, keepdim=True) if p["mean"] else x.sum(dim=1, keepdim=True)
            return x - r
        if s.kind == "product":
            return x * xs[1]
        if s.kind == "div":  # a divisor bounded away from 0
            return x / (torch.sigmoid(xs[1]) + 0.5)
        if s.kind == "matmul":
            a, b = p["a"], p["b"]
            return torch.matmul(x.view(-1, a, b), xs[1].view(-1, b, a)).flatten(1)
        if s.kind == "softmax":
            return torch.softmax(x, dim=1)
        if s.kind == "gelu":
            return F.gelu(x)
        if s.kind == "layernorm":
            # eps 0.1: the default 1e-5 amplifies the network's own rounding of a (near-)constant
            # input up to 316x, past what the oracle's rounding allowance measures (the rule is the
            # same; tests/test_sequence_models.py covers the default eps)
            return F.layer_norm(x, (x.shape[1],), eps=0.1)
        if s.kind == "clamp":
            return torch.clamp(x, p["lo"], p["hi"])
        if s.kind == "pick":
            return x[:, p["start"]::2]
        raise ValueError(s.kind)

    def _inplace(self, s: Step) -> bool:
        p = s.params
        return (s.kind == "act" and p["form"].endswith("_inplace")) or \
            (s.kind in ("add", "sub") and p.get("inplace", False))

    def _run_steps(self, steps, layers, pool):
        # An in-place step overwrites one tensor, and so every pool entry that *is* that tensor
        # (earlier in-place results alias their input): the twin replaces them all.
        same = list(range(len(pool)))  # alias class of each entry
        for s, m in zip(steps, layers):
            y = self._step(s, m, pool)
            if self._inplace(s):
                c = same[s.inputs[0]]
                for k in range(len(pool)):
                    if same[k] == c:
                        pool[k] = y
                same.append(c)
            else:
                same.append(len(same))
            pool.append(y)
        return pool

    def forward(self, x):
        pool = self._run_steps(self.spec.steps, self.layers, [x])
        h = torch.cat([pool[i].flatten(1) for i in self.spec.head], 1) if len(self.spec.head) > 1 \
            else pool[self.spec.head[0]].flatten(1)
        return self._run_steps(self.spec.dense, self.dlayers, [h])[-1]


def build(spec: Spec, dtype=torch.float64) -> tuple[RandomNet, RandomNet]:
    """(traced model, functional twin) with the same random parameters and BN statistics."""
    torch.manual_seed(spec.seed)
    model = RandomNet(spec)
    g = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.randn(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g) * 0.3)
    twin = RandomNet(spec, functional=True)
    twin.load_state_dict(model.state_dict())
    model, twin = model.to(dtype).eval(), twin.to(dtype).eval()
    if spec.bn_train:
        for net in (model, twin):
            for m in net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train()
    return model, twin


def freeze_bn(twin: RandomNet, x0: torch.Tensor) -> RandomNet:
    """The twin with training-mode BN replaced by the statistics of the clean batch x0 (what the
    bounds treat as constants), so that any point can be evaluated on its own."""
    import copy
    m = copy.deepcopy(twin)
    stats = {}
    hooks = []
    for k, mod in m.named_modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.training:

            def hook(mod, i, o, k=k):
                t = i[0]
                d = [0] + list(range(2, t.dim()))
                stats[k] = (t.mean(d), t.var(d, unbiased=False))
            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        m(x0)
    for h in hooks:
        h.remove()
    for k, mod in m.named_modules():
        if k in stats:
            mod.running_mean.copy_(stats[k][0])
            mod.running_var.copy_(stats[k][1])
            mod.eval()
    return m.eval()


def degenerate_bn(model: nn.Module, x0: torch.Tensor) -> bool:
    """Whether a training-mode BN sees a (nearly) constant batch at x0, e.g. after ``h - h``: it
    then multiplies rounding noise by 1/sqrt(eps) per layer, and the network's value (a constant
    in exact arithmetic) is noise in floating point, which no bound can be checked against."""
    import copy
    model = copy.deepcopy(model)  # the forward pass below updates running statistics
    found = []

    def hook(mod, i, o):
        t = i[0]
        d = [0] + list(range(2, t.dim()))
        var, mean = t.var(d, unbiased=False), t.mean(d)
        found.append(bool((var < 1e-6 * (1 + mean ** 2)).any()))

    hooks = [m.register_forward_hook(hook) for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    try:
        with torch.no_grad():
            model(x0.clone())
    finally:
        for h in hooks:
            h.remove()
    return any(found)
