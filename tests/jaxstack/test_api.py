"""The three-function API as a user meets it (public API only): automatic sharding of any
model's head, meshes by name, load-then-predict on a mesh, the logged learning rate,
evaluation metrics, throughput, config gaps and a quiet load."""

import json
import logging
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxstack as js

VOCAB, SEQ = 64, 12


class Blob(nn.Module):
    """A language model whose parameter names say nothing (``a`` ... ``d``)."""

    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        x = nn.Embed(VOCAB, 32, name="a")(ids)
        h = nn.gelu(nn.Dense(128, name="b")(x))
        x = x + nn.Dense(32, name="c")(h)
        return nn.Dense(VOCAB, use_bias=False, name="d")(x)


MODEL = Blob()


def collate_fn(examples: list[np.ndarray]) -> dict[str, np.ndarray]:
    rows = np.stack(examples)
    return {"ids": rows[:, :-1], "labels": rows[:, 1:]}


def loss_fn(params, batch, rng):
    logits = MODEL.apply({"params": params}, batch["ids"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    return loss, {"accuracy": (logits.argmax(-1) == batch["labels"]).mean()}


def pred_fn(params, batch, rng):
    logits = MODEL.apply({"params": params}, batch["ids"])
    return {"next": logits.argmax(-1), "logprob": jax.nn.log_softmax(logits).max(-1).sum(-1)}


def init(rng):
    return MODEL.init(rng, jnp.zeros((1, SEQ), jnp.int32))["params"]


@pytest.fixture(scope="module")
def examples():
    rng = np.random.default_rng(0)
    start = rng.integers(0, VOCAB, size=(96, 1))
    return list((start + np.arange(SEQ + 1)) % VOCAB)  # counting sequences: learnable


def trainer(tmp_path, mesh=None, **config) -> js.Trainer:
    optimizer = config.pop("optimizer", None)
    settings = dict(work_dir=str(tmp_path), batch_size=16, num_steps=4, log_every=1,
                    progress_bar=False, learning_rate=1e-2)  # fmt: skip
    settings.update(config)
    return js.Trainer(
        params=init,
        collate_fn=collate_fn,
        loss_fn=loss_fn,
        pred_fn=pred_fn,
        mesh=mesh,
        config=js.TrainConfig(**settings),
        optimizer=optimizer,
    )


def test_default_rules_shard_the_head_of_a_model_with_meaningless_names(tmp_path, examples):
    t = trainer(tmp_path, mesh="data=2,tensor=4")
    t.init(collate_fn(examples[:16]))
    head = t.params["d"]["kernel"]  # [32, VOCAB]
    assert head.sharding.spec[1] == "tensor"
    assert head.addressable_shards[0].data.shape == (32, VOCAB // 4)
    # the pair b -> c is Megatron: b column-parallel, c row-parallel
    assert t.params["b"]["kernel"].sharding.spec[1] == "tensor"
    assert t.params["c"]["kernel"].sharding.spec[0] == "tensor"
    t.close()


@pytest.mark.parametrize(
    "spelling",
    ["data=4,tensor=2", {"data": 4, "tensor": 2}, "mesh"],
    ids=["string", "dict", "Mesh"],
)
def test_meshes_by_name_in_trainer_and_predictor(tmp_path, examples, spelling):
    if spelling == "mesh":
        spelling = js.make_mesh(data=4, tensor=2)
    t = trainer(tmp_path, mesh=spelling)
    t.train_step(collate_fn(examples[:16]))
    assert dict(t.mesh.shape) == {
        "stage": 1, "data": 4, "fsdp": 1, "tensor": 2, "expert": 1, "sequence": 1,
    }  # fmt: skip
    predictor = js.Predictor(collate_fn=collate_fn, pred_fn=pred_fn, mesh=spelling)
    assert predictor.mesh.shape == t.mesh.shape
    ours = predictor.predict(t.params, examples[:20], batch_size=8)
    np.testing.assert_array_equal(ours["next"], t.predict(examples[:20], batch_size=8)["next"])
    t.close()


def test_auto_mesh_in_trainer_and_predictor(tmp_path, examples):
    t = trainer(tmp_path, mesh="auto")
    t.fit(examples)
    assert t.mesh.size == 8 and t.step == 4
    predictor = js.Predictor(collate_fn=collate_fn, pred_fn=pred_fn, mesh="auto")
    out = predictor.predict(t.params, examples[:10], batch_size=8)
    assert predictor.mesh.size == 8 and out["next"].shape == (10, SEQ)
    t.close()


def test_load_then_predict_on_eight_devices_equals_one_device(tmp_path, examples):
    t = trainer(tmp_path, num_steps=2)
    t.fit(examples)
    t.close()
    params = js.load_params(tmp_path)  # on the first device
    one = js.Predictor(collate_fn=collate_fn, pred_fn=pred_fn, mesh=js.make_mesh(
        devices=jax.devices()[:1]))  # fmt: skip
    expected = one.predict(params, examples[:20], batch_size=8)
    eight = js.Predictor(collate_fn=collate_fn, pred_fn=pred_fn, mesh="data=2,tensor=4")
    got = eight.predict(params, examples[:20], batch_size=8)
    np.testing.assert_array_equal(got["next"], expected["next"])
    np.testing.assert_allclose(got["logprob"], expected["logprob"], rtol=1e-5)
    # or read straight into the placement the rules choose
    placed = eight.load_params(tmp_path, collate_fn(examples[:8]))
    assert placed["d"]["kernel"].sharding.spec[1] == "tensor"
    np.testing.assert_array_equal(
        eight.predict(placed, examples[:20], batch_size=8)["next"], expected["next"]
    )


def test_logged_lr_is_the_optimizers_own(tmp_path, examples):
    schedule = optax.linear_schedule(0.1, 0.0, 4)
    custom = optax.chain(optax.clip(1.0), optax.inject_hyperparams(optax.sgd)(schedule))
    records = trainer(tmp_path / "custom", optimizer=custom).fit(examples)
    np.testing.assert_allclose([r["lr"] for r in records], [0.1, 0.075, 0.05, 0.025])
    plain = trainer(tmp_path / "plain", optimizer=optax.sgd(0.1)).fit(examples)
    assert all("lr" not in r for r in plain)  # the state does not say: nothing is guessed


def test_evaluation_logs_metrics_only(tmp_path, examples):
    def eval_metric_fn(dataset, predictions):
        expected = np.stack([np.asarray(e)[1:] for e in dataset])
        return {"next_token_accuracy": float((predictions["next"] == expected).mean())}

    t = js.Trainer(
        params=init, collate_fn=collate_fn, loss_fn=loss_fn, pred_fn=pred_fn,
        eval_metric_fn=eval_metric_fn,
        config=js.TrainConfig(work_dir=str(tmp_path), batch_size=16, num_steps=4,
                              eval_every=2, progress_bar=False, learning_rate=1e-2),
    )  # fmt: skip
    records = t.fit(examples[:80], examples[80:])
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    eval_keys = {k for r in evals for k in r if k.startswith("eval_")}
    assert eval_keys == {"eval_loss", "eval_accuracy", "eval_next_token_accuracy"}
    # eval_loss is loss_fn over the held-out batch, not an average of predictions
    direct = loss_fn(jax.device_get(t.params), collate_fn(examples[80:96]), None)[0]
    np.testing.assert_allclose(evals[-1]["eval_loss"], float(direct), rtol=1e-5)
    t.close()


def test_throughput_times_training_steps_only(tmp_path, examples):
    def slow_metrics(dataset, predictions):
        time.sleep(2.0)
        return {"n": float(len(dataset))}

    t = js.Trainer(
        params=init, collate_fn=collate_fn, loss_fn=loss_fn, pred_fn=pred_fn,
        eval_metric_fn=slow_metrics,
        config=js.TrainConfig(work_dir=str(tmp_path), batch_size=16, num_steps=9, log_every=1,
                              eval_every=4, save_every=3, progress_bar=False),
    )  # fmt: skip
    saving = t.checkpoints.save

    def slow_save(*args, **kwargs):
        time.sleep(2.0)
        return saving(*args, **kwargs)

    t.checkpoints.save = slow_save
    records = t.fit(examples, examples[:16])
    t.close()
    assert "tokens_per_sec" not in records[0]  # the compiling step is not a rate
    assert all("examples_per_sec" in r for r in records[1:])  # no input_ids: examples
    rates = {r["step"]: r["examples_per_sec"] for r in records[1:]}
    steady = np.median([rates[s] for s in (2, 5, 7)])
    for step in (3, 4, 6, 8, 9):  # saves at 3, 6, 9; evaluations at 4, 8
        assert rates[step] > steady / 5, (step, rates)  # a 2 s pause would be ~100x


def test_per_device_batch_size_and_epochs(tmp_path, examples):
    t = trainer(tmp_path, mesh="data=4,fsdp=2", batch_size=None, per_device_batch_size=2,
                num_steps=None, num_epochs=2)  # fmt: skip
    records = t.fit(examples)
    assert t.batch_size == 16 and t.num_steps == 2 * (96 // 16) == t.step
    assert len(records) == 12
    t.close()


def test_compute_dtype_runs_the_loss_in_bfloat16_with_float32_state(tmp_path, examples):
    seen = []

    def recording_loss(params, batch, rng):
        seen.append(params["b"]["kernel"].dtype)
        return loss_fn(params, batch, rng)

    t = js.Trainer(
        params=init, collate_fn=collate_fn, loss_fn=recording_loss,
        config=js.TrainConfig(work_dir=str(tmp_path), batch_size=16, num_steps=2,
                              compute_dtype="bfloat16", progress_bar=False, learning_rate=1e-2),
    )  # fmt: skip
    records = t.fit(examples)
    assert jnp.bfloat16 in seen
    assert {x.dtype for x in jax.tree.leaves(t.params)} == {jnp.dtype(jnp.float32)}
    assert np.isfinite(records[-1]["loss"])
    t.close()


def test_bad_train_config_values_say_which_field(tmp_path):
    with pytest.raises(ValueError, match="compute_dtype='int8'; choose one of"):
        js.TrainConfig(compute_dtype="int8")
    with pytest.raises(TypeError, match="TrainConfig.per_device_batch_size=2.5"):
        js.TrainConfig(per_device_batch_size=2.5)
    with pytest.raises(ValueError, match="give num_steps or num_epochs, not both"):
        js.TrainConfig(num_steps=3, num_epochs=1)


def test_load_params_prints_no_orbax_warning(tmp_path, examples, caplog):
    t = trainer(tmp_path, num_steps=1)
    t.fit(examples)
    t.close()
    with caplog.at_level(logging.WARNING):
        params = js.load_params(tmp_path)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert params["d"]["kernel"].shape == (32, VOCAB)


def test_vector_metrics_are_logged_as_lists(tmp_path, examples):
    def loss_with_vector(params, batch, rng):
        loss, metrics = loss_fn(params, batch, rng)
        logits = MODEL.apply({"params": params}, batch["ids"])
        hits = (logits.argmax(-1) == batch["labels"]).mean(0)  # accuracy per position: [SEQ]
        return loss, {**metrics, "position_accuracy": hits}

    t = js.Trainer(
        params=init, collate_fn=collate_fn, loss_fn=loss_with_vector,
        config=js.TrainConfig(work_dir=str(tmp_path), batch_size=16, num_steps=2, log_every=1,
                              grad_accum_steps=2, progress_bar=False),
    )  # fmt: skip
    records = t.fit(examples, examples[:32])
    t.close()
    vector = records[-1]["position_accuracy"]
    assert isinstance(vector, list) and len(vector) == SEQ
    np.testing.assert_allclose(np.mean(vector), records[-1]["accuracy"], rtol=1e-5)
    assert len(records[-1]["eval_position_accuracy"]) == SEQ
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["position_accuracy"] == vector
