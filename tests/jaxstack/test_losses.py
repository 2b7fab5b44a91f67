"""Fused chunked cross-entropy: values and gradients against optax on full logits, on one
device and on a vocab-parallel (data=2, tensor=4) mesh; the LM functions; memory saved."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxstack.lm import lm_functions
from jaxstack.losses import chunk_layout, fused_cross_entropy
from jaxstack.mesh import make_mesh
from jaxstack.models import Llama, preset

B, S, D, V = 4, 37, 16, 48  # 37 positions: chunks of 8 leave a padded last chunk
CHUNK = 8
FIELDS = ("input_ids", "targets", "segment_ids", "positions", "loss_mask")


@pytest.fixture(scope="module")
def case():
    """hidden [B, S, D], head [D, V], targets and masks that differ per row (one row empty);
    masked targets are out of range, which the loss must ignore."""
    k = jax.random.split(jax.random.key(0), 4)
    hidden = jax.random.normal(k[0], (B, S, D))
    head = jax.random.normal(k[1], (D, V)) * 0.3
    lengths = np.array([S, 20, 3, 0])[:, None]
    mask = np.arange(S)[None, :] < lengths
    mask[0, ::5] = False
    targets = np.asarray(jax.random.randint(k[2], (B, S), 0, V))
    targets = np.where(mask, targets, V + 7)
    # a top prediction where it is the target, so accuracy is not trivially 0
    targets[0, 1] = int(jnp.argmax(hidden[0, 1] @ head))
    return hidden, head, jnp.asarray(targets), jnp.asarray(mask)


def reference(hidden, head, targets, mask, soft_cap=None, z_loss=0.0):
    """Full float32 logits and optax: (loss_sum, num_tokens, num_correct, token_loss)."""
    logits = jnp.einsum("...d,dv->...v", hidden, head, preferred_element_type=jnp.float32)
    if soft_cap is not None:
        logits = soft_cap * jnp.tanh(logits / soft_cap)
    safe = jnp.where(mask, targets, 0)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, safe)
    losses = losses + z_loss * jax.nn.logsumexp(logits, -1) ** 2
    weight = mask.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, safe[..., None], -1)[..., 0]
    correct = (target_logit >= logits.max(-1)) * weight
    return (losses * weight).sum(), weight.sum(), correct.sum(), losses * weight


def _mean_loss(fn, **options):
    def mean(hidden, head, targets, mask):
        out = fn(hidden, head, targets, mask, **options)
        return out[0] / out[1], out

    return jax.value_and_grad(mean, argnums=(0, 1), has_aux=True)


def _check(got, want, rtol):
    (_, out), grads = got
    (_, ref), ref_grads = want
    np.testing.assert_allclose(out[1], ref[1])  # token counts are exact
    np.testing.assert_allclose(out[2], ref[2])
    np.testing.assert_allclose(out[0], ref[0], rtol=rtol)
    np.testing.assert_allclose(out[3], ref[3], rtol=rtol, atol=rtol)
    for g, r in zip(grads, ref_grads, strict=True):
        scale = float(jnp.abs(r).max())
        assert scale > 0
        np.testing.assert_allclose(np.asarray(g, np.float32), r, atol=rtol * scale)


@pytest.mark.parametrize("flat", [False, True], ids=["b_s_d", "t_d"])
def test_matches_optax_values_and_gradients(case, flat):
    hidden, head, targets, mask = case
    if flat:  # one row of B*S tokens, chunks of 8 tokens
        hidden, targets, mask = hidden.reshape(B * S, D), targets.reshape(-1), mask.reshape(-1)
    got = jax.jit(_mean_loss(fused_cross_entropy, chunk_size=CHUNK))(hidden, head, targets, mask)
    _check(got, _mean_loss(reference)(hidden, head, targets, mask), rtol=1e-5)
    out = got[0][1]
    assert out.token_loss.shape == targets.shape and float(out.num_correct) >= 1


def test_soft_cap_and_z_loss(case):
    options = {"soft_cap": 2.0, "z_loss": 1e-2}
    fused = _mean_loss(
        fused_cross_entropy, chunk_size=CHUNK, logit_soft_cap=2.0, z_loss=options["z_loss"]
    )
    _check(jax.jit(fused)(*case), _mean_loss(reference, **options)(*case), rtol=1e-5)


def test_bfloat16_hidden_accumulates_in_float32(case):
    hidden, head, targets, mask = case
    h16 = hidden.astype(jnp.bfloat16)
    got = jax.jit(_mean_loss(fused_cross_entropy, chunk_size=CHUNK))(h16, head, targets, mask)
    assert got[1][0].dtype == jnp.bfloat16 and got[1][1].dtype == jnp.float32
    # the same bf16-rounded inputs with float32 arithmetic throughout: agree to bf16 precision
    rounded = (h16.astype(jnp.float32), head.astype(jnp.bfloat16).astype(jnp.float32))
    _check(got, _mean_loss(reference)(*rounded, targets, mask), rtol=2e-2)


def _loop_all_reduces(hlo: str) -> list[str]:
    """The all-reduce instructions inside while-loop bodies of compiled HLO text."""
    bodies = set(re.findall(r"body=(%[\w.\-]+)", hlo))
    found, inside = [], False
    for line in hlo.splitlines():
        if line and not line.startswith(" "):
            inside = line.split(" ")[0] in bodies
        elif inside and " all-reduce(" in line:
            found.append(line)
    return found


def test_vocab_parallel_mesh_matches_one_device(case):
    """Head P(None, "tensor"), batch over data: plain jnp inside, GSPMD inserts the
    all-reduces; values and gradients equal the unsharded optax reference, and the head
    gradient is all-reduced over the batch once, not once per chunk."""
    mesh = make_mesh(data=2, tensor=4)
    put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))  # noqa: E731
    hidden, head, targets, mask = case
    args = (put(hidden, "data"), put(head, None, "tensor"), put(targets, "data"), put(mask, "data"))
    step = jax.jit(_mean_loss(fused_cross_entropy, chunk_size=CHUNK))
    with jax.set_mesh(mesh):
        got = step(*args)
        hlo = step.lower(*args).compile().as_text()
    _check(got, _mean_loss(reference)(*case), rtol=1e-5)
    assert got[1][1].sharding.is_equivalent_to(args[1].sharding, 2)
    in_loops = _loop_all_reduces(hlo)
    assert in_loops  # the per-chunk logsumexp / target all-reduces over tensor
    assert not [line for line in in_loops if f"{D},{V // 4}]" in line], in_loops  # [d, v/t]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"chunk_size": 0}, "chunk_size=0"),
        ({"head_kernel": jnp.zeros((V, D))}, "head_kernel"),
        ({"targets": jnp.zeros((B, S + 1), jnp.int32)}, "targets"),
        ({"targets": jnp.zeros((B, S))}, "integer"),
        ({"mask": jnp.ones((B,))}, "mask"),
        ({"logit_soft_cap": 0.0}, "logit_soft_cap"),
        ({"z_loss": -1.0}, "z_loss"),
    ],
)
def test_bad_arguments_name_the_fix(case, kwargs, match):
    hidden, head, targets, mask = case
    args = {"hidden": hidden, "head_kernel": head, "targets": targets, "mask": mask} | kwargs
    with pytest.raises(ValueError, match=match):
        fused_cross_entropy(**args)


def test_chunk_layout_evens_chunks():
    assert chunk_layout(512, 200) == (3, 171)
    assert chunk_layout(37, 8) == (5, 8)
    assert chunk_layout(5, 512) == (1, 5)
    with pytest.raises(ValueError, match="positive int"):
        lm_functions(Llama(preset("tiny")), chunk_size=-1)


# -- the LM functions ------------------------------------------------------------------------
def _batch(vocab, rows=3, seq=20):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, (rows, seq + 1))
    mask = np.arange(seq)[None, :] < np.array([[seq], [11], [4]])
    return {
        "input_ids": jnp.asarray(ids[:, :-1], jnp.int32),
        "targets": jnp.asarray(ids[:, 1:], jnp.int32),
        "segment_ids": jnp.ones((rows, seq), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (rows, seq)),
        "loss_mask": jnp.asarray(mask, jnp.int32),
    }


@pytest.mark.parametrize("tie", [False, True])
def test_lm_functions_match_full_logits(tie):
    model = Llama(preset("tiny", num_layers=1, tie_embeddings=tie))
    batch = _batch(model.config.vocab_size)
    params = jax.jit(model.init)(jax.random.key(1), batch["input_ids"])["params"]
    forward = jax.jit(lambda p: model.apply({"params": p}, batch["input_ids"]))
    # every other target is the model's top prediction: accuracies well inside (0, 1)
    top = jnp.argmax(forward(params), -1).astype(jnp.int32)
    batch["targets"] = batch["targets"].at[:, ::2].set(top[:, ::2])
    loss_fn, pred_fn = lm_functions(model, chunk_size=6)

    def plain(p):
        logits = forward(p)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        target_logit = jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
        mask = batch["loss_mask"].astype(jnp.float32)
        correct = (target_logit >= logits.max(-1)) * mask
        rows = {"loss": (losses * mask).sum(-1), "accuracy": correct.sum(-1)}
        rows = {k: v / mask.sum(-1) for k, v in rows.items()}
        return (losses * mask).sum() / mask.sum(), (rows, correct.sum() / mask.sum())

    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (loss, metrics), grads = grad_fn(params, batch, None)
    (want, (want_rows, want_acc)), want_grads = jax.jit(jax.value_and_grad(plain, has_aux=True))(
        params
    )
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert float(metrics["num_tokens"]) == 20 + 11 + 4
    assert 0.3 < float(metrics["accuracy"]) < 1
    np.testing.assert_allclose(metrics["accuracy"], want_acc)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5 * float(jnp.abs(w).max()))
    rows = jax.jit(pred_fn)(params, batch, None)
    np.testing.assert_allclose(rows["loss"], want_rows["loss"], rtol=1e-5)
    np.testing.assert_allclose(rows["accuracy"], want_rows["accuracy"])


def test_fused_train_step_needs_less_than_half_the_memory():
    """Compiled value_and_grad of the loss, vocab 32000: the chunked loss never holds the
    [2048, 32000] float32 logits (250 MiB) or their gradient."""
    config = preset(
        "tiny", vocab_size=32000, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=4,
        intermediate_size=512,
    )  # fmt: skip
    model = Llama(config)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    batch = {name: jax.ShapeDtypeStruct((4, 512), jnp.int32) for name in FIELDS}
    fused, _ = lm_functions(model, chunk_size=64)

    def plain(p, b, rng):
        logits = model.apply({"params": p}, b["input_ids"], positions=b["positions"])
        mask = b["loss_mask"].astype(jnp.float32)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, b["targets"])
        return (losses * mask).sum() / mask.sum(), {}

    def temp_bytes(loss_fn):
        step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
        compiled = step.lower(params["params"], batch, None).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    fused_bytes, plain_bytes = temp_bytes(fused), temp_bytes(plain)
    print(
        f"train step temp: fused {fused_bytes / 2**20:.0f} MiB, plain {plain_bytes / 2**20:.0f} MiB"
    )
    assert fused_bytes < plain_bytes / 2
