"""The device side of serving: the paged KV pages, and one jitted step (paged forward of the
model + per-row sampling) compiled for a fixed set of shape buckets at start-up.

A step packs the scheduled tokens into ``T`` flat slots and their sequences into ``S`` rows,
``S`` rounded up to the smallest sequence bucket and ``T`` to the smallest token bucket that
holds the tokens and is at least ``S``; padding tokens write nowhere
(slot -1) and padding rows attend to nothing, so every step reuses a compiled executable.
"""

import contextlib
import math
import os
from dataclasses import dataclass, fields

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxstack.layers.attention import PagedBatch, PagedCache
from jaxstack.metrics import tracked
from jaxstack.models.llama import Llama
from jaxstack.serve.sampling import sample_rows
from jaxstack.serve.scheduler import RequestState
from sharding_rules import fitting_spec, infer_param_specs


@dataclass(frozen=True)
class StepInputs:
    """Host arrays of one step (shapes: one bucket ``[T]`` and ``[S]``)."""

    tokens: np.ndarray  # i32[T]
    positions: np.ndarray  # i32[T]
    batch: PagedBatch  # numpy leaves
    last_rows: np.ndarray  # i32[S] row of each sequence's last token
    temperature: np.ndarray  # f32[S]
    top_k: np.ndarray  # i32[S]
    top_p: np.ndarray  # f32[S]
    seeds: np.ndarray  # u32[S]
    counters: np.ndarray  # i32[S]
    prev_rows: np.ndarray  # i32[T] for a token still on the device: its row in the previous
    # step's sampled tokens; -1 for tokens given in ``tokens``


def serving_param_specs(model: Llama, params, mesh: Mesh):
    """The ``PartitionSpec`` of every parameter when serving on ``mesh``: the training sharding
    rules traced from ``model``'s forward. ``params`` may be abstract (``ShapeDtypeStruct``), so
    weights can be loaded straight into this placement."""
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    forward = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    return infer_param_specs(forward, params, ids, mesh_axis_sizes=dict(mesh.shape))


def page_shape(config, num_pages: int, page_size: int) -> tuple[int, ...]:
    """Shape of one layer's KV pages, ``[num_pages, page_size, 2 * kv_heads, head_dim]``."""
    return (num_pages, page_size, 2 * config.num_kv_heads, config.head_dim_)


def page_spec(shape: tuple[int, ...], mesh_sizes: dict[str, int]) -> PartitionSpec:
    """KV pages (one layer's, or stacked layers') split their heads over ``tensor``."""
    return fitting_spec(shape, (None,) * (len(shape) - 2) + ("kv_heads", None), mesh_sizes)


def host_available_bytes() -> int:
    """Host memory the OS can hand out now (``MemAvailable``; free pages where there is no
    ``/proc/meminfo``)."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def kv_budget_bytes(devices: list, fraction: float) -> int:
    """Bytes the KV cache may take on each of ``devices``: ``fraction`` of a device's memory
    less what is already in use there (the weights), as vLLM's ``gpu_memory_utilization``;
    devices without memory statistics (CPU) share ``fraction`` of the available host memory."""
    budgets = []
    for device in devices:
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            budgets.append(int(fraction * stats["bytes_limit"]) - stats.get("bytes_in_use", 0))
        else:
            budgets.append(int(fraction * host_available_bytes()) // len(devices))
    return min(budgets)


def page_bytes(config, page_size: int, mesh: Mesh | None) -> int:
    """Bytes one KV page (all layers) takes on each device."""
    shape = page_shape(config, 1, page_size)
    if mesh is not None:
        shape = NamedSharding(mesh, page_spec(shape, dict(mesh.shape))).shard_shape(shape)
    return config.num_layers * math.prod(shape) * jnp.dtype(config.dtype).itemsize


def weight_bytes(params) -> int:
    """Bytes of ``params`` on the device holding the largest share."""
    held: dict = {}
    for leaf in jax.tree.leaves(params):
        if not isinstance(leaf, jax.Array):  # host arrays: copied to the default device
            held[None] = held.get(None, 0) + leaf.nbytes
            continue
        for shard in leaf.addressable_shards:
            held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
    return max(held.values(), default=0)


def bucket(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= ``n``."""
    for size in buckets:
        if size >= n:
            return size
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


class ModelRunner:
    """Owns the KV pages (per layer ``[num_pages, page_size, 2 * kv_heads, head_dim]``) and
    runs steps. With a ``mesh``, params are placed by ``sharding_rules`` (traced from the model's
    forward, as in training) and the pages split their KV heads over ``tensor``.
    """

    def __init__(
        self,
        model: Llama,
        params,
        *,
        num_pages: int,
        page_size: int,
        pages_per_seq: int,
        token_buckets: tuple[int, ...],
        seq_buckets: tuple[int, ...],
        mesh: Mesh | None = None,
    ):
        cfg = model.config
        self.model, self.mesh = model, mesh
        self.page_size, self.pages_per_seq = page_size, pages_per_seq
        self.token_buckets = tuple(sorted(token_buckets))
        self.seq_buckets = tuple(sorted(seq_buckets))
        self._layer_shape = page_shape(cfg, num_pages, page_size)
        self.max_seqs = self.seq_buckets[-1]
        self._no_prev = jnp.zeros(self.max_seqs, jnp.int32)
        self.num_traces = 0
        """How often the step was traced (each trace is one compilation)."""
        self._pages_sharding = None  # default placement
        if mesh is None:
            self.params, self.pages = params, self._zero_pages()
            self._step = jax.jit(self._device_step, donate_argnums=1)
            return
        sizes = dict(mesh.shape)
        specs = serving_param_specs(model, params, mesh)
        param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
        kv_heads = lambda x: NamedSharding(mesh, page_spec(x.shape, sizes))  # noqa: E731
        self._pages_sharding = pages_sh = jax.tree.map(kv_heads, jax.eval_shape(self._zero_pages))
        self.params = jax.device_put(params, param_sh)  # a no-op where loaded in place
        self.pages = self._zero_pages()
        replicated = NamedSharding(mesh, PartitionSpec())
        inputs = len(fields(StepInputs)) + 1  # the previous step's sampled tokens too
        self._step = jax.jit(
            self._device_step,
            in_shardings=(param_sh, pages_sh) + (replicated,) * inputs,
            out_shardings=(replicated, pages_sh),
            donate_argnums=1,
        )

    def _zero_pages(self):
        """Empty pages: a tuple of per-layer arrays (each updated in place), or one stacked
        array for scanned layers; created in place on their devices once the sharding is
        known."""
        cfg, layer = self.model.config, self._layer_shape
        dtype = jnp.dtype(cfg.dtype)
        shape = (cfg.num_layers, *layer) if cfg.scan_layers else layer
        sharding = self._pages_sharding
        if cfg.scan_layers:
            return jnp.zeros(shape, dtype, device=sharding)
        shardings = sharding or (None,) * cfg.num_layers
        return tuple(jnp.zeros(shape, dtype, device=sh) for sh in shardings)

    def reset_pages(self) -> None:
        """Replace the KV pages with empty ones in the same placement (after a failed step,
        whose donated pages may be gone)."""
        self.pages = None  # drop the old buffers before allocating the new ones
        self.pages = self._zero_pages()

    def _forward(self, params, pages, tokens, positions, batch, last_rows, *sampling):
        self.num_traces += 1
        hidden, cache = self.model.apply(
            {"params": params},
            tokens[None],
            positions[None],
            cache=PagedCache(pages, batch),
            return_hidden=True,
        )
        last = hidden[0, last_rows]  # [S, d]
        head = self.model.head_kernel(params).astype(last.dtype)
        logits = jnp.dot(last, head).astype(jnp.float32)  # [S, vocab]
        return sample_rows(logits, *sampling), cache.pages

    def _context(self):
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def _device_step(self, params, pages, tokens, positions, batch, last_rows, *rest):
        """``_forward`` after taking the tokens still on the device from the previous step's
        sampled tokens (``rest`` ends with ``prev_rows`` and those tokens); returns the
        sampled tokens padded to the largest sequence bucket."""
        *sampling, prev_rows, prev_sampled = rest
        tokens = jnp.where(prev_rows >= 0, prev_sampled[jnp.maximum(prev_rows, 0)], tokens)
        sampled, pages = self._forward(params, pages, tokens, positions, batch, last_rows,
                                       *sampling)  # fmt: skip
        return jnp.zeros(self.max_seqs, jnp.int32).at[: sampled.shape[0]].set(sampled), pages

    def dispatch(self, inputs: StepInputs, prev_sampled: jax.Array | None = None) -> jax.Array:
        """Start one step without waiting for it; the pages are updated in place. Returns
        the sampled token of every row on the device (i32[largest seq bucket]; only rows whose
        sequence finished its pending tokens mean anything). ``prev_sampled``: what the
        previous dispatch returned, read where ``inputs.prev_rows`` says."""
        prev = self._no_prev if prev_sampled is None else prev_sampled
        with self._context():
            tokens, self.pages = self._step(
                self.params,
                self.pages,
                *(getattr(inputs, f.name) for f in fields(StepInputs)),
                prev,
            )
        return tokens

    def run(self, inputs: StepInputs) -> np.ndarray:
        """Run one step and wait for it: the sampled token of every row (see ``dispatch``)."""
        return np.asarray(self.dispatch(inputs))[: len(inputs.last_rows)]

    @property
    def buckets(self) -> list[tuple[int, int]]:
        """Every (tokens, sequences) shape a step can take: no more sequences than tokens."""
        return [(t, s) for t in self.token_buckets for s in self.seq_buckets if s <= t]

    def warmup(self, progress: bool = True) -> None:
        """Compile every bucket now, with a progress bar (start / done lines in a log)."""
        for t, s in tracked(self.buckets, "compiling serving buckets", progress):
            self.run(self.pack([], num_tokens=t, num_seqs=s))

    def probe(self) -> None:
        """Run one empty step of the smallest bucket (writes nowhere): raises if the device
        cannot run steps."""
        t, s = self.buckets[0]
        self.run(self.pack([], num_tokens=t, num_seqs=s))

    def pack(
        self,
        step: list[tuple[RequestState, int]],
        *,
        num_tokens: int | None = None,
        num_seqs: int | None = None,
    ) -> StepInputs:
        """Host arrays of ``step`` ([(sequence, tokens to compute)]), padded to its buckets
        (or to ``num_tokens`` / ``num_seqs``)."""
        s = num_seqs or bucket(len(step), self.seq_buckets)
        t = num_tokens or bucket(max(sum(n for _, n in step), s), self.token_buckets)
        tokens, positions = np.zeros(t, np.int32), np.zeros(t, np.int32)
        slots = np.full(t, -1, np.int32)
        kv_lens, cu = np.zeros(s, np.int32), np.zeros(s + 1, np.int32)
        table = np.zeros((s, self.pages_per_seq), np.int32)
        temperature, top_p = np.zeros(s, np.float32), np.ones(s, np.float32)
        top_k, counters = np.zeros(s, np.int32), np.zeros(s, np.int32)
        seeds = np.zeros(s, np.uint32)
        prev_rows = np.full(t, -1, np.int32)
        start, ps = 0, self.page_size
        for row, (seq, n) in enumerate(step):
            pos = np.arange(seq.num_computed, seq.num_computed + n)
            pages = np.asarray(seq.pages, np.int32)
            tokens[start : start + n] = seq.tokens[seq.num_computed : seq.num_computed + n]
            positions[start : start + n] = pos
            slots[start : start + n] = pages[pos // ps] * ps + pos % ps
            kv_lens[row], cu[row + 1] = seq.num_computed + n, start + n
            table[row, : len(pages)] = pages
            p = seq.params
            temperature[row], top_k[row], top_p[row] = p.temperature, p.top_k, p.top_p
            seeds[row], counters[row] = seq.seed, seq.num_output
            if seq.num_resolved < seq.num_computed + n:  # only ever the last token
                prev_rows[start + n - 1] = seq.sample_row
            start += n
        cu[len(step) + 1 :] = start
        batch = PagedBatch(slots, kv_lens, table, cu, np.array([len(step)], np.int32))
        last_rows = np.maximum(cu[1:] - 1, 0)
        sampling = (temperature, top_k, top_p, seeds, counters)
        return StepInputs(tokens, positions, batch, last_rows, *sampling, prev_rows)
