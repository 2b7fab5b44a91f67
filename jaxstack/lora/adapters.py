"""LoRA adapters as a pytree beside a frozen base: find the targets, create, merge, shard.

The adapters of a base weight ``W: [*lead, *in, *out]`` (``lead``: stacked layers or
experts, ``in``: the dims a matmul contracts, ``out``: the ones it produces) are
``A: [*lead, *in, r]`` and ``B: [*lead, r, *out]``, and the model runs on

    W_eff = W + scale * einsum(A, B over r)          scale = alpha / r

computed by :func:`merge` inside the jitted step, a transform of the params rather than of
the modules, so it applies to any Flax (or plain JAX) model without editing it. ``A`` keeps
the kernel's ``in`` dims and ``B`` its ``out`` dims, so each takes the kernel's own sharding
on those dims (:func:`adapter_specs`) and ``A @ B`` lands in ``W``'s sharding with no
communication. The adapter tree nests like the params: ``{..."q": {"kernel": {"lora_a": A,
"lora_b": B}}}`` for the parameter ``.../q/kernel``.
"""

import math
import re
import string
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import PartitionSpec

from jaxstack.lora.config import LoRAConfig
from sharding_rules import ModelAnalysis
from sharding_rules.paths import leaves_with_paths, path_keys
from sharding_rules.trace import BATCH, CONTRACT, FREE, LAYER

Params = Any
LORA_A, LORA_B = "lora_a", "lora_b"

HF_MODULE_NAMES = {
    "attn/q/": "self_attn/q_proj/",
    "attn/k/": "self_attn/k_proj/",
    "attn/v/": "self_attn/v_proj/",
    "attn/o/": "self_attn/o_proj/",
    "mlp/gate/": "mlp/gate_proj/",
    "mlp/up/": "mlp/up_proj/",
    "mlp/down/": "mlp/down_proj/",
}
"""jaxstack module path -> the Hugging Face (and PEFT) module name of the Llama family, so
that ``targets="q_proj|v_proj"`` selects what PEFT's ``target_modules`` would."""


@dataclass(frozen=True)
class Target:
    """One adapted weight: its path and how its dims split into ``lead``, ``in``, ``out``."""

    path: str
    shape: tuple[int, ...]
    lead: int
    n_in: int

    @property
    def in_shape(self) -> tuple[int, ...]:
        return self.shape[self.lead : self.lead + self.n_in]

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.shape[self.lead + self.n_in :]


def matches(pattern: str, path: str) -> bool:
    """Whether ``pattern`` selects ``path``, spelled as is or with HF module names."""
    spelled = path + "/"
    for ours, theirs in HF_MODULE_NAMES.items():
        spelled = spelled.replace(ours, theirs)
    return bool(re.search(pattern, path) or re.search(pattern, spelled.rstrip("/")))


def find_targets(analysis: ModelAnalysis, config: LoRAConfig) -> list[Target]:
    """The weight matrices whose path ``config.targets`` selects, with their dim layout read
    from how the traced computation uses each dim (``sharding_rules.trace`` roles).

    Raises:
        ValueError: no weight matrix matches (the message lists the matrices there are), or
            a matched weight's dims are not ``[*layers/experts, *in, *out]``.
    """
    found, matrices = [], []
    for leaf, path in enumerate(analysis.paths):
        shape = analysis.shapes[leaf]
        roles = [analysis.roles.get((leaf, d), frozenset()) for d in range(len(shape))]
        if not any(CONTRACT in r for r in roles) or not any(FREE in r for r in roles):
            continue  # not a weight matrix: norms, biases, embeddings
        matrices.append(path)
        if not matches(config.targets, path):
            continue
        kinds = "".join(_kind(r) for r in roles)
        layout = re.fullmatch(r"(L*)(C+)(F+)", kinds)
        if layout is None:
            raise ValueError(
                f"lora.targets selects {path} {shape}, whose dims the model uses as "
                f"{kinds!r} (L: layers/experts, C: contracted input, F: output); LoRA needs "
                "[*layers, *in, *out]: narrow lora.targets to leave it out"
            )
        found.append(Target(path, tuple(shape), len(layout[1]), len(layout[2])))
    if not found:
        raise ValueError(
            f"lora.targets={config.targets!r} selects no weight matrix of the model; its "
            f"matrices are: {', '.join(matrices[:12])}{' ...' if len(matrices) > 12 else ''}"
        )
    return found


def _kind(roles: frozenset[str]) -> str:
    if roles & {LAYER, BATCH}:
        return "L"
    if CONTRACT in roles:
        return "C"
    return "F" if FREE in roles else "?"


def init_adapters(rng: jax.Array, targets: list[Target], rank: int, dtype=jnp.float32) -> Params:
    """Fresh adapters: ``A`` uniform in ``+-1/sqrt(fan_in)`` (PEFT's default), ``B`` zero,
    so the adapted model starts equal to the base."""
    flat = {}
    for index, t in enumerate(targets):
        lead = t.shape[: t.lead]
        bound = 1.0 / math.sqrt(math.prod(t.in_shape))
        a_shape = (*lead, *t.in_shape, rank)
        key = jax.random.fold_in(rng, index)
        flat[(*t.path.split("/"), LORA_A)] = jax.random.uniform(key, a_shape, dtype, -bound, bound)
        flat[(*t.path.split("/"), LORA_B)] = jnp.zeros((*lead, rank, *t.out_shape), dtype)
    return traverse_util.unflatten_dict(flat)


def adapter_pairs(adapters: Params) -> dict[str, tuple[jax.Array, jax.Array]]:
    """``{weight path: (A, B)}`` of an adapter tree."""
    flat = traverse_util.flatten_dict(adapters, sep="/")
    keys, pairs = set(flat), {}
    for key in flat:
        path, kind = key.rsplit("/", 1)
        pair = {f"{path}/{LORA_A}", f"{path}/{LORA_B}"}
        if kind not in (LORA_A, LORA_B) or not pair <= keys:
            raise ValueError(f"adapter entry {key!r} is not one of a {LORA_A}/{LORA_B} pair")
        pairs[path] = (flat[f"{path}/{LORA_A}"], flat[f"{path}/{LORA_B}"])
    return pairs


def delta(a: jax.Array, b: jax.Array, weight_shape: tuple[int, ...]) -> jax.Array:
    """``A @ B`` over the rank, shaped like the weight ``[*lead, *in, *out]``."""
    lead = a.ndim + b.ndim - 2 - len(weight_shape)
    n_in = a.ndim - 1 - lead
    n_out = b.ndim - 1 - lead
    letters = iter(string.ascii_letters.replace("z", ""))
    lead_s = "".join(next(letters) for _ in range(lead))
    in_s = "".join(next(letters) for _ in range(n_in))
    out_s = "".join(next(letters) for _ in range(n_out))
    return jnp.einsum(f"{lead_s}{in_s}z,{lead_s}z{out_s}->{lead_s}{in_s}{out_s}", a, b)


def merge(
    base: Params,
    adapters: Params,
    scale: float,
    *,
    dropout: float = 0.0,
    rng: jax.Array | None = None,
) -> Params:
    """``base`` with every adapted weight replaced by ``W + scale * A @ B`` (in ``W``'s dtype).

    With ``dropout > 0`` and an ``rng`` (training), each input feature of each adapter is
    dropped with that probability (a row of ``A`` zeroed, the rest scaled by
    ``1 / (1 - dropout)``).

    Raises:
        ValueError: an adapter for a weight the base lacks, or whose shapes do not fit it.
    """
    pairs = adapter_pairs(adapters)
    flat, treedef = jax.tree_util.tree_flatten_with_path(base)
    paths = ["/".join(path_keys(kp)) for kp, _ in flat]
    missing = sorted(set(pairs) - set(paths))
    if missing:
        raise ValueError(
            f"the adapters modify {missing[0]}, which the base model lacks: they were made "
            "for another model (or lora.targets differs)"
        )
    leaves = []
    for index, (path, (_, w)) in enumerate(zip(paths, flat, strict=True)):
        if path not in pairs:
            leaves.append(w)
            continue
        a, b = pairs[path]
        check_fits(path, a, b, w.shape)
        if dropout > 0 and rng is not None:
            keep = jax.random.bernoulli(
                jax.random.fold_in(rng, index), 1 - dropout, (*a.shape[:-1], 1)
            )
            a = jnp.where(keep, a / (1 - dropout), 0).astype(a.dtype)
        leaves.append((w + scale * delta(a.astype(w.dtype), b.astype(w.dtype), w.shape))
                      .astype(w.dtype))  # fmt: skip
    return jax.tree.unflatten(treedef, leaves)


def check_fits(path: str, a: Any, b: Any, weight_shape: tuple[int, ...]) -> None:
    """Raise a one-line ``ValueError`` unless ``A``, ``B`` adapt a weight of ``weight_shape``."""
    w = tuple(weight_shape)
    lead = a.ndim + b.ndim - 2 - len(w)
    n_in = a.ndim - 1 - lead
    rank = a.shape[-1]
    fits = (
        lead >= 0
        and n_in >= 1
        and tuple(a.shape[:-1]) == w[: lead + n_in]
        and tuple(b.shape) == (*w[:lead], rank, *w[lead + n_in :])
    )
    if not fits:
        raise ValueError(
            f"the adapter of {path} (A {tuple(a.shape)}, B {tuple(b.shape)}) does not fit the "
            f"base weight {w}: it was made for another base model, or its A and B ranks differ"
        )


def adapter_specs(base: Params, base_specs: Params, adapters: Params) -> Params:
    """PartitionSpecs of an adapter tree from its base weights' specs (``base``: arrays or
    ``ShapeDtypeStruct``-s): ``A`` takes the weight's ``lead`` and ``in`` entries, ``B`` its
    ``lead`` and ``out`` entries; the rank is never split."""
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    spec_paths, spec_leaves, _ = leaves_with_paths(jax.tree.map(lambda s: s, base_specs,
                                                                is_leaf=is_spec))  # fmt: skip
    paths, leaves, _ = leaves_with_paths(base)
    specs = dict(zip(spec_paths, spec_leaves, strict=True))
    shapes = {path: tuple(x.shape) for path, x in zip(paths, leaves, strict=True)}
    flat = {}
    for path, (a, b) in adapter_pairs(adapters).items():
        ndim = len(shapes[path])
        lead = a.ndim + b.ndim - 2 - ndim
        n_in = a.ndim - 1 - lead
        spec = tuple(specs.get(path, PartitionSpec()))
        full = spec + (None,) * (ndim - len(spec))
        keys = tuple(path.split("/"))
        flat[(*keys, LORA_A)] = PartitionSpec(*full[: lead + n_in], None)
        flat[(*keys, LORA_B)] = PartitionSpec(*full[:lead], None, *full[lead + n_in :])
    return traverse_util.unflatten_dict(flat)


def base_reference(base: Params) -> dict:
    """A fingerprint of the base model saved beside its adapters: each weight's shape and
    dtype and the float64 sum of its absolute values (:func:`check_base`)."""
    paths, leaves, _ = leaves_with_paths(base)
    sums = jax.jit(lambda xs: [jnp.abs(x.astype(jnp.float32)).sum() for x in xs])(leaves)
    return {
        path: {"shape": list(x.shape), "dtype": str(x.dtype), "abs_sum": float(s)}
        for path, x, s in zip(paths, leaves, jax.device_get(sums), strict=True)
    }


def check_base(reference: dict, base: Params, where: str) -> None:
    """Raise a one-line ``ValueError`` when ``base`` is not the model ``reference``
    (:func:`base_reference`) describes; ``where`` names the adapters in the message."""
    current = base_reference(base)
    for path, saved in reference.items():
        now = current.get(path)
        if now is None or now["shape"] != saved["shape"]:
            got = "no such weight" if now is None else f"shape {now['shape']}"
            raise ValueError(
                f"{where} were trained on another base model: its {path} has shape "
                f"{saved['shape']}, this base has {got}; load the base it was trained on"
            )
        if not np.isclose(now["abs_sum"], saved["abs_sum"], rtol=1e-4, atol=1e-6):
            raise ValueError(
                f"{where} were trained on another base model: its {path} differs in value "
                f"(sum |w| {saved['abs_sum']:.6g} there, {now['abs_sum']:.6g} here); load the "
                "base it was trained on"
            )
