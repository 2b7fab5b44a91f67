"""The three functions for causal language modelling, ready to hand to the Trainer.

``collate_fn`` is ``jaxstack.data.lm_collate`` (stacks packed examples); ``lm_functions``
returns ``loss_fn`` and ``pred_fn`` for a model, written only against the public API.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jaxstack.models.llama import Llama
from sharding_rules import ModelAnalysis, analyze_model, param_rules, specs_tree


def lm_functions(model: Llama) -> tuple[Callable, Callable]:
    """``(loss_fn, pred_fn)`` for next-token prediction on packed batches.

    Batches hold ``input_ids``, ``targets``, ``segment_ids``, ``positions`` and ``loss_mask``,
    each ``[batch, seq]``. ``loss_fn`` returns the mean cross-entropy over unmasked tokens and
    the token accuracy; ``pred_fn`` returns per-example ``loss`` and ``accuracy``.
    """

    def token_losses(params, batch):
        logits = model.apply(
            {"params": params},
            batch["input_ids"],
            positions=batch["positions"],
            segment_ids=batch["segment_ids"],
        )
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        # the target is the top prediction (ties count): cheaper than an argmax over vocab
        target_logit = jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
        correct = (target_logit >= logits.max(-1)).astype(jnp.float32)
        return losses, correct, batch["loss_mask"].astype(jnp.float32)

    def loss_fn(params, batch, rng: jax.Array):
        losses, correct, mask = token_losses(params, batch)
        denom = jnp.maximum(mask.sum(), 1.0)
        return (losses * mask).sum() / denom, {"accuracy": (correct * mask).sum() / denom}

    def pred_fn(params, batch, rng: jax.Array):
        losses, correct, mask = token_losses(params, batch)
        denom = jnp.maximum(mask.sum(-1), 1.0)
        return {
            "loss": (losses * mask).sum(-1) / denom,
            "accuracy": (correct * mask).sum(-1) / denom,
        }

    return loss_fn, pred_fn


def lm_param_specs(
    model: Llama, seq_len: int, overrides: dict | None = None
) -> Callable[[Any, Mesh], Any]:
    """A Trainer ``param_specs_fn`` that derives specs from the model's forward pass.

    Tracing the forward (ids -> logits) rather than the loss lets the rules see the LM head's
    logits as the model output, so the head is column-parallel over vocab.
    """

    def specs(abstract_params, mesh: Mesh):
        analysis = lm_analysis(model, seq_len, abstract_params)
        return specs_tree(analysis, param_rules(analysis, mesh, overrides))

    return specs


def lm_analysis(model: Llama, seq_len: int, abstract_params: Any) -> ModelAnalysis:
    """The sharding rules' trace of the model's forward pass (ids -> logits), done once."""
    ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    return analyze_model(lambda p, x: model.apply({"params": p}, x), abstract_params, ids)
