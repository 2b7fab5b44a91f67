"""Dataflow analysis: how the model's computation uses each parameter dimension.

``analyze_model(apply_fn, params, *example_args)`` traces ``apply_fn(params, *example_args)``
to a jaxpr (abstractly: nothing is allocated) and walks it once, into ``jit``, ``remat``,
``custom_jvp``/``custom_vjp``, ``scan``, ``while`` and ``cond`` sub-jaxprs.

Every dimension of every value is described as a tuple of *factors* ``(size, labels)``,
major first. A label names where the data along that factor came from:

- ``ParamLabel(leaf, dim, outer)``: dimension ``dim`` of parameter ``leaf``. When a reshape
  splits a dimension (``heads*head_dim -> heads, head_dim``) each factor keeps the label
  with ``outer`` = product of the factors in front of it within that parameter dimension.
  ``outer == 1`` marks the factor that sharding the whole parameter dimension splits: the
  heads, never head_dim.
- ``OtherLabel("input", ...)`` for model inputs and ``OtherLabel("iota", ...)`` for
  ``iota`` (one-hot encodings, positions).

Labels flow through elementwise ops (merged per dimension), reshapes (factors split and
regrouped), transposes, broadcasts, slices and through both operands of
activation-activation ``dot_general`` batch dimensions (attention heads). The walk records:

- ``roles``: for each ``(leaf, dim)``, how a weight matmul used it: ``contract``, ``free``
  (an output feature), ``batch`` (a batch dim against an activation: experts), ``vocab`` /
  ``width`` (an embedding table read by ``gather`` or a one-hot matmul), ``layer`` (the
  stacked axis a ``scan`` slices, or a loop indexes with ``dynamic_slice`` / ``gather``).
- ``contractions``: each weight factor contracted against an activation factor, with the
  labels the activation factor carried (which weight outputs feed which weight inputs).
- ``sinks``: where each ``outer == 1`` parameter label ends: contracted by a weight
  (``("row", consumer_label)``), reaching the model output (``("output", None)``), reduced
  away (``("reduce", None)``), or anywhere that would need the whole factor on one device if
  it were sharded (``("bad", None)``: cumulative ops, sorts, activation-activation
  contractions that keep other large dims, misaligned reshapes, opaque ops).

  A *reduction over a factor* is an op whose result drops the factor and is no larger than
  its operand divided by the factor's size: ``reduce_max`` / ``reduce_sum`` (softmax,
  logsumexp), ``argmax``, a ``gather`` that picks one entry along it (``take_along_axis`` of
  the target logit), or an activation contraction against a one-hot (``einsum("bsv,bsv->bs",
  logits, one_hot)``). With the factor sharded each device reduces its slice and an
  all-reduce of the (small) result finishes it, so a weight output that is only reduced (the
  LM head under a softmax cross-entropy) can be column-parallel cheaply.
- ``cooccurrences``: label sets merged into one factor (a bias added to a matmul output).

Primitives not listed here (custom kernels such as ``pallas_call`` among them) are treated
positionally: an output dimension merges the labels of same-rank operands whose dimension
at that position has the same size, or a size dividing it (taken as repeated, like the kv
heads of a grouped-query attention kernel); labels that land nowhere get a ``bad`` sink.
"""

import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.extend.core import ClosedJaxpr, DropVar, Jaxpr, Literal

from sharding_rules.paths import leaves_with_paths

CONTRACT = "contract"
FREE = "free"
BATCH = "batch"
VOCAB = "vocab"
WIDTH = "width"
LAYER = "layer"
DOT_ROLES = frozenset({CONTRACT, FREE, BATCH, VOCAB, WIDTH})

_CALLS = frozenset(
    {
        "jit",
        "pjit",
        "closed_call",
        "core_call",
        "remat",
        "remat2",
        "checkpoint",
        "custom_jvp_call",
        "custom_vjp_call",
        "custom_vjp_call_jaxpr",
    }
)
_REDUCTIONS = frozenset(
    {
        "reduce_sum",
        "reduce_max",
        "reduce_min",
        "reduce_prod",
        "reduce_and",
        "reduce_or",
        "reduce_xor",
        "argmax",
        "argmin",
    }
)
_CUMULATIVE = frozenset({"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"})
_KEEPS_ONEHOT = frozenset({"convert_element_type", "copy", "copy_p"})
_DROPS = frozenset({"conv_general_dilated"})


@dataclass(frozen=True, slots=True)
class ParamLabel:
    """Dimension ``dim`` of parameter ``leaf``; ``outer`` > 1 for a non-leading factor."""

    leaf: int
    dim: int
    outer: int = 1


@dataclass(frozen=True, slots=True)
class OtherLabel:
    """A non-parameter origin: ``kind`` is ``"input"`` or ``"iota"``."""

    kind: str
    ident: tuple[int, ...]


Labels = frozenset[ParamLabel | OtherLabel]
Factor = tuple[int, Labels]
Dim = tuple[Factor, ...]
Sink = tuple[str, ParamLabel | None]
_EMPTY: Labels = frozenset()


@dataclass(frozen=True, slots=True)
class Contraction:
    """Weight label ``consumer`` contracted against an activation factor of ``size``."""

    consumer: ParamLabel
    sources: Labels
    size: int
    order: int


@dataclass(frozen=True)
class ModelAnalysis:
    """What ``analyze_model`` found; mesh-independent, reused for every candidate mesh."""

    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[np.dtype, ...]
    treedef: Any
    roles: dict[tuple[int, int], frozenset[str]]
    contractions: tuple[Contraction, ...]
    sinks: dict[ParamLabel, frozenset[Sink]]
    cooccurrences: tuple[Labels, ...]
    rows: dict[int, int]
    """Per weight leaf, the activation rows one use of it processes (tokens for an LM: the
    activation's elements over the contracted ones; the looked-up ids of an embedding),
    largest over its uses; a scanned stack counts one layer. For communication estimates."""

    def role(self, label: ParamLabel) -> frozenset[str]:
        """Roles of the parameter dimension a label names."""
        return self.roles.get((label.leaf, label.dim), _EMPTY)


@dataclass(frozen=True, slots=True)
class _Val:
    dims: tuple[Dim, ...]
    kind: str  # "param" (derived only from params), "act", or "const"
    onehot: bool = False


def _size(dim: Dim) -> int:
    return int(np.prod([f[0] for f in dim], dtype=np.int64))


def _numel(val: "_Val") -> int:
    return math.prod(_size(d) for d in val.dims)


def _plain_dim(n: int, labels: Labels = _EMPTY) -> Dim:
    return ((int(n), labels),) if n > 1 else ()


def _plain(shape: Sequence[int], kind: str) -> _Val:
    return _Val(tuple(_plain_dim(n) for n in shape), kind)


def _labels(dim: Dim) -> Labels:
    return frozenset().union(*(f[1] for f in dim)) if dim else _EMPTY


def _leading(labels: Labels) -> list[ParamLabel]:
    return [lab for lab in labels if isinstance(lab, ParamLabel) and lab.outer == 1]


def _shift(labels: Labels, by: int) -> Labels:
    if by == 1:
        return labels
    return frozenset(
        ParamLabel(lab.leaf, lab.dim, lab.outer * by) if isinstance(lab, ParamLabel) else lab
        for lab in labels
    )


def _inners(dim: Dim) -> list[int]:
    inners, acc = [], 1
    for size, _ in reversed(dim):
        inners.append(acc)
        acc *= size
    return inners[::-1]


def _split_at(dim: Dim, cuts: set[int]) -> Dim | None:
    """Split factors at the given inner-size boundaries; None if a cut is not a factor."""
    out: list[Factor] = []
    for (size, labels), inner in zip(dim, _inners(dim), strict=True):
        seq = [inner * size, *sorted((c for c in cuts if inner < c < inner * size), reverse=True)]
        seq.append(inner)
        if any(seq[k] % seq[k + 1] for k in range(len(seq) - 1)):
            return None
        prefix = 1
        for k in range(len(seq) - 1):
            piece = seq[k] // seq[k + 1]
            out.append((piece, _shift(labels, prefix)))
            prefix *= piece
    return tuple(out)


def _refine(a: Dim, b: Dim) -> tuple[Dim, Dim] | None:
    """Common factorisation of two equal-size dimensions, or None if there is none."""
    if [f[0] for f in a] == [f[0] for f in b]:
        return a, b
    cuts = set(_inners(a)) | set(_inners(b))
    ra, rb = _split_at(a, cuts), _split_at(b, cuts)
    if ra is None or rb is None or [f[0] for f in ra] != [f[0] for f in rb]:
        return None
    return ra, rb


def _reshape_dims(dims: Sequence[Dim], new_shape: Sequence[int]) -> tuple[Dim, ...]:
    flat: Dim = tuple(f for d in dims for f in d)
    cuts, acc = set(), 1
    for n in reversed(new_shape):
        acc *= n
        cuts.add(acc)
    pieces = _split_at(flat, cuts)
    if pieces is None:
        merged = _labels(flat)
        return tuple(_plain_dim(n, merged) for n in new_shape)
    out, queue = [], list(pieces)
    for n in new_shape:
        group, prod = [], 1
        while prod < n:
            factor = queue.pop(0)
            group.append(factor)
            prod *= factor[0]
        out.append(tuple(group))
    return tuple(out)


def _resize(dim: Dim, n: int) -> Dim:
    """A dimension cut to size ``n`` (slice, pad): keeps its leading factor's labels."""
    if _size(dim) == n:
        return dim
    return _plain_dim(n, dim[0][1] if dim else _EMPTY)


def _kind(vals: Sequence[_Val]) -> str:
    kinds = {v.kind for v in vals}
    return "act" if "act" in kinds else ("param" if "param" in kinds else "const")


class _Tracer:
    """Walks a jaxpr, propagating factor labels and recording what ``ModelAnalysis`` holds."""

    def __init__(self) -> None:
        self.roles: dict[tuple[int, int], set[str]] = defaultdict(set)
        self.contractions: list[Contraction] = []
        self.sinks: dict[ParamLabel, set[Sink]] = defaultdict(set)
        self.cooccurrences: set[Labels] = set()
        self.rows: dict[int, int] = {}
        self._iotas = 0

    # -- bookkeeping -------------------------------------------------------------------
    def _role(self, labels: Labels, role: str) -> None:
        for lab in _leading(labels):
            self.roles[(lab.leaf, lab.dim)].add(role)

    def _bad(self, labels: Labels) -> None:
        for lab in _leading(labels):
            self.sinks[lab].add(("bad", None))

    def _rows(self, weight: _Val, rows: int) -> None:
        for leaf in {lab.leaf for d in weight.dims for lab in _labels(d)
                     if isinstance(lab, ParamLabel)}:  # fmt: skip
            self.rows[leaf] = max(self.rows.get(leaf, 0), int(rows))

    def _reduced(self, labels: Labels, shrinks: bool = True) -> None:
        """Labels reduced away; ``shrinks`` False (the result is not smaller) makes it bad."""
        for lab in _leading(labels):
            self.sinks[lab].add(("reduce" if shrinks else "bad", None))

    def _merge2(self, a: Dim, b: Dim) -> Dim:
        if not a:
            return b
        if not b or a == b:
            return a
        refined = _refine(a, b)
        if refined is None:
            return _plain_dim(_size(a), _labels(a) | _labels(b))
        merged = tuple(
            (fa[0], fa[1] | fb[1]) for fa, fb in zip(refined[0], refined[1], strict=True)
        )
        for _, labels in merged:
            if len(labels) > 1 and _leading(labels):
                self.cooccurrences.add(labels)
        return merged

    def _merge(self, dims: Sequence[Dim]) -> Dim:
        out: Dim = ()
        for d in dims:
            out = self._merge2(out, d)
        return out

    # -- walking -----------------------------------------------------------------------
    def run(self, jaxpr: Jaxpr, consts: Sequence[_Val], args: Sequence[_Val]) -> list[_Val]:
        """Evaluate ``jaxpr`` on labelled values."""
        env: dict[Any, _Val] = {}
        for var, val in zip([*jaxpr.constvars, *jaxpr.invars], [*consts, *args], strict=True):
            env[var] = val

        def read(var: Any) -> _Val:
            if isinstance(var, Literal):
                return _plain(var.aval.shape, "const")
            return env[var]

        for eqn in jaxpr.eqns:
            outs = self._eqn(eqn, [read(v) for v in eqn.invars])
            for var, val in zip(eqn.outvars, outs, strict=True):
                if not isinstance(var, DropVar):
                    env[var] = val
        return [read(v) for v in jaxpr.outvars]

    def _eqn(self, eqn: Any, ins: list[_Val]) -> list[_Val]:
        name = eqn.primitive.name
        handler = _HANDLERS.get(name)
        if handler is not None:
            return handler(self, eqn, ins)
        if name in _CALLS:
            return self._call(eqn, ins)
        if name in _REDUCTIONS:
            return self._reduce(eqn, ins)
        if name in _CUMULATIVE:
            self._bad(_labels(ins[0].dims[eqn.params["axis"]]))
            return [ins[0]]
        if name.startswith("scatter"):
            return self._scatter(eqn, ins)
        if name in _DROPS:
            for val in ins:
                self._bad(frozenset().union(*(_labels(d) for d in val.dims)))
            return [_plain(v.aval.shape, _kind(ins)) for v in eqn.outvars]
        return self._positional(eqn, ins)

    def _sub(self, closed: Any, consts: Sequence[_Val], args: Sequence[_Val]) -> list[_Val]:
        if isinstance(closed, ClosedJaxpr):
            const_vals = [_plain(np.shape(c), "const") for c in closed.consts]
            return self.run(closed.jaxpr, const_vals, [*consts, *args])
        return self.run(closed, [], [*consts, *args])

    def _call(self, eqn: Any, ins: list[_Val]) -> list[_Val]:
        sub = next(
            (eqn.params[k] for k in ("jaxpr", "call_jaxpr", "fun_jaxpr") if k in eqn.params),
            None,
        )
        inner = sub.jaxpr if isinstance(sub, ClosedJaxpr) else sub
        if not isinstance(inner, Jaxpr) or len(inner.invars) != len(ins):
            return self._positional(eqn, ins)
        return self._sub(sub, [], ins)

    def _positional(self, eqn: Any, ins: list[_Val]) -> list[_Val]:
        kind = _kind(ins)
        landed: set[tuple[int, int]] = set()
        outs = []
        for var in eqn.outvars:
            shape = getattr(var.aval, "shape", ())
            dims = []
            for i, n in enumerate(shape):
                parts = []
                for k, val in enumerate(ins):
                    m = _size(val.dims[i]) if len(val.dims) == len(shape) else 0
                    if m == n:
                        parts.append(val.dims[i])
                    elif m > 1 and n % m == 0:  # repeated, e.g. kv heads in a GQA kernel
                        parts.append((*val.dims[i], (n // m, _EMPTY)))
                    else:
                        continue
                    landed.add((k, i))
                dims.append(self._merge(parts) if n > 1 else ())
            onehot = eqn.primitive.name == "eq" and any(
                isinstance(lab, OtherLabel) and lab.kind == "iota"
                for val in ins
                for d in val.dims
                for lab in _labels(d)
            )
            if eqn.primitive.name in _KEEPS_ONEHOT:
                onehot = ins[0].onehot
            outs.append(_Val(tuple(dims), kind, onehot))
        for k, val in enumerate(ins):
            for i, d in enumerate(val.dims):
                if (k, i) not in landed:
                    self._bad(_labels(d))
        return outs

    def _reduce(self, eqn: Any, ins: list[_Val]) -> list[_Val]:
        axes = set(eqn.params["axes"])
        (val,) = ins
        for i in axes:
            self._reduced(_labels(val.dims[i]))
        dims = tuple(d for i, d in enumerate(val.dims) if i not in axes)
        return [_Val(dims, val.kind)]

    def _scatter(self, eqn: Any, ins: list[_Val]) -> list[_Val]:
        operand, updates = ins[0], ins[2]
        dn = eqn.params["dimension_numbers"]
        skipped = set(dn.inserted_window_dims) | set(dn.operand_batching_dims)
        window_dst = [d for d in range(len(operand.dims)) if d not in skipped]
        dims = list(operand.dims)
        for src, dst in zip(dn.update_window_dims, window_dst, strict=False):
            if _size(updates.dims[src]) == _size(dims[dst]):
                dims[dst] = self._merge2(dims[dst], updates.dims[src])
        return [_Val(tuple(dims), _kind(ins))]

    # -- matmuls -----------------------------------------------------------------------
    def _dot(self, eqn: Any, ins: list[_Val]) -> list[_Val]:
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        return [self._contract(ins[0], ins[1], lc, rc, lb, rb, group_dims=())]

    def _ragged_dot(self, eqn: Any, ins: list[_Val]) -> list[_Val]:
        rdn = eqn.params["ragged_dot_dimension_numbers"]
        (lc, rc), (lb, rb) = rdn.dot_dimension_numbers
        out = self._contract(ins[0], ins[1], lc, rc, lb, rb, tuple(rdn.rhs_group_dimensions))
        return [out]

    def _contract(
        self,
        lhs: _Val,
        rhs: _Val,
        lc: Sequence[int],
        rc: Sequence[int],
        lb: Sequence[int],
        rb: Sequence[int],
        group_dims: tuple[int, ...],
    ) -> _Val:
        kinds = (lhs.kind, rhs.kind)
        weight_side = {("act", "param"): 1, ("param", "act"): 0}.get(kinds)
        batch = [self._merge2(lhs.dims[i], rhs.dims[j]) for i, j in zip(lb, rb, strict=True)]
        skip_r = set(rc) | set(rb) | set(group_dims)
        lfree = [d for i, d in enumerate(lhs.dims) if i not in lc and i not in lb]
        rfree = [d for i, d in enumerate(rhs.dims) if i not in skip_r]
        out = _Val((*batch, *lfree, *rfree), _kind([lhs, rhs]))
        if weight_side is None:
            if "act" in kinds:  # e.g. the target logit as a dot with a one-hot: a reduction
                out_size = _numel(out)
                for val, dims in ((lhs, lc), (rhs, rc)):
                    contracted = math.prod(_size(val.dims[i]) for i in dims)
                    shrinks = out_size * contracted <= _numel(val)
                    for i in dims:
                        self._reduced(_labels(val.dims[i]), shrinks)
        else:
            act, weight = (rhs, lhs) if weight_side == 0 else (lhs, rhs)
            act_c, w_c = (rc, lc) if weight_side == 0 else (lc, rc)
            w_b = lb if weight_side == 0 else rb
            w_free = [
                i
                for i in range(len(weight.dims))
                if i not in w_c and i not in w_b and i not in group_dims
            ]
            lookup = self._weight_contract(act, weight, act_c, w_c)
            for i in w_free:
                self._role(_labels(weight.dims[i]), WIDTH if lookup else FREE)
            for i in (*w_b, *group_dims):
                self._role(_labels(weight.dims[i]), BATCH)
        return out

    def _weight_contract(
        self, act: _Val, weight: _Val, act_c: Sequence[int], w_c: Sequence[int]
    ) -> bool:
        """Record a weight's contracting dims; True if it is a one-hot embedding lookup."""
        self._rows(weight, _numel(act) // max(math.prod(_size(act.dims[d]) for d in act_c), 1))
        aligned: list[tuple[Factor, Factor]] = []
        for ad, wd in zip(act_c, w_c, strict=True):
            refined = _refine(act.dims[ad], weight.dims[wd])
            if refined is None:
                self._bad(_labels(act.dims[ad]))
                self._role(_labels(weight.dims[wd]), CONTRACT)
                continue
            aligned.extend(zip(refined[0], refined[1], strict=True))
        lookup = act.onehot and any(
            isinstance(lab, OtherLabel) and lab.kind == "iota"
            for (_, labels), _ in aligned
            for lab in labels
        )
        for (size, a_labels), (_, w_labels) in aligned:
            consumers = _leading(w_labels)
            self._role(w_labels, VOCAB if lookup else CONTRACT)
            for lab in _leading(a_labels):
                if not consumers:
                    self.sinks[lab].add(("bad", None))
                for c in consumers:
                    self.sinks[lab].add(("row", c))
            if not lookup:
                for c in consumers:
                    order = len(self.contractions)
                    self.contractions.append(Contraction(c, a_labels, size, order))
        return lookup

    def _gather(self, eqn: Any, ins: list[_Val]) -> list[_Val]:
        operand, indices = ins[0], ins[1]
        dn = eqn.params["dimension_numbers"]
        sizes = eqn.params["slice_sizes"]
        out_shape = eqn.outvars[0].aval.shape
        removed = set(dn.collapsed_slice_dims) | set(dn.operand_batching_dims)
        kept = [d for d in range(len(operand.dims)) if d not in removed]
        dims: list[Dim] = [()] * len(out_shape)
        for od, sd in zip(dn.offset_dims, kept, strict=True):
            dims[od] = _resize(operand.dims[sd], sizes[sd])
        batch_out = [d for d in range(len(out_shape)) if d not in dn.offset_dims]
        for od, idim in zip(batch_out, indices.dims[:-1], strict=False):
            dims[od] = idim if _size(idim) == out_shape[od] else _plain_dim(out_shape[od])
        # a batched gather (take_along_axis) keeps its operand's batching dims, in index order
        for src, idx in zip(dn.operand_batching_dims, dn.start_indices_batching_dims, strict=True):
            od = batch_out[idx]
            if _size(operand.dims[src]) == out_shape[od]:
                dims[od] = self._merge2(dims[od], operand.dims[src])
        if operand.kind == "param":
            role = VOCAB if len(indices.dims) > 1 else LAYER
            if role == VOCAB:
                self._rows(
                    operand, math.prod(out_shape) // max(math.prod(sizes[d] for d in kept), 1)
                )
            for d in dn.collapsed_slice_dims:
                self._role(_labels(operand.dims[d]), role)
            if role == VOCAB:
                for d in kept:
                    if sizes[d] == _size(operand.dims[d]):
                        self._role(_labels(operand.dims[d]), WIDTH)
        else:  # picking one entry per row along a dim (the target logit) reduces it
            collapsed = [_size(operand.dims[d]) for d in dn.collapsed_slice_dims]
            shrinks = math.prod(out_shape) * math.prod(collapsed) <= _numel(operand)
            for d in dn.collapsed_slice_dims:
                self._reduced(_labels(operand.dims[d]), shrinks)
        return [_Val(tuple(dims), _kind(ins))]

    # -- shape ops -----------------------------------------------------------------------
    def _reshape(self, eqn: Any, ins: list[_Val]) -> list[_Val]:
        new = eqn.params["new_sizes"]
        val = ins[0]
        return [_Val(_reshape_dims(val.dims, new), val.kind, val.onehot)]

    def _transpose(self, eqn: Any, ins: list[_Val]) -> list[_Val]:
        val = ins[0]
        dims = tuple(val.dims[p] for p in eqn.params["permutation"])
        return [_Val(dims, val.kind, val.onehot)]

    def _broadcast(self, eqn: Any, ins: list[_Val]) -> list[_Val]:
        val = ins[0]
        shape = eqn.params["shape"]
        dims = [_plain_dim(n) for n in shape]
        for src, dst in enumerate(eqn.params["broadcast_dimensions"]):
            if _size(val.dims[src]) == shape[dst]:
                dims[dst] = val.dims[src]
        return [_Val(tuple(dims), val.kind, val.onehot)]

    def _squeeze(self, eqn: Any, ins: list[_Val]) -> list[_Val]:
        val = ins[0]
        drop = {d % len(val.dims) for d in eqn.params["dimensions"]}
        dims = tuple(d for i, d in enumerate(val.dims) if i not in drop)
        return [_Val(dims, val.kind, val.onehot)]

    def _slice(self, eqn: Any, ins: list[_Val]) -> list[_Val]:
        val = ins[0]
        shape = eqn.outvars[0].aval.shape
        return [_Val(tuple(_resize(d, n) for d, n in zip(val.dims, shape, strict=True)), val.kind)]

    def _dynamic_slice(self, eqn: Any, ins: list[_Val]) -> list[_Val]:
        val = ins[0]
        if val.kind == "param":  # a stacked parameter indexed by a loop counter
            for dim, n in zip(val.dims, eqn.params["slice_sizes"], strict=True):
                if n == 1 and dim:
                    self._role(_labels(dim), LAYER)
        return self._slice(eqn, ins)

    def _split(self, eqn: Any, ins: list[_Val]) -> list[_Val]:
        val, axis = ins[0], eqn.params["axis"]
        outs = []
        for size in eqn.params["sizes"]:
            dims = list(val.dims)
            dims[axis] = _resize(dims[axis], int(size))
            outs.append(_Val(tuple(dims), val.kind))
        return outs

    def _concatenate(self, eqn: Any, ins: list[_Val]) -> list[_Val]:
        axis = eqn.params["dimension"]
        shape = eqn.outvars[0].aval.shape
        dims = []
        for i, n in enumerate(shape):
            if i == axis:
                labels = frozenset().union(*(v.dims[i][0][1] for v in ins if v.dims[i]))
                dims.append(_plain_dim(n, labels))
            else:
                dims.append(self._merge([v.dims[i] for v in ins if _size(v.dims[i]) == n]))
        return [_Val(tuple(dims), _kind(ins))]

    def _dynamic_update_slice(self, eqn: Any, ins: list[_Val]) -> list[_Val]:
        operand, update = ins[0], ins[1]
        dims = tuple(
            self._merge2(o, u) if _size(o) == _size(u) else o
            for o, u in zip(operand.dims, update.dims, strict=True)
        )
        return [_Val(dims, _kind(ins[:2]))]

    def _iota(self, eqn: Any, ins: list[_Val]) -> list[_Val]:
        self._iotas += 1
        shape, axis = eqn.params["shape"], eqn.params["dimension"]
        label = frozenset({OtherLabel("iota", (self._iotas,))})
        dims = tuple(_plain_dim(n, label if i == axis else _EMPTY) for i, n in enumerate(shape))
        return [_Val(dims, "const")]

    def _sort(self, eqn: Any, ins: list[_Val]) -> list[_Val]:
        axis = eqn.params["dimension"]
        for val in ins:
            self._bad(_labels(val.dims[axis]))
        return self._positional(eqn, ins)

    def _top_k(self, eqn: Any, ins: list[_Val]) -> list[_Val]:
        val = ins[0]
        axis = eqn.params.get("axis", len(val.dims) - 1) % len(val.dims)
        self._bad(_labels(val.dims[axis]))
        dims = list(val.dims)
        dims[axis] = _plain_dim(eqn.params["k"])
        return [_Val(tuple(dims), val.kind), _Val(tuple(dims), val.kind)]

    def _identity(self, eqn: Any, ins: list[_Val]) -> list[_Val]:
        return list(ins)

    # -- control flow ------------------------------------------------------------------
    def _scan(self, eqn: Any, ins: list[_Val]) -> list[_Val]:
        nc, ncar = eqn.params["num_consts"], eqn.params["num_carry"]
        consts, carry, xs = ins[:nc], ins[nc : nc + ncar], ins[nc + ncar :]
        for x in xs:
            if x.kind == "param" and x.dims:
                self._role(_labels(x.dims[0]), LAYER)
        sliced = [_Val(x.dims[1:], x.kind, x.onehot) for x in xs]
        outs = self._sub(eqn.params["jaxpr"], consts, [*carry, *sliced])
        carry_out = [self._join(a, b) for a, b in zip(carry, outs[:ncar], strict=True)]
        layer = _plain_dim(eqn.params["length"])
        ys = [_Val((layer, *y.dims), y.kind) for y in outs[ncar:]]
        return [*carry_out, *ys]

    def _while(self, eqn: Any, ins: list[_Val]) -> list[_Val]:
        nc, nb = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
        body_consts, carry = ins[nc : nc + nb], ins[nc + nb :]
        outs = self._sub(eqn.params["body_jaxpr"], body_consts, carry)
        return [self._join(a, b) for a, b in zip(carry, outs, strict=True)]

    def _cond(self, eqn: Any, ins: list[_Val]) -> list[_Val]:
        results = [self._sub(branch, [], ins[1:]) for branch in eqn.params["branches"]]
        outs = results[0]
        for other in results[1:]:
            outs = [self._join(a, b) for a, b in zip(outs, other, strict=True)]
        return outs

    def _join(self, a: _Val, b: _Val) -> _Val:
        dims = tuple(self._merge2(x, y) for x, y in zip(a.dims, b.dims, strict=True))
        return _Val(dims, _kind([a, b]), a.onehot and b.onehot)


_HANDLERS: dict[str, Callable[[_Tracer, Any, list[_Val]], list[_Val]]] = {
    "dot_general": _Tracer._dot,
    "ragged_dot_general": _Tracer._ragged_dot,
    "gather": _Tracer._gather,
    "reshape": _Tracer._reshape,
    "transpose": _Tracer._transpose,
    "broadcast_in_dim": _Tracer._broadcast,
    "squeeze": _Tracer._squeeze,
    "slice": _Tracer._slice,
    "dynamic_slice": _Tracer._dynamic_slice,
    "pad": _Tracer._slice,
    "split": _Tracer._split,
    "concatenate": _Tracer._concatenate,
    "dynamic_update_slice": _Tracer._dynamic_update_slice,
    "iota": _Tracer._iota,
    "sort": _Tracer._sort,
    "top_k": _Tracer._top_k,
    "optimization_barrier": _Tracer._identity,
    "scan": _Tracer._scan,
    "while": _Tracer._while,
    "cond": _Tracer._cond,
}


def _is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray | jax.ShapeDtypeStruct)


def analyze_model(apply_fn: Callable[..., Any], params: Any, *example_args: Any) -> ModelAnalysis:
    """Trace ``apply_fn(params, *example_args)`` abstractly and analyse parameter use.

    Args:
      apply_fn: the model's forward function, e.g. ``model.apply`` (the forward pass, not
        the loss: logits must reach the output for the output-head rule).
      params: the parameter pytree, as arrays or ``jax.ShapeDtypeStruct`` (e.g. from
        ``jax.eval_shape(model.init, ...)``); nothing is allocated.
      *example_args: the remaining arguments; array / ``ShapeDtypeStruct`` leaves are traced,
        any other leaf (flags such as ``deterministic=True`` passed positionally) is static.

    Returns:
      A ``ModelAnalysis``; pass it to ``sharding_rules.param_rules`` for each mesh.

    Raises:
      ValueError: if ``params`` has no array leaves.
    """
    paths, leaves, treedef = leaves_with_paths(params)
    if not leaves:
        raise ValueError("params has no array leaves; pass the model's parameter pytree")
    shapes = [jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x in leaves]
    arg_leaves, arg_def = jax.tree.flatten(example_args)
    traced_idx = [i for i, x in enumerate(arg_leaves) if _is_array(x)]
    traced = [
        jax.ShapeDtypeStruct(np.shape(arg_leaves[i]), arg_leaves[i].dtype) for i in traced_idx
    ]

    def forward(flat_params: list[Any], flat_args: list[Any]) -> Any:
        full = list(arg_leaves)
        for i, x in zip(traced_idx, flat_args, strict=True):
            full[i] = x
        args = jax.tree.unflatten(arg_def, full)
        return apply_fn(jax.tree.unflatten(treedef, flat_params), *args)

    closed = jax.make_jaxpr(forward)(shapes, traced)
    param_vals = [
        _Val(
            tuple(_plain_dim(n, frozenset({ParamLabel(k, d)})) for d, n in enumerate(s.shape)),
            "param",
        )
        for k, s in enumerate(shapes)
    ]
    arg_vals = [
        _Val(
            tuple(
                _plain_dim(n, frozenset({OtherLabel("input", (k, d))}))
                for d, n in enumerate(s.shape)
            ),
            "act",
        )
        for k, s in enumerate(traced)
    ]
    tracer = _Tracer()
    consts = [_plain(np.shape(c), "const") for c in closed.consts]
    outs = tracer.run(closed.jaxpr, consts, [*param_vals, *arg_vals])
    for val in outs:
        for d in val.dims:
            for lab in _leading(_labels(d)):
                tracer.sinks[lab].add(("output", None))
    return ModelAnalysis(
        paths=tuple(paths),
        shapes=tuple(tuple(s.shape) for s in shapes),
        dtypes=tuple(np.dtype(s.dtype) for s in shapes),
        treedef=treedef,
        roles={k: frozenset(v) for k, v in tracer.roles.items()},
        contractions=tuple(tracer.contractions),
        sinks={k: frozenset(v) for k, v in tracer.sinks.items()},
        cooccurrences=tuple(tracer.cooccurrences),
        rows=dict(tracer.rows),
    )
