"""Host offload: optimizer state in ``pinned_host`` between steps, activations by remat name."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from lm_setup import MODEL, lm_trainer, packed_dataset

from jaxstack.data import lm_collate
from jaxstack.lm import lm_functions, lm_param_specs
from jaxstack.mesh import batch_sharding, make_mesh
from jaxstack.models import Llama
from jaxstack.optim import HOST, in_memory
from jaxstack.step import TrainState, make_train_step
from sharding_rules import optimizer_state_specs


@pytest.fixture(scope="module")
def batch():
    data = packed_dataset()
    return lm_collate([data[i] for i in range(16)])


def test_offloaded_optimizer_trains_the_same_and_lives_on_the_host(tmp_path, batch):
    mesh = make_mesh(data=8)
    losses = {}
    for offload in (False, True):
        trainer = lm_trainer(tmp_path / str(offload), mesh=mesh, optimizer_offload=offload)
        losses[offload] = [float(trainer.train_step(batch)["loss"]) for _ in range(2)]
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-6)
    kinds = {x.sharding.memory_kind for x in jax.tree.leaves(trainer.state.opt_state)}
    assert kinds == {HOST}
    assert {x.sharding.memory_kind for x in jax.tree.leaves(trainer.params)} == {"device"}


def _entry_host_bytes(hlo: str) -> int:
    """Bytes of the compiled entry computation's parameters laid out in host memory (S(5))."""
    layout = re.search(r"entry_computation_layout=\{\((.*?)\)->", hlo).group(1)
    total = 0
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]\{[^}]*S\(5\)", layout):
        itemsize = 1 if dtype == "pred" else int(re.sub(r"\D", "", dtype)) // 8  # f32, s32, bf16
        total += itemsize * int(np.prod([int(d) for d in dims.split(",") if d]))
    return total


def test_offloaded_optimizer_leaves_device_memory(batch):
    """The compiled step reads Adam's moments from host memory: its device-resident arguments
    shrink by exactly the moments' bytes (CPU's memory analysis counts host arguments with
    the device ones, so the host part is read from the entry layout)."""
    mesh = make_mesh(data=8)
    params = jax.eval_shape(lambda: MODEL.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), int)))
    params = params["params"]
    specs = lm_param_specs(MODEL, 32)(params, mesh)
    optimizer = optax.adamw(1e-3)
    opt_state = jax.eval_shape(optimizer.init, params)
    named = lambda tree: jax.tree.map(lambda s: NamedSharding(mesh, s), tree)  # noqa: E731
    opt_shardings = named(optimizer_state_specs(opt_state, params, specs))
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch_shardings = {k: batch_sharding(mesh, v.ndim) for k, v in batch.items()}
    moments = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_state))
    loss_fn, _ = lm_functions(MODEL)
    device_bytes = {}
    for offload in (False, True):
        state_opt = opt_shardings
        if offload:
            state_opt = jax.tree.map(lambda s: s.with_memory_kind(HOST), opt_shardings)
        shardings = TrainState(replicated, named(specs), state_opt, *[replicated] * 3)
        step = make_train_step(loss_fn, optimizer, grad_accum_steps=1, grad_clip=1.0,
                               compute_dtype=None,
                               offload_shardings=opt_shardings if offload else None)  # fmt: skip
        state = TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, opt_state,
                           jax.ShapeDtypeStruct((2,), jnp.uint32),
                           *[jax.ShapeDtypeStruct((), jnp.int32)] * 2)  # fmt: skip
        abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
        compiled = (
            jax.jit(
                step,
                in_shardings=(shardings, batch_shardings),
                out_shardings=(shardings, replicated),
            )  # fmt: skip
            .lower(state, abstract_batch)
            .compile()
        )
        arguments = compiled.memory_analysis().argument_size_in_bytes
        host = _entry_host_bytes(compiled.as_text())
        assert host == (moments if offload else 0)
        device_bytes[offload] = arguments - host
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
