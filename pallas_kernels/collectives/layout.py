"""Where a device's shard of the sequence sits in the global sequence.

A sequence of ``S`` positions split over ``n`` devices of a mesh axis is laid out either

* ``"contiguous"``: device ``r`` holds positions ``[r * S/n, (r + 1) * S/n)``; or
* ``"zigzag"``: the sequence is cut into ``2n`` chunks of ``c = S / (2n)`` and device ``r``
  holds chunks ``r`` and ``2n - 1 - r``. Under a causal mask every device then owns one early
  and one late chunk, so each sees the same number of (query, key) pairs: no device idles
  while the last one works through the whole prefix (Brandon et al., "Striped attention";
  the zig-zag order of ring-flash-attention).

:func:`to_layout` reorders a global ``[b, S, ...]`` array so that an ordinary split of axis 1
over the mesh axis gives each device its shard; :func:`from_layout` undoes it. Inside
``shard_map`` :func:`shard_positions` gives the global index of each local position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: str, seq_len: int, num_shards: int) -> None:
    """Raise ``ValueError`` naming a working length when ``seq_len`` cannot be laid out.

    ``"contiguous"`` needs ``seq_len % num_shards == 0``; ``"zigzag"`` needs
    ``seq_len % (2 * num_shards) == 0``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
    multiple = num_shards * (2 if layout == "zigzag" else 1)
    if seq_len % multiple:
        below, above = seq_len // multiple * multiple, -(-seq_len // multiple) * multiple
        raise ValueError(
            f"sequence length {seq_len} does not split over {num_shards} sequence shards in the "
            f"{layout!r} layout: it must be a multiple of {multiple}"
            + (" (2 x sequence)" if layout == "zigzag" else "")
            + f"; pad or cut it to {above}"
            + (f" or {below}" if below else "")
            + ", or use a sequence axis that divides it."
        )


def permutation(layout: str, seq_len: int, num_shards: int) -> np.ndarray:
    """``[S]`` int: global index of each position of the laid-out sequence (static)."""
    check_layout(layout, seq_len, num_shards)
    if layout == "contiguous":
        return np.arange(seq_len)
    c = seq_len // (2 * num_shards)
    chunks = [
        np.arange(c) + chunk * c for r in range(num_shards) for chunk in (r, 2 * num_shards - 1 - r)
    ]
    return np.concatenate(chunks)


def to_layout(x: jax.Array, layout: str, num_shards: int, axis: int = 1) -> jax.Array:
    """``x`` in natural order along ``axis`` -> the order whose even split is ``layout``."""
    if layout == "contiguous":
        return x
    return jnp.take(x, permutation(layout, x.shape[axis], num_shards), axis=axis)


def from_layout(x: jax.Array, layout: str, num_shards: int, axis: int = 1) -> jax.Array:
    """Inverse of :func:`to_layout`."""
    if layout == "contiguous":
        return x
    inverse = np.argsort(permutation(layout, x.shape[axis], num_shards))
    return jnp.take(x, inverse, axis=axis)


def shard_positions(layout: str, local_len: int, index: jax.Array, num_shards: int) -> jax.Array:
    """``[local_len]`` int32: global index of each position of shard ``index`` (traced)."""
    if layout == "contiguous":
        return index * local_len + jnp.arange(local_len, dtype=jnp.int32)
    c = local_len // 2
    within = jnp.arange(c, dtype=jnp.int32)
    return jnp.concatenate([index * c + within, (2 * num_shards - 1 - index) * c + within])
