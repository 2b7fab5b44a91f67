"""The model gives the same loss, gradients and tokens with Pallas kernels as with XLA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxstack.data import ByteTokenizer, PackedDataset, lm_collate
from jaxstack.generate import generate
from jaxstack.lm import lm_functions
from jaxstack.mesh import make_mesh
from jaxstack.models import Llama, preset

CONFIG = preset("tiny", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
                intermediate_size=128, sliding_window=12)  # fmt: skip


@pytest.fixture(scope="module")
def setup():
    docs = ["short doc. ", "a somewhat longer document here. ", "third! " * 3] * 6
    data = PackedDataset.from_texts(docs, ByteTokenizer(), seq_len=32)
    batch = {k: jnp.asarray(v) for k, v in lm_collate([data[i] for i in range(4)]).items()}
    assert len(np.unique(batch["segment_ids"][0])) > 1  # packed: segments matter
    params = Llama(CONFIG).init(jax.random.PRNGKey(0), batch["input_ids"])["params"]
    return batch, params


def _loss_and_grads(implementation, params, batch):
    loss_fn, _ = lm_functions(Llama(CONFIG.replace(attention_impl=implementation)))
    grad_fn = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, None)[0]))
    return grad_fn(params)


@pytest.mark.parametrize("mesh_axes", [None, {"data": 2, "tensor": 2, "fsdp": 2}])
def test_pallas_and_xla_give_same_loss_and_gradients(setup, mesh_axes):
    batch, params = setup
    reference = _loss_and_grads("xla", params, batch)
    if mesh_axes is None:
        pallas = _loss_and_grads("pallas", params, batch)
    else:  # the kernels run per shard under shard_map
        with jax.set_mesh(make_mesh(**mesh_axes)):
            pallas = _loss_and_grads("pallas", params, batch)
    np.testing.assert_allclose(pallas[0], reference[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(pallas[1]), jax.tree.leaves(reference[1]), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_pallas_decode_generates_the_same_tokens(setup):
    _, params = setup
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], [42, 43]]
    out = {
        impl: generate(
            Llama(CONFIG.replace(attention_impl=impl)), params, prompts, max_new_tokens=6
        )  # fmt: skip
        for impl in ("xla", "pallas")
    }
    assert out["pallas"] == out["xla"]
