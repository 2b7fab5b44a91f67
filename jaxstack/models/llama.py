"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/3 by config): config, presets, modules, FLOPs.

Parameters live in float32; ``dtype`` is the compute dtype (bfloat16 for mixed precision).
Layers are either separate modules (``layers_0``, ``layers_1``, ...) or, with ``scan_layers``,
one module whose parameters carry a leading ``[num_layers]`` axis.
"""

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxstack.layers import context_parallel, pipeline, tensor_parallel
from jaxstack.layers.attention import Attention, LayerCache, PagedCache
from jaxstack.layers.mlp import SwiGLU
from jaxstack.layers.norms import RMSNorm
from jaxstack.layers.rope import Llama3RopeScaling
from sharding_rules import constrain

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

ACTIVATION_NAMES = ("block_input", "attention_out", "mlp_in", "mlp_out")
"""The ``checkpoint_name``s of a block's activations (each ``[b, s, hidden]``), for a per-name
``remat``: the block's input, the attention output, the normed MLP input, the MLP output."""
REMAT_CHOICES = ("save", "offload", "recompute")
"""Per-name remat choices: keep on the device, keep in host memory (``pinned_host``), or
recompute in the backward pass."""


def parse_remat(remat: str) -> dict[str, str] | None:
    """``"block_input=offload,attention_out=save"`` -> ``{name: choice}``; None for one of
    ``REMAT_POLICIES``. Names left out are recomputed.

    Raises:
        ValueError: neither a policy name nor ``name=choice`` pairs of ``ACTIVATION_NAMES`` and
            ``REMAT_CHOICES``.
    """
    if remat in REMAT_POLICIES:
        return None
    choices = {}
    for part in remat.split(","):
        name, _, choice = (x.strip() for x in part.partition("="))
        if name not in ACTIVATION_NAMES or choice not in REMAT_CHOICES:
            raise ValueError(
                f"remat={remat!r}; choose one of {sorted(REMAT_POLICIES)} or name=choice pairs "
                f"such as 'block_input=offload,attention_out=save' (names {ACTIVATION_NAMES}, "
                f"choices {REMAT_CHOICES})"
            )
        choices[name] = choice
    return choices


def remat_policy(remat: str) -> Callable | None:
    """The ``jax.checkpoint`` policy of a ``LlamaConfig.remat`` value (None: no remat)."""
    choices = parse_remat(remat)
    if choices is None:
        return REMAT_POLICIES[remat]
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[n for n, c in choices.items() if c == "save"],
        names_which_can_be_offloaded=[n for n, c in choices.items() if c == "offload"],
        offload_src="device",
        offload_dst="pinned_host",
    )


@dataclass(frozen=True)
class LlamaConfig:
    """Architecture and numerics of a Llama-family decoder."""

    vocab_size: int = 32000
    """Number of token ids."""
    hidden_size: int = 4096
    """Model width (embedding size)."""
    num_layers: int = 32
    """Number of decoder blocks."""
    num_heads: int = 32
    """Query heads."""
    num_kv_heads: int = 32
    """Key/value heads (grouped-query attention when fewer than ``num_heads``)."""
    head_dim: int | None = None
    """Per-head width; defaults to ``hidden_size // num_heads``."""
    intermediate_size: int = 11008
    """SwiGLU hidden width."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rope_scaling: Llama3RopeScaling | None = None
    """Llama 3.1-style RoPE scaling, or None."""
    rms_norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Use the input embedding as the LM head."""
    qkv_bias: bool = False
    """Biases on the q/k/v projections (Qwen2)."""
    qk_norm: bool = False
    """RMSNorm on queries and keys per head before RoPE (Qwen3)."""
    sliding_window: int | None = None
    """Each token sees at most this many most recent tokens (Mistral), or None."""
    attention_sinks: int = 0
    """With a ``sliding_window``: the first this many tokens of a sequence stay visible to
    every later token however far past the window (StreamingLLM's attention sinks); keys keep
    their absolute positions. A serving-time choice: not part of the checkpoint's config."""
    max_seq_len: int = 4096
    """Longest sequence the model is used with (sizes the KV cache default)."""
    scan_layers: bool = False
    """Stack the layers with ``nn.scan`` (faster compiles, leading layer axis on params)."""
    remat: str = "none"
    """Rematerialisation policy per layer: one of ``REMAT_POLICIES``, or per named activation
    (``ACTIVATION_NAMES``) ``save``, ``offload`` (to ``pinned_host`` memory) or ``recompute``:
    ``"block_input=offload,attention_out=save"`` (unnamed ones are recomputed)."""
    dtype: str = "float32"
    """Compute dtype (``bfloat16`` for mixed precision); parameters stay float32."""
    attention_impl: str = "auto"
    """``pallas_kernels.attention`` implementation: auto (Pallas on TPU, the fastest on GPU,
    XLA on CPU), pallas, cudnn or xla."""
    context_parallel: str = "none"
    """Attention over a sequence split on the ``sequence`` mesh axis: ``ring`` (K/V blocks
    travel a ring), ``all_gather`` (K/V gathered once) or ``none``. Only active under a mesh
    with ``sequence`` > 1; the length must then be a multiple of 2 x ``sequence``
    (``jaxstack.layers.context_parallel``, docs/long_context.md)."""
    tensor_parallel: str = "plain"
    """How activations sit on the ``tensor`` axis between tensor-parallel regions: ``plain``
    (whole), ``sequence_parallel`` (Megatron-SP: norms and residuals split over the sequence
    on ``tensor`` too) or ``collective_matmul`` (that split, with the all-gather before q/k/v,
    gate/up and the reduce-scatter after o, down overlapped with their matmuls;
    ``collective_matmul_bidirectional``: by rings running both ways). The split modes act
    under a mesh with ``tensor`` > 1 and no KV cache, and need the head counts and
    ``intermediate_size`` to be multiples of ``tensor`` (``jaxstack.layers.tensor_parallel``,
    docs/long_context.md)."""
    pipeline_microbatches: int = 0
    """Microbatches of the pipeline schedule under a mesh with ``stage`` > 1 (needs
    ``scan_layers``; ``jaxstack.layers.pipeline``): a multiple of ``stage`` dividing the batch;
    0 picks 2 x stages when the batch allows (``choose_microbatches``)."""
    pipeline_fsdp_gather: str = "per_microbatch"
    """Under ``stage`` and ``fsdp`` > 1: gather a stage's FSDP-split weights at each use
    (``per_microbatch``, least memory) or ``once`` per step (fewest collectives)."""
    initializer_range: float = 0.02
    """Std of the normal initialiser of weights."""
    extra: dict = field(default_factory=dict, compare=False, repr=False)
    """Free-form metadata carried along (e.g. the HF architecture); not used by the model."""

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                "set head_dim explicitly"
            )
        parse_remat(self.remat)
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r}; choose float32, bfloat16 or float16")
        if self.attention_impl not in ("auto", "pallas", "cudnn", "xla"):
            raise ValueError(
                f"attention_impl={self.attention_impl!r}; choose auto, pallas, cudnn or xla"
            )
        if self.attention_sinks < 0 or (self.attention_sinks and self.sliding_window is None):
            raise ValueError(
                f"attention_sinks={self.attention_sinks} needs a model with a sliding_window "
                "(sinks keep the first tokens visible past the window; without one every token "
                "is visible already): use 0, or a model whose config sets sliding_window"
            )
        if self.head_dim_ % 2:
            raise ValueError(f"head_dim={self.head_dim_} must be even for RoPE")
        if self.context_parallel not in context_parallel.CONTEXT_PARALLEL:
            raise ValueError(
                f"context_parallel={self.context_parallel!r}; choose one of "
                f"{context_parallel.CONTEXT_PARALLEL}"
            )
        if self.pipeline_microbatches < 0:
            raise ValueError(
                f"pipeline_microbatches={self.pipeline_microbatches}; use 0 (automatic) or a "
                "positive multiple of the stage count"
            )
        if self.pipeline_fsdp_gather not in pipeline.FSDP_GATHER:
            raise ValueError(
                f"pipeline_fsdp_gather={self.pipeline_fsdp_gather!r}; choose one of "
                f"{pipeline.FSDP_GATHER}"
            )
        if self.tensor_parallel not in tensor_parallel.TENSOR_PARALLEL:
            raise ValueError(
                f"tensor_parallel={self.tensor_parallel!r}; choose one of "
                f"{tensor_parallel.TENSOR_PARALLEL}"
            )

    @property
    def head_dim_(self) -> int:
        """The resolved per-head width."""
        return self.head_dim or self.hidden_size // self.num_heads

    def replace(self, **changes) -> "LlamaConfig":
        """A copy with ``changes`` applied (unknown keys raise TypeError)."""
        return dataclasses.replace(self, **changes)

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count, computed from the config (no allocation)."""
        d, hd, f = self.hidden_size, self.head_dim_, self.intermediate_size
        attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.qkv_bias:
            attn += hd * (self.num_heads + 2 * self.num_kv_heads)
        norms = 2 * d + (2 * hd if self.qk_norm else 0)
        per_layer = attn + 3 * d * f + norms
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + d + (embed if include_embedding else 0)

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        """Model FLOPs per token: 2 per multiply-add in every matmul, attention included.

        Counts the LM head, and the attention score and value matmuls over the keys each
        query really sees: causal attention averages ``(seq_len + 1) / 2`` keys per query
        (every kernel skips the masked blocks), fewer under a sliding window. Training is
        3x the forward pass.
        """
        d, hd, f = self.hidden_size, self.head_dim_, self.intermediate_size
        matmul_params = (
            self.num_layers * (d * hd * (2 * self.num_heads + 2 * self.num_kv_heads) + 3 * d * f)
            + d * self.vocab_size
        )
        attention = self.num_layers * 2 * self.keys_per_query(seq_len) * self.num_heads * hd
        forward = 2 * (matmul_params + attention)
        return 3 * forward if training else forward

    def keys_per_query(self, seq_len: int) -> float:
        """Keys a query attends to, averaged over the ``seq_len`` causal positions."""
        window = self.sliding_window or seq_len
        full = min(window, seq_len)  # positions 0..full-1 see i + 1 keys, later ones see window
        return (full * (full + 1) / 2 + (seq_len - full) * window) / seq_len


PRESETS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(
        vocab_size=259,
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=384,
        max_seq_len=512,
        rope_theta=10000.0,
    ),
    "100m": LlamaConfig(
        vocab_size=32000,
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        num_kv_heads=4,
        intermediate_size=2048,
        max_seq_len=2048,
    ),
    "1b": LlamaConfig(  # Llama 3.2 1B
        vocab_size=128256,
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=8192,
        rope_theta=500000.0,
        tie_embeddings=True,
        max_seq_len=131072,
        rope_scaling=Llama3RopeScaling(32.0, 1.0, 4.0, 8192),
    ),
    "7b": LlamaConfig(  # Llama 2 7B
        vocab_size=32000,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        intermediate_size=11008,
        max_seq_len=4096,
    ),
    "8b": LlamaConfig(  # Llama 3 8B
        vocab_size=128256,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=14336,
        rope_theta=500000.0,
        max_seq_len=8192,
    ),
    "mistral-7b": LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=14336,
        sliding_window=4096,
        max_seq_len=32768,
    ),
}


def preset(name: str, **overrides) -> LlamaConfig:
    """A named config from ``PRESETS`` (``tiny`` ... ``8b``) with field overrides."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then + mlp(norm(x))."""

    config: LlamaConfig

    def feed_forward(self) -> nn.Module:
        """The block's MLP, named ``mlp`` (a family with other MLPs, such as mixtures of
        experts, overrides this in a subclass)."""
        cfg = self.config
        return SwiGLU(cfg.intermediate_size, jnp.dtype(cfg.dtype),
                      tensor_parallel=cfg.tensor_parallel, name="mlp")  # fmt: skip

    @nn.compact
    def __call__(self, x, positions, segment_ids, cache, decode_index):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, dtype, name=name)  # noqa: E731
        x = checkpoint_name(x, "block_input")
        attn_out, cache = Attention(
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim_,
            rope_theta=cfg.rope_theta,
            rope_scaling=cfg.rope_scaling,
            qkv_bias=cfg.qkv_bias,
            qk_norm=cfg.qk_norm,
            norm_eps=cfg.rms_norm_eps,
            sliding_window=cfg.sliding_window,
            sinks=cfg.attention_sinks,
            implementation=cfg.attention_impl,
            context_parallel=cfg.context_parallel,
            tensor_parallel=cfg.tensor_parallel,
            dtype=dtype,
            name="attn",
        )(norm("attn_norm")(x), positions, segment_ids, cache, decode_index)
        attn_out = checkpoint_name(attn_out, "attention_out")
        x = tensor_parallel.constrain_residual(x + attn_out, cfg.tensor_parallel)
        mlp_in = checkpoint_name(norm("mlp_norm")(x), "mlp_in")
        x = x + checkpoint_name(self.feed_forward()(mlp_in), "mlp_out")
        return tensor_parallel.constrain_residual(x, cfg.tensor_parallel), cache


class ScannedBlock(nn.Module):
    """A ``block`` in the (carry, xs) -> (carry, ys) form that ``nn.scan`` expects."""

    config: LlamaConfig
    block: type[Block] = Block

    @nn.compact
    def __call__(self, x, cache, positions, segment_ids, decode_index):
        return self.block(self.config, name="block")(x, positions, segment_ids, cache, decode_index)


class Llama(nn.Module):
    """Decoder-only LM: token ids [b, s] -> logits [b, s, vocab] (float32).

    ``positions`` [b, s] default to 0..s-1; ``segment_ids`` [b, s] restrict attention to equal
    ids (packed documents). With ``cache`` (from ``init_cache``) returns ``(logits, cache)``;
    a ``PagedCache`` (serving, ``jaxstack.serve``) takes one row of packed tokens of many
    sequences with their ``positions`` ([1, T]) and returns the cache with their keys written.
    With ``return_hidden=True`` returns the final-norm hidden states [b, s, hidden] (compute
    dtype) in place of the logits, for a loss that applies ``head_kernel(params)`` itself
    (``jaxstack.losses.fused_cross_entropy``). Under context parallelism the output comes
    back in natural order unless ``natural_order=False``: then it stays in the order the
    sequence split uses (no device gathers the whole sequence), and a loss reorders its
    per-token targets to match with ``context_parallel.model_order``. Under a mesh with
    ``stage`` > 1 and no cache the stacked layers run as a pipeline
    (``jaxstack.layers.pipeline``, GPipe) on the same parameters.
    """

    config: LlamaConfig

    def block_type(self, layer: int) -> type[Block]:
        """The block class of layer ``layer`` (a family with other blocks overrides this)."""
        del layer
        return Block

    def _layer(self, remat_cls):
        if self.config.remat == "none":
            return remat_cls
        policy = remat_policy(self.config.remat)
        return nn.remat(remat_cls, policy=policy, prevent_cse=not self.config.scan_layers)

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: LayerCache | PagedCache | None = None,
        decode_index: jax.Array | None = None,
        return_hidden: bool = False,
        natural_order: bool = True,
    ):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        if positions is None:
            start = 0 if decode_index is None else decode_index[:, None]
            positions = start + jnp.arange(input_ids.shape[1])[None, :]
            positions = jnp.broadcast_to(positions, input_ids.shape)
        # context parallelism: tokens in zig-zag order while the layers run (module doc of
        # jaxstack.layers.context_parallel), back in natural order after the final norm
        # (not while initialising: parameters do not depend on it, and init's dummy ids need
        # not split)
        initializing = self.is_initializing()
        reorder = (
            cache is None and not initializing and context_parallel.active(cfg.context_parallel)
        )
        if reorder:
            input_ids, positions, segment_ids = (
                context_parallel.to_shards(a) for a in (input_ids, positions, segment_ids)
            )
        # sequence-parallel tensor parallelism: the blocks get the mode that applies here
        # ("plain" with a cache, at init or without a tensor axis; layers.tensor_parallel)
        cfg = cfg.replace(
            tensor_parallel=tensor_parallel.mode(
                cfg.tensor_parallel, cache is not None or initializing
            )
        )
        if cfg.tensor_parallel != "plain":
            widths = {"num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads,
                      "intermediate_size": cfg.intermediate_size}  # fmt: skip
            zigzag = 2 * context_parallel.sequence_shards() if reorder else 1
            tensor_parallel.check(widths, input_ids.shape[1], multiple=zigzag)
        init = nn.initializers.normal(cfg.initializer_range)
        embed = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, embedding_init=init, name="embed"
        )
        # The lookup reads the table whole along its width, as FSDP gathers every weight at
        # its use: a table still split over fsdp would make the gather's output split over the
        # width, which XLA cannot turn into the batch split below without a full remat.
        table = constrain(embed.embedding, ("vocab", "embed"))
        x = jnp.take(table, input_ids, axis=0).astype(dtype)
        x = tensor_parallel.constrain_residual(x, cfg.tensor_parallel)

        stages = pipeline.stage_count()
        if stages > 1 and cache is None and not initializing:
            x = self._pipelined(x, positions, segment_ids, stages)
        elif cfg.scan_layers:
            stack = nn.scan(
                self._layer(ScannedBlock),
                variable_axes={True: 0},  # params and anything the layers sow: per layer
                split_rngs={"params": True},
                # a paged cache scans its pages per layer; the batch layout is shared
                in_axes=(
                    PagedCache(0, nn.broadcast) if isinstance(cache, PagedCache) else 0,
                    nn.broadcast,
                    nn.broadcast,
                    nn.broadcast,
                ),
                length=cfg.num_layers,
            )
            x, layers_cache = stack(cfg, self.block_type(0), name="layers")(
                x, cache, positions, segment_ids, decode_index
            )
            paged = isinstance(cache, PagedCache)
            cache = PagedCache(layers_cache.pages, cache.batch) if paged else layers_cache
        else:
            new_layers = []
            for i in range(cfg.num_layers):
                layer_cache = None if cache is None else _layer_cache(cache, i)
                x, layer_cache = self._layer(self.block_type(i))(cfg, name=f"layers_{i}")(
                    x, positions, segment_ids, layer_cache, decode_index
                )
                new_layers.append(layer_cache)
            if isinstance(cache, PagedCache):  # per-layer pages, each updated in place
                cache = PagedCache(tuple(c.pages for c in new_layers), cache.batch)
            elif cache is not None:
                cache = LayerCache(
                    jnp.stack([c.k for c in new_layers]), jnp.stack([c.v for c in new_layers])
                )

        x = RMSNorm(cfg.rms_norm_eps, dtype, name="final_norm")(x)
        if reorder and natural_order:
            x = context_parallel.from_shards(x)
        if return_hidden:
            return x if cache is None else (x, cache)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(
                cfg.vocab_size, use_bias=False, dtype=dtype, kernel_init=init, name="lm_head"
            )(x)
        logits = constrain(logits.astype(jnp.float32), ("batch", "seq", "vocab"))
        return logits if cache is None else (logits, cache)

    def _pipelined(self, x, positions, segment_ids, stages: int) -> jax.Array:
        """The scanned layers run as a pipeline over the ``stage`` mesh axis (GPipe,
        ``jaxstack.layers.pipeline``) on the parameters ``nn.scan`` created at init."""
        cfg = self.config
        if not cfg.scan_layers:
            raise ValueError(
                f"a mesh with stage={stages} pipelines stacked layers: set scan_layers=True "
                "(--model.scan_layers true)"
            )
        block_type = self.block_type(0)
        if block_type is not Block:
            raise ValueError(
                f"pipeline stages run the dense Llama block, not {block_type.__name__} (its "
                "routing losses would be lost); use a mesh without stage for this model"
            )
        if cfg.context_parallel != "none" or cfg.tensor_parallel != "plain":
            raise ValueError(
                "pipeline stages support tensor_parallel='plain' and context_parallel='none' "
                f"(got {cfg.tensor_parallel!r}, {cfg.context_parallel!r}); drop one of them"
            )
        block = block_type(cfg)
        shards = pipeline.batch_shards()

        def layer_fn(weights, h, extras):
            return block.apply({"params": weights}, h, *extras, None, None)[0]

        if cfg.remat != "none":
            layer_fn = jax.checkpoint(layer_fn, policy=remat_policy(cfg.remat))
        microbatches = pipeline.choose_microbatches(
            x.shape[0], stages, cfg.pipeline_microbatches, shards
        )
        return pipeline.pipeline(
            layer_fn,
            self.variables["params"]["layers"]["block"],
            x,
            (positions, segment_ids),
            stages=stages,
            microbatches=microbatches,
            fsdp_gather=cfg.pipeline_fsdp_gather,
        )

    def head_kernel(self, params: dict) -> jax.Array:
        """The LM head of ``params`` (the inner ``params`` dict) as a [hidden, vocab] matrix:
        the ``lm_head`` kernel, or the embedding table's transpose when embeddings are tied."""
        if self.config.tie_embeddings:
            return params["embed"]["embedding"].T
        return params["lm_head"]["kernel"]


def _layer_cache(cache: LayerCache | PagedCache, layer: int) -> LayerCache | PagedCache:
    """Layer ``layer``'s part of a whole-model cache."""
    if isinstance(cache, PagedCache):
        return PagedCache(cache.pages[layer], cache.batch)
    return LayerCache(cache.k[layer], cache.v[layer])


def init_cache(config: LlamaConfig, batch_size: int, max_len: int, dtype=None) -> LayerCache:
    """An empty KV cache: k, v: [num_layers, batch, max_len, kv_heads, head_dim]."""
    shape = (config.num_layers, batch_size, max_len, config.num_kv_heads, config.head_dim_)
    dtype = jnp.dtype(dtype or config.dtype)
    return LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


# ------------------------------------------------------------------------------------------
# Hugging Face round-trip: config conversion and the per-tensor key map (used by jaxstack.hf).
# ------------------------------------------------------------------------------------------

HF_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
"""HF ``model_type`` -> the ``architectures`` entry this family reads and writes."""


@dataclass(frozen=True)
class HFTensor:
    """Where one jaxstack parameter lives in a Hugging Face checkpoint.

    ``key`` is the HF tensor name, or a tuple of names (or of such tuples) stacked along new
    leading axes, one per level of nesting: scanned layers, then experts (an MoE layer's
    ``[E, d, f]`` weight is one HF tensor per expert). ``hf_shape`` is the shape of each HF
    tensor. ``in_axes`` is 0 when the values only need a reshape (embeddings, norms, biases),
    or n > 0 for an HF ``nn.Linear`` weight ``[out, in]`` whose jaxstack kernel is
    ``[*in, *out]`` with ``in`` on its first n axes.
    """

    path: tuple[str, ...]
    key: "str | tuple"
    hf_shape: tuple[int, ...]
    in_axes: int = 0

    def names(self) -> list[tuple[str, tuple[int, ...]]]:
        """Each HF tensor name with its index on the parameter's stacked leading axes (``()``
        for a parameter that is one HF tensor)."""
        found, todo = [], [(self.key, ())]
        while todo:
            key, index = todo.pop(0)
            if isinstance(key, str):
                found.append((key, index))
            else:
                todo[:0] = [(sub, (*index, i)) for i, sub in enumerate(key)]
        return found


LayerTensor = tuple[tuple[str, ...], "str | tuple", tuple[int, ...], int]
"""(path inside a block, name(s) inside ``model.layers.{i}``, HF shape, in_axes) of one
parameter of a decoder block; a tuple of names is stacked (experts)."""


def hf_mlp_tensors(
    hidden: int, width: int, prefix: str = "mlp", path: tuple[str, ...] = ("mlp",)
) -> list[LayerTensor]:
    """A SwiGLU MLP of ``width`` at ``path`` whose HF tensors are ``{prefix}.gate_proj`` ..."""
    return [
        ((*path, "gate", "kernel"), f"{prefix}.gate_proj.weight", (width, hidden), 1),
        ((*path, "up", "kernel"), f"{prefix}.up_proj.weight", (width, hidden), 1),
        ((*path, "down", "kernel"), f"{prefix}.down_proj.weight", (hidden, width), 1),
    ]


def hf_tensors(config: LlamaConfig) -> list[HFTensor]:
    """Every parameter of ``Llama(config)`` with its Hugging Face tensor(s) and layout."""
    mlp = hf_mlp_tensors(config.hidden_size, config.intermediate_size)
    return hf_model_tensors(config, lambda layer: hf_attention_tensors(config) + mlp)


def hf_attention_tensors(config: LlamaConfig) -> list[LayerTensor]:
    """A block's attention and its two norms."""
    d, hd = config.hidden_size, config.head_dim_
    q, kv = config.num_heads * hd, config.num_kv_heads * hd
    layer = [
        (("attn", "q", "kernel"), "self_attn.q_proj.weight", (q, d), 1),
        (("attn", "k", "kernel"), "self_attn.k_proj.weight", (kv, d), 1),
        (("attn", "v", "kernel"), "self_attn.v_proj.weight", (kv, d), 1),
        (("attn", "o", "kernel"), "self_attn.o_proj.weight", (d, q), 2),
        (("attn_norm", "scale"), "input_layernorm.weight", (d,), 0),
        (("mlp_norm", "scale"), "post_attention_layernorm.weight", (d,), 0),
    ]
    if config.qkv_bias:
        layer += [
            (("attn", "q", "bias"), "self_attn.q_proj.bias", (q,), 0),
            (("attn", "k", "bias"), "self_attn.k_proj.bias", (kv,), 0),
            (("attn", "v", "bias"), "self_attn.v_proj.bias", (kv,), 0),
        ]
    if config.qk_norm:
        layer += [
            (("attn", "q_norm", "scale"), "self_attn.q_norm.weight", (hd,), 0),
            (("attn", "k_norm", "scale"), "self_attn.k_norm.weight", (hd,), 0),
        ]
    return layer


def hf_model_tensors(
    config: LlamaConfig, layer_tensors: Callable[[int], list[LayerTensor]]
) -> list[HFTensor]:
    """The embedding, final norm and head, and ``layer_tensors(i)`` of every block ``i``
    (stacked over the layers when ``scan_layers``: every block then has the same tensors)."""
    d = config.hidden_size
    tensors = [
        HFTensor(("embed", "embedding"), "model.embed_tokens.weight", (config.vocab_size, d)),
        HFTensor(("final_norm", "scale"), "model.norm.weight", (d,)),
    ]
    if not config.tie_embeddings:
        tensors.append(HFTensor(("lm_head", "kernel"), "lm_head.weight", (config.vocab_size, d), 1))
    blocks = [
        [
            (path, _prefixed(name, f"model.layers.{i}."), shape, axes)
            for path, name, shape, axes in layer_tensors(i)
        ]
        for i in range(config.num_layers)
    ]
    if config.scan_layers:
        for j, (path, _, shape, in_axes) in enumerate(blocks[0]):
            keys = tuple(block[j][1] for block in blocks)
            tensors.append(HFTensor(("layers", "block", *path), keys, shape, in_axes))
        return tensors
    for i, block in enumerate(blocks):
        tensors += [HFTensor((f"layers_{i}", *path), *rest) for path, *rest in block]
    return tensors


def _prefixed(name: "str | tuple", prefix: str) -> "str | tuple":
    if isinstance(name, str):
        return prefix + name
    return tuple(_prefixed(sub, prefix) for sub in name)


def hf_ignored_tensor(config: LlamaConfig, key: str) -> bool:
    """Whether an HF tensor that no parameter reads is expected (so not an error) for ``config``.

    Old checkpoints store RoPE ``inv_freq`` buffers; tied models may still store ``lm_head``.
    """
    return key.endswith(".rotary_emb.inv_freq") or (
        config.tie_embeddings and key == "lm_head.weight"
    )


def config_from_hf(hf: dict) -> LlamaConfig:
    """The ``LlamaConfig`` of a Hugging Face ``config.json`` (Llama 2/3, Mistral, Qwen2/3).

    Accepts both the transformers 4 spelling (``rope_theta`` + ``rope_scaling``) and the
    transformers 5 one (``rope_parameters``). The HF model type, architecture and special token
    ids are kept in ``extra`` so that ``config_to_hf`` writes the same family back.

    Raises:
        ValueError: the model type, activation, RoPE type, biases or attention layout is not
            one this model implements, or a required key is missing.
    """
    return LlamaConfig(**hf_decoder_fields(hf, HF_ARCHITECTURES, hf.get("model_type")))


def hf_decoder_fields(hf: dict, architectures: dict[str, str], attention: str) -> dict:
    """The ``LlamaConfig`` fields of a Hugging Face ``config.json`` of one of the model types
    ``architectures`` names (a family's map model type -> architecture), whose attention is
    that of the dense model type ``attention`` (llama, mistral, qwen2 or qwen3).

    Raises:
        ValueError: as ``config_from_hf``.
    """
    model_type = hf.get("model_type")
    if model_type not in architectures:
        raise ValueError(
            f"config.json model_type={model_type!r} is not a model of this family; "
            f"supported model types: {sorted(architectures)}"
        )
    architecture = architectures[model_type]
    for name in hf.get("architectures") or [architecture]:
        if name != architecture:
            raise ValueError(
                f"config.json architecture {name!r} is not supported; jaxstack loads "
                f"{architecture} (a causal LM) for model_type {model_type!r}"
            )
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act={hf['hidden_act']!r}; only 'silu' is supported")
    if hf.get("mlp_bias"):
        raise ValueError("config.json mlp_bias=true: MLP biases are not supported")
    if hf.get("attention_bias") and attention != "qwen2":
        raise ValueError(
            f"config.json attention_bias=true: {model_type} then has an o_proj bias, which "
            "jaxstack's Llama does not implement"
        )
    rope_theta, rope_scaling = _rope_from_hf(hf)
    num_heads = hf_required(hf, "num_attention_heads")
    hidden = hf_required(hf, "hidden_size")
    return dict(
        vocab_size=hf_required(hf, "vocab_size"),
        hidden_size=hidden,
        num_layers=hf_required(hf, "num_hidden_layers"),
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hidden // num_heads,
        intermediate_size=hf_required(hf, "intermediate_size"),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=attention == "qwen2",
        qk_norm=attention == "qwen3",
        sliding_window=_sliding_window_from_hf(hf, attention),
        max_seq_len=hf.get("max_position_embeddings", 4096),
        initializer_range=hf.get("initializer_range", 0.02),
        extra={
            "hf_model_type": model_type,
            **{k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf},
        },
    )


def config_to_hf(config: LlamaConfig, dtype: str = "float32") -> dict:
    """A Hugging Face ``config.json`` dict for ``config`` (tensors stored as ``dtype``).

    The model type is ``config.extra["hf_model_type"]`` when set (a config read from HF),
    otherwise the family that has the config's features: qk_norm -> qwen3, qkv_bias -> qwen2,
    sliding_window -> mistral, else llama. RoPE is written the transformers 4 way
    (``rope_theta`` + ``rope_scaling``), which transformers 5 also reads.

    Raises:
        ValueError: the config has a feature that HF model type cannot express.
    """
    model_type = config.extra.get("hf_model_type") or _infer_model_type(config)
    return hf_decoder_config(config, dtype, model_type, HF_ARCHITECTURES, model_type)


def hf_decoder_config(
    config: LlamaConfig,
    dtype: str,
    model_type: str,
    architectures: dict[str, str],
    attention: str,
) -> dict:
    """The ``config.json`` entries of ``config``'s decoder for ``model_type``, one of
    ``architectures`` (a family's map model type -> architecture), whose attention is that of
    the dense model type ``attention`` (see ``hf_decoder_fields``).

    Raises:
        ValueError: as ``config_to_hf``.
    """
    if model_type not in architectures:
        raise ValueError(
            f"extra['hf_model_type']={model_type!r}; choose one of {sorted(architectures)}"
        )
    expected = {"qkv_bias": attention == "qwen2", "qk_norm": attention == "qwen3"}
    expected["attention_sinks"] = 0  # no HF family has them: serve with --attention-sinks
    if attention == "llama":
        expected["sliding_window"] = None
    for name, value in expected.items():
        if getattr(config, name) != value:
            raise ValueError(
                f"{name}={getattr(config, name)!r} cannot be written as HF model_type "
                f"{model_type!r} (which needs {name}={value!r}); set extra['hf_model_type'] to "
                "a family that has this feature or drop the feature"
            )
    scaling = config.rope_scaling
    hf = {
        "architectures": [architectures[model_type]],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim_,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None if scaling is None else {"rope_type": "llama3", **vars(scaling)},
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.initializer_range,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    hf.update(
        {
            k: config.extra[k]
            for k in ("bos_token_id", "eos_token_id", "pad_token_id")
            if k in config.extra
        }
    )
    if attention in ("llama", "qwen3"):
        hf["attention_bias"] = False
    if attention == "llama":
        hf["mlp_bias"] = False
    if attention == "mistral":
        hf["sliding_window"] = config.sliding_window
    if attention in ("qwen2", "qwen3"):
        window = config.sliding_window
        hf.update(
            use_sliding_window=window is not None,
            sliding_window=window,
            max_window_layers=0 if window else config.num_layers,
            layer_types=[("sliding" if window else "full") + "_attention"] * config.num_layers,
        )
    return hf


def hf_required(hf: dict, key: str):
    if hf.get(key) is None:
        raise ValueError(f"config.json has no {key!r}; it is required for a Llama-family model")
    return hf[key]


def _rope_from_hf(hf: dict) -> tuple[float, Llama3RopeScaling | None]:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if any(isinstance(value, dict) for value in params.values()):
        raise ValueError(
            f"config.json has per-layer-type RoPE parameters {sorted(params)}; only one RoPE "
            "setting for all layers is supported"
        )
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"config.json partial_rotary_factor={partial}; only 1.0 is supported")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(
            f"config.json RoPE type {kind!r} is not supported; jaxstack implements 'default' "
            "and 'llama3'"
        )
    scaling = Llama3RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(
            params.get(
                "original_max_position_embeddings", hf_required(hf, "max_position_embeddings")
            )
        ),
    )
    return theta, scaling


def _sliding_window_from_hf(hf: dict, model_type: str) -> int | None:
    window = hf.get("sliding_window")
    if model_type == "mistral":
        return window
    if model_type == "llama" or not hf.get("use_sliding_window") or window is None:
        return None
    num_layers = hf_required(hf, "num_hidden_layers")
    first_sliding = hf.get("max_window_layers", 28)
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if i >= first_sliding else "full_attention" for i in range(num_layers)
    ]
    if set(layer_types) == {"full_attention"}:
        return None
    if set(layer_types) == {"sliding_attention"}:
        return window
    raise ValueError(
        f"config.json mixes sliding-window and full attention layers (layer_types="
        f"{layer_types}); jaxstack's Llama applies one attention pattern to every layer"
    )


def _infer_model_type(config: LlamaConfig) -> str:
    if config.qk_norm:
        return "qwen3"
    if config.qkv_bias:
        return "qwen2"
    return "mistral" if config.sliding_window is not None else "llama"
