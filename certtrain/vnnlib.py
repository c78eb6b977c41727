"""VNN-LIB 1.0 properties (as used in VNN-COMP) and ``instances.csv`` lists.

    from certtrain.vnnlib import read_vnnlib, load_instances
    prop = read_vnnlib("prop_0_0.03.vnnlib")           # or parse_vnnlib(text)
    for dj in prop.disjuncts:                          # one per distinct input box
        x_lo, x_hi = dj.x_lo, dj.x_hi                  # float64, shape (n_inputs,)
        C, d, groups = dj.spec()                       # all rows of all its conjunctions
        ...                                            # lb = lower bound of C @ y over the box
        proved = dj.is_proved(lb)

**Convention: the file asserts a counterexample.**  A VNN-LIB file declares inputs ``X_0 ..
X_{n-1}`` (the network input flattened in row-major order) and outputs ``Y_0 .. Y_{m-1}``, and its
assertions describe the inputs and outputs of a *violation* of the property.  The property holds
("unsat") iff no input satisfying the assertions is mapped by the network to outputs satisfying
them; it is violated ("sat") iff such an input exists.

The assertions are normalised to a disjunction of conjunctions and grouped by input box::

    violated  <=>  exists disjunct D, x in [D.x_lo, D.x_hi], (C, d) in D.conjunctions:
                   C @ f(x) <= d   (every one of the k rows)

with ``C`` of shape ``(k, n_outputs)`` and ``d`` of shape ``(k,)`` (float64).  Each atomic
comparison between linear terms of the outputs (``(>= Y_0 Y_8)``, ``(<= Y_3 0.5)``,
``(<= (+ Y_0 (* 2 Y_1)) Y_2)``, ...) is one row ``c @ y <= d``: ``(>= Y_0 Y_8)`` is the row
``Y_8 - Y_0 <= 0``.  ``=`` gives two rows; strict ``<`` / ``>`` are read as ``<=`` / ``>=`` (the
closure of the unsafe set: a proof of the closed version proves the strict one).

**What a verifier must show.**  A conjunction ``(C, d)`` is infeasible over a box (no input in it
gives outputs satisfying all rows) if for SOME row i::

    min over x in box of (C_i @ f(x) - d_i) > 0

and the property is proved iff EVERY conjunction of EVERY disjunct is infeasible.  So a lower
bound ``lb`` of ``C @ f(x)`` over the box (e.g. CROWN with the spec matrix ``C``) proves a
conjunction when ``max_i (lb_i - d_i) > 0``: `Disjunct.spec` stacks the rows of all conjunctions
of a disjunct into one spec matrix (batch dim 1, as ``compute_bounds(C=...)`` takes it) with the
conjunction index of each row, `Disjunct.margins` gives ``max_i (lb_i - d_i)`` per conjunction and
`Disjunct.is_proved` whether all are positive.  A conjunction without output rows (the whole box
is a counterexample) is never proved.  `VnnlibProperty.counterexample_holds` checks a concrete
output (and optionally input) against the unsafe condition, the check for a "sat" answer.

For the VNN-COMP 2021 benchmarks: mnistfc files have one box of 784 inputs in [0, 1] and one
disjunct with 9 single-row conjunctions ``Y_t - Y_j <= 0`` (written ``(>= Y_j Y_t)``, t the true
class); oval21 files have one box of 3072 (normalised) inputs and 9 conjunctions
``Y_t - Y_j <= 0`` (written ``(<= Y_t Y_j)``).

Supported syntax: ``;`` comments, ``(declare-const X_i Real)`` / ``(declare-const Y_j Real)``,
``(assert B)`` with ``B`` one of ``(and B*)``, ``(or B*)``, ``(<= T T+)``, ``(>= T T+)``, ``(< ...)``,
``(> ...)``, ``(= T T)``, and linear terms ``T``: numbers, variables, ``(+ T*)``, ``(- T)``,
``(- T T*)``, ``(* T*)`` (at most one non-constant factor), ``(/ T number)``.  Input constraints
must bound single variables (a box) and every input must be bounded on both sides; constraints
mixing inputs and outputs are not supported.  ``check-sat``, ``set-logic``, ``set-info``,
``set-option``, ``get-model`` and ``exit`` are ignored.  Anything else raises `VnnlibError` with
the file, the line and what was expected.
"""
from __future__ import annotations

import csv
import gc
import gzip
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["VnnlibError", "Conjunction", "Disjunct", "VnnlibProperty", "parse_vnnlib", "read_vnnlib",
           "Instance", "load_instances"]

PathLike = Union[str, Path]

#: at most this many conjunctions after normalising and/or nesting (a guard against blow-up)
MAX_CONJUNCTIONS = 100_000


class VnnlibError(ValueError):
    """A malformed or unsupported VNN-LIB file; the message names the file and line."""


# --------------------------------------------------------------------------------------- result
class Conjunction(NamedTuple):
    """``C @ y <= d`` (all rows): C of shape (k, n_outputs), d of shape (k,), float64."""

    C: Tensor
    d: Tensor

    def holds(self, y: Tensor, tol: float = 0.0) -> bool:
        y = torch.as_tensor(y, dtype=torch.float64).reshape(-1)
        return bool(torch.all(self.C @ y <= self.d + tol))


@dataclass
class Disjunct:
    """An input box with the output conditions of a counterexample in it: the property is violated
    in this box iff some x in ``[x_lo, x_hi]`` gives outputs satisfying some conjunction."""

    x_lo: Tensor  # float64, (n_inputs,)
    x_hi: Tensor  # float64, (n_inputs,)
    conjunctions: list[Conjunction] = field(default_factory=list)

    @property
    def n_rows(self) -> int:
        return sum(c.C.shape[0] for c in self.conjunctions)

    def input_box(self, shape: Optional[Sequence[int]] = None, dtype: torch.dtype = torch.float64,
                  device=None) -> tuple[Tensor, Tensor]:
        """``(x_lo, x_hi)`` reshaped to ``shape`` (e.g. the network's input shape with its batch
        dim, ``(1, 784, 1)``: inputs are in row-major order).  Converting float64 bounds to
        float32 rounds them outward, so the box only grows."""
        lo, hi = self.x_lo, self.x_hi
        if dtype != torch.float64:
            lo_c, hi_c = lo.to(dtype), hi.to(dtype)
            lo_c = torch.where(lo_c.double() > lo, torch.nextafter(lo_c, torch.full_like(lo_c, -math.inf)), lo_c)
            hi_c = torch.where(hi_c.double() < hi, torch.nextafter(hi_c, torch.full_like(hi_c, math.inf)), hi_c)
            lo, hi = lo_c, hi_c
        if shape is not None:
            lo, hi = lo.reshape(tuple(shape)), hi.reshape(tuple(shape))
        return lo.to(device), hi.to(device)

    def bounded_input(self, shape: Optional[Sequence[int]] = None, dtype: torch.dtype = torch.float32,
                      device=None):
        """The box as a ``BoundedTensor`` for ``BoundedModule.compute_bounds(x=(...,))``: centre
        ``(x_lo + x_hi) / 2`` with ``PerturbationLpNorm(norm=inf, eps=x_hi - x_lo, x_L=x_lo,
        x_U=x_hi)``, whose set is exactly ``[x_lo, x_hi]`` (outward-rounded to ``dtype``).  Note
        that ``PerturbationLpNorm``'s ``eps`` defaults to 0: with ``x_L``/``x_U`` alone the set is
        the centre point, not the box."""
        from certtrain.bounds import BoundedTensor, PerturbationLpNorm

        lo, hi = self.input_box(shape, dtype, device)
        centre = torch.clamp((lo + hi) / 2, lo, hi)
        return BoundedTensor(centre, PerturbationLpNorm(norm=math.inf, eps=hi - lo, x_L=lo, x_U=hi))

    def spec(self, dtype: torch.dtype = torch.float64, device=None) -> tuple[Tensor, Tensor, Tensor]:
        """All rows of all conjunctions stacked: ``C`` of shape ``(1, R, n_outputs)`` (batch dim 1,
        as ``BoundedModule.compute_bounds(C=...)`` takes it), ``d`` of shape ``(R,)`` and
        ``groups`` of shape ``(R,)``, the index of each row's conjunction."""
        n_out = self.conjunctions[0].C.shape[1] if self.conjunctions else 0
        Cs = [c.C for c in self.conjunctions] or [torch.zeros(0, n_out, dtype=torch.float64)]
        ds = [c.d for c in self.conjunctions] or [torch.zeros(0, dtype=torch.float64)]
        groups = torch.cat([torch.full((c.C.shape[0],), k, dtype=torch.long)
                            for k, c in enumerate(self.conjunctions)] or [torch.zeros(0, dtype=torch.long)])
        C = torch.cat(Cs).to(dtype=dtype, device=device).unsqueeze(0)
        return C, torch.cat(ds).to(dtype=dtype, device=device), groups.to(device)

    def margins(self, lb: Tensor) -> Tensor:
        """Per conjunction, ``max_i (lb_i - d_i)`` over its rows (``-inf`` for one without rows),
        given ``lb`` (shape ``(R,)`` or ``(1, R)``), lower bounds over the box of the rows of
        `spec`.  A positive margin proves the conjunction infeasible."""
        lb = torch.as_tensor(lb).reshape(-1).to(torch.float64)
        if lb.numel() != self.n_rows:
            raise ValueError(f"expected {self.n_rows} lower bounds (the rows of spec()), got {lb.numel()}")
        out, start = [], 0
        for c in self.conjunctions:
            k = c.C.shape[0]
            m = (lb[start:start + k].cpu() - c.d)
            out.append(m.max() if k else torch.tensor(-math.inf, dtype=torch.float64))
            start += k
        return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64)

    def is_proved(self, lb: Tensor) -> bool:
        """Whether lower bounds ``lb`` of the rows of `spec` over the box prove every conjunction
        infeasible (no counterexample in this box)."""
        return bool(torch.all(self.margins(lb) > 0))

    def contains(self, x: Tensor, tol: float = 0.0) -> bool:
        x = torch.as_tensor(x, dtype=torch.float64).reshape(-1)
        return bool(torch.all(x >= self.x_lo - tol) and torch.all(x <= self.x_hi + tol))


@dataclass
class VnnlibProperty:
    """A parsed VNN-LIB file: violated iff some disjunct has an input in its box whose outputs
    satisfy one of its conjunctions (see the module docstring)."""

    n_inputs: int
    n_outputs: int
    disjuncts: list[Disjunct]
    source: str = "<string>"

    def counterexample_holds(self, y: Tensor, x: Optional[Tensor] = None, tol: float = 0.0) -> bool:
        """Whether output ``y`` (``n_outputs`` values, any shape) satisfies the unsafe condition of
        some disjunct; with ``x`` only disjuncts whose box contains ``x`` count (the full check of
        a counterexample ``(x, f(x))``).  ``tol`` relaxes both checks."""
        y = torch.as_tensor(y, dtype=torch.float64).reshape(-1)
        if y.numel() != self.n_outputs:
            raise ValueError(f"expected {self.n_outputs} outputs, got {y.numel()}")
        for dj in self.disjuncts:
            if x is not None and not dj.contains(x, tol):
                continue
            if any(c.holds(y, tol) for c in dj.conjunctions):
                return True
        return False


# ------------------------------------------------------------------------------------ tokenizer
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_VAR = re.compile(r"^([XY])_(\d+)$")
_IGNORED = {"check-sat", "set-logic", "set-info", "set-option", "get-model", "exit"}


_LINE_ASSERT = re.compile(r"^\s*\(\s*assert\s*\(\s*(<=|>=|<|>)\s+([^\s();]+)\s+([^\s();]+)\s*\)\s*\)\s*$")
_LINE_DECLARE = re.compile(r"^\s*\(\s*declare-const\s+([^\s();]+)\s+([^\s();]+)\s*\)\s*$")


class _List(list):
    """An s-expression list, with the line where it opens."""

    line: int


def _sexprs(text: str, where: str) -> list:
    """The top-level s-expressions of ``text``: lists (`_List`, with ``.line``) of atoms (str)."""
    stack: list[_List] = []
    top: list = []
    cur = top
    for lineno, raw in enumerate(text.split("\n"), 1):
        k = raw.find(";")
        if k >= 0:
            raw = raw[:k]
        if not stack:  # fast path for the one-line commands that make up most real files
            m = _LINE_ASSERT.match(raw) or _LINE_DECLARE.match(raw)
            if m:
                outer = _List(("assert",) if m.re is _LINE_ASSERT else ("declare-const",))
                outer.line = lineno
                if m.re is _LINE_ASSERT:
                    inner = _List(m.groups())
                    inner.line = lineno
                    outer.append(inner)
                else:
                    outer.extend(m.groups())
                top.append(outer)
                continue
        if "(" not in raw and ")" not in raw:
            atoms = raw.split()
            if atoms:
                if not stack:
                    raise VnnlibError(f"{where}:{lineno}: expected a command in parentheses, got '{atoms[0]}'")
                cur.extend(atoms)
            continue
        for tok in raw.replace("(", " ( ").replace(")", " ) ").split():
            if tok == "(":
                lst = _List()
                lst.line = lineno
                cur.append(lst)
                stack.append(lst)
                cur = lst
            elif tok == ")":
                if not stack:
                    raise VnnlibError(f"{where}:{lineno}: unbalanced ')'")
                stack.pop()
                cur = stack[-1] if stack else top
            elif not stack:
                raise VnnlibError(f"{where}:{lineno}: expected a command in parentheses, got '{tok}'")
            else:
                cur.append(tok)
    if stack:
        raise VnnlibError(f"{where}:{stack[-1].line}: '(' is never closed (end of file reached)")
    return top


def _show(e) -> str:
    if isinstance(e, list):
        s = "(" + " ".join(_show(x) for x in e) + ")"
    else:
        s = str(e)
    return s if len(s) <= 60 else s[:57] + "..."


# --------------------------------------------------------------------------------------- parser
# A linear term: ({var: coeff}, constant); var is ("X", i) or ("Y", j).
# An atom: (coeffs, constant, is_equality) meaning sum coeff*var + constant <= 0 (or == 0).

class _Parser:
    def __init__(self, where: str):
        self.where = where
        self.declared: dict[str, tuple[str, int]] = {}
        self.line: object = "?"  # the line of the innermost list being read (for atoms' errors)

    def err(self, e, msg: str) -> VnnlibError:
        return VnnlibError(f"{self.where}:{getattr(e, 'line', self.line)}: {msg}")

    def term(self, e):
        if not isinstance(e, list):
            if _NUMBER.match(e):
                return {}, float(e)
            if e in self.declared:
                return {self.declared[e]: 1.0}, 0.0
            if _VAR.match(e):
                raise self.err(e, f"unknown variable '{e}' (not declared with declare-const)")
            raise self.err(e, f"expected a number or a declared variable, got '{e}'")
        self.line = e.line
        if not e or isinstance(e[0], list):
            raise self.err(e, f"expected a term, got {_show(e)}")
        op, args = e[0], e[1:]
        terms = [self.term(a) for a in args]
        if op == "+" and terms:
            return _combine(terms, [1.0] * len(terms))
        if op == "-" and terms:
            if len(terms) == 1:
                return _combine(terms, [-1.0])
            return _combine(terms, [1.0] + [-1.0] * (len(terms) - 1))
        if op == "*" and terms:
            var_terms = [t for t in terms if t[0]]
            if len(var_terms) > 1:
                raise self.err(e, f"non-linear term {_show(e)}: a product may have one non-constant factor")
            k = math.prod(t[1] for t in terms if not t[0])
            base = var_terms[0] if var_terms else ({}, 1.0)
            return {v: c * k for v, c in base[0].items()}, base[1] * k
        if op == "/" and len(terms) == 2:
            if terms[1][0]:
                raise self.err(e, f"non-linear term {_show(e)}: division by a variable")
            if terms[1][1] == 0:
                raise self.err(e, f"division by zero in {_show(e)}")
            k = 1.0 / terms[1][1]
            return {v: c * k for v, c in terms[0][0].items()}, terms[0][1] * k
        raise self.err(e, f"expected a linear term (number, variable, +, -, *, /), got {_show(e)}")

    def formula(self, e) -> list[list]:
        """A boolean formula as a DNF: a list of conjunctions, each a list of atoms."""
        if not isinstance(e, list) or not e or isinstance(e[0], list):
            raise self.err(e, f"expected a constraint (and / or / <= / >= / < / > / =), got {_show(e)}")
        op, args = e[0], e[1:]
        self.line = e.line
        if op == "and":
            dnf: list[list] = [[]]
            for a in args:
                sub = self.formula(a)
                if len(dnf) == 1 and len(sub) == 1:
                    dnf[0].extend(sub[0])
                    continue
                if len(dnf) * len(sub) > MAX_CONJUNCTIONS:
                    raise self.err(e, f"more than {MAX_CONJUNCTIONS} conjunctions after normalisation")
                dnf = [c + s for c in dnf for s in sub]
            return dnf
        if op == "or":
            if not args:
                raise self.err(e, "empty (or)")
            dnf = []
            for a in args:
                dnf.extend(self.formula(a))
            if len(dnf) > MAX_CONJUNCTIONS:
                raise self.err(e, f"more than {MAX_CONJUNCTIONS} conjunctions after normalisation")
            return dnf
        if op in ("<=", ">=", "<", ">", "="):
            if len(args) == 2 and op != "=" and type(args[0]) is str and type(args[1]) is str:
                atom = self._simple_atom(*(args if op in ("<=", "<") else args[::-1]), e)
                if atom is not None:
                    return [[atom]]
            if len(args) < 2 or (op == "=" and len(args) != 2):
                raise self.err(e, f"'{op}' needs two terms{'' if op == '=' else ' or more'}, got {_show(e)}")
            terms = [self.term(a) for a in args]
            self.line = e.line
            atoms = []
            for a, b in zip(terms, terms[1:]):
                lhs, rhs = (a, b) if op in ("<=", "<", "=") else (b, a)
                coeffs, const = _combine([lhs, rhs], [1.0, -1.0])
                kinds = {v[0] for v, c in coeffs.items() if c != 0}
                if len(kinds) > 1:
                    raise self.err(e, f"constraint {_show(e)} mixes inputs (X) and outputs (Y): not supported")
                atoms.append(({v: c for v, c in coeffs.items() if c != 0}, const, op == "=", e))
            return [atoms]
        if op == "not":
            raise self.err(e, "'not' is not supported (write the negated comparison instead)")
        raise self.err(e, f"expected and / or / <= / >= / < / > / =, got '{op}'")

    def _simple_atom(self, a: str, b: str, e):
        """``a <= b`` for a variable and a number or two variables (the bulk of real files), or
        None (then the general path handles it, errors included)."""
        va, vb = self.declared.get(a), self.declared.get(b)
        if va is not None and vb is None and _NUMBER.match(b):
            return {va: 1.0}, -float(b), False, e
        if vb is not None and va is None and _NUMBER.match(a):
            return {vb: -1.0}, float(a), False, e
        if va is not None and vb is not None and va[0] == vb[0]:
            return ({va: 1.0, vb: -1.0} if va != vb else {}), 0.0, False, e
        return None

    def parse(self, text: str) -> VnnlibProperty:
        global_atoms: list = []
        dnf: list[list] = [[]]
        for cmd in _sexprs(text, self.where):
            if not cmd or isinstance(cmd[0], list):
                raise self.err(cmd, f"expected a command (declare-const / assert), got {_show(cmd)}")
            head = cmd[0]
            self.line = cmd.line
            if head == "declare-const":
                if len(cmd) != 3 or isinstance(cmd[1], list) or isinstance(cmd[2], list):
                    raise self.err(cmd, f"expected (declare-const NAME Real), got {_show(cmd)}")
                name, sort = cmd[1], cmd[2]
                if sort != "Real":
                    raise self.err(cmd, f"expected sort Real for '{name}', got '{sort}'")
                m = _VAR.match(name)
                if not m:
                    raise self.err(cmd, f"expected a variable named X_<i> (input) or Y_<j> (output), got '{name}'")
                if name in self.declared:
                    raise self.err(cmd, f"variable '{name}' declared twice")
                self.declared[name] = (m.group(1), int(m.group(2)))
            elif head == "assert":
                if len(cmd) != 2:
                    raise self.err(cmd, f"expected (assert CONSTRAINT), got {_show(cmd)}")
                sub = self.formula(cmd[1])
                if len(sub) == 1:
                    global_atoms.extend(sub[0])
                else:
                    if len(dnf) * len(sub) > MAX_CONJUNCTIONS:
                        raise self.err(cmd, f"more than {MAX_CONJUNCTIONS} conjunctions after normalisation")
                    dnf = [c + s for c in dnf for s in sub]
            elif head in _IGNORED:
                continue
            else:
                raise self.err(cmd, f"expected declare-const or assert, got '{head}'")
        return self.build(global_atoms, dnf)

    def _counts(self) -> tuple[int, int]:
        n = {}
        for kind in ("X", "Y"):
            idx = sorted(i for k, i in self.declared.values() if k == kind)
            if idx != list(range(len(idx))):
                missing = sorted(set(range(max(idx) + 1)) - set(idx))
                raise VnnlibError(f"{self.where}: {kind} variables must be {kind}_0 .. {kind}_{{n-1}}; "
                                  f"missing {', '.join(f'{kind}_{i}' for i in missing[:5])}")
            n[kind] = len(idx)
        if n["X"] == 0 or n["Y"] == 0:
            raise VnnlibError(f"{self.where}: no {'inputs (X_i)' if n['X'] == 0 else 'outputs (Y_j)'} declared")
        return n["X"], n["Y"]

    def _apply_input(self, lo: np.ndarray, hi: np.ndarray, atom) -> bool:
        """Apply an input atom to the box; False if it can never hold."""
        coeffs, const, eq, e = atom
        if not coeffs:
            return const == 0 if eq else const <= 0
        if len(coeffs) != 1:
            raise self.err(e, f"input constraint {_show(e)} involves several inputs: only boxes "
                              "(bounds of single inputs) are supported")
        ((_, i), a), = coeffs.items()
        v = -const / a + 0.0  # + 0.0: no -0.0
        if eq or a > 0:
            hi[i] = min(hi[i], v)
        if eq or a < 0:
            lo[i] = max(lo[i], v)
        return True

    def build(self, global_atoms: list, dnf: list[list]) -> VnnlibProperty:
        n_in, n_out = self._counts()
        lo0, hi0 = np.full(n_in, -np.inf), np.full(n_in, np.inf)
        out0: list = []
        feasible0 = True
        for atom in global_atoms:
            if atom[0] and next(iter(atom[0]))[0] == "Y":
                out0.append(atom)
            elif not self._apply_input(lo0, hi0, atom):
                feasible0 = False
        groups: dict[tuple, Disjunct] = {}
        for conj in (dnf if feasible0 else []):
            lo, hi, rows, ok = lo0, hi0, list(out0), True
            copied = False
            for atom in conj:
                if atom[0] and next(iter(atom[0]))[0] == "Y":
                    rows.append(atom)
                    continue
                if not copied:
                    lo, hi, copied = lo0.copy(), hi0.copy(), True
                ok = self._apply_input(lo, hi, atom) and ok
            C, d = [], []
            for coeffs, const, eq, e in rows:
                row = np.zeros(n_out)
                for (_, j), c in coeffs.items():
                    row[j] += c
                C.append(row)
                d.append(-const + 0.0)
                if eq:
                    C.append(-row + 0.0)
                    d.append(const + 0.0)
            C = np.array(C).reshape(-1, n_out)
            d = np.array(d, dtype=np.float64)
            const_rows = ~np.any(C != 0, axis=1)
            if np.any(const_rows & (d < 0)):
                ok = False  # a row 0 <= d with d < 0: this conjunction never holds
            C, d = C[~const_rows], d[~const_rows]
            if not ok:
                continue
            key = (lo.tobytes(), hi.tobytes())
            if key not in groups:
                groups[key] = Disjunct(torch.from_numpy(lo.copy()), torch.from_numpy(hi.copy()), [])
            groups[key].conjunctions.append(Conjunction(torch.from_numpy(C), torch.from_numpy(d)))
        for dj in groups.values():
            unb = (~torch.isfinite(dj.x_lo)) | (~torch.isfinite(dj.x_hi))
            if unb.any():
                i = int(unb.nonzero()[0])
                side = "lower" if not math.isfinite(dj.x_lo[i]) else "upper"
                raise VnnlibError(f"{self.where}: input X_{i} has no {side} bound "
                                  f"({int(unb.sum())} inputs are unbounded); every input needs both")
        return VnnlibProperty(n_in, n_out, list(groups.values()), self.where)


def _combine(terms, weights):
    coeffs: dict = {}
    const = 0.0
    for (c, k), w in zip(terms, weights):
        for v, a in c.items():
            coeffs[v] = coeffs.get(v, 0.0) + w * a
        const += w * k
    return coeffs, const


def parse_vnnlib(text: str, name: str = "<string>", n_inputs: Optional[int] = None,
                 n_outputs: Optional[int] = None) -> VnnlibProperty:
    """Parse VNN-LIB source ``text`` (``name`` appears in error messages).  ``n_inputs`` /
    ``n_outputs``, when given, are checked against the declarations."""
    enabled = gc.isenabled()
    gc.disable()  # the parse allocates many small lists: cyclic GC passes would dominate its time
    try:
        prop = _Parser(name).parse(text)
    finally:
        if enabled:
            gc.enable()
    for what, want, got in (("inputs", n_inputs, prop.n_inputs), ("outputs", n_outputs, prop.n_outputs)):
        if want is not None and want != got:
            raise VnnlibError(f"{name}: declares {got} {what}, expected {want}")
    return prop


def read_vnnlib(path: PathLike, n_inputs: Optional[int] = None, n_outputs: Optional[int] = None) -> VnnlibProperty:
    """Read and parse a ``.vnnlib`` file (``.vnnlib.gz`` too); see `parse_vnnlib`."""
    path = Path(path)
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as f:
            text = f.read()
    else:
        text = path.read_text(encoding="utf-8")
    return parse_vnnlib(text, str(path), n_inputs, n_outputs)


# ------------------------------------------------------------------------------------ instances
@dataclass(frozen=True)
class Instance:
    """One line of a VNN-COMP ``instances.csv``: network, property, timeout in seconds."""

    onnx: Path
    vnnlib: Path
    timeout: float


def _resolve(base: Path, rel: str) -> Path:
    p = base / rel
    if not p.exists() and (base / Path(rel).name).exists():
        return base / Path(rel).name  # a flattened copy of the benchmark folder
    return p


def load_instances(csv_path: PathLike, check: bool = True) -> list[Instance]:
    """The instances of a VNN-COMP ``*_instances.csv`` (lines ``onnx,vnnlib,timeout``), paths
    resolved relative to the csv's folder.  A path that does not exist there but whose file name
    does (a benchmark copied without its ``nets/`` / ``vnnlib/`` subfolders, as oval21 in
    ``shared/vnncomp2021``) resolves to that file.  ``check``: raise FileNotFoundError for a
    missing file.  Blank lines and lines starting with ``#`` are skipped."""
    csv_path = Path(csv_path)
    base = csv_path.parent
    out = []
    with open(csv_path, newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            row = [c.strip() for c in row]
            if not row or not any(row) or row[0].startswith("#"):
                continue
            if len(row) != 3:
                raise ValueError(f"{csv_path}:{lineno}: expected 'onnx,vnnlib,timeout', got {','.join(row)!r}")
            try:
                timeout = float(row[2])
            except ValueError:
                raise ValueError(f"{csv_path}:{lineno}: timeout '{row[2]}' is not a number") from None
            inst = Instance(_resolve(base, row[0]), _resolve(base, row[1]), timeout)
            if check:
                for p in (inst.onnx, inst.vnnlib):
                    if not p.exists():
                        raise FileNotFoundError(f"{csv_path}:{lineno}: {p} does not exist")
            out.append(inst)
    return out
