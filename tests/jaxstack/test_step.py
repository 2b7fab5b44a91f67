"""The training step: one compilation, no host syncs, resume without init, exact accumulation,
the weight-decay mask and the clip norm computed once."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from lm_setup import (
    COMPILE_EVENT,
    MODEL,
    TRACE_EVENT,
    batch_of,
    count_compilations,
    lm_trainer,
    packed_dataset,
)

from jaxstack.mesh import make_mesh
from jaxstack.models import Llama
from jaxstack.step import NUM_TOKENS


@pytest.fixture(scope="module")
def dataset():
    return packed_dataset()


@pytest.mark.parametrize(
    "mesh", ["data=1", "data=8", "data=2,fsdp=2,tensor=2"], ids=["one", "dp8", "2x2x2"]
)
def test_one_trace_and_one_compilation_per_step_eval_and_predict(tmp_path, dataset, mesh):
    devices = jax.devices()[:1] if mesh == "data=1" else None
    trainer = lm_trainer(tmp_path, mesh=make_mesh(devices=devices) if devices else mesh)
    trainer.train_step(batch_of(dataset))  # traces and compiles
    with count_compilations() as counts:
        for start in (16, 32, 48):
            metrics = trainer.train_step(batch_of(dataset, start))
        jax.block_until_ready(metrics)
    assert counts[TRACE_EVENT] == 0 and counts[COMPILE_EVENT] == 0, counts
    eval_set, predict_set = [dataset[i] for i in range(40)], [dataset[i] for i in range(11)]
    trainer.evaluate(eval_set)
    trainer.predict(predict_set)
    with count_compilations() as counts:
        trainer.evaluate(eval_set)
        trainer.predict(predict_set)
    assert counts[TRACE_EVENT] == 0 and counts[COMPILE_EVENT] == 0, counts
    assert trainer.step == 4
    trainer.close()


def test_fit_never_reads_the_device_between_log_steps(tmp_path, dataset):
    trainer = lm_trainer(tmp_path, num_steps=6, log_every=6, save_every=100)
    # implicit device->host reads (int(array), float(array), np.asarray) raise in here; the
    # loop may only fetch metrics explicitly at its log / save steps
    with jax.transfer_guard_device_to_host("disallow"):
        records = trainer.fit(dataset)
    assert [r["step"] for r in records] == [6]
    assert trainer.step == 6
    trainer.close()


def test_resume_reads_the_checkpoint_without_running_the_initialiser(tmp_path, dataset):
    first = lm_trainer(tmp_path, num_steps=4, save_every=2)
    first.fit(dataset)
    first.close()
    runs = []

    def counted_init(rng):
        jax.debug.callback(lambda: runs.append(1))  # runs only when the init really executes
        return MODEL.init(rng, jnp.zeros((1, 8), jnp.int32))["params"]

    fresh = lm_trainer(tmp_path / "fresh", init=counted_init, num_steps=1, warmup_steps=0)
    fresh.fit(dataset)
    fresh.close()
    assert runs == [1]  # the counter works: a fresh run initialises once

    runs.clear()
    resumed = lm_trainer(tmp_path, init=counted_init, num_steps=6, save_every=2)
    resumed.fit(dataset)
    resumed.close()
    assert runs == [] and resumed.step == 6


def _masked_batch(dataset):
    """16 examples whose loss masks keep very different token counts: example i keeps its
    first 2 + 2 * (i % 8) targets, so the two micro-batches of accumulation differ."""
    batch = batch_of(dataset)
    keep = 2 + 2 * (np.arange(16) % 8)
    # micro-batch i takes examples i, i+2, ...: make the odd ones nearly empty
    keep[1::2] = 1
    batch["loss_mask"] = (np.arange(batch["loss_mask"].shape[1])[None] < keep[:, None]).astype(
        batch["loss_mask"].dtype
    )
    return batch


def test_accumulation_over_unequal_token_counts_equals_the_large_batch(tmp_path, dataset):
    batch = _masked_batch(dataset)
    counts = batch["loss_mask"].reshape(8, 2, -1).sum((0, 2))  # per micro-batch (i, i+2, ...)
    assert counts[0] > 4 * counts[1]  # really unequal
    sgd = optax.sgd(1.0)  # params move by -grad: equal params mean equal gradients
    big = lm_trainer(tmp_path / "big", optimizer=sgd, grad_clip=None)
    accum = lm_trainer(tmp_path / "accum", optimizer=sgd, grad_clip=None, grad_accum_steps=2)
    m_big, m_acc = big.train_step(batch), accum.train_step(batch)
    np.testing.assert_allclose(m_acc["loss"], m_big["loss"], rtol=2e-6)
    np.testing.assert_allclose(m_acc["accuracy"], m_big["accuracy"], rtol=2e-6)
    assert float(m_acc[NUM_TOKENS]) == float(m_big[NUM_TOKENS]) == batch["loss_mask"].sum()
    for a, b in zip(jax.tree.leaves(big.params), jax.tree.leaves(accum.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)

    # the old rule (mean of the micro-batch means) is measurably different on this batch
    loss_fn = big.loss_fn
    params = jax.device_get(accum.params)
    halves = [jax.tree.map(lambda x, i=i: x[i::2], batch) for i in range(2)]
    mean_of_means = np.mean([float(loss_fn(params, h, None)[0]) for h in halves])
    assert abs(mean_of_means - float(loss_fn(params, batch, None)[0])) > 1e-3
    big.close()
    accum.close()


def test_weight_decay_skips_norms_biases_and_by_default_embeddings(tmp_path, dataset):
    model = Llama(MODEL.config.replace(qkv_bias=True))  # biases too
    batch = batch_of(dataset)

    def zero_grad_loss(params, batch, rng):  # the dataflow of the LM, no gradient
        logits = model.apply({"params": params}, batch["input_ids"])
        return 0.0 * logits.mean()

    def trained(decay_embeddings: bool, no_decay: str = ""):
        trainer = lm_trainer(
            tmp_path / f"{decay_embeddings}{no_decay}", model=model, weight_decay=0.5,
            learning_rate=0.1, warmup_steps=0, schedule="constant", num_steps=1,
            decay_embeddings=decay_embeddings, no_decay=no_decay,
        )  # fmt: skip
        trainer.loss_fn = zero_grad_loss
        trainer.init(batch)
        before = jax.device_get(trainer.params)
        trainer.train_step(batch)
        after = jax.device_get(trainer.params)
        trainer.close()
        flat = jax.tree_util.tree_flatten_with_path(before)[0]
        return {
            "/".join(k.key for k in path): not np.array_equal(b, a)
            for (path, b), a in zip(flat, jax.tree.leaves(after), strict=True)
        }

    decayed = trained(False)
    assert decayed["layers_0/attn/q/kernel"] and decayed["lm_head/kernel"]
    assert decayed["layers_1/mlp/down/kernel"]
    assert not decayed["layers_0/attn_norm/scale"] and not decayed["final_norm/scale"]
    assert not decayed["layers_0/attn/q/bias"]
    assert not decayed["embed/embedding"]
    assert trained(True)["embed/embedding"]
    assert not trained(False, no_decay="mlp/")["layers_0/mlp/up/kernel"]


def test_clipping_reuses_the_logged_norm_and_bounds_the_update(tmp_path, dataset):
    batch = batch_of(dataset)
    sgd = optax.sgd(1.0)
    clipped = lm_trainer(tmp_path / "c", optimizer=sgd, grad_clip=1e-3)
    clipped.init(batch)
    before = jax.device_get(clipped.params)
    metrics = clipped.train_step(batch)
    moved = jax.tree.map(lambda a, b: np.asarray(a) - b, clipped.params, before)
    assert float(metrics["grad_norm"]) > 1e-2  # the reported norm is the unclipped one
    np.testing.assert_allclose(float(optax.tree.norm(moved)), 1e-3, rtol=1e-3)
    clipped.close()


def test_loss_fn_without_num_tokens_weighs_micro_batches_equally(tmp_path, dataset):
    batch = _masked_batch(dataset)
    lm_loss = lm_trainer(tmp_path / "x").loss_fn

    def mean_loss(params, batch, rng):  # no num_tokens: each micro-batch's mean counts once
        return lm_loss(params, batch, rng)[0]

    accum = lm_trainer(tmp_path / "a", grad_accum_steps=2)
    accum.loss_fn = mean_loss
    accum.init(batch)
    params = jax.device_get(accum.params)
    metrics = accum.train_step(batch)
    halves = [jax.tree.map(lambda x, i=i: x[i::2], batch) for i in range(2)]
    expected = np.mean([float(mean_loss(params, h, None)) for h in halves])
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=2e-6)
    assert NUM_TOKENS not in metrics
    accum.close()
