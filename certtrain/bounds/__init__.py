"""certtrain.bounds: guaranteed output bounds of PyTorch models (IBP, CROWN, CROWN-IBP, α-CROWN) and
complete verification by branch and bound (β-CROWN, `bab_verify`); bounds of input gradients
(Jacobian, JVP, local Lipschitz constants: `BoundedJacobian`).

    net = BoundedModule(model, example_input)
    x = BoundedTensor(x0, PerturbationLpNorm(norm=float("inf"), eps=0.1, x_L=0.0, x_U=1.0))
    lb, ub = net.compute_bounds(x=(x,), method="CROWN")

Algorithms on the engine use its walk interface (`BoundedModule.prepare`, `interval_pass`,
`output_bounds`, `node_bounds`, `BoundState`), never its private members.
"""
from .bab import BaBOptions, BaBResult, VerificationProblem, bab_verify
from .bounded_module import DEFAULT_OPTS, BoundedModule, check_bound_opts
from .graph import BoundNode, TraceError
from .gradient_graph import build_gradient_graph, vjp_rule
from .jacobian import BoundedJacobian, gradient_l1_norms
from .methods import (CHEAP_METHODS, METHOD_NAMES, AlphaCROWN, BoundMethod, CROWN, CROWNIBP, IBP,
                      check_alpha_opts, resolve_method)
from .ops import OPS, BoundOp, LinearOp, UnsupportedOperation, Value, register_op
from .patches import Patches
from .perturbations import Perturbation, PerturbationL0Norm, PerturbationLpNorm, PerturbationSynonym
from .state import BoundState
from .tensor import BoundedParameter, BoundedTensor

__all__ = ["BoundedModule", "BoundedTensor", "BoundedParameter", "BoundState", "BoundNode", "Perturbation", "PerturbationLpNorm", "PerturbationL0Norm", "PerturbationSynonym",
           "Patches", "BoundOp", "LinearOp", "Value", "OPS", "register_op", "UnsupportedOperation",
           "TraceError", "DEFAULT_OPTS", "check_bound_opts", "BoundMethod", "IBP", "CROWNIBP", "CROWN",
           "AlphaCROWN", "METHOD_NAMES", "CHEAP_METHODS", "resolve_method", "check_alpha_opts",
           "bab_verify", "BaBOptions", "BaBResult", "VerificationProblem", "BoundedJacobian",
           "build_gradient_graph", "vjp_rule", "gradient_l1_norms"]
