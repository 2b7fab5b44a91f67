"""Grouped-query self-attention with RoPE, optional QK-norm, and a KV cache.

Every attention computation in jaxstack goes through ``pallas_kernels.attention`` (training
and prefill) or ``pallas_kernels.decode_attention`` (one new token against the cache), so the
kernel implementation is picked in one place by ``implementation``.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxstack.layers.norms import RMSNorm
from jaxstack.layers.rope import Llama3RopeScaling, apply_rope, inverse_frequencies
from pallas_kernels import attention, decode_attention
from sharding_rules import constrain, fitting_spec, uses_our_axes


def per_shard(fn, *args: jax.Array | None, logical_axes, out_axes):
    """Run ``fn`` on each device's shard of ``args`` under the current mesh (``shard_map``).

    Attention is independent per batch row and per head, so a kernel XLA cannot partition
    (Pallas) runs locally instead of on gathered inputs. Heads shard over ``tensor`` only when
    every head count (query and key/value) divides it; ``None`` args pass through as None.
    Outside a mesh of ``MESH_AXES`` ``fn`` is called directly.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if not uses_our_axes(mesh) or mesh.size == 1:
        return fn(*args)
    sizes = dict(mesh.shape)
    tensor = sizes.get("tensor", 1)
    head_dims = [x.shape[a.index("heads")] for x, a in zip(args, logical_axes, strict=True)
                 if x is not None and "heads" in a]  # fmt: skip
    heads_fit = all(n % tensor == 0 for n in head_dims)
    axes = [tuple(n if n != "heads" or heads_fit else None for n in a) for a in logical_axes]
    present = [i for i, x in enumerate(args) if x is not None]
    specs = tuple(fitting_spec(args[i].shape, axes[i], sizes) for i in present)
    # the output follows the first argument's placement, axis name by axis name
    placed = dict(zip(axes[present[0]], specs[0], strict=True))
    out_spec = PartitionSpec(*(placed.get(name) for name in out_axes))

    def local(*shards):
        full = [None] * len(args)
        for i, shard in zip(present, shards, strict=True):
            full[i] = shard
        return fn(*full)

    mapped = jax.shard_map(local, in_specs=specs, out_specs=out_spec, check_vma=False)
    return mapped(*(args[i] for i in present))


class LayerCache(NamedTuple):
    """One layer's KV cache: k, v: [b, max_len, kv_heads, head_dim]."""

    k: jax.Array
    v: jax.Array


class Attention(nn.Module):
    """x: [b, s, embed] -> [b, s, embed].

    Without a cache: causal attention restricted to equal ``segment_ids`` (packed sequences).
    With a cache and ``decode_index`` None (prefill): attends over x causally and writes its
    keys/values to cache positions [0, s). With ``decode_index: [b]`` (decode, s == 1): writes
    the new key/value at each row's index and attends to cache positions [0, index].
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: Llama3RopeScaling | None = None
    qkv_bias: bool = False
    qk_norm: bool = False
    norm_eps: float = 1e-6
    sliding_window: int | None = None
    implementation: str = "xla"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _project(self, x: jax.Array, heads: int, name: str) -> jax.Array:
        return nn.DenseGeneral(
            (heads, self.head_dim),
            use_bias=self.qkv_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )(x)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None = None,
        cache: LayerCache | None = None,
        decode_index: jax.Array | None = None,
    ) -> tuple[jax.Array, LayerCache | None]:
        q = self._project(x, self.num_heads, "q")  # [b, s, h, d]
        k = self._project(x, self.num_kv_heads, "k")  # [b, s, kv, d]
        v = self._project(x, self.num_kv_heads, "v")
        if self.qk_norm:
            norm = lambda name: RMSNorm(self.norm_eps, self.dtype, self.param_dtype, name=name)  # noqa: E731
            q, k = norm("q_norm")(q), norm("k_norm")(k)
        inv_freq = inverse_frequencies(self.head_dim, self.rope_theta, self.rope_scaling)
        q = constrain(apply_rope(q, positions, inv_freq), ("batch", "seq", "heads", "head_dim"))
        k = constrain(apply_rope(k, positions, inv_freq), ("batch", "seq", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "seq", "kv_heads", "head_dim"))
        masks = dict(sliding_window=self.sliding_window, implementation=self.implementation)
        local = self.implementation != "xla"  # kernels run per shard; XLA partitions itself
        bhd, bshd = ("batch", "heads", None), ("batch", None, "heads", None)

        if decode_index is not None:
            if cache is None or x.shape[1] != 1:
                raise ValueError("decoding needs a cache and exactly one new token per row")
            rows = jnp.arange(x.shape[0])
            cache = LayerCache(
                cache.k.at[rows, decode_index].set(k[:, 0].astype(cache.k.dtype)),
                cache.v.at[rows, decode_index].set(v[:, 0].astype(cache.v.dtype)),
            )
            decode = lambda q, k, v, n: decode_attention(q, k, v, n, **masks)  # noqa: E731
            args = (q[:, 0], cache.k, cache.v, decode_index + 1)
            if local:
                out = per_shard(decode, *args, logical_axes=(bhd, bshd, bshd, ("batch",)),
                                out_axes=bhd)  # fmt: skip
            else:
                out = decode(*args)
            out = out[:, None].astype(self.dtype)
        else:
            prefill = lambda q, k, v, seg: attention(q, k, v, q_segment_ids=seg, **masks)  # noqa: E731
            if local:
                axes = (bshd, bshd, bshd, ("batch", None))
                out = per_shard(prefill, q, k, v, segment_ids, logical_axes=axes, out_axes=bshd)
            else:
                out = prefill(q, k, v, segment_ids)
            if cache is not None:
                cache = LayerCache(
                    jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), 0, 1),
                    jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), 0, 1),
                )
        out = constrain(out, ("batch", "seq", "heads", "head_dim"))
        y = nn.DenseGeneral(
            x.shape[-1],
            axis=(-2, -1),
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="o",
        )(out)
        return y, cache
