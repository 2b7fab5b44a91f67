"""LoRA training in the Trainer: only adapters move, sharded equals one device, plans, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxstack as js
from jaxstack.checkpoint import saved_param_shapes
from jaxstack.lora import LoRAConfig, merge
from jaxstack.mesh import make_mesh
from jaxstack.overrides import parse_overrides
from jaxstack.planning import plan_notes, plan_run
from jaxstack.run import RunConfig

D, H = 16, 32


def init(rng):
    """A model whose parameter names say nothing: ``foo`` and ``bar`` are its matrices."""
    k1, k2 = jax.random.split(rng)
    return {
        "foo": jax.random.normal(k1, (D, H)) / 4,
        "bar": {"baz": jax.random.normal(k2, (H, D)) / 6},
        "qux": jnp.ones((D,)),
    }


def apply(params, batch):
    return jnp.tanh(batch["x"] @ params["foo"]) @ params["bar"]["baz"] * params["qux"]


def loss_fn(params, batch, rng):
    return jnp.mean((apply(params, batch) - batch["y"]) ** 2)


def pred_fn(params, batch, rng):
    return {"y": apply(params, batch)}


def collate(examples):
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def batch_of(n=8):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, D)).astype(np.float32)
    return {"x": x, "y": np.sin(x[:, ::-1]).astype(np.float32)}


def make(tmp_path, mesh, lora=None, **config):
    return js.Trainer(
        params=init,
        collate_fn=collate,
        loss_fn=loss_fn,
        pred_fn=pred_fn,
        config=js.TrainConfig(
            batch_size=8,
            learning_rate=3e-2,
            warmup_steps=0,
            schedule="constant",
            work_dir=str(tmp_path),
            **config,
        ),  # fmt: skip
        mesh=mesh,
        lora=lora or LoRAConfig(rank=4, alpha=8.0, targets=r"foo|baz"),
    )


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    trainer = make(tmp_path_factory.mktemp("one"), make_mesh(devices=jax.devices()[:1]))
    batch = batch_of()
    trainer.init(batch)
    base = jax.tree.map(np.array, jax.device_get(trainer.base_params))
    losses = [float(trainer.train_step(batch)["loss"]) for _ in range(6)]
    return trainer, base, losses


def test_only_adapters_train(one_device):
    trainer, base, losses = one_device
    assert losses[-1] < 0.8 * losses[0]
    # the base is bit-identical, the optimizer state holds adapters only
    for a, b in zip(jax.tree.leaves(trainer.base_params), jax.tree.leaves(base), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    shapes = {tuple(x.shape) for x in jax.tree.leaves(trainer.state.opt_state) if x.ndim}
    assert shapes == {(D, 4), (4, H), (H, 4), (4, D)}
    assert set(trainer.params) == {"foo", "bar"}
    merged = trainer.model_params
    assert not np.allclose(merged["foo"], base["foo"])
    np.testing.assert_array_equal(merged["qux"], base["qux"])
    # pred_fn runs on the merged model
    batch = batch_of()
    examples = [{k: v[i] for k, v in batch.items()} for i in range(8)]
    np.testing.assert_allclose(trainer.predict(examples)["y"], apply(merged, batch), atol=1e-6)


def test_sharded_equals_one_device(tmp_path, one_device):
    reference, _, losses = one_device
    trainer = make(tmp_path, make_mesh(data=2, fsdp=2, tensor=2))
    batch = batch_of()
    sharded = [float(trainer.train_step(batch)["loss"]) for _ in range(6)]
    np.testing.assert_allclose(sharded, losses, rtol=2e-5)
    got, want = jax.tree.leaves(trainer.params), jax.tree.leaves(reference.params)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)
    # A follows the kernel's input axis, B its output axis, the rank is never split
    base_specs = trainer._placement.base_specs
    specs = trainer._placement.param_specs
    foo = tuple(base_specs["foo"])
    assert tuple(specs["foo"]["lora_a"]) == (foo[0], None)
    assert tuple(specs["foo"]["lora_b"]) == (None, foo[1])
    assert any(s != P() for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)))


def test_plan_counts_optimizer_state_for_adapters_only(tmp_path, one_device):
    trainer, _, _ = one_device
    plan = trainer.plan(batch_of())
    adapters = sum(x.size * 4 for x in jax.tree.leaves(trainer.params))
    base = (D * H * 2 + D) * 4
    assert plan.param_bytes == base + adapters
    assert plan.grad_bytes == adapters
    assert plan.opt_state_bytes < 3 * adapters  # AdamW: two moments (and a count)


def test_targets_that_match_nothing_are_refused(tmp_path):
    trainer = make(tmp_path, make_mesh(devices=jax.devices()[:1]),
                   lora=LoRAConfig(rank=4, targets="q_proj"))  # fmt: skip
    with pytest.raises(ValueError, match="selects no weight matrix.*foo"):
        trainer.train_step(batch_of())


def test_checkpoint_holds_adapters_and_refuses_another_base(tmp_path):
    examples = [{k: v[i] for k, v in batch_of().items()} for i in range(8)]
    mesh = make_mesh(devices=jax.devices()[:1])
    trainer = make(tmp_path, mesh, num_steps=2, save_every=2)
    trainer.fit(examples)
    trainer.close()
    saved = saved_param_shapes(tmp_path)
    assert {k: tuple(v.shape) for k, v in saved["foo"].items()} == {"lora_a": (D, 4),
                                                                   "lora_b": (4, H)}  # fmt: skip
    assert "qux" not in saved
    other = make(tmp_path, mesh, num_steps=3, save_every=2)
    other._init_fn = lambda rng: jax.tree.map(lambda x: 2 * x, init(rng))
    with pytest.raises(ValueError, match=r"trained on another base model: its \S+ differs"):
        other.fit(examples)


def test_dropout_drops_input_rows_of_a():
    base = {"w": jnp.zeros((6, 3))}
    adapters = {"w": {"lora_a": jnp.ones((6, 2)), "lora_b": jnp.ones((2, 3))}}
    merged = merge(base, adapters, 1.0, dropout=0.5, rng=jax.random.PRNGKey(3))["w"]
    rows = np.asarray(merged[:, 0])
    assert set(rows) == {0.0, 4.0}  # each input row dropped or kept at 2 * (1 / (1 - 0.5))
    np.testing.assert_array_equal(merged, np.repeat(rows[:, None], 3, axis=1))
    np.testing.assert_array_equal(merge(base, adapters, 1.0)["w"], np.full((6, 3), 2.0))


def test_run_config_lora_section():
    run = RunConfig()
    assert not run.lora.enabled  # full fine-tuning unless --lora.rank is given
    changes = parse_overrides(run, {"lora.rank": "16", "lora.targets": "q_proj|v_proj"})
    built = RunConfig.from_dict({**run.to_dict(), "lora": changes["lora"]})
    assert (built.lora.rank, built.lora.scale, built.lora.targets) == (16, 2.0, "q_proj|v_proj")
    old = run.to_dict()
    del old["lora"]  # a run.json written before LoRA
    assert RunConfig.from_dict(old).lora == run.lora
    with pytest.raises(ValueError, match="lora.rank is 0"):
        RunConfig(lora=LoRAConfig(rank=0, targets="q_proj"))


def test_jaxstack_plan_shows_adapter_memory():
    run = RunConfig(lora=LoRAConfig(rank=4, targets="q_proj|v_proj"))
    plan = plan_run(run, 1)
    adapters = [e for e in plan.entries if e.path.endswith(("lora_a", "lora_b"))]
    assert {e.path.rsplit("/", 3)[-3] for e in adapters} == {"q", "v"}
    assert plan.grad_bytes == sum(e.bytes_per_device for e in adapters)
    (note,) = [line for line in plan_notes(run, plan) if line.startswith("LoRA rank 4")]
    assert "adapters only; full fine-tuning" in note
