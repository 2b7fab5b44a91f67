"""Automatic sharding in the pipeline: every mesh trains like one device, really sharded."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from lm_setup import rules_trainer, sgd_trainer

from jaxstack.data import ByteTokenizer, PackedDataset, lm_collate
from jaxstack.mesh import make_mesh
from jaxstack.models import preset
from sharding_rules.paths import leaves_with_paths

CONFIG = preset(
    "tiny", vocab_size=264, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=8,
    intermediate_size=128,
)  # fmt: skip
MESHES = [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2), (1, 2, 4), (4, 1, 2)]
FULL_REMAT = "Involuntary full rematerialization"


@pytest.fixture(scope="module")
def batch():
    data = PackedDataset.from_texts(["sharded training on eight devices. " * 20] * 8,
                                    ByteTokenizer(), seq_len=32)  # fmt: skip
    return lm_collate([data[i] for i in range(8)])


def _trainer(tmp_path, mesh, config=CONFIG, **options):
    return rules_trainer(tmp_path, mesh, config, **options)


def _sgd_trainer(tmp_path, mesh, config=CONFIG):
    return sgd_trainer(tmp_path, mesh, config)


@pytest.fixture(scope="module")
def single_device_step(tmp_path_factory, batch):
    trainer = _sgd_trainer(tmp_path_factory.mktemp("one"), make_mesh(devices=jax.devices()[:1]))
    metrics = trainer.train_step(batch)
    return float(metrics["loss"]), jax.device_get(trainer.params)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_mesh_step_equals_single_device(tmp_path, batch, single_device_step, shape, capfd):
    data, fsdp, tensor = shape
    mesh = make_mesh(data=data, fsdp=fsdp, tensor=tensor)
    trainer = _sgd_trainer(tmp_path, mesh)
    plan = trainer.plan(batch)
    metrics = trainer.train_step(batch)
    # XLA (C++ log, stderr) warns when a layout forces a whole tensor onto every device
    assert FULL_REMAT not in capfd.readouterr().err
    loss, params = single_device_step
    np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(trainer.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(np.asarray(a), b, atol=2e-6)

    # every parameter's local shard has the shape and bytes the plan promised
    entries = {entry.path: entry for entry in plan.entries}
    flat = jax.tree_util.tree_flatten_with_path(trainer.params)[0]
    assert len(flat) == len(entries)
    sharded = 0
    for path, array in flat:
        entry = entries["/".join(str(getattr(k, "key", k)) for k in path)]
        expected = tuple(
            dim // math.prod(mesh.shape[a] for a in _axes(part))
            for dim, part in zip(entry.shape, _padded(entry.spec, len(entry.shape)), strict=True)
        )
        assert array.addressable_shards[0].data.shape == expected, entry.path
        assert array.addressable_shards[0].data.nbytes == entry.bytes_per_device
        sharded += expected != entry.shape
    if fsdp * tensor > 1:
        assert sharded > len(flat) // 2  # most parameters really are split
    else:
        assert sharded == 0  # pure data parallelism replicates


def _padded(spec, ndim):
    return tuple(spec) + (None,) * (ndim - len(spec))


def _axes(part):
    return () if part is None else (part,) if isinstance(part, str) else tuple(part)


def test_megatron_layout_in_the_pipeline(tmp_path, batch):
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    trainer = _sgd_trainer(tmp_path, mesh, CONFIG.replace(scan_layers=True))
    trainer.init(batch)
    block = trainer.params["layers"]["block"]
    spec = lambda x: tuple(x.sharding.spec)  # noqa: E731
    assert spec(block["attn"]["q"]["kernel"])[2] == "tensor"  # heads, after the layer axis
    assert spec(block["attn"]["o"]["kernel"])[1] == "tensor"
    assert spec(block["mlp"]["up"]["kernel"])[2] == "tensor"
    assert spec(block["mlp"]["down"]["kernel"])[1] == "tensor"
    assert spec(block["attn"]["q"]["kernel"])[0] is None  # never the layer axis
    assert "tensor" in spec(trainer.params["lm_head"]["kernel"])


def test_full_remat_warning_is_seen_when_the_layout_is_wrong(capfd):
    """The check above can see XLA's warning: the embedding lookup the Llama had, a table
    split over fsdp on its width read into activations split over (data, fsdp), raises it."""
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = lambda shape, dtype, *spec: jax.ShapeDtypeStruct(  # noqa: E731
        shape, dtype, sharding=NamedSharding(mesh, P(*spec))
    )
    table = sharded((CONFIG.vocab_size, CONFIG.hidden_size), jnp.float32, "tensor", "fsdp")
    ids = sharded((8, 32), jnp.int32, ("data", "fsdp"))

    def loss(table, ids):
        x = jax.lax.with_sharding_constraint(jnp.take(table, ids, axis=0), P(("data", "fsdp")))
        return (x * x).sum()

    with jax.set_mesh(mesh):
        jax.jit(jax.grad(loss)).lower(table, ids).compile()
    assert FULL_REMAT in capfd.readouterr().err


def test_default_rules_follow_loss_fn(tmp_path, batch):
    """Without param_specs_fn the Trainer traces loss_fn: still tensor-parallel, and the
    fused cross-entropy reduces the head's output over vocab, so the head is too."""
    trainer = _trainer(tmp_path, make_mesh(data=4, tensor=2), forward_rules=False)
    trainer.init(batch)
    assert tuple(trainer.params["lm_head"]["kernel"].sharding.spec) == (None, "tensor")
    layer = trainer.params["layers_0"]
    assert tuple(layer["attn"]["q"]["kernel"].sharding.spec)[1] == "tensor"
    assert tuple(layer["mlp"]["down"]["kernel"].sharding.spec)[0] == "tensor"
    # the Adam moments of q, wherever the optimizer nests them, follow q's spec
    paths, leaves, _ = leaves_with_paths(trainer.state.opt_state)
    q_path = "layers_0/attn/q/kernel"
    moments = [x for p, x in zip(paths, leaves, strict=True) if p.endswith(q_path)]
    assert len(moments) == 2
    for moment in moments:
        assert moment.sharding.spec == layer["attn"]["q"]["kernel"].sharding.spec


def test_mesh_that_does_not_divide_heads_is_a_clear_error(tmp_path, batch):
    config = CONFIG.replace(num_heads=4, num_kv_heads=4, head_dim=16)
    trainer = _trainer(tmp_path, make_mesh(data=1, tensor=8), config)
    with pytest.raises(ValueError, match="tensor"):
        trainer.init(batch)
