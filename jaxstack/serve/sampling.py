"""Per-request sampling: the parameters a request carries, and the device code of one step's
sampling for a batch whose rows each have their own settings.

Inside the compiled step, in this order (vLLM's): the log-probabilities a row asked for are
taken from the raw logits (``logprobs_of``); ``logit_bias`` (and, below ``min_tokens``, a
-inf bias on the stop ids) is added, then the repetition, frequency and presence penalties
applied (``adjust_logits``); then ``sample_rows`` draws with temperature, top-k and top-p.
Each stage sits behind a ``lax.cond`` on whether any row of the batch uses it, so a batch
that uses none pays a few reductions over ``[S]`` arrays.

Row ``i``'s ``n``-th output token is drawn with the key ``fold_in(PRNGKey(seed_i), n)``, so a
seeded request samples the same tokens whatever it is batched with, and after preemption.
"""

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxstack.serve.structured import check_format

MAX_LOGPROBS = 20
"""Most top log-probabilities a request may ask for per token (compiled into the step)."""
MAX_LOGIT_BIAS = 300
"""Most ``logit_bias`` entries of one request."""
BIAS_SLOTS = 320
"""Width of a row's sparse bias table: its ``logit_bias`` entries, plus its stop ids (EOS and
``stop_token_ids``) while it is below ``min_tokens``."""
NO_TOKEN = np.iinfo(np.int32).max
"""Padding token id of the sparse tables (outside every vocabulary: scatters drop it)."""


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
    min_tokens: int = 0
    """Fewest new tokens: until then EOS and ``stop_token_ids`` cannot be sampled, and stop
    strings do not end the output."""
    logprobs: int | None = None
    """Report each output token's log-probability and those of the ``logprobs`` most likely
    tokens (0: the sampled token's only; at most ``MAX_LOGPROBS``); None reports none. Taken
    from the raw logits, before any bias, penalty, temperature or top-k/top-p."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token already in the output (in [-2, 2])."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it is in the output (in [-2, 2])."""
    repetition_penalty: float = 1.0
    """Divides positive logits and multiplies negative ones of every token in the prompt or
    the output (> 0; 1 is off; above 1 discourages repeats)."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """Token id -> value added to its logit, clipped to [-100, 100] (-100 all but bans it)."""
    response_format: dict | None = None
    """Structured output, OpenAI's shape: ``{"type": "json_object"}`` or ``{"type":
    "json_schema", "json_schema": {"schema": {...}}}`` (needs the ``structured`` extra); the
    output then follows it (compact JSON for a schema)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        bias = {int(k): min(max(float(v), -100.0), 100.0) for k, v in self.logit_bias.items()}
        object.__setattr__(self, "logit_bias", bias)
        penalty = lambda x: -2.0 <= x <= 2.0  # noqa: E731
        if self.response_format is not None:
            check_format(self.response_format)
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", ">= 1"),
            (0.0 <= self.temperature <= 100.0, "temperature", "in [0, 100]"),
            (0.0 < self.top_p <= 1.0, "top_p", "in (0, 1]"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k", ">= 0 (0 disables it)"),
            (self.seed is None or isinstance(self.seed, int), "seed", "an integer or None"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings"),
            (all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             "stop_token_ids", "token ids (ints >= 0)"),
            (isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
             "min_tokens", "an int in [0, max_tokens]"),
            (self.logprobs is None or (isinstance(self.logprobs, int)
                                       and 0 <= self.logprobs <= MAX_LOGPROBS),
             "logprobs", f"None or an int in [0, {MAX_LOGPROBS}]"),
            (penalty(self.presence_penalty), "presence_penalty", "in [-2, 2]"),
            (penalty(self.frequency_penalty), "frequency_penalty", "in [-2, 2]"),
            (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
             "repetition_penalty", "> 0 (1 is off)"),
            (all(t >= 0 for t in self.logit_bias) and len(self.logit_bias) <= MAX_LOGIT_BIAS,
             "logit_bias", f"at most {MAX_LOGIT_BIAS} token ids >= 0"),
        ]  # fmt: skip
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
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    filtered = jnp.any((top_k > 0) | (top_p < 1.0))

    def draw(scaled):
        kept = jax.lax.cond(filtered, _top_k_top_p, lambda x, k, p: x, scaled, top_k, top_p)
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.PRNGKey(s), c))(seeds, counters)
        drawn = jax.vmap(jax.random.categorical)(keys, kept).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(temperature > 0), draw, lambda _: greedy, scaled)


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


@dataclass(frozen=True)
class TokenLogprob:
    """One output token's log-probability and the most likely tokens at its position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]
    """``(token id, logprob)`` of the ``SamplingParams.logprobs`` most likely tokens, most
    likely first."""


class LogitControls(NamedTuple):
    """Per-row step inputs besides the sampling settings: which rows want log-probabilities,
    and what changes their logits before sampling.

    The bias is a sparse table: ``bias_ids`` / ``bias``, ``[S, BIAS_SLOTS]``, each row its
    ``logit_bias`` entries (and -inf on its stop ids below ``min_tokens``), padded with
    ``NO_TOKEN`` / 0. The penalties count tokens on the device from ``history``,
    ``i32[S, L]``: the row's prompt then output tokens (``L`` the longest sequence, so the
    shape never changes), padded with ``NO_TOKEN``; position ``j`` is an output token when
    ``j >= prompt_lens[i]``. ``adjust_logits`` scatters it into a ``[S, vocab]`` count of
    output tokens and a seen-anywhere mask, the size of the logits. Bounded by ``S x L``
    either way, and only built (and sent to the device) when a row of the step has a
    penalty: otherwise the runner passes constant tables already on the device.
    """

    num_logprobs: jax.Array  # i32[S]: top log-probabilities wanted; -1: none
    bias_ids: jax.Array  # i32[S, BIAS_SLOTS]
    bias: jax.Array  # f32[S, BIAS_SLOTS]
    repetition: jax.Array  # f32[S]; 1: off
    presence: jax.Array  # f32[S]
    frequency: jax.Array  # f32[S]
    history: jax.Array  # i32[S, L]
    prompt_lens: jax.Array  # i32[S]
    allowed: jax.Array  # i32[S, ceil(vocab / 32)] token bitmask of structured output; -1: all


def logprobs_of(logits: jax.Array, sampled: jax.Array, num_logprobs: jax.Array):
    """Log-softmax of the raw ``logits: [S, vocab]`` at each row's ``sampled`` token and its
    ``MAX_LOGPROBS`` (or vocab, if fewer) most likely tokens: ``(f32[S], i32[S, K],
    f32[S, K])``, all zeros unless a row asked (``num_logprobs >= 0``)."""
    k = min(MAX_LOGPROBS, logits.shape[-1])

    def compute(logits):
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        top, ids = jax.lax.top_k(logp, k)
        chosen = jnp.take_along_axis(logp, sampled[:, None], axis=-1)[:, 0]
        return chosen, ids.astype(jnp.int32), top

    def skip(logits):
        rows = logits.shape[0]
        zeros = jnp.zeros((rows, k), jnp.float32)
        return jnp.zeros(rows, jnp.float32), zeros.astype(jnp.int32), zeros

    return jax.lax.cond(jnp.any(num_logprobs >= 0), compute, skip, logits)


def adjust_logits(logits: jax.Array, c: LogitControls) -> jax.Array:
    """``logits: [S, vocab]`` with the tokens a row's grammar forbids (a 0 bit of its
    ``allowed`` bitmask) set to -inf, its bias added, then its penalties applied (vLLM's
    rules): a token seen in the prompt or output has a positive logit divided by the
    repetition penalty, a negative one multiplied; then ``frequency x (times in the output)``
    and ``presence x (in the output at all)`` are subtracted."""
    logits = logits.astype(jnp.float32)
    rows = jnp.arange(logits.shape[0])[:, None]

    def add_bias(logits):
        return logits.at[rows, c.bias_ids].add(c.bias, mode="drop")

    def penalize(logits):
        is_output = jnp.arange(c.history.shape[1])[None, :] >= c.prompt_lens[:, None]
        counts = (
            jnp.zeros_like(logits)
            .at[rows, c.history]
            .add(is_output.astype(jnp.float32), mode="drop")
        )
        seen = jnp.zeros(logits.shape, bool).at[rows, c.history].set(True, mode="drop")
        scale = jnp.where(seen, c.repetition[:, None], 1.0)
        logits = jnp.where(logits > 0, logits / scale, logits * scale)
        logits = logits - c.frequency[:, None] * counts
        return logits - c.presence[:, None] * (counts > 0)

    def constrain(logits):
        token = jnp.arange(logits.shape[-1])
        bits = (c.allowed[:, token // 32] >> (token % 32)[None, :]) & 1
        return jnp.where(bits == 1, logits, -jnp.inf)

    constrained = jnp.any(c.allowed != -1)
    logits = jax.lax.cond(constrained, constrain, lambda x: x, logits)
    biased = jnp.any(c.bias != 0)
    logits = jax.lax.cond(biased, add_bias, lambda x: x, logits)
    penalized = jnp.any((c.repetition != 1) | (c.presence != 0) | (c.frequency != 0))
    return jax.lax.cond(penalized, penalize, lambda x: x, logits)
