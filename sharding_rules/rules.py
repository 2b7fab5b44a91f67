"""Parameter PartitionSpecs from a ``ModelAnalysis`` and the mesh axis sizes.

Order of decisions for each parameter:

1. Overrides: ``{regex: PartitionSpec}``; the first pattern that ``re.search``-es the path
   (``"params/layers/attn/q/kernel"``) gives the whole spec. Checked for divisibility.
2. Tensor parallel (``tensor`` > 1), from the dataflow, never from names:
   - *Groups*: weights whose output factor feeds only the contracting dimension of other
     weights (through elementwise ops, reshapes and attention, never a reduction or the
     residual stream) form a Megatron pair: the producers are column-parallel on that
     output dimension, the consumers row-parallel on their contracting dimension. A reshape
     ``heads*head_dim -> heads, head_dim`` makes the heads factor the sharded one; head_dim,
     contracted between activations in ``q @ k``, never qualifies. Larger groups (q, k, v ->
     o) are chosen first, then program order; a weight joins at most one group.
   - *Embeddings* (read by ``gather`` or a one-hot matmul; a tied output head included):
     vocab over ``tensor`` when it divides, else the width.
   - *Output heads*: column-parallel on the output; if it does not divide, the contracting
     width. A weight is one when its output factor only reaches the model output (a forward
     pass returning logits) or is only *reduced over* (see ``sharding_rules.trace``): the max,
     logsumexp, target-logit pick and argmax of a softmax cross-entropy and its accuracy, so
     the LM head is vocab-parallel when the trace is the loss. A reduced output must be at
     least as wide as the weight's input (vocab >= width): sharding it then saves more than
     the all-reduce of the reduced values costs, while a narrow one (a 4-expert router, a
     3-class classifier) stays replicated.
3. Experts (``expert`` > 1): a weight dimension that is a ``dot_general`` batch dimension
   against an activation (``einsum('ecd,edf->ecf')``, ``ragged_dot`` groups).
4. Followers: an unmatched parameter dimension (bias, scale) merged into the same factor as
   a column-parallel, vocab-parallel or expert dimension takes that axis.
5. Stages (``stage`` > 1): the layer axis of a scanned stack, split into contiguous blocks of
   layers, one block per pipeline stage (``jaxstack.layers.pipeline``); parameters outside
   the stack (embeddings, final norm, head) stay whole on every stage.
6. FSDP (``fsdp`` > 1): the largest remaining dimension divisible by ``fsdp``, never the
   layer axis of a scanned stack; a parameter with none is replicated and says so.

A dimension chosen for ``tensor``, ``expert`` or ``stage`` that the axis does not divide raises
``ShardingRuleError`` naming the parameter, the dimension and the axis sizes that work.
"""

import math
import re
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec

from sharding_rules.logical import MESH_AXES
from sharding_rules.trace import (
    BATCH,
    CONTRACT,
    DOT_ROLES,
    FREE,
    LAYER,
    VOCAB,
    WIDTH,
    ModelAnalysis,
    ParamLabel,
    analyze_model,
)

_OUTPUT = ("output", None)
_REDUCE = ("reduce", None)


class ShardingRuleError(ValueError):
    """A requested mesh axis cannot shard a parameter, or an override/mesh is malformed."""


@dataclass(frozen=True)
class ParamRule:
    """The decision for one parameter: its spec and why."""

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    spec: PartitionSpec
    reason: str


@dataclass(frozen=True)
class TensorGroup:
    """A Megatron pair: ``columns`` feed ``rows``; each entry is ``(leaf, dim)``."""

    columns: tuple[tuple[int, int], ...]
    rows: tuple[tuple[int, int], ...]
    sizes: frozenset[int]


@dataclass(frozen=True)
class _Structure:
    groups: tuple[TensorGroup, ...]
    embeddings: dict[int, tuple[int, tuple[int, ...]]]  # leaf -> (vocab dim, width dims)
    heads: dict[int, tuple[int, int | None, str]]  # leaf -> (output dim, contracting dim, why)
    experts: tuple[tuple[int, int], ...]
    layers: frozenset[tuple[int, int]]


def divisors(n: int) -> list[int]:
    """All positive divisors of ``n``, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


MeshSizes = Mapping[str, int] | jax.sharding.Mesh | jax.sharding.AbstractMesh


def axis_sizes(mesh_axis_sizes: MeshSizes) -> dict[str, int]:
    """Validate axis sizes (a dict, ``Mesh`` or ``AbstractMesh``); absent axes become 1.

    Raises:
      ShardingRuleError: on an unknown axis name or a size that is not a positive int.
    """
    if isinstance(mesh_axis_sizes, jax.sharding.Mesh | jax.sharding.AbstractMesh):
        mesh_axis_sizes = mesh_axis_sizes.shape
    sizes = dict(mesh_axis_sizes)
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ShardingRuleError(f"unknown mesh axes {unknown}; valid axes are {list(MESH_AXES)}")
    for name, size in sizes.items():
        if not isinstance(size, int | np.integer) or size < 1:
            raise ShardingRuleError(f"mesh axis {name!r} has size {size!r}; use a positive int")
    return {a: int(sizes.get(a, 1)) for a in MESH_AXES}


# -- mesh-independent structure ------------------------------------------------------------
def _find(parent: dict[ParamLabel, ParamLabel], x: ParamLabel) -> ParamLabel:
    parent.setdefault(x, x)
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


def _embeddings(an: ModelAnalysis) -> dict[int, tuple[int, tuple[int, ...]]]:
    """Leaves read by index: leaf -> (vocab dim, width dims)."""
    embeddings: dict[int, tuple[int, tuple[int, ...]]] = {}
    for (leaf, dim), roles in sorted(an.roles.items()):
        if VOCAB in roles and leaf not in embeddings:
            widths = tuple(
                d
                for d, n in enumerate(an.shapes[leaf])
                if d != dim and n > 1 and WIDTH in an.roles.get((leaf, d), ())
            )
            embeddings[leaf] = (dim, widths)
    return embeddings


def _groups(an: ModelAnalysis, is_producer: Callable[[Any], bool]) -> list[TensorGroup]:
    """Megatron pairs: union consumers with the producers they contract, keep clean groups."""
    parent: dict[ParamLabel, ParamLabel] = {}
    tainted: set[ParamLabel] = set()
    for c in an.contractions:
        _find(parent, c.consumer)
        for src in c.sources:
            if is_producer(src):
                parent[_find(parent, src)] = _find(parent, c.consumer)
            elif not (
                isinstance(src, ParamLabel) and src.outer == 1 and not an.role(src) & DOT_ROLES
            ):  # anything but a bias/scale merged in: input, residual stream, misaligned factor
                tainted.add(c.consumer)
    members: dict[ParamLabel, set[ParamLabel]] = defaultdict(set)
    for label in parent:
        members[_find(parent, label)].add(label)
    by_root: dict[ParamLabel, list[Any]] = defaultdict(list)
    for c in an.contractions:
        by_root[_find(parent, c.consumer)].append(c)
    candidates = []
    for root, contractions in by_root.items():
        consumers = {c.consumer for c in contractions}
        producers = members[root] - consumers
        leaves = [m.leaf for m in members[root]]
        only_feeds_consumers = all(
            an.sinks.get(p) and all(s[0] == "row" and s[1] in consumers for s in an.sinks[p])
            for p in producers
        )
        if (
            producers
            and not members[root] & tainted
            and len(set(leaves)) == len(leaves)
            and only_feeds_consumers
        ):
            group = TensorGroup(
                columns=tuple(sorted((p.leaf, p.dim) for p in producers)),
                rows=tuple(sorted((c.leaf, c.dim) for c in consumers)),
                sizes=frozenset(c.size for c in contractions),
            )
            candidates.append((-len(members[root]), min(c.order for c in contractions), group))
    groups, taken = [], set()
    for _, _, group in sorted(candidates, key=lambda x: x[:2]):
        leaves = {leaf for leaf, _ in (*group.columns, *group.rows)}
        if not leaves & taken:
            groups.append(group)
            taken |= leaves
    return groups


def _structure(an: ModelAnalysis) -> _Structure:
    embeddings = _embeddings(an)

    def is_producer(lab: Any) -> bool:
        return (
            isinstance(lab, ParamLabel)
            and lab.outer == 1
            and FREE in an.role(lab)
            and lab.leaf not in embeddings
        )

    pruned = replace(
        an, contractions=tuple(c for c in an.contractions if c.consumer.leaf not in embeddings)
    )
    groups = _groups(pruned, is_producer)
    taken = {leaf for g in groups for leaf, _ in (*g.columns, *g.rows)}
    heads: dict[int, tuple[int, int | None, str]] = {}
    for lab, sinks in sorted(an.sinks.items(), key=lambda kv: (kv[0].leaf, kv[0].dim)):
        if not (is_producer(lab) and sinks <= {_OUTPUT, _REDUCE}) or lab.leaf in taken | set(heads):
            continue
        shape = an.shapes[lab.leaf]
        contracting = [d for d in range(len(shape)) if CONTRACT in an.roles.get((lab.leaf, d), ())]
        if _REDUCE in sinks and shape[lab.dim] < math.prod(shape[d] for d in contracting):
            continue  # narrower than its input (router, classifier): replicated is cheaper
        why = "reaches the output" if _REDUCE not in sinks else "only reduced over (softmax/CE)"
        heads[lab.leaf] = (lab.dim, contracting[0] if contracting else None, why)
    experts: dict[int, int] = {}  # leaf -> its first expert-stacked dim
    for (leaf, dim), roles in sorted(an.roles.items()):
        if BATCH in roles and LAYER not in roles:
            experts.setdefault(leaf, dim)
    return _Structure(
        groups=tuple(groups),
        embeddings=embeddings,
        heads=heads,
        experts=tuple(sorted(experts.items())),
        layers=frozenset(k for k, r in an.roles.items() if LAYER in r),
    )


# -- overrides ---------------------------------------------------------------------------
def _entry_axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    if isinstance(entry, tuple) and all(isinstance(a, str) for a in entry):
        return entry
    raise ShardingRuleError(
        f"PartitionSpec entry {entry!r} is not None, an axis name or a tuple of axis names"
    )


def check_spec(
    path: str, shape: tuple[int, ...], spec: PartitionSpec, sizes: Mapping[str, int], origin: str
) -> PartitionSpec:
    """Validate ``spec`` for a parameter and pad it to its rank.

    Raises:
      ShardingRuleError: the spec is longer than the rank, names an unknown or repeated axis,
        or its axes do not divide a dimension (the message lists the sizes that would).
    """
    if len(spec) > len(shape):
        raise ShardingRuleError(
            f"{origin}: spec {spec} has {len(spec)} entries but {path!r} has shape {shape}"
        )
    entries = [_entry_axes(entry) for entry in spec]
    named = [axis for axes in entries for axis in axes]
    for axis in named:
        if axis not in MESH_AXES:
            raise ShardingRuleError(
                f"{origin}: unknown mesh axis {axis!r} for {path!r}; valid: {list(MESH_AXES)}"
            )
        if named.count(axis) > 1:
            raise ShardingRuleError(f"{origin}: axis {axis!r} used twice in {spec}")
    for dim, axes in enumerate(entries):
        total = math.prod(sizes[a] for a in axes)
        if shape[dim] % total:
            raise ShardingRuleError(
                f"{origin}: {path!r} dim {dim} (size {shape[dim]}) cannot be sharded over "
                f"{axes} (total size {total}); sizes that would divide it: "
                f"{divisors(shape[dim])}. Change the mesh or the override."
            )
    return PartitionSpec(*spec, *([None] * (len(shape) - len(spec))))


def _match_overrides(
    an: ModelAnalysis, overrides: Mapping[str, PartitionSpec] | None, sizes: dict[str, int]
) -> dict[int, tuple[str, PartitionSpec]]:
    if not overrides:
        return {}
    compiled = []
    for pattern, spec in overrides.items():
        if not isinstance(spec, PartitionSpec):
            raise ShardingRuleError(
                f"override {pattern!r} maps to {spec!r}; use a jax.sharding.PartitionSpec"
            )
        try:
            compiled.append((pattern, re.compile(pattern), spec))
        except re.error as err:
            raise ShardingRuleError(f"override {pattern!r} is not a valid regex: {err}") from err
    unmatched = [p for p, rx, _ in compiled if not any(rx.search(path) for path in an.paths)]
    if unmatched:
        raise ShardingRuleError(
            f"override patterns {unmatched} match no parameter; paths look like "
            f"{list(an.paths[:3])}"
        )
    out = {}
    for leaf, path in enumerate(an.paths):
        for pattern, rx, spec in compiled:
            if rx.search(path):
                origin = f"override {pattern!r}"
                out[leaf] = (pattern, check_spec(path, an.shapes[leaf], spec, sizes, origin))
                break
    return out


# -- per-mesh assignment -----------------------------------------------------------------
class _Assignment:
    def __init__(self, an: ModelAnalysis, fixed: dict[int, tuple[str, PartitionSpec]]) -> None:
        self.an = an
        self.fixed = fixed
        self.axes: list[dict[int, str]] = [{} for _ in an.paths]
        self.notes: list[list[str]] = [[] for _ in an.paths]
        self.anchors: dict[tuple[int, int], str] = {}

    def free(self, leaf: int) -> bool:
        return leaf not in self.fixed

    def put(self, leaf: int, dim: int, axis: str, note: str, anchor: bool = False) -> None:
        self.axes[leaf][dim] = axis
        self.notes[leaf].append(f"{axis}: {note}")
        if anchor:
            self.anchors[(leaf, dim)] = axis

    def names(self, entries: tuple[tuple[int, int], ...]) -> str:
        return ", ".join(self.an.paths[leaf] for leaf, _ in entries)


def _pattern(an: ModelAnalysis, entries: tuple[tuple[int, int], ...]) -> str:
    paths = sorted({an.paths[leaf] for leaf, _ in entries})
    return "^(" + "|".join(re.escape(p) for p in paths) + ")$"


def _no_divide(an: ModelAnalysis, leaf: int, dim: int, axis: str, size: int, what: str) -> str:
    path = an.paths[leaf]
    return (
        f"cannot shard {path!r} dim {dim} (shape {an.shapes[leaf]}, {what}) over {axis}={size}: "
        f"{size} does not divide it. {axis} sizes that would work: "
        f"{divisors(an.shapes[leaf][dim])}. Change the mesh, or override this parameter, e.g. "
        f"overrides={{{_pattern(an, ((leaf, dim),))!r}: PartitionSpec()}}"
    )


def _tensor(st: _Structure, asg: _Assignment, t: int) -> None:
    an = asg.an
    for g in st.groups:
        if not any(asg.free(leaf) for leaf, _ in (*g.columns, *g.rows)):
            continue
        bad = sorted(s for s in g.sizes if s % t)
        if bad:
            leaf, dim = g.columns[0]
            raise ShardingRuleError(
                f"tensor={t} does not divide the tensor-parallel dimension of "
                f"{an.paths[leaf]!r} (dim {dim} of shape {an.shapes[leaf]}): the group "
                f"[column-parallel: {asg.names(g.columns)}; row-parallel: {asg.names(g.rows)}] "
                f"is split over a factor of size {bad[0]} (attention heads or hidden units). "
                f"tensor sizes that would work: {divisors(math.gcd(*g.sizes))}. Change the mesh "
                f"or keep the whole group off 'tensor' with an override, e.g. "
                f"overrides={{{_pattern(an, (*g.columns, *g.rows))!r}: PartitionSpec()}}"
            )
        for leaf, dim in g.columns:
            if asg.free(leaf):
                asg.put(leaf, dim, "tensor", f"column-parallel, feeds {asg.names(g.rows)}", True)
        for leaf, dim in g.rows:
            if asg.free(leaf):
                asg.put(leaf, dim, "tensor", f"row-parallel, fed by {asg.names(g.columns)}")
    for leaf, (vocab, widths) in st.embeddings.items():
        if not asg.free(leaf):
            continue
        shape = an.shapes[leaf]
        if shape[vocab] % t == 0:
            asg.put(leaf, vocab, "tensor", f"embedding, vocab dim {vocab}", True)
            continue
        width = next((d for d in widths if shape[d] % t == 0), None)
        if width is None:
            raise ShardingRuleError(
                _no_divide(an, leaf, vocab, "tensor", t, "embedding vocab")
                + f"; its width dims {widths} do not divide either"
            )
        asg.put(leaf, width, "tensor", f"embedding, width (vocab {shape[vocab]} does not divide)")
    for leaf, (out, contracting, why) in st.heads.items():
        if not asg.free(leaf):
            continue
        shape = an.shapes[leaf]
        if shape[out] % t == 0:
            asg.put(leaf, out, "tensor", f"output head ({why}), column-parallel dim {out}", True)
        elif contracting is not None and shape[contracting] % t == 0:
            note = f"output head ({why}), input dim ({shape[out]} outputs)"
            asg.put(leaf, contracting, "tensor", note)
        else:
            raise ShardingRuleError(_no_divide(an, leaf, out, "tensor", t, "output head"))
    for leaf, shape in enumerate(an.shapes):
        used_by_matmul = any(
            an.roles.get((leaf, d), frozenset()) & DOT_ROLES for d in range(len(shape))
        )
        if asg.free(leaf) and used_by_matmul and "tensor" not in asg.axes[leaf].values():
            asg.notes[leaf].append("tensor: replicated, in no column/row pair (e.g. residual)")


def _followers(asg: _Assignment) -> None:
    an = asg.an
    # (leaf, dim) -> {(axis, size of the merged label set, anchor leaf)}
    proposals: dict[tuple[int, int], set[tuple[str, int, int]]] = defaultdict(set)
    for labels in an.cooccurrences:
        lead = [lab for lab in labels if isinstance(lab, ParamLabel) and lab.outer == 1]
        found = {
            (asg.anchors[(lab.leaf, lab.dim)], len(labels), lab.leaf)
            for lab in lead
            if (lab.leaf, lab.dim) in asg.anchors
        }
        if len({axis for axis, _, _ in found}) != 1:
            continue
        for lab in lead:
            if not an.role(lab) & DOT_ROLES and asg.free(lab.leaf):
                proposals[(lab.leaf, lab.dim)] |= found
    for (leaf, dim), found in sorted(proposals.items()):
        axes = {axis for axis, _, _ in found}
        if len(axes) != 1 or dim in asg.axes[leaf]:
            continue
        (axis,) = axes
        if axis not in asg.axes[leaf].values():
            _, _, anchor = min(found, key=lambda x: x[1:])
            asg.put(leaf, dim, axis, f"follows {an.paths[anchor]}")


def _stages(st: _Structure, asg: _Assignment, s: int) -> None:
    an = asg.an
    for leaf, dim in sorted(st.layers):
        if not asg.free(leaf) or dim in asg.axes[leaf] or "stage" in asg.axes[leaf].values():
            continue
        if an.shapes[leaf][dim] % s:
            raise ShardingRuleError(
                f"{an.shapes[leaf][dim]} stacked layers of {an.paths[leaf]!r} do not split into "
                f"stage={s} pipeline stages; use a stage count that divides the layer count "
                f"({divisors(an.shapes[leaf][dim])})"
            )
        asg.put(leaf, dim, "stage", f"layer axis {dim}, one block of layers per stage")


def _fsdp(st: _Structure, asg: _Assignment, f: int) -> None:
    an = asg.an
    for leaf, shape in enumerate(an.shapes):
        if not asg.free(leaf):
            continue
        dims = [
            d
            for d, n in enumerate(shape)
            if d not in asg.axes[leaf] and (leaf, d) not in st.layers and n % f == 0
        ]
        if dims:
            dim = max(dims, key=lambda d: (shape[d], -d))
            asg.put(leaf, dim, "fsdp", f"largest remaining divisible dim {dim}")
        else:
            asg.notes[leaf].append(f"fsdp: replicated, no free dimension divisible by fsdp={f}")


def param_rules(
    analysis: ModelAnalysis,
    mesh_axis_sizes: MeshSizes,
    overrides: Mapping[str, PartitionSpec] | None = None,
) -> dict[str, ParamRule]:
    """Decide every parameter's PartitionSpec for one mesh.

    Args:
      analysis: from ``analyze_model``.
      mesh_axis_sizes: ``{"data": 2, "fsdp": 2, "tensor": 2}`` (absent axes are 1) or a Mesh.
      overrides: ``{regex: PartitionSpec}``, first match on the path wins over the rules.

    Returns:
      ``{path: ParamRule}`` in ``jax.tree`` leaf order.

    Raises:
      ShardingRuleError: see the module docstring.
    """
    sizes = axis_sizes(mesh_axis_sizes)
    st = _structure(analysis)
    fixed = _match_overrides(analysis, overrides, sizes)
    asg = _Assignment(analysis, fixed)
    if sizes["tensor"] > 1:
        _tensor(st, asg, sizes["tensor"])
    if sizes["expert"] > 1:
        for leaf, dim in st.experts:
            if asg.free(leaf):
                n = analysis.shapes[leaf][dim]
                if n % sizes["expert"]:
                    raise ShardingRuleError(
                        _no_divide(analysis, leaf, dim, "expert", sizes["expert"], "experts")
                    )
                asg.put(leaf, dim, "expert", f"expert-stacked dim {dim}", True)
    _followers(asg)
    if sizes["stage"] > 1:
        _stages(st, asg, sizes["stage"])
    if sizes["fsdp"] > 1:
        _fsdp(st, asg, sizes["fsdp"])
    rules = {}
    for leaf, path in enumerate(analysis.paths):
        shape = analysis.shapes[leaf]
        if leaf in fixed:
            pattern, spec = fixed[leaf]
            reason = f"override {pattern!r}"
        else:
            spec = PartitionSpec(*(asg.axes[leaf].get(d) for d in range(len(shape))))
            reason = "; ".join(asg.notes[leaf]) or "replicated"
        rules[path] = ParamRule(path, shape, analysis.dtypes[leaf], spec, reason)
    return rules


def infer_param_specs(
    apply_fn: Callable[..., Any],
    params: Any,
    *example_args: Any,
    mesh_axis_sizes: MeshSizes,
    overrides: Mapping[str, PartitionSpec] | None = None,
) -> Any:
    """A PartitionSpec for every parameter, as a pytree shaped like ``params``.

    ``apply_fn(params, *example_args)`` is traced abstractly (see ``analyze_model``); the
    specs follow the rules in this module's docstring.

    Raises:
      ShardingRuleError: a requested axis does not divide the dimension the rules chose,
        or an override / mesh is malformed.
    """
    analysis = analyze_model(apply_fn, params, *example_args)
    return specs_tree(analysis, param_rules(analysis, mesh_axis_sizes, overrides))


def specs_tree(analysis: ModelAnalysis, rules: Mapping[str, ParamRule]) -> Any:
    """The specs of ``param_rules(analysis, ...)`` as a pytree shaped like the params, so one
    analysis can be turned into specs for many meshes without tracing again."""
    return jax.tree.unflatten(analysis.treedef, [r.spec for r in rules.values()])
