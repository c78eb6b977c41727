"""Registry of bound rules, keyed by op name and by the torch targets each rule handles."""
from __future__ import annotations

from typing import Any, Optional

from torch import fx, nn

from .base import BoundOp

OPS: dict[str, type[BoundOp]] = {}
_BY_TARGET: dict[Any, type[BoundOp]] = {}


class UnsupportedOperation(NotImplementedError):
    """Raised when a traced model uses an op that has no bound rule."""


def register_op(name: str):
    """Class decorator: register a `BoundOp` under ``name`` for every entry of its ``targets``."""

    def deco(cls: type[BoundOp]) -> type[BoundOp]:
        cls.op_name = name
        OPS[name] = cls
        for t in cls.targets:
            _BY_TARGET[t] = cls
        return cls

    return deco


def target_key(node: fx.Node, module: Optional[nn.Module]) -> Any:
    if node.op == "call_module":
        return type(module)
    if node.op == "call_method":
        return f"method:{node.target}"
    return node.target


def describe_target(key: Any) -> str:
    if isinstance(key, type):
        return f"module {key.__module__}.{key.__qualname__}"
    if isinstance(key, str):
        return f"tensor method .{key.split(':', 1)[1]}()"
    mod = getattr(key, "__module__", None) or ""
    return f"function {mod + '.' if mod else ''}{getattr(key, '__name__', repr(key))}"


def source_line(node: fx.Node) -> str:
    """The model's source line that created ``node`` (from fx's recorded stack trace)."""
    trace = node.meta.get("stack_trace") or ""
    lines = [l for l in trace.strip().splitlines() if l.strip()]
    frames = [(lines[i].strip(), lines[i + 1].strip() if i + 1 < len(lines) else "")
              for i in range(len(lines)) if lines[i].strip().startswith("File ")]
    # The innermost frame outside torch itself is the user's line.
    for where, code in reversed(frames):
        if "/torch/" not in where and "\\torch\\" not in where:
            return f"{where}: {code}"
    return f"{frames[-1][0]}: {frames[-1][1]}" if frames else "source line unknown"


def lookup(node: fx.Node, module: Optional[nn.Module]) -> type[BoundOp]:
    key = target_key(node, module)
    cls = _BY_TARGET.get(key)
    if cls is None:
        what = describe_target(key)
        raise UnsupportedOperation(
            f"No bound rule for {what} at graph node '{node.name}' ({source_line(node)}). "
            "To support it, write a BoundOp subclass in a new file under certtrain/bounds/ops/ "
            "with `targets = (...)` naming this module class / function / 'method:name', "
            "implement ibp() and backward(), decorate it with @register_op('OpName') and import "
            "the file in certtrain/bounds/ops/__init__.py (see README, 'Adding a bound rule').")
    return cls
