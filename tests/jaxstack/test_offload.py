"""Host offload: optimizer state in ``pinned_host`` between steps, activations by remat name."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from lm_setup import MODEL, lm_trainer, packed_dataset

from jaxstack.data import lm_collate
from jaxstack.mesh import make_mesh
from jaxstack.models import Llama
from jaxstack.optim import HOST, host_argument_bytes, in_memory


@pytest.fixture(scope="module")
def batch():
    data = packed_dataset()
    return lm_collate([data[i] for i in range(16)])


def test_offloaded_optimizer_trains_the_same_from_host_memory(tmp_path, batch):
    """Same losses; the moments live in pinned_host; the compiled step's device-resident
    arguments shrink by the moments' bytes (CPU's memory analysis counts host arguments with
    the device ones, so ``host_argument_bytes`` reads the host part from the entry layout)."""
    mesh = make_mesh(data=8)
    losses, device_bytes = {}, {}
    for offload in (False, True):
        trainer = lm_trainer(tmp_path / str(offload), mesh=mesh, optimizer_offload=offload)
        losses[offload] = [float(trainer.train_step(batch)["loss"]) for _ in range(2)]
        compiled = trainer.compiled_train_step(batch)
        host = host_argument_bytes(compiled)
        device_bytes[offload] = compiled.memory_analysis().argument_size_in_bytes - host
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-6)
    opt_state = jax.tree.leaves(trainer.state.opt_state)
    assert {x.sharding.memory_kind for x in opt_state} == {HOST}
    assert {x.sharding.memory_kind for x in jax.tree.leaves(trainer.params)} == {"device"}
    moments = sum(x.addressable_shards[0].data.nbytes for x in opt_state)  # per device
    assert host == moments
    assert device_bytes[False] - device_bytes[True] >= moments


def test_in_memory_moves_between_kinds():
    mesh = make_mesh(data=8)
    sharding = NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    x = jax.device_put(jnp.arange(16.0), sharding)
    on_host = in_memory(x, sharding, HOST)
    assert on_host.sharding.memory_kind == HOST
    np.testing.assert_array_equal(in_memory(on_host, sharding, "device"), x)


IDS = jnp.asarray(np.arange(64).reshape(2, 32) % 200)


def _grad_fn(model: Llama):
    return jax.grad(lambda p: model.apply({"params": p}, IDS).mean())


@pytest.fixture(scope="module")
def no_remat():
    params = jax.jit(MODEL.init)(jax.random.PRNGKey(0), IDS)["params"]
    return params, jax.jit(_grad_fn(MODEL))(params)


@pytest.mark.parametrize(
    "remat, offloaded",
    [("block_input=offload,attention_out=save", True), ("block_input=save", False)],
)
def test_remat_by_name_gives_the_same_gradients(no_remat, remat, offloaded):
    params, want = no_remat
    grad_fn = _grad_fn(Llama(MODEL.config.replace(remat=remat)))
    for a, b in zip(jax.tree.leaves(jax.jit(grad_fn)(params)), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # an offloaded residual is typed as living in host memory in the differentiated program
    assert ("<host>" in str(jax.make_jaxpr(grad_fn)(params))) == offloaded


def test_bad_remat_names_the_choices():
    with pytest.raises(ValueError, match="block_input=offload") as error:
        MODEL.config.replace(remat="attn=offload")
    assert "\n" not in str(error.value)
