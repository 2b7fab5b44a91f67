"""Batched autoregressive generation with a KV cache.

Prompts of different lengths are right-padded into one batch. Prefill runs the padded
prompts once (causal attention keeps padding invisible to real tokens) and fills the cache;
each decode step then writes one token per row at that row's own position and attends to
its valid cache prefix. Sampling: greedy, temperature, top-k, top-p; rows stop at EOS.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxstack.data.tokenizers import Tokenizer
from jaxstack.models.llama import Llama, init_cache


def sample_logits(
    logits: jax.Array,
    rng: jax.Array,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> jax.Array:
    """Pick a token per row from logits: [b, vocab] -> [b] int32 (greedy when temperature is 0)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # the smallest logit still inside the nucleus (the top token always is)
        cutoff = jnp.min(
            jnp.where(mass_before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True
        )
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits).astype(jnp.int32)


def generate(
    model: Llama,
    params,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    rng: jax.Array | None = None,
) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens; returns only the new tokens.

    A row stops after emitting ``eos_id`` (the EOS token is included in its output).
    ``params`` is the model's ``params`` collection (a ``{"params": ...}`` dict also works).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs a non-empty list of non-empty prompts (token id lists)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if top_k is not None and not 0 < top_k <= model.config.vocab_size:
        raise ValueError(f"top_k={top_k} must be in [1, vocab_size={model.config.vocab_size}]")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    lengths = np.array([len(p) for p in prompts], np.int32)
    padded = np.full((len(prompts), lengths.max()), pad_id, np.int32)
    for row, prompt in enumerate(prompts):
        padded[row, : len(prompt)] = prompt
    variables = params if "params" in params else {"params": params}
    rng = jax.random.PRNGKey(0) if rng is None else rng
    tokens, counts = _generate(
        model,
        variables,
        jnp.asarray(padded),
        jnp.asarray(lengths),
        rng,
        max_new_tokens=max_new_tokens,
        sampling=(temperature, top_k, top_p),
        eos_id=-1 if eos_id is None else eos_id,
    )
    tokens, counts = np.asarray(tokens), np.asarray(counts)
    return [tokens[row, : counts[row]].tolist() for row in range(len(prompts))]


def complete(
    model: Llama,
    params,
    tokenizer: Tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 100,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    eos_id: int | None = None,
) -> list[str]:
    """Text completions of ``prompts`` (the new text only), stopping at the tokenizer's EOS
    (or ``eos_id``); prompts start with BOS when the tokenizer has one."""
    ids = [tokenizer.encode(p, add_bos=tokenizer.bos_id is not None) for p in prompts]
    out = generate(
        model,
        params,
        ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_id=tokenizer.eos_id if eos_id is None else eos_id,
        rng=jax.random.PRNGKey(seed),
    )
    return [tokenizer.decode(tokens) for tokens in out]


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "sampling", "eos_id"))
def _generate(model, variables, padded, lengths, rng, *, max_new_tokens, sampling, eos_id):
    batch = padded.shape[0]
    cache = init_cache(model.config, batch, padded.shape[1] + max_new_tokens)
    logits, cache = model.apply(variables, padded, cache=cache)
    last_logits = logits[jnp.arange(batch), lengths - 1]
    out = jnp.zeros((batch, max_new_tokens), jnp.int32)

    def emit(state, logits):
        step, out, counts, done, rng, cache = state
        rng, step_rng = jax.random.split(rng)
        token = sample_logits(logits, step_rng, *sampling)
        out = out.at[:, step].set(jnp.where(done, 0, token))
        counts = counts + (~done).astype(jnp.int32)
        done = done | (token == eos_id)
        return step + 1, out, counts, done, rng, cache, token

    def cond(state):
        step, _, _, done, *_ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, out, counts, done, rng, cache, token = state
        logits, cache = model.apply(
            variables, token[:, None], cache=cache, decode_index=lengths + step - 1
        )
        return emit((step, out, counts, done, rng, cache), logits[:, 0])

    zeros = jnp.zeros((batch,), jnp.int32)
    state = emit((0, out, zeros, jnp.zeros((batch,), bool), rng, cache), last_logits)
    _, out, counts, *_ = jax.lax.while_loop(cond, body, state)
    return out, counts
