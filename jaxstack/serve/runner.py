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
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxstack.layers.attention import PagedBatch, PagedCache
from jaxstack.metrics import tracked
from jaxstack.models.llama import Llama
from jaxstack.serve import quantize
from jaxstack.serve.sampling import (
    BIAS_SLOTS,
    NO_TOKEN,
    LogitControls,
    adjust_logits,
    logprobs_of,
    sample_rows,
)
from jaxstack.serve.scheduler import RequestState
from jaxstack.serve.structured import bitmask_width
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
    controls: LogitControls  # logprobs, bias, penalties (see sampling.LogitControls)
    prev_rows: np.ndarray  # i32[T] for a token still on the device: its row in the previous
    # step's sampled tokens; -1 for tokens given in ``tokens``


class StepOutputs(NamedTuple):
    """What one step returns to the host."""

    tokens: np.ndarray  # i32[S] sampled token of every row
    logprobs: tuple[np.ndarray, np.ndarray, np.ndarray] | None
    """``sampling.logprobs_of`` (sampled, top ids, top logprobs) when a row asked."""


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
    forward, as in training) and the pages split their KV heads over ``tensor``. Params from
    ``quantize.quantize_params`` (int8 kernels) run their matmuls in int8.
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
        eos_ids: frozenset[int] = frozenset(),
    ):
        cfg = model.config
        self.eos_ids = eos_ids
        """Ids masked (with a row's ``stop_token_ids``) while a row is below ``min_tokens``."""
        self._constants: dict[tuple, jax.Array] = {}  # device tables of steps without bias
        self.model, self.mesh = model, mesh
        self.quantized = quantize.is_quantized(params)
        self.page_size, self.pages_per_seq = page_size, pages_per_seq
        self.token_buckets = tuple(sorted(token_buckets))
        self.seq_buckets = tuple(sorted(seq_buckets))
        self._layer_shape = page_shape(cfg, num_pages, page_size)
        self.max_seqs = self.seq_buckets[-1]
        self._no_prev = jnp.zeros(self.max_seqs, jnp.int32)
        self.num_traces = 0
        """How often the step was traced (each trace is one compilation)."""
        self._pages_sharding = None  # default placement
        self._replicated = None if mesh is None else NamedSharding(mesh, PartitionSpec())
        if mesh is None:
            self.params, self.pages = params, self._zero_pages()
            self._step = jax.jit(self._device_step, donate_argnums=1)
            # a step's outputs are committed to the device when its params are: the first
            # step's stand-in for the previous tokens must match, or the step compiles twice
            if any(getattr(leaf, "committed", False) for leaf in jax.tree.leaves(params)):
                self._no_prev = jax.device_put(self._no_prev, jax.devices()[0])
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
        *sampling, controls = sampling
        self.num_traces += 1
        int8 = self.quantized
        with nn.intercept_methods(quantize.dense_interceptor) if int8 else contextlib.nullcontext():
            hidden, cache = self.model.apply(
                {"params": params},
                tokens[None],
                positions[None],
                cache=PagedCache(pages, batch),
                return_hidden=True,
            )
        last = hidden[0, last_rows]  # [S, d]: the head runs on each sequence's last token only
        if int8 and not self.model.config.tie_embeddings:
            logits = quantize.head_logits(last, params["lm_head"])
        else:
            head = self.model.head_kernel(params).astype(last.dtype)
            logits = jnp.dot(last, head).astype(jnp.float32)  # [S, vocab]
        sampled = sample_rows(adjust_logits(logits, controls), *sampling)
        return (sampled, logprobs_of(logits, sampled, controls.num_logprobs)), cache.pages

    def _context(self):
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)

    def _device_step(self, params, pages, tokens, positions, batch, last_rows, *rest):
        """``_forward`` after taking the tokens still on the device from the previous step's
        sampled tokens (``rest`` ends with ``prev_rows`` and those tokens); returns the
        sampled tokens padded to the largest sequence bucket, and the log-probabilities."""
        *sampling, prev_rows, prev_sampled = rest
        tokens = jnp.where(prev_rows >= 0, prev_sampled[jnp.maximum(prev_rows, 0)], tokens)
        (sampled, logprobs), pages = self._forward(params, pages, tokens, positions, batch,
                                                   last_rows, *sampling)  # fmt: skip
        padded = jnp.zeros(self.max_seqs, jnp.int32).at[: sampled.shape[0]].set(sampled)
        return (padded, logprobs), pages

    def dispatch(self, inputs: StepInputs, prev_sampled: jax.Array | None = None) -> tuple:
        """Start one step without waiting for it; the pages are updated in place. Returns,
        on the device, the sampled token of every row (i32[largest seq bucket]; only rows
        whose sequence finished its pending tokens mean anything) and the log-probabilities.
        ``prev_sampled``: the tokens the previous dispatch returned, read where
        ``inputs.prev_rows`` says."""
        prev = self._no_prev if prev_sampled is None else prev_sampled
        with self._context():
            (tokens, logprobs), self.pages = self._step(
                self.params,
                self.pages,
                *(getattr(inputs, f.name) for f in fields(StepInputs)),
                prev,
            )
        return tokens, logprobs

    def run(self, inputs: StepInputs) -> StepOutputs:
        """Run one step and wait for it (see ``dispatch``): the sampled token of every row and,
        when a row asked, the log-probabilities."""
        tokens, logprobs = self.dispatch(inputs)
        wanted = np.any(np.asarray(inputs.controls.num_logprobs) >= 0)
        return StepOutputs(
            np.asarray(tokens)[: len(inputs.last_rows)],
            jax.device_get(logprobs) if wanted else None,
        )

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
        vocab = self.model.config.vocab_size
        controls = _ControlsBuilder(s, self.pages_per_seq * self.page_size, self.eos_ids, vocab)
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
            controls.add(row, seq, samples=n == seq.num_pending)
            if seq.num_resolved < seq.num_computed + n:  # only ever the last token
                prev_rows[start + n - 1] = seq.sample_row
            start += n
        cu[len(step) + 1 :] = start
        batch = PagedBatch(slots, kv_lens, table, cu, np.array([len(step)], np.int32))
        last_rows = np.maximum(cu[1:] - 1, 0)
        sampling = (temperature, top_k, top_p, seeds, counters)
        controls = controls.build(self._device)
        return StepInputs(tokens, positions, batch, last_rows, *sampling, controls, prev_rows)

    def _device(self, array: np.ndarray | None, shape: tuple[int, ...], fill) -> jax.Array:
        """``array`` on the device (replicated on the mesh); None: a constant ``fill`` table
        of ``shape`` kept there, so a step without bias or penalties sends nothing big."""
        if array is not None:
            return jax.device_put(array, self._replicated)
        key = (shape, fill, type(fill))
        if key not in self._constants:
            table = np.full(shape, fill, np.int32 if isinstance(fill, int) else np.float32)
            self._constants[key] = jax.device_put(table, self._replicated)
        return self._constants[key]


class _ControlsBuilder:
    """Fills the ``LogitControls`` of one step row by row (``add``), then ``build``s it: the
    bias and history tables are built only when a row uses them."""

    def __init__(self, num_seqs: int, max_len: int, eos_ids: frozenset[int], vocab_size: int):
        s, self.max_len, self.eos_ids = num_seqs, max_len, eos_ids
        self.mask_width = bitmask_width(vocab_size)
        self.allowed: np.ndarray | None = None  # built at the first constrained row
        self.num_logprobs = np.full(s, -1, np.int32)
        self.repetition = np.ones(s, np.float32)
        self.presence, self.frequency = np.zeros(s, np.float32), np.zeros(s, np.float32)
        self.prompt_lens = np.zeros(s, np.int32)
        self.biased: dict[int, dict[int, float]] = {}  # row -> token -> bias
        self.penalized: dict[int, list[int]] = {}  # row -> its tokens

    def add(self, row: int, seq: RequestState, samples: bool) -> None:
        """Row ``row`` computes ``seq``; ``samples``: its token is kept (the last chunk)."""
        p = seq.params
        if samples and seq.matcher is not None and not seq.matcher.is_terminated():
            if self.allowed is None:
                self.allowed = np.full((len(self.num_logprobs), self.mask_width), -1, np.int32)
            seq.matcher.fill_next_token_bitmask(self.allowed, row)
        if p.logprobs is not None:
            self.num_logprobs[row] = p.logprobs
        bias = dict(p.logit_bias)
        if seq.num_output < p.min_tokens:
            stops = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_ids)
            bias.update(dict.fromkeys(stops, -np.inf))
        if bias:
            self.biased[row] = bias
        rates = (p.repetition_penalty, p.presence_penalty, p.frequency_penalty)
        if rates != (1.0, 0.0, 0.0):
            self.repetition[row], self.presence[row], self.frequency[row] = rates
            self.prompt_lens[row] = len(seq.prompt)
            self.penalized[row] = seq.tokens

    def build(self, device) -> LogitControls:
        s = len(self.num_logprobs)
        bias_ids = bias = history = None
        if self.biased:
            bias_ids = np.full((s, BIAS_SLOTS), NO_TOKEN, np.int32)
            bias = np.zeros((s, BIAS_SLOTS), np.float32)
            for row, entries in self.biased.items():
                bias_ids[row, : len(entries)] = list(entries)
                bias[row, : len(entries)] = list(entries.values())
        if self.penalized:
            history = np.full((s, self.max_len), NO_TOKEN, np.int32)
            for row, tokens in self.penalized.items():
                history[row, : len(tokens)] = tokens
        return LogitControls(
            self.num_logprobs,
            device(bias_ids, (s, BIAS_SLOTS), int(NO_TOKEN)),
            device(bias, (s, BIAS_SLOTS), 0.0),
            self.repetition,
            self.presence,
            self.frequency,
            device(history, (s, self.max_len), int(NO_TOKEN)),
            self.prompt_lens,
            device(self.allowed, (s, self.mask_width), -1),
        )
