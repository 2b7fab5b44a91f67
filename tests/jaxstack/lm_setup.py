"""Shared builders of the trainer tests: a tiny byte-level LM and its Trainer, and a counter
of jit traces and XLA compilations."""

import contextlib
from collections import Counter

import jax
import jax.numpy as jnp
import optax

from jaxstack.data import ByteTokenizer, PackedDataset, lm_collate
from jaxstack.lm import lm_functions, lm_param_specs
from jaxstack.models import Llama, LlamaConfig, preset
from jaxstack.trainer import TrainConfig, Trainer

TEXT = [
    "the quick brown fox jumps over the lazy dog. " * 6,
    "pack my box with five dozen liquor jugs! " * 6,
    "sphinx of black quartz, judge my vow. " * 6,
] * 8

MODEL = Llama(preset("tiny", num_layers=2, hidden_size=64, intermediate_size=128))
SEQ_LEN = 32


def packed_dataset() -> PackedDataset:
    """181 packed sequences of 32 byte tokens."""
    return PackedDataset.from_texts(TEXT, ByteTokenizer(), seq_len=SEQ_LEN)


def lm_trainer(work_dir, *, model: Llama = MODEL, mesh=None, optimizer=None, init=None,
               router_bias_rate=None, **config) -> Trainer:  # fmt: skip
    """A Trainer of ``model`` with the LM functions; ``config`` overrides TrainConfig fields
    of a small run (16 examples per step, 8 steps)."""
    loss_fn, pred_fn = lm_functions(model)
    settings = dict(
        work_dir=str(work_dir),
        batch_size=16,
        num_steps=8,
        learning_rate=3e-3,
        warmup_steps=2,
        save_every=4,
        log_every=1,
        progress_bar=False,
    )
    settings.update(config)
    if settings.get("per_device_batch_size") is not None:
        settings["batch_size"] = None
    if settings.get("num_epochs") is not None:
        settings["num_steps"] = None
    return Trainer(
        params=init or (lambda rng: model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"]),
        collate_fn=lm_collate,
        loss_fn=loss_fn,
        pred_fn=pred_fn,
        config=TrainConfig(**settings),
        optimizer=optimizer,
        router_bias_rate=router_bias_rate,
        mesh=mesh,
        flops_per_token=model.config.flops_per_token(SEQ_LEN),
    )


TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compilations():
    """Yields a Counter of jit traces (``TRACE_EVENT``) and XLA compilations
    (``COMPILE_EVENT``) that happen inside the block."""
    counts = Counter()

    def listener(event: str, duration: float, **kwargs) -> None:
        counts[event] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def batch_of(dataset, start: int = 0, size: int = 16) -> dict:
    """Examples ``start .. start + size`` collated."""
    return lm_collate([dataset[i] for i in range(start, start + size)])


def rules_trainer(work_dir, mesh, config: LlamaConfig, *, forward_rules: bool = True, **options):
    """A one-step Trainer of ``Llama(config)`` with the LM functions (batch 8, no clipping) on
    ``mesh``; parameter rules from the forward pass at ``SEQ_LEN`` unless ``forward_rules`` is
    False (then the Trainer's default: traced from ``loss_fn``)."""
    model = Llama(config)
    loss_fn, _ = lm_functions(model)
    return Trainer(
        params=lambda rng: model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"],
        collate_fn=lm_collate,
        loss_fn=loss_fn,
        config=TrainConfig(work_dir=str(work_dir), batch_size=8, num_steps=1, grad_clip=None),
        mesh=mesh,
        param_specs_fn=lm_param_specs(model, SEQ_LEN) if forward_rules else None,
        **options,
    )


def sgd_trainer(work_dir, mesh, config: LlamaConfig) -> Trainer:
    """``rules_trainer`` with SGD at rate 1: params move by exactly -grad, so comparing params
    after one step compares gradients."""
    return rules_trainer(work_dir, mesh, config, optimizer=optax.sgd(1.0))
