"""certtrain.bounds: guaranteed output bounds of PyTorch models (IBP, CROWN, CROWN-IBP).

    net = BoundedModule(model, example_input)
    x = BoundedTensor(x0, PerturbationLpNorm(norm=float("inf"), eps=0.1, x_L=0.0, x_U=1.0))
    lb, ub = net.compute_bounds(x=(x,), method="CROWN")
"""
from .graph import TraceError
from .module import DEFAULT_OPTS, BoundedModule
from .ops import OPS, BoundOp, LinearOp, UnsupportedOperation, Value, register_op
from .patches import Patches
from .perturbations import Perturbation, PerturbationLpNorm
from .tensor import BoundedTensor

__all__ = ["BoundedModule", "BoundedTensor", "Perturbation", "PerturbationLpNorm", "Patches",
           "BoundOp", "LinearOp", "Value", "OPS", "register_op", "UnsupportedOperation",
           "TraceError", "DEFAULT_OPTS"]
