"""Trainer: loss falls, exact resume, the schedule, evaluation, bad input (accumulation:
test_step.py)."""

import json

import jax
import numpy as np
import pytest
from lm_setup import lm_trainer, packed_dataset

from jaxstack.checkpoint import load_params
from jaxstack.data import lm_collate
from jaxstack.mesh import make_mesh


@pytest.fixture(scope="module")
def dataset():
    return packed_dataset()


def test_loss_decreases_and_metrics_are_logged(tmp_path, dataset):
    trainer = lm_trainer(tmp_path, num_steps=25, log_every=5)
    records = trainer.fit(dataset, dataset)
    trainer.close()
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [5, 10, 15, 20, 25]
    for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "mfu", "eval_loss", "accuracy"):
        assert key in lines[-1], key
    assert 0 < lines[-1]["mfu"] < 1
    assert lines[-1]["eval_loss"] < 5.0


def test_resume_is_bit_identical(tmp_path, dataset):
    straight = lm_trainer(tmp_path / "straight")
    straight.fit(dataset)
    straight.close()

    first = lm_trainer(tmp_path / "resumed")
    first.fit(dataset, stop_after=4)
    first.close()
    assert first.step == 4
    second = lm_trainer(tmp_path / "resumed")
    second.fit(dataset)
    second.close()
    assert second.step == 8
    for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(second.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_schedule_counts_optimizer_updates_not_micro_batches(tmp_path, dataset):
    trainer = lm_trainer(
        tmp_path,
        batch_size=32,
        num_steps=4,
        grad_accum_steps=4,
        warmup_steps=2,
        schedule="linear",
    )
    records = trainer.fit(dataset)
    trainer.close()
    lrs = [r["lr"] for r in records]
    assert len(lrs) == 4
    np.testing.assert_allclose(lrs[:3], [0.0, 1.5e-3, 3e-3], rtol=1e-5)


def test_load_params_for_inference(tmp_path, dataset):
    trainer = lm_trainer(tmp_path, num_steps=2, warmup_steps=0)
    trainer.fit(dataset)
    trainer.close()
    params = load_params(tmp_path)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(trainer.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_predict_returns_outputs_in_dataset_order(tmp_path, dataset):
    trainer = lm_trainer(tmp_path)
    subset = [dataset[i] for i in range(11)]  # not a multiple of the batch
    with pytest.raises(RuntimeError, match="no state yet"):
        trainer.predict(subset, batch_size=8)
    trainer.init(lm_collate(subset[:8]))
    outputs = trainer.predict(subset, batch_size=8)
    assert outputs["loss"].shape == (11,)
    single = trainer.predict(subset[5:6] * 8, batch_size=8)
    np.testing.assert_allclose(outputs["loss"][5], single["loss"][0], rtol=1e-5)
    trainer.close()


def test_sharded_batch_over_a_mesh(tmp_path, dataset):
    mesh = make_mesh(data=4, fsdp=2)
    trainer = lm_trainer(tmp_path, mesh=mesh, num_steps=1, warmup_steps=0)
    batch = lm_collate([dataset[i] for i in range(16)])
    trainer.train_step(batch)
    # the batch axes (expert splits the batch outside MoE layers; it is 1 here)
    assert trainer.to_global(batch)["input_ids"].sharding.spec[0] == ("data", "fsdp", "expert")
    trainer.close()


def test_batch_that_does_not_divide_devices_is_a_clear_error(tmp_path, dataset):
    with pytest.raises(ValueError, match="multiple of 8"):
        lm_trainer(tmp_path, batch_size=12)
    with pytest.raises(ValueError, match="not divisible by grad_accum_steps"):
        lm_trainer(tmp_path, batch_size=16, grad_accum_steps=3)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoints directory"):
        load_params(tmp_path / "nowhere")


def test_mesh_that_does_not_match_devices_is_a_clear_error():
    with pytest.raises(ValueError, match="multiply to 6 but there are 8 devices"):
        make_mesh(data=3, tensor=2)
    with pytest.raises(ValueError, match="cannot be split"):
        make_mesh(data=-1, tensor=3)
