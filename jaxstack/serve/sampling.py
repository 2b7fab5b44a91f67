"""Per-request sampling: the parameters a request carries, and one jitted sampler for a batch
whose rows each have their own temperature, top-k, top-p and seed.

Row ``i``'s ``n``-th output token is drawn with the key ``fold_in(PRNGKey(seed_i), n)``, so a
seeded request samples the same tokens whatever it is batched with, and after preemption.
"""

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp


@dataclass(frozen=True)
class SamplingParams:
    """How to continue one prompt (OpenAI-style names).

    Raises ``ValueError`` on construction when a value is out of range.
    """

    max_tokens: int = 16
    """Most new tokens to produce."""
    temperature: float = 0.0
    """Softmax temperature; 0 is greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 keeps all."""
    seed: int | None = None
    """Seed of this request's random draws (None: a fresh random one per request)."""
    stop: tuple[str, ...] = field(default_factory=tuple)
    """Stop strings: the output ends before the first one it contains (needs a tokenizer)."""
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    """Token ids that end the output (included in it), besides the engine's EOS."""
    ignore_eos: bool = False
    """Keep going past the EOS token (benchmarks)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", ">= 1"),
            (0.0 <= self.temperature <= 100.0, "temperature", "in [0, 100]"),
            (0.0 < self.top_p <= 1.0, "top_p", "in (0, 1]"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k", ">= 0 (0 disables it)"),
            (self.seed is None or isinstance(self.seed, int), "seed", "an integer or None"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings"),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} must be {rule}")


def sample_rows(
    logits: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    seeds: jax.Array,
    counters: jax.Array,
) -> jax.Array:
    """One token per row of ``logits: [S, vocab]`` with that row's own settings.

    ``temperature``, ``top_p``: f32[S]; ``top_k``: i32[S] (0 = all tokens); ``seeds``,
    ``counters``: u32/i32[S] (the key of row i is ``fold_in(PRNGKey(seeds[i]), counters[i])``).
    Rows with temperature 0 take the argmax. Top-k applies first, then top-p on what is left
    (as ``jaxstack.generate.sample_logits``). A batch of greedy rows skips the draws, and one
    without top-k/top-p skips the sort over the vocabulary. Returns i32[S].
    """
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = jnp.any((top_k > 0) | (top_p < 1.0))

    def draw(logits):
        scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
        kept = jax.lax.cond(filtered, _top_k_top_p, lambda x, k, p: x, scaled, top_k, top_p)
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.PRNGKey(s), c))(seeds, counters)
        drawn = jax.vmap(jax.random.categorical)(keys, kept).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(temperature > 0), draw, lambda _: greedy, logits)


def _top_k_top_p(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """``scaled: [S, vocab]`` with every logit outside each row's top-k, then outside the
    nucleus of what is left, set to -inf."""
    vocab = scaled.shape[-1]
    ordered = jnp.sort(scaled, axis=-1)[:, ::-1]  # [S, vocab] descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)
    ordered = jnp.where(ordered < kth, -jnp.inf, ordered)
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # the smallest logit still inside the nucleus (the top token always is)
    cutoff = jnp.min(jnp.where(mass_before < top_p[:, None], ordered, jnp.inf), axis=-1)
    return jnp.where(scaled < jnp.maximum(kth[:, 0], cutoff)[:, None], -jnp.inf, scaled)
