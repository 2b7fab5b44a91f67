"""Small flax.linen models exercising every layout the sharding rules must get right.

Sizes are tiny so tracing takes milliseconds. Dimensions: D model width, H query heads,
KVH key/value heads (GQA), DH head dim, F MLP width, V vocab, E experts.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

D, H, KVH, DH, F, V, E = 32, 4, 2, 8, 64, 96, 4


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """q: [b, s, h, dh], k/v: [b, s, kvh, dh] -> [b, s, h, dh]; kv heads repeated (GQA)."""
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    s = q.shape[1]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1])
    mask = jnp.arange(s)[:, None] >= jnp.arange(s)[None, :]
    probs = jax.nn.softmax(jnp.where(mask, scores, -1e9), axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def rope(x: jax.Array) -> jax.Array:
    """Rotary position embedding over the last dim of x: [b, s, h, dh]."""
    s, dh = x.shape[1], x.shape[-1]
    freqs = 1.0 / (10000 ** (jnp.arange(0, dh, 2) / dh))
    angles = jnp.arange(s)[:, None] * freqs[None, :]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, -1)[None, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, -1)[None, :, None, :]
    x1, x2 = x[..., : dh // 2], x[..., dh // 2 :]
    return x * cos + jnp.concatenate([-x2, x1], -1) * sin


def rms_norm(x: jax.Array, scale: jax.Array) -> jax.Array:
    """RMSNorm over the last dim."""
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * scale


class MLPPair(nn.Module):
    """fc1 [8, hidden] -> relu -> fc2 [hidden, 16]: one column/row pair."""

    hidden: int = 32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(16, name="fc2")(jax.nn.relu(nn.Dense(self.hidden, name="fc1")(x)))


class MLPChain(nn.Module):
    """Four same-width layers without residual: pairs (l0, l1) and (l2, l3)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(4):
            x = jax.nn.relu(nn.Dense(D, name=f"l{i}")(x))
        return x


class DenseGeneralAttention(nn.Module):
    """query/key/value: DenseGeneral [D, H, DH] (+ bias [H, DH]); out: [H, DH, D]."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v = (nn.DenseGeneral((H, DH), name=n)(x) for n in ("query", "key", "value"))
        return x + nn.DenseGeneral(D, axis=(-2, -1), name="out")(causal_attention(q, k, v))


class GPT2Attention(nn.Module):
    """c_attn [D, 3D] fused qkv split into heads; c_proj [D, D]."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, s, _ = x.shape
        q, k, v = jnp.split(nn.Dense(3 * D, name="c_attn")(x), 3, axis=-1)
        q, k, v = (t.reshape(b, s, H, DH) for t in (q, k, v))
        return nn.Dense(D, name="c_proj")(causal_attention(q, k, v).reshape(b, s, D))


class GPT2MLP(nn.Module):
    """c_fc [D, 4D] -> gelu -> c_proj [4D, D]."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(D, name="c_proj")(jax.nn.gelu(nn.Dense(4 * D, name="c_fc")(x)))


class GPT2(nn.Module):
    """wte [V, D] (tied LM head), wpe [16, D], two blocks h_0, h_1, ln_f."""

    vocab: int = V

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        wte = nn.Embed(self.vocab, D, name="wte")
        x = wte(ids) + nn.Embed(16, D, name="wpe")(jnp.arange(ids.shape[1])[None])
        for i in range(2):
            x = x + GPT2Attention(name=f"h_{i}_attn")(nn.LayerNorm(name=f"h_{i}_ln_1")(x))
            x = x + GPT2MLP(name=f"h_{i}_mlp")(nn.LayerNorm(name=f"h_{i}_ln_2")(x))
        return wte.attend(nn.LayerNorm(name="ln_f")(x))


class LlamaBlock(nn.Module):
    """Flat projections: q [D, H*DH], k/v [D, KVH*DH], o [H*DH, D]; SwiGLU gate/up/down."""

    @nn.compact
    def __call__(self, x: jax.Array, _: None = None) -> tuple[jax.Array, None]:
        b, s, _ = x.shape
        h = rms_norm(x, self.param("attn_norm", nn.initializers.ones, (D,)))
        q = nn.Dense(H * DH, use_bias=False, name="q_proj")(h).reshape(b, s, H, DH)
        k = nn.Dense(KVH * DH, use_bias=False, name="k_proj")(h).reshape(b, s, KVH, DH)
        v = nn.Dense(KVH * DH, use_bias=False, name="v_proj")(h).reshape(b, s, KVH, DH)
        attn = causal_attention(rope(q), rope(k), v).reshape(b, s, H * DH)
        x = x + nn.Dense(D, use_bias=False, name="o_proj")(attn)
        h = rms_norm(x, self.param("mlp_norm", nn.initializers.ones, (D,)))
        gate = nn.Dense(F, use_bias=False, name="gate_proj")(h)
        up = nn.Dense(F, use_bias=False, name="up_proj")(h)
        return x + nn.Dense(D, use_bias=False, name="down_proj")(jax.nn.silu(gate) * up), None


class LlamaLike(nn.Module):
    """embed [V, D] -> blocks (nn.scan-stacked if scan, nn.remat if remat) -> lm_head [D, V]."""

    scan: bool = False
    remat: bool = False
    layers: int = 2
    vocab: int = V

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        x = nn.Embed(self.vocab, D, name="embed")(ids)
        block = nn.remat(LlamaBlock) if self.remat else LlamaBlock
        if self.scan:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=self.layers,
            )
            x, _ = stack(name="layers")(x, None)
        else:
            for i in range(self.layers):
                x, _ = block(name=f"layers_{i}")(x)
        x = rms_norm(x, self.param("final_norm", nn.initializers.ones, (D,)))
        return nn.Dense(self.vocab, use_bias=False, name="lm_head")(x)


class Anonymous(nn.Module):
    """LlamaLike (one block, untied head) with meaningless names p0..p10.

    p0 embed [V, D]; p1 norm; p2 q [D, H*DH]; p3 k; p4 v [D, kv_heads*DH]; p5 o [H*DH, D];
    p6 norm; p7 gate [D, F]; p8 up [D, F]; p9 down [F, D]; p10 head [D, V].
    """

    kv_heads: int = KVH

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        init = nn.initializers.normal(0.02)
        kv = self.kv_heads * DH
        shapes = [(V, D), (D,), (D, H * DH), (D, kv), (D, kv), (H * DH, D), (D,)]
        shapes += [(D, F), (D, F), (F, D), (D, V)]
        p = [self.param(f"p{i}", init, s) for i, s in enumerate(shapes)]
        b, s = ids.shape
        x = jnp.take(p[0], ids, axis=0)
        h = rms_norm(x, p[1])
        q = (h @ p[2]).reshape(b, s, H, DH)
        k = (h @ p[3]).reshape(b, s, self.kv_heads, DH)
        v = (h @ p[4]).reshape(b, s, self.kv_heads, DH)
        x = x + causal_attention(rope(q), rope(k), v).reshape(b, s, H * DH) @ p[5]
        h = rms_norm(x, p[6])
        x = x + (jax.nn.silu(h @ p[7]) * (h @ p[8])) @ p[9]
        return x @ p[10]


class EmbedLM(nn.Module):
    """embed [vocab, D] -> dense -> untied lm_head [D, vocab], or tied x @ embed.T + bias."""

    vocab: int = V
    tied: bool = False
    one_hot: bool = False

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        table = self.param("embed", nn.initializers.normal(0.02), (self.vocab, D))
        if self.one_hot:
            x = jax.nn.one_hot(ids, self.vocab) @ table
        else:
            x = jnp.take(table, ids, axis=0)
        x = x + nn.Dense(D, name="mix")(x)
        if self.tied:
            return x @ table.T + self.param("logits_bias", nn.initializers.zeros, (self.vocab,))
        return nn.Dense(self.vocab, name="lm_head")(x)


class MoE(nn.Module):
    """router [D, E]; experts w_in [E, D, F] (+ bias [E, F]) and w_out [E, F, D].

    Tokens are dispatched with a one-hot top-1 mask to [E, tokens, D] and run through the
    experts with ``einsum('ecd,edf->ecf')`` (``ragged=False``) or sorted by expert and run
    with ``jax.lax.ragged_dot`` (``ragged=True``).
    """

    ragged: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.normal(0.02)
        w_in = self.param("w_in", init, (E, D, F))
        w_out = self.param("w_out", init, (E, F, D))
        tokens = x.reshape(-1, D)
        probs = jax.nn.softmax(nn.Dense(E, use_bias=False, name="router")(tokens), -1)
        top = jnp.argmax(probs, -1)
        gate = jnp.max(probs, -1)
        if self.ragged:
            order = jnp.argsort(top)
            sizes = jnp.bincount(top, length=E).astype(jnp.int32)
            h = jax.nn.gelu(jax.lax.ragged_dot(tokens[order], w_in, sizes))
            y = jnp.zeros_like(tokens).at[order].set(jax.lax.ragged_dot(h, w_out, sizes))
        else:
            b_in = self.param("b_in", nn.initializers.zeros, (E, F))
            dispatch = jax.nn.one_hot(top, E)  # [t, e]
            routed = jnp.einsum("te,td->etd", dispatch, tokens)
            h = jax.nn.gelu(jnp.einsum("ecd,edf->ecf", routed, w_in) + b_in[:, None, :])
            y = jnp.einsum("ecd,te->td", jnp.einsum("ecf,efd->ecd", h, w_out), dispatch)
        return x + (y * gate[:, None]).reshape(x.shape)


def shapes_of(model: nn.Module, *args: jax.Array) -> dict:
    """The model's variables as ShapeDtypeStructs (nothing allocated)."""
    return jax.eval_shape(model.init, jax.random.key(0), *args)
