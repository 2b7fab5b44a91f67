"""The three functions for causal language modelling, ready to hand to the Trainer.

``collate_fn`` is ``jaxstack.data.lm_collate`` (stacks packed examples); ``lm_functions``
returns ``loss_fn`` and ``pred_fn`` for a model, written only against the public API. A
mixture-of-experts model's routing losses (what its layers sow into ``MOE_COLLECTION``) are
added to the loss and reported as metrics.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxstack.layers import context_parallel
from jaxstack.layers.moe import MOE_COLLECTION, moe_summary
from jaxstack.losses import (
    DEFAULT_CHUNK_SIZE,
    CrossEntropyOutput,
    chunk_layout,
    fused_cross_entropy,
)
from jaxstack.models.llama import Llama
from sharding_rules import ModelAnalysis, analyze_model, param_rules, specs_tree


def lm_functions(
    model: Llama, *, chunk_size: int = DEFAULT_CHUNK_SIZE, z_loss: float = 0.0
) -> tuple[Callable, Callable]:
    """``(loss_fn, pred_fn)`` for next-token prediction on packed batches.

    Batches hold ``input_ids``, ``targets``, ``segment_ids``, ``positions`` and ``loss_mask``,
    each ``[batch, seq]``. The loss is ``jaxstack.losses.fused_cross_entropy`` over the
    model's final hidden states and head: ``chunk_size`` positions of every row at a time, so
    the float32 ``[tokens, vocab]`` logits never exist at once; ``z_loss`` weights PaLM's
    ``logsumexp**2`` term.

    ``loss_fn`` returns the mean loss over unmasked tokens and the metrics ``accuracy`` (the
    target is a top prediction) and ``num_tokens`` (the token count the mean divides by, so
    that micro-batches can be weighted by it); ``pred_fn`` returns per-example ``loss`` and
    ``accuracy``.

    For a model with MoE layers (``jaxstack.models.Mixtral``) the loss also holds their
    weighted load-balancing and router z-losses (mean over MoE layers, computed per
    micro-batch), and the metrics add ``aux_loss``, ``z_loss`` (the router's; unweighted),
    ``expert_load`` (``[E]``: the fraction of routed assignments per expert, mean over
    layers) and ``expert_load_max`` (the busiest expert's load over the mean, worst layer).

    Raises:
      ValueError: ``chunk_size`` is not a positive int.
    """
    chunk_layout(1, chunk_size)  # a bad chunk_size fails here, where it enters

    def token_stats(params, batch) -> tuple[CrossEntropyOutput, dict]:
        hidden, sown = model.apply(
            {"params": params},
            batch["input_ids"],
            positions=batch["positions"],
            segment_ids=batch["segment_ids"],
            return_hidden=True,
            natural_order=False,
            mutable=[MOE_COLLECTION],
        )
        # the loss sums over positions, so it takes them in the model's order (a
        # permutation under context parallelism) instead of gathering the hidden states
        targets, loss_mask = context_parallel.model_order(
            model.config.context_parallel, batch["targets"], batch["loss_mask"]
        )
        out = fused_cross_entropy(
            hidden,
            model.head_kernel(params),
            targets,
            loss_mask,
            chunk_size=chunk_size,
            z_loss=z_loss,
        )
        return out, sown

    def loss_fn(params, batch, rng: jax.Array):
        out, sown = token_stats(params, batch)
        denom = jnp.maximum(out.num_tokens, 1.0)
        metrics = {"accuracy": out.num_correct / denom, "num_tokens": out.num_tokens}
        loss = out.loss_sum / denom
        moe = moe_summary(sown.get(MOE_COLLECTION, {}))
        if moe is not None:
            loss = loss + moe.loss
            metrics.update(moe.metrics())
        return loss, metrics

    def pred_fn(params, batch, rng: jax.Array):
        out, _ = token_stats(params, batch)
        denom = jnp.maximum(batch["loss_mask"].astype(jnp.float32).sum(-1), 1.0)
        return {
            "loss": out.token_loss.sum(-1) / denom,
            "accuracy": out.token_correct.sum(-1) / denom,
        }

    return loss_fn, pred_fn


def lm_param_specs(
    model: Llama, seq_len: int, overrides: dict | None = None
) -> Callable[[Any, Mesh], Any]:
    """A Trainer ``param_specs_fn`` that derives specs from the model's forward pass.

    It needs only ``seq_len``, not a batch (plans, ``mesh="auto"``). The Trainer's default,
    tracing ``loss_fn``, reaches the same layout: the rules see the cross-entropy reduce the
    head's logits over the vocabulary, so either way the head is column-parallel over vocab.
    """

    def specs(abstract_params, mesh: Mesh):
        analysis = lm_analysis(model, seq_len, abstract_params)
        return specs_tree(analysis, param_rules(analysis, mesh, overrides))

    return specs


ANALYSIS_SEQ_LEN = 128
"""Tokens the sharding rules' trace runs on at most: the layout does not depend on the
length, and the rows each weight multiplies grow linearly with it (scaled up after)."""


def lm_analysis(model: Llama, seq_len: int, abstract_params: Any) -> ModelAnalysis:
    """The sharding rules' trace of the model's forward pass (ids -> logits), done once, on
    at most ``ANALYSIS_SEQ_LEN`` tokens with its per-weight rows scaled to ``seq_len``
    (tracing a long sequence costs seconds and tells the rules nothing more)."""
    traced = min(seq_len, ANALYSIS_SEQ_LEN)
    ids = jax.ShapeDtypeStruct((1, traced), jnp.int32)
    analysis = analyze_model(lambda p, x: model.apply({"params": p}, x), abstract_params, ids)
    rows = {leaf: n * seq_len // traced for leaf, n in analysis.rows.items()}
    return dataclasses.replace(analysis, rows=rows)
