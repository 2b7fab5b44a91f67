"""Grouped-query self-attention with RoPE, optional QK-norm, and a KV cache.

Every attention computation in jaxstack goes through ``pallas_kernels.attention`` (training
and prefill), ``pallas_kernels.decode_attention`` (one new token against the cache) or
``pallas_kernels.paged.ragged_paged_attention`` (serving: flat tokens of many sequences over a
paged cache), so the kernel implementation is picked in one place by ``implementation``.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxstack.layers import context_parallel, tensor_parallel
from jaxstack.layers.norms import RMSNorm
from jaxstack.layers.rope import Llama3RopeScaling, apply_rope, inverse_frequencies
from pallas_kernels import attention, decode_attention
from pallas_kernels.paged import ragged_paged_attention, write_kv_pages
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


class PagedBatch(NamedTuple):
    """Where a flat batch of ``T`` new tokens from ``S`` sequences sits in a paged KV cache
    (the layout of ``pallas_kernels.paged.ragged_paged_attention``).

    slot_mapping: i32[T] cache slot (page * page_size + offset) of each token, -1 skips it;
    kv_lens: i32[S] keys of each sequence after this batch; page_indices: i32[S, pages_per_seq];
    cu_q_lens: i32[S + 1] token offsets of the sequences; num_seqs: i32[1] sequences in use.
    """

    slot_mapping: jax.Array
    kv_lens: jax.Array
    page_indices: jax.Array
    cu_q_lens: jax.Array
    num_seqs: jax.Array


class PagedCache(NamedTuple):
    """A paged KV cache and the batch that reads and writes it.

    pages: [pages, page_size, 2 * kv_heads, head_dim] for one layer (K at even, V at odd
    indices of axis 2). For the whole model: a tuple of those per layer (unrolled layers; each
    is updated in place when donated), or one array with a leading [num_layers] axis (scanned
    layers).
    """

    pages: jax.Array
    batch: PagedBatch


class Attention(nn.Module):
    """x: [b, s, embed] -> [b, s, embed].

    Without a cache: causal attention restricted to equal ``segment_ids`` (packed sequences).
    With a cache and ``decode_index`` None (prefill): attends over x causally and writes its
    keys/values to cache positions [0, s). With ``decode_index: [b]`` (decode, s == 1): writes
    the new key/value at each row's index and attends to cache positions [0, index].
    With a ``PagedCache`` (serving): x is one row of packed tokens ([1, T, embed]) from the
    sequences of ``cache.batch``; writes their keys/values to their slots and attends ragged.
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
    sinks: int = 0
    """With a ``sliding_window``: keys at positions below this stay visible to every query
    (StreamingLLM's attention sinks)."""
    implementation: str = "xla"
    context_parallel: str = "none"
    """``"ring"`` / ``"all_gather"``: under a ``sequence`` axis > 1, inputs arrive in the
    zig-zag order of ``jaxstack.layers.context_parallel`` and attention runs per sequence
    shard (the model reorders them); ``"none"``: attention sees whole sequences."""
    tensor_parallel: str = "plain"
    """The mode of ``jaxstack.layers.tensor_parallel`` that applies here (``Block`` resolves
    it): in the split modes q/k/v all-gather x, split over the sequence on ``tensor``, and o
    reduce-scatters back to that layout (``collective_matmul``: in overlapped ring steps)."""
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _projection(self, heads: int, name: str) -> nn.DenseGeneral:
        return nn.DenseGeneral(
            (heads, self.head_dim),
            use_bias=self.qkv_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            dot_general=tensor_parallel.dot_generals(self.tensor_parallel)[0],
            name=name,
        )

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        segment_ids: jax.Array | None = None,
        cache: LayerCache | PagedCache | None = None,
        decode_index: jax.Array | None = None,
    ) -> tuple[jax.Array, LayerCache | PagedCache | None]:
        # q: [b, s, h, d], k/v: [b, s, kv, d]; in the split modes x is gathered once for all
        heads = {"q": self.num_heads, "k": self.num_kv_heads, "v": self.num_kv_heads}
        projections = [self._projection(n, name) for name, n in heads.items()]
        q, k, v = tensor_parallel.project(x, projections, self.tensor_parallel)
        if self.qk_norm:
            norm = lambda name: RMSNorm(self.norm_eps, self.dtype, self.param_dtype, name=name)  # noqa: E731
            q, k = norm("q_norm")(q), norm("k_norm")(k)
        inv_freq = inverse_frequencies(self.head_dim, self.rope_theta, self.rope_scaling)
        q = constrain(apply_rope(q, positions, inv_freq), ("batch", "seq", "heads", "head_dim"))
        k = constrain(apply_rope(k, positions, inv_freq), ("batch", "seq", "kv_heads", "head_dim"))
        v = constrain(v, ("batch", "seq", "kv_heads", "head_dim"))
        masks = dict(sliding_window=self.sliding_window, num_sink_tokens=self.sinks,
                     implementation=self.implementation)  # fmt: skip
        local = self.implementation != "xla"  # kernels run per shard; XLA partitions itself
        bhd, bshd = ("batch", "heads", None), ("batch", None, "heads", None)

        if isinstance(cache, PagedCache):
            out, cache = self._paged(q, k, v, cache)
        elif decode_index is not None:
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
        elif (
            cache is None
            and not self.is_initializing()  # as the model, which does not reorder then
            and context_parallel.active(self.context_parallel)
        ):
            if self.sinks:
                raise ValueError(
                    f"sinks={self.sinks}: context-parallel attention has no attention sinks; "
                    "use attention_sinks=0 or context_parallel='none'"
                )
            out = context_parallel.attention(
                q, k, v, segment_ids, strategy=self.context_parallel,
                sliding_window=self.sliding_window, implementation=self.implementation,
            )  # fmt: skip
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
            dot_general=tensor_parallel.dot_generals(self.tensor_parallel)[1],
            name="o",
        )(out)
        return y, cache

    def _paged(self, q, k, v, cache: PagedCache) -> tuple[jax.Array, PagedCache]:
        """q: [1, T, h, d], k/v: [1, T, kv, d] -> attention output [1, T, h, d] and the cache
        with the new keys/values written. Runs per shard: KV heads split over ``tensor``."""
        if q.shape[0] != 1:
            raise ValueError(f"a paged cache takes one row of packed tokens, got {q.shape[0]}")
        meta = cache.batch
        thd, pages_axes, per_seq = (None, "heads", None), (None, None, "heads", None), (None,)
        pages = per_shard(
            write_kv_pages,
            cache.pages,
            k[0],
            v[0],
            meta.slot_mapping,
            logical_axes=(pages_axes, thd, thd, per_seq),
            out_axes=pages_axes,
        )

        def attend(q, pages, kv_lens, page_indices, cu_q_lens, num_seqs):
            return ragged_paged_attention(
                q, pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                sm_scale=self.head_dim**-0.5,
                sliding_window=self.sliding_window,
                sinks=self.sinks or None,
                implementation="xla" if self.implementation == "xla" else "auto",
            )  # fmt: skip

        out = per_shard(
            attend,
            q[0],
            pages,
            meta.kv_lens,
            meta.page_indices,
            meta.cu_q_lens,
            meta.num_seqs,
            logical_axes=(thd, pages_axes, per_seq, (None, None), per_seq, per_seq),
            out_axes=thd,
        )
        return out[None].astype(self.dtype), PagedCache(pages, meta)
