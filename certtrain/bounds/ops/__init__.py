"""Bound rules, one concept per module; importing this package registers them all."""
from . import (activation, arithmetic, batchnorm, concat, conv, conv1d, exp_log, identity, linear,  # noqa: F401
               clamp, gelu, matmul, pooling, power, reduce, relu, reshape, s_shaped, select, softmax,
               unfold, absolute, conv_grad, derivative)
from .base import BoundOp, LinearOp, Value
from .registry import OPS, UnsupportedOperation, register_op

__all__ = ["BoundOp", "LinearOp", "Value", "OPS", "UnsupportedOperation", "register_op"]
