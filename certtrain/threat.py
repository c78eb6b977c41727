"""Threat models: the perturbation family a model is trained and verified against.

Training ramps the radius ε from 0 to its target, so a run's perturbation is a *family* of sets;
``family.at(eps)`` gives the engine's perturbation set (a `certtrain.bounds.Perturbation`) at one
radius.  Configs build the family by ``_target_`` (``conf/perturbation/*.yaml``)::

    _target_: certtrain.threat.LpBall
    norm: inf
    eps: 0.1

Every ε and norm of a run is checked here, once.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .bounds.perturbations import Perturbation, PerturbationL0Norm, PerturbationLpNorm, PerturbationSynonym

__all__ = ["L0Ball", "LpBall", "SynonymSubstitution", "ThreatModel", "WeightBall", "WeightBallSet", "build_threat",
           "check_budget", "check_eps", "check_l0_budget", "parse_norm"]


def parse_norm(norm: float | str) -> float:
    """``inf`` / ``linf`` / ``2`` / ``l2`` → math.inf or 2.0, ``0`` / ``l0`` → 0.0 (the L0 ball,
    `L0Ball`; `LpBall` refuses it); ValueError otherwise (the PGD attack has no L1)."""
    s = str(norm).strip().lower()
    s = s[1:] if s.startswith("l") else s
    try:
        value = math.inf if s in ("inf", "infinity", "∞") else float(s)
    except ValueError:
        value = float("nan")
    if value not in (math.inf, 2.0, 0.0):
        raise ValueError(f"unsupported perturbation norm {norm!r}: use inf (linf), 2 (l2) or 0 (l0: perturbation=l0)")
    return value


def check_eps(name: str, eps: Any) -> float:
    """``eps`` as a finite float >= 0; ValueError naming ``name`` otherwise."""
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {eps!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {eps!r}")
    return value


class ThreatModel:
    """Base class of perturbation families: ``at(eps)`` is the set of radius ``eps``; ``eps`` the
    training target, ``eval_eps`` the radius of evaluation; ``attack_norm`` the norm PGD attacks
    in (None where PGD does not apply; the training methods' attacks need it); ``is_box`` whether
    every set is a box (SABR needs it); ``input_kind`` what the set perturbs: ``"image"`` (the input
    tensor) or ``"text"`` (the word embeddings of a text classifier, `certtrain.text_module`);
    ``attack_accuracy`` the attack of validation, test and verification."""

    eps: float
    eval_eps: float
    attack_norm: Optional[float] = None
    is_box: bool = False
    input_kind: str = "image"
    x_L: float = 0.0
    x_U: float = 1.0

    #: what the sets perturb: ``"input"`` (the input tensor) or ``"weights"`` (the model's parameters, `WeightBall`)
    perturbs: str = "input"
    #: the attack of `attack_accuracy`, as tables name it
    attack_name: str = "PGD"

    def at(self, eps: Any, x: Optional[Tensor] = None) -> Perturbation:
        """The set of radius ``eps`` (``x``: the clean input, for sets that depend on it)."""
        raise NotImplementedError

    def attack_accuracy(self, net: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, restarts: int = 1,
                        step_size: Optional[float] = None) -> Optional[Tensor]:
        """Boolean (B,): the threat's attack at radius ``eps`` finds no misclassified point (None: no
        attack).  Default: PGD in the ``attack_norm`` ball within [x_L, x_U] where ``attack_norm`` is set."""
        if self.attack_norm is None:
            return None
        from .attacks import pgd_accuracy

        return pgd_accuracy(net, x, y, eps, norm=self.attack_norm, steps=steps, step_size=step_size,
                            restarts=restarts, x_min=self.x_L, x_max=self.x_U)

    def prepare_model(self, model: nn.Module) -> None:
        """Called once on the model before the bound engine is traced (`WeightBall` installs its
        `BoundedParameter`s here)."""

    def describe(self, eps: Optional[float] = None) -> str:
        """The set at ``eps`` (default ``eval_eps``) in words, for tables."""
        return f"{self!r} at {self.eval_eps if eps is None else eps:g}"


class LpBall(ThreatModel):
    """The Lp ball ``||x' - x||_p <= eps`` (p = inf or 2) within the input domain ``[x_L, x_U]``
    (pixel space: [0, 1])."""

    def __init__(self, norm: float | str = "inf", eps: float = 0.1, eval_eps: Optional[float] = None,
                 x_L: float = 0.0, x_U: float = 1.0):
        self.norm = parse_norm(norm)
        if self.norm == 0:
            raise ValueError("perturbation.norm=0 is the L0 ball (at most k pixels changed): use perturbation=l0 "
                             "(certtrain.threat.L0Ball)")
        self.eps = check_eps("perturbation.eps", eps)
        self.eval_eps = self.eps if eval_eps is None else check_eps("perturbation.eval_eps", eval_eps)
        self.x_L, self.x_U = float(x_L), float(x_U)
        if not self.x_L < self.x_U:
            raise ValueError(f"perturbation domain [x_L, x_U] = [{x_L}, {x_U}] is empty")
        self.attack_norm = self.norm
        self.is_box = self.norm == math.inf

    def __repr__(self) -> str:
        n = "inf" if self.norm == math.inf else f"{self.norm:g}"
        return f"LpBall(norm={n}, eps={self.eps:g}, eval_eps={self.eval_eps:g})"

    def at(self, eps: Any, x: Optional[Tensor] = None) -> PerturbationLpNorm:
        return PerturbationLpNorm(eps=eps, norm=self.norm, x_L=self.x_L, x_U=self.x_U)

    def describe(self, eps: Optional[float] = None) -> str:
        n = "L∞" if self.norm == math.inf else "L2"
        return f"{n} ε = {self.eval_eps if eps is None else float(eps):g}"


def check_budget(name: str, budget: Any) -> int:
    """``budget`` as an integer >= 0 (a number of substituted words); ValueError naming ``name``."""
    ok = not isinstance(budget, bool) and isinstance(budget, (int, float)) and float(budget).is_integer() \
        and budget >= 0
    if not ok:
        raise ValueError(f"{name} must be an integer >= 0 (words substituted), got {budget!r}")
    return int(budget)


class SynonymSubstitution(ThreatModel):
    """At most ``budget`` words of a sentence replaced by synonym candidates (the text data module's
    table; Jia et al. 2019, Xu et al. 2020).  ``eps`` in (0, 1] is the training ramp's target: at ε
    the candidates' embeddings are moved towards the original word's, ``x + ε (c - x)`` (a smaller
    set, for the loss only); evaluation always uses the real candidates (``eval_eps`` = 1).
    ``beam``: the word-substitution attack's beam width (`certtrain.word_attack`)."""

    attack_name = "word-substitution attack"
    input_kind = "text"

    def __init__(self, budget: int = 6, eps: float = 1.0, eval_eps: Optional[float] = None, beam: int = 1):
        self.budget = check_budget("perturbation.budget", budget)
        self.eps = check_eps("perturbation.eps", eps)
        if not 0 < self.eps <= 1:
            raise ValueError(f"perturbation.eps is the ramp's target for word substitutions and must lie in (0, 1] "
                             f"(1: the real candidates), got {eps!r}")
        self.eval_eps = 1.0 if eval_eps is None else check_eps("perturbation.eval_eps", eval_eps)
        if self.eval_eps != 1.0:
            raise ValueError(f"perturbation.eval_eps must be 1 for word substitutions: a certificate holds for the real "
                             f"candidates only (eps < 1 is the training ramp), got {eval_eps!r}")
        if isinstance(beam, bool) or not isinstance(beam, int) or beam < 1:
            raise ValueError(f"perturbation.beam must be an integer >= 1, got {beam!r}")
        self.beam = beam

    def __repr__(self) -> str:
        return f"SynonymSubstitution(budget={self.budget}, eps={self.eps:g}, beam={self.beam})"

    def describe(self, eps: Optional[float] = None) -> str:
        return f"word substitutions: at most {self.budget} word(s) replaced by synonym candidates"

    def at(self, eps: Any, candidates: Optional[Tensor] = None, candidate_mask: Optional[Tensor] = None,
           budget: Optional[int] = None) -> PerturbationSynonym:
        """The set at ramp value ``eps`` for a batch's candidate embeddings (B, T, K, D) and mask."""
        if candidates is None:
            raise ValueError("SynonymSubstitution.at needs the batch's candidate embeddings (candidates=...)")
        return PerturbationSynonym(self.budget if budget is None else check_budget("budget", budget), candidates,
                                   candidate_mask, eps=min(float(eps), 1.0))


def build_threat(config: Any, where: str = "perturbation") -> ThreatModel:
    """A threat model from an object or a config mapping (``_target_`` plus its options; a mapping
    without ``_target_``, as in old checkpoints, is an `LpBall`).  ValueError naming the problem."""
    if isinstance(config, ThreatModel):
        return config
    if config is None:
        return LpBall()
    if not hasattr(config, "items"):
        raise ValueError(f"{where} must be a mapping (norm, eps, ...) or a threat model, got {config!r}")
    opts = dict(config)
    target = opts.pop("_target_", None)
    cls: Any = LpBall
    if target is not None:
        import importlib

        mod, _, attr = str(target).rpartition(".")
        try:
            cls = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError, ValueError):
            raise ValueError(f"unknown {where}._target_ {target!r}; e.g. certtrain.threat.LpBall") from None
        if not (isinstance(cls, type) and issubclass(cls, ThreatModel)):
            raise ValueError(f"{where}._target_ {target!r} is not a certtrain.threat.ThreatModel")
    import inspect

    known = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(f'{where}.{k}' for k in unknown)}; available: {', '.join(known)}")
    return cls(**opts)


# ----------------------------------------------------------------------------- L0 and weight balls
def check_l0_budget(name: str, k: Any) -> int:
    """``k`` as an integer >= 0 (a number of changed pixels); ValueError naming ``name`` otherwise."""
    ok = not isinstance(k, bool) and isinstance(k, (int, float)) and math.isfinite(float(k)) \
        and float(k).is_integer() and k >= 0
    if not ok:
        raise ValueError(f"{name} must be an integer >= 0 (pixels changed), got {k!r}; a fractional ε exists "
                         "only on the training ramp")
    return int(k)


class L0Ball(ThreatModel):
    """At most k pixels (input coordinates) changed, each to any value of its domain [x_L, x_U]
    (pixel space: [0, 1]); the engine's `PerturbationL0Norm`.  ``eps``: the training target (may be
    fractional), ``eval_eps``: the integer k of validation, test and verification (default ``eps``).

    Training ramp: at a fractional ε, ``at(eps, x)`` is k = ceil(ε) pixels, each within its domain
    shrunk towards x by r = ε / k (x_L' = x − r (x − x_L), x_U' = x + r (x_U − x)): a real, smaller
    subset of the set of ceil(ε) pixels, so the loss bounds an actual set of inputs (auto_LiRPA's
    ``simple_training`` instead multiplies the L0 concretization term by ε/ε_max, a bound of no
    set).  At an integer ε it is the real set.  The sets grow with ε between integers; at an integer
    n they change from n whole pixels to n+1 pixels at n/(n+1) of their range."""

    attack_name = "L0 attack"

    def __init__(self, eps: float = 1, eval_eps: Optional[int] = None, x_L: float = 0.0, x_U: float = 1.0,
                 norm: Any = 0):
        if parse_norm(norm) != 0:
            raise ValueError(f"perturbation.norm of an L0 ball is 0 (it counts changed pixels), got {norm!r}; "
                             "for an Lp ball use perturbation=linf or l2")
        self.eps = check_eps("perturbation.eps", eps)
        if eval_eps is None:
            if not self.eps.is_integer():
                raise ValueError(f"perturbation.eps={eps!r} is fractional, so it cannot be the evaluation budget: "
                                 "give perturbation.eval_eps (an integer number of pixels)")
            eval_eps = self.eps
        self.eval_eps = check_l0_budget("perturbation.eval_eps", eval_eps)
        self.x_L, self.x_U = float(x_L), float(x_U)
        if not self.x_L < self.x_U:
            raise ValueError(f"perturbation domain [x_L, x_U] = [{x_L}, {x_U}] is empty")
        self.norm = 0.0
        self.attack_norm = None
        self.is_box = False

    def __repr__(self) -> str:
        return f"L0Ball(eps={self.eps:g}, eval_eps={self.eval_eps})"

    def at(self, eps: Any, x: Optional[Tensor] = None) -> PerturbationL0Norm:
        """The real set of k = ε pixels at an integer ε; at a fractional ε the ramp's subset around
        ``x`` (required then), see the class docstring."""
        e = check_eps("the L0 budget ε", eps)
        if e.is_integer():
            return PerturbationL0Norm(eps=int(e), x_L=self.x_L, x_U=self.x_U)
        if x is None:
            raise ValueError(f"L0Ball.at({e:g}): a fractional ε (the training ramp) shrinks the domain towards the "
                             "clean input, so pass x=; evaluation uses an integer number of pixels")
        k = math.ceil(e)
        r = e / k
        x = x.detach()
        lo = torch.minimum((x - r * (x - self.x_L)).clamp(min=self.x_L), x)  # clamps: exactly inside the real set
        hi = torch.maximum((x + r * (self.x_U - x)).clamp(max=self.x_U), x)
        return PerturbationL0Norm(eps=k, x_L=lo, x_U=hi)

    def attack_accuracy(self, net: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, restarts: int = 1,
                        step_size: Optional[float] = None) -> Optional[Tensor]:
        """The L0 attack of `certtrain.attacks.l0_attack` on the set ``at(eps, x)`` (``step_size`` unused)."""
        from .attacks import l0_accuracy

        ptb = self.at(eps, x)
        return l0_accuracy(net, x, y, ptb.eps, x_min=ptb.x_L, x_max=ptb.x_U, steps=steps, restarts=restarts)

    def describe(self, eps: Optional[float] = None) -> str:
        k = self.eval_eps if eps is None else eps
        return f"L0: at most {k:g} pixel(s) changed, each in [{self.x_L:g}, {self.x_U:g}]"


#: the layers whose parameters a `WeightBall` may perturb (the engine's rules for `BoundedParameter`)
WEIGHT_LAYERS = (nn.Linear, nn.Conv2d)


class WeightBallSet(PerturbationLpNorm):
    """The Lp ball that each perturbed parameter of a `WeightBall` carries (a `PerturbationLpNorm`
    for the engine); its own class so that code for input sets refuses it instead of reading it as
    a ball around the input."""


class WeightBall(ThreatModel):
    """Each named parameter of the model in its own Lp ball (``norm`` 2 or inf) of radius ε around
    its trained value; the input stays the clean x (auto_LiRPA's `BoundedParameter` and its
    ``mlp_3layer_weight_perturb`` example).  ``params``: names or glob patterns of the model's
    parameters (without the ``Normalize`` that `CertifiedModule` prepends), default the weight of
    every nn.Linear; nn.Linear (on (batch, features) inputs) and nn.Conv2d (groups=1) only.

    A prediction counts as robust when it holds for every parameter value in the set; the bounds
    take one parameter copy per example, and the attack (`certtrain.attacks.weight_pgd_attack`)
    searches weights per example, the matching upper bound of robust accuracy."""

    attack_name = "weight PGD"

    perturbs = "weights"

    def __init__(self, norm: float | str = 2, eps: float = 0.01, eval_eps: Optional[float] = None,
                 params: Optional[Any] = None):
        self.norm = parse_norm(norm)
        if self.norm == 0:
            raise ValueError("perturbation.norm of a weight ball must be inf or 2, got 0")
        self.eps = check_eps("perturbation.eps", eps)
        self.eval_eps = self.eps if eval_eps is None else check_eps("perturbation.eval_eps", eval_eps)
        if params is not None:
            items = [params] if isinstance(params, str) else params
            if not isinstance(items, (list, tuple)) or not items or \
                    not all(isinstance(p, str) and p.strip() for p in items):
                raise ValueError(f"perturbation.params must be null (the weight of every nn.Linear) or a non-empty "
                                 f"list of parameter names / glob patterns, e.g. [classifier.0.weight], got {params!r}")
            params = [p.strip() for p in items]
        self.params: Optional[list[str]] = params
        self.attack_norm = None
        self.is_box = False

    def __repr__(self) -> str:
        n = "inf" if self.norm == math.inf else f"{self.norm:g}"
        return (f"WeightBall(norm={n}, eps={self.eps:g}, eval_eps={self.eval_eps:g}"
                + (f", params={self.params}" if self.params is not None else "") + ")")

    def at(self, eps: Any, x: Optional[Tensor] = None) -> WeightBallSet:
        """The ball of radius ``eps`` that each perturbed parameter gets (``x`` unused)."""
        return WeightBallSet(eps=eps, norm=self.norm)

    def parameter_names(self, model: nn.Module) -> list[str]:
        """Names of the parameters of ``model`` that the ball perturbs; ValueError for a pattern that
        matches nothing or a parameter of a layer the engine cannot bound with perturbed parameters."""
        import fnmatch

        owners = {}
        for mname, m in model.named_modules():
            for pname, _ in m.named_parameters(recurse=False):
                owners[f"{mname}.{pname}" if mname else pname] = m
        if self.params is None:
            names = [n for n, m in owners.items() if isinstance(m, nn.Linear) and n.endswith("weight")]
            if not names:
                raise ValueError("perturbation=weights: the model has no nn.Linear; name the parameters to perturb "
                                 f"(perturbation.params), e.g. one of {', '.join(list(owners)[:8])}")
            return names
        names: list[str] = []
        for pat in self.params:
            hit = [n for n in owners if fnmatch.fnmatchcase(n, pat)]
            if not hit:
                raise ValueError(f"perturbation.params: {pat!r} matches no parameter of the model; available: "
                                 f"{', '.join(owners)}")
            names += [n for n in hit if n not in names]
        for n in names:
            m = owners[n]
            if not isinstance(m, WEIGHT_LAYERS) or (isinstance(m, nn.Conv2d) and m.groups != 1):
                what = type(m).__name__ + (f" (groups={m.groups})" if isinstance(m, nn.Conv2d) else "")
                raise ValueError(f"perturbation.params: {n!r} belongs to {what}; weight perturbation supports the "
                                 "weight and bias of nn.Linear and nn.Conv2d (groups=1)")
        return names

    def prepare_model(self, model: nn.Module) -> None:
        """Replace the perturbed parameters by `BoundedParameter`s (same data, ``ptb`` None: unperturbed
        until a bound call sets it); idempotent.  Call before the bound engine is traced."""
        from .bounds import BoundedParameter

        for name in self.parameter_names(model):
            mod, _, attr = name.rpartition(".")
            layer = model.get_submodule(mod) if mod else model
            p = getattr(layer, attr)
            if not isinstance(p, BoundedParameter):
                setattr(layer, attr, BoundedParameter(p.data, None, p.requires_grad))

    @staticmethod
    def perturbed(net: nn.Module) -> list[tuple[str, Any]]:
        """(name, parameter) of the `BoundedParameter`s of ``net``; RuntimeError if there are none."""
        from .bounds import BoundedParameter

        out = [(n, p) for n, p in net.named_parameters() if isinstance(p, BoundedParameter)]
        if not out:
            raise RuntimeError("the model has no BoundedParameter: call WeightBall.prepare_model(model) before "
                               "tracing it (CertifiedModule does this on construction)")
        return out

    @contextmanager
    def perturbing(self, net: nn.Module, eps: Any) -> Iterator[None]:
        """Within the block, every `BoundedParameter` of ``net`` carries the ball of radius ``eps``."""
        params = [p for _, p in self.perturbed(net)]
        saved = [p.ptb for p in params]
        ptb = self.at(eps)
        for p in params:
            p.ptb = ptb
        try:
            yield
        finally:
            for p, s in zip(params, saved):
                p.ptb = s

    def attack_accuracy(self, net: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, restarts: int = 1,
                        step_size: Optional[float] = None) -> Optional[Tensor]:
        """PGD on the perturbed parameters, per example (`certtrain.attacks.weight_pgd_accuracy`)."""
        from .attacks import weight_pgd_accuracy

        names = [n for n, _ in self.perturbed(net)]
        return weight_pgd_accuracy(net, x, y, eps, names, norm=self.norm, steps=steps, step_size=step_size,
                                   restarts=restarts)

    def describe(self, eps: Optional[float] = None) -> str:
        n = "L∞" if self.norm == math.inf else "L2"
        which = ", ".join(self.params) if self.params is not None else "every nn.Linear weight"
        return f"weights ({which}): {n} ε = {self.eval_eps if eps is None else float(eps):g} each"
