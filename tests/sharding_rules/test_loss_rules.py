"""Rules traced from a loss: an output that is only reduced over (softmax cross-entropy,
accuracy) makes its weight a vocab-parallel head; a use that needs the whole row does not."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import toy_models as tm
from flax import nnx
from jax.sharding import PartitionSpec as P

from sharding_rules import analyze_model, infer_param_specs, optimizer_state_specs, param_rules

IDS = jnp.zeros((4, 6), jnp.int32)
BATCH = {"ids": IDS, "targets": IDS}
SIZES = {"data": 2, "tensor": 4}


def optax_ce(logits, targets):
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def log_softmax_take(logits, targets):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1).mean()


def one_hot_ce_and_argmax_accuracy(logits, targets):
    target_logit = jnp.einsum("bsv,bsv->bs", logits, jax.nn.one_hot(targets, logits.shape[-1]))
    loss = (jax.nn.logsumexp(logits, -1) - target_logit).mean()
    return loss, {"accuracy": (jnp.argmax(logits, -1) == targets).mean()}


def rules_from(model, loss, sizes):
    def loss_fn(params, batch):
        return loss(model.apply(params, batch["ids"]), batch["targets"])

    return param_rules(analyze_model(loss_fn, tm.shapes_of(model, IDS), BATCH), sizes)


def specs_from(model, loss, sizes=SIZES):
    """{path without 'params/': spec}, traced through ``loss`` (None: the forward pass)."""
    if loss is None:
        an = analyze_model(model.apply, tm.shapes_of(model, IDS), IDS)
        rules = param_rules(an, sizes)
    else:
        rules = rules_from(model, loss, sizes)
    return {path.removeprefix("params/"): rule.spec for path, rule in rules.items()}


@pytest.mark.parametrize("loss", [optax_ce, log_softmax_take, one_hot_ce_and_argmax_accuracy])
@pytest.mark.parametrize(
    "model, head",
    [
        (tm.Anonymous(kv_heads=tm.H), "p10"),  # meaningless names: p10 is the [D, V] head
        (tm.EmbedLM(), "lm_head/kernel"),
        (tm.GPT2(), "wte/embedding"),  # tied: the embedding is the head
    ],
    ids=["anonymous", "embed_lm", "gpt2_tied"],
)
def test_the_loss_gives_the_forward_layout(model, head, loss):
    """Every spec, the vocab-parallel head included, equals the forward pass's."""
    got = specs_from(model, loss)
    assert got == specs_from(model, None)
    vocab_dim = 0 if head == "wte/embedding" else 1
    assert got[head][vocab_dim] == "tensor"


def test_reason_says_the_head_output_is_only_reduced():
    rules = rules_from(tm.Anonymous(kv_heads=tm.H), optax_ce, SIZES)
    assert "only reduced over" in rules["params/p10"].reason


def _soft_embedding(logits, targets):  # probabilities times an activation table
    table = jnp.ones((logits.shape[-1], 5)) * targets.sum()
    return (jax.nn.softmax(logits) @ table).sum()


@pytest.mark.parametrize(
    "loss",
    [
        lambda z, t: jnp.sort(z, -1)[..., -3:].sum(),  # top-k style: needs the whole row
        lambda z, t: jax.lax.top_k(z, 3)[0].sum(),
        lambda z, t: jnp.cumsum(jax.nn.softmax(z), -1).mean(),  # cumulative over vocab
        lambda z, t: jnp.sort(z.sum(0), -1)[:, -1].sum(),  # batch sum keeps vocab, then a sort
        lambda z, t: jnp.take(z, np.random.default_rng(0).permutation(tm.V), -1).max(-1).sum(),
        _soft_embedding,  # a vocab contraction that keeps a [tokens, 5] result
    ],
    ids=["sort", "top_k", "cumsum", "batch_sum_then_sort", "permuting_gather", "soft_embed"],
)
def test_a_use_that_needs_the_whole_vocab_row_is_no_head(loss):
    """Sharding vocab would still be correct (GSPMD gathers); it is only not cheap."""
    s = specs_from(tm.EmbedLM(), lambda z, t: loss(z, t) + optax_ce(z, t))
    assert s["lm_head/kernel"] == P(None, None)
    assert s["embed"] == P("tensor", None)


@pytest.mark.parametrize(
    "loss",
    [
        lambda z, t: z.mean(),  # every dim reduced at once: an all-reduce of one scalar
        lambda z, t: z.sum(0),  # a batch sum keeps vocab and returns it, vocab-sharded
        lambda z, t: jax.nn.logsumexp(z.sum(0), -1).sum(),
    ],
    ids=["mean_of_all", "batch_sum_output", "batch_sum_then_logsumexp"],
)
def test_every_use_reducing_over_vocab_is_a_head(loss):
    assert specs_from(tm.EmbedLM(), loss)["lm_head/kernel"] == P(None, "tensor")


class Classifier(nn.Module):
    """embed [V, D] -> mean over positions -> classes [D, 3]: narrower than its input."""

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        x = nn.Embed(tm.V, tm.D, name="embed")(ids).mean(1)
        return nn.Dense(3, name="classes")(x)


def test_a_narrow_reduced_output_stays_replicated():
    def loss_fn(params, batch):
        logits = Classifier().apply(params, batch["ids"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"][:, 0])

    params = tm.shapes_of(Classifier(), IDS)
    rules = param_rules(analyze_model(loss_fn, params, BATCH), {"tensor": 2})
    assert rules["params/classes/kernel"].spec == P(None, None)
    assert rules["params/embed/embedding"].spec == P("tensor", None)


# -- flax.nnx paths ------------------------------------------------------------------------
class NNXMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(tm.D, tm.F, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(tm.F, tm.D, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.relu(self.up(x)))


def test_nnx_paths_drop_the_variable_value_and_overrides_match_them():
    def build():
        model = NNXMLP(nnx.Rngs(0))
        return model, nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

    model, optimizer = nnx.eval_shape(build)
    graphdef, state = nnx.split(model)

    def apply(s, x):
        return nnx.merge(graphdef, s)(x)

    x = jax.ShapeDtypeStruct((2, tm.D), jnp.float32)
    assert analyze_model(apply, state, x).paths == ("down/kernel", "up/kernel")
    specs = infer_param_specs(
        apply, state, x, mesh_axis_sizes={"tensor": 2}, overrides={"up/kernel$": P(None, None)}
    )
    assert specs["up"]["kernel"].get_value() == P(None, None)  # the override, not column-parallel
    assert specs["down"]["kernel"].get_value() == P("tensor", None)
    opt_specs = optimizer_state_specs(nnx.state(optimizer), state, specs)
    assert opt_specs["opt_state"][0]["mu"]["down"]["kernel"].get_value() == P("tensor", None)
    assert opt_specs["opt_state"][0]["nu"]["up"]["kernel"].get_value() == P(None, None)
