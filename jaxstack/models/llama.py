"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/3 by config): config, presets, modules, FLOPs.

Parameters live in float32; ``dtype`` is the compute dtype (bfloat16 for mixed precision).
Layers are either separate modules (``layers_0``, ``layers_1``, ...) or, with ``scan_layers``,
one module whose parameters carry a leading ``[num_layers]`` axis.
"""

import dataclasses
from dataclasses import dataclass, field

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxstack.layers.attention import Attention, LayerCache
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
    max_seq_len: int = 4096
    """Longest sequence the model is used with (sizes the KV cache default)."""
    scan_layers: bool = False
    """Stack the layers with ``nn.scan`` (faster compiles, leading layer axis on params)."""
    remat: str = "none"
    """Rematerialisation policy per layer: one of ``REMAT_POLICIES``."""
    dtype: str = "float32"
    """Compute dtype (``bfloat16`` for mixed precision); parameters stay float32."""
    attention_impl: str = "xla"
    """``pallas_kernels.attention`` implementation: auto, pallas, cudnn or xla."""
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
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; choose one of {sorted(REMAT_POLICIES)}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r}; choose float32, bfloat16 or float16")
        if self.head_dim_ % 2:
            raise ValueError(f"head_dim={self.head_dim_} must be even for RoPE")

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

        Counts the LM head and the full (non-causal-discounted) attention score and value
        matmuls, PaLM-style; training is 3x the forward pass.
        """
        d, hd, f = self.hidden_size, self.head_dim_, self.intermediate_size
        matmul_params = (
            self.num_layers * (d * hd * (2 * self.num_heads + 2 * self.num_kv_heads) + 3 * d * f)
            + d * self.vocab_size
        )
        attention = self.num_layers * 2 * seq_len * self.num_heads * hd
        forward = 2 * (matmul_params + attention)
        return 3 * forward if training else forward


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

    @nn.compact
    def __call__(self, x, positions, segment_ids, cache, decode_index):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        norm = lambda name: RMSNorm(cfg.rms_norm_eps, dtype, name=name)  # noqa: E731
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
            implementation=cfg.attention_impl,
            dtype=dtype,
            name="attn",
        )(norm("attn_norm")(x), positions, segment_ids, cache, decode_index)
        x = constrain(x + attn_out, ("batch", "seq", "embed"))
        x = x + SwiGLU(cfg.intermediate_size, dtype, name="mlp")(norm("mlp_norm")(x))
        return constrain(x, ("batch", "seq", "embed")), cache


class ScannedBlock(nn.Module):
    """``Block`` in the (carry, xs) -> (carry, ys) form that ``nn.scan`` expects."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cache, positions, segment_ids, decode_index):
        return Block(self.config, name="block")(x, positions, segment_ids, cache, decode_index)


class Llama(nn.Module):
    """Decoder-only LM: token ids [b, s] -> logits [b, s, vocab] (float32).

    ``positions`` [b, s] default to 0..s-1; ``segment_ids`` [b, s] restrict attention to equal
    ids (packed documents). With ``cache`` (from ``init_cache``) returns ``(logits, cache)``.
    """

    config: LlamaConfig

    def _layer(self, remat_cls):
        policy = REMAT_POLICIES[self.config.remat]
        if self.config.remat == "none":
            return remat_cls
        return nn.remat(remat_cls, policy=policy, prevent_cse=not self.config.scan_layers)

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        cache: LayerCache | None = None,
        decode_index: jax.Array | None = None,
    ):
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        if positions is None:
            start = 0 if decode_index is None else decode_index[:, None]
            positions = start + jnp.arange(input_ids.shape[1])[None, :]
            positions = jnp.broadcast_to(positions, input_ids.shape)
        init = nn.initializers.normal(cfg.initializer_range)
        embed = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, embedding_init=init, name="embed"
        )
        x = constrain(embed(input_ids), ("batch", "seq", "embed"))

        if cfg.scan_layers:
            stack = nn.scan(
                self._layer(ScannedBlock),
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
            )
            x, cache = stack(cfg, name="layers")(x, cache, positions, segment_ids, decode_index)
        else:
            new_layers = []
            for i in range(cfg.num_layers):
                layer_cache = None if cache is None else LayerCache(cache.k[i], cache.v[i])
                x, layer_cache = self._layer(Block)(cfg, name=f"layers_{i}")(
                    x, positions, segment_ids, layer_cache, decode_index
                )
                new_layers.append(layer_cache)
            if cache is not None:
                cache = LayerCache(
                    jnp.stack([c.k for c in new_layers]), jnp.stack([c.v for c in new_layers])
                )

        x = RMSNorm(cfg.rms_norm_eps, dtype, name="final_norm")(x)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            logits = nn.Dense(
                cfg.vocab_size, use_bias=False, dtype=dtype, kernel_init=init, name="lm_head"
            )(x)
        logits = constrain(logits.astype(jnp.float32), ("batch", "seq", "vocab"))
        return logits if cache is None else (logits, cache)


def init_cache(config: LlamaConfig, batch_size: int, max_len: int, dtype=None) -> LayerCache:
    """An empty KV cache: k, v: [num_layers, batch, max_len, kv_heads, head_dim]."""
    shape = (config.num_layers, batch_size, max_len, config.num_kv_heads, config.head_dim_)
    dtype = jnp.dtype(dtype or config.dtype)
    return LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
