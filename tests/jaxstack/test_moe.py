"""Mixture of experts: the layer against a per-token loop, capacity and dropping, routers and
their losses, the balancing bias, expert parallelism on 8 devices, counts, plan and CLI."""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from lm_setup import lm_trainer

from jaxstack.cli import main
from jaxstack.data import ByteTokenizer, PackedDataset, lm_collate
from jaxstack.layers.moe import (
    MOE_COLLECTION,
    ROUTER_BIAS,
    MoE,
    balance_probe,
    dispatch_experts,
    moe_summary,
    padded_ragged_all_to_all,
    route,
    route_router_bias,
)
from jaxstack.lm import lm_functions
from jaxstack.mesh import make_mesh
from jaxstack.models import LlamaConfig, Mixtral, MixtralConfig, model_for, preset
from jaxstack.models.mixtral import MoEBlock
from jaxstack.planning import activation_bytes, plan_run
from jaxstack.run import DataConfig, RunConfig
from jaxstack.trainer import TrainConfig

E, K, D, F = 4, 2, 8, 16
ROUTERS = {  # name -> MoE fields
    "mixtral": dict(),
    "qwen2": dict(normalize_weights=False, shared_intermediate_size=12, shared_gate=True),
    "deepseek": dict(
        score_fn="sigmoid", score_bias=True, routed_scaling_factor=2.5, shared_intermediate_size=12
    ),
}


def _layer(**fields) -> MoE:
    return MoE(E, K, F, aux_loss_weight=0.01, z_loss_weight=0.001, **fields)


def _init(layer: MoE, x: jax.Array) -> dict:
    """Random params of the layer's shapes (no compiled init: ``eval_shape`` only)."""
    shapes = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x)["params"]
    leaves, treedef = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
    params = treedef.unflatten(
        [0.4 * jax.random.normal(key, leaf.shape) for key, leaf in zip(keys, leaves, strict=True)]
    )
    if ROUTER_BIAS in params:  # a bias that changes which experts win
        params[ROUTER_BIAS] = jnp.array([0.3, -0.2, 0.1, -0.4])
    return params


def _swiglu(x, gate, up, down):
    return (jax.nn.silu(x @ gate) * (x @ up)) @ down


def _naive(layer: MoE, params: dict, x: jax.Array) -> jax.Array:
    """The layer written for one token, expert by expert (mapped over the tokens)."""
    tokens = x.reshape(-1, x.shape[-1])
    return jax.vmap(lambda token: _naive_token(layer, params, token))(tokens).reshape(x.shape)


def _naive_token(layer: MoE, params: dict, token: jax.Array) -> jax.Array:
    experts = params["experts"]
    logits = token @ params["router"]["kernel"]
    scores = jax.nn.softmax(logits) if layer.score_fn == "softmax" else jax.nn.sigmoid(logits)
    chosen = jnp.argsort(-(scores + params.get(ROUTER_BIAS, 0.0)))[:K]
    weights = scores[chosen]
    if layer.normalize_weights:
        weights = weights / weights.sum()
    y = 0.0
    for j in range(K):
        e = chosen[j]
        expert_out = _swiglu(token, experts["gate"][e], experts["up"][e], experts["down"][e])
        y = y + layer.routed_scaling_factor * weights[j] * expert_out
    if layer.shared_intermediate_size:
        shared = params["shared"]
        s = _swiglu(
            token, shared["gate"]["kernel"], shared["up"]["kernel"], shared["down"]["kernel"]
        )
        if layer.shared_gate:
            s = s * jax.nn.sigmoid(token @ params["shared_gate"]["kernel"])
        y = y + s
    return y


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_layer_equals_a_naive_loop_over_experts(router):
    layer = _layer(**ROUTERS[router])
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, D))
    params = _init(layer, x)
    cotangent = jax.random.normal(jax.random.PRNGKey(2), x.shape)

    def with_output(fn):  # (vdot(y, cotangent), y) and the gradients, in one compiled call
        y_of = lambda p, x: (jnp.vdot(fn(p, x), cotangent), fn(p, x))  # noqa: E731
        return jax.jit(jax.value_and_grad(y_of, argnums=(0, 1), has_aux=True))(params, x)

    (value, out), grads = with_output(lambda p, x: layer.apply({"params": p}, x))
    (want, want_out), want_grads = with_output(lambda p, x: _naive(layer, p, x))
    np.testing.assert_allclose(value, want, rtol=1e-5)
    np.testing.assert_allclose(out, want_out, atol=1e-5)
    flat, flat_want = jax.tree.leaves(grads), jax.tree.leaves(want_grads)
    assert len(flat) == len(flat_want)
    for path, got in jax.tree_util.tree_flatten_with_path(grads)[0]:
        if ROUTER_BIAS in jax.tree_util.keystr(path):
            continue  # its gradient is the balancing direction (test_bias_...), not d(output)
        expected = want_grads
        for key in path:
            expected = expected[key.key if hasattr(key, "key") else key.idx]
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_capacity_that_drops_nothing_equals_dropless():
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 6, D))
    params = _init(_layer(), x)
    run = lambda cf: jax.jit(_layer(capacity_factor=cf).apply)({"params": params}, x)  # noqa: E731
    np.testing.assert_allclose(run(E / K), run(None), atol=1e-6)  # capacity: the whole group


def test_a_dropped_token_passes_on_the_residual_alone():
    """Every token picks experts 0 and 1 (the bias decides); capacity 2 keeps tokens 0 and 1,
    so tokens 2.. leave the block exactly as a block whose MLP outputs nothing would."""
    config = MixtralConfig(
        vocab_size=16,
        hidden_size=D,
        num_layers=1,
        num_heads=2,
        num_kv_heads=2,
        num_experts=E,
        experts_per_token=K,
        expert_intermediate_size=F,
        router_score="sigmoid",
        router_bias_rate=1e-3,
        capacity_factor=0.5,
    )
    block = MoEBlock(config)
    x = jax.random.normal(jax.random.PRNGKey(4), (1, 6, D))
    positions = jnp.arange(6)[None]
    init = jax.jit(lambda rng: block.init(rng, x, positions, None, None, None)["params"])
    params = init(jax.random.PRNGKey(5))
    params["mlp"][ROUTER_BIAS] = jnp.array([10.0, 9.0, 0.0, 0.0])
    silent = jax.tree.map(lambda w: w, params)
    silent["mlp"]["experts"]["down"] = jnp.zeros_like(params["mlp"]["experts"]["down"])
    run = jax.jit(lambda p: block.apply({"params": p}, x, positions, None, None, None)[0])
    out, residual = run(params), run(silent)
    np.testing.assert_allclose(out[0, 2:], residual[0, 2:], atol=1e-6)
    assert np.abs(out[0, :2] - residual[0, :2]).min() > 1e-4


LOGITS = np.array([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 0.0], [1.0, 1.5, -2.0, 0.5]])


@pytest.mark.parametrize("score_fn", ["softmax", "sigmoid"])
def test_router_weights_and_losses_by_hand(score_fn):
    # top-2 per token: {0, 1}, {1, 2}, {1, 0} -> assignments per expert 2, 3, 1, 0 of 6
    routing = route(jnp.asarray(LOGITS), 2, score_fn=score_fn)
    if score_fn == "softmax":
        scores = np.exp(LOGITS) / np.exp(LOGITS).sum(1, keepdims=True)
        probs = scores
    else:
        scores = 1 / (1 + np.exp(-LOGITS))
        probs = scores / scores.sum(1, keepdims=True)
    np.testing.assert_array_equal(routing.experts, [[0, 1], [1, 2], [1, 0]])
    picked = np.take_along_axis(scores, np.array([[0, 1], [1, 2], [1, 0]]), 1)
    np.testing.assert_allclose(routing.weights, picked / picked.sum(1, keepdims=True), rtol=1e-6)
    raw = route(jnp.asarray(LOGITS), 2, score_fn=score_fn, normalize=False, scale=2.0)
    np.testing.assert_allclose(raw.weights, 2.0 * picked, rtol=1e-6)
    load = np.array([2, 3, 1, 0]) / 6
    np.testing.assert_allclose(routing.load, load, rtol=1e-6)
    np.testing.assert_allclose(routing.aux_loss, 4 * np.sum(load * probs.mean(0)), rtol=1e-6)
    lse = np.log(np.exp(LOGITS).sum(1))
    np.testing.assert_allclose(routing.z_loss, np.mean(lse**2), rtol=1e-6)
    # perfectly balanced routing has aux loss 1
    flat = route(jnp.zeros((4, 4)).at[jnp.arange(4), jnp.arange(4)].set(1.0), 1)
    np.testing.assert_allclose(flat.aux_loss, 1.0, rtol=1e-6)


def test_balancing_bias_moves_toward_balance_and_adam_never_sees_it():
    """Tokens that all prefer expert 0: the probe's gradient is load - 1/E (times the scale),
    the routed optimizer moves the bias by -rate * sign of it, and after some updates no
    expert has even 1.5x the mean load; Adam updates the router, never the bias."""
    logits = jax.random.normal(jax.random.PRNGKey(6), (64, E)) + jnp.array([2.0, 1.0, 0.0, 0.0])
    params = {"router": {"kernel": jnp.ones((2, E))}, ROUTER_BIAS: jnp.zeros(E)}
    rate = 0.05
    optimizer = route_router_bias(optax.adam(0.1), rate)
    state = optimizer.init(params)
    adam_state = state.inner_states["rest"].inner_state[0]
    assert isinstance(adam_state.mu[ROUTER_BIAS], optax.MaskedNode)

    def loss(params):
        routing = route(logits, 1, score_fn="sigmoid", bias=params[ROUTER_BIAS])
        return jnp.sum(params["router"]["kernel"] ** 2) + balance_probe(
            params[ROUTER_BIAS], routing.load
        ), routing.load

    (value, start), grads = jax.value_and_grad(loss, has_aux=True)(params)
    assert float(value) == 2 * E  # the probe adds nothing to the loss
    np.testing.assert_allclose(grads[ROUTER_BIAS], 1e-6 * (start - 1 / E), rtol=1e-5)
    updates, state = optimizer.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(params[ROUTER_BIAS], -rate * np.sign(start - 1 / E), atol=1e-7)

    @jax.jit
    def step(params, state):
        (_, load), grads = jax.value_and_grad(loss, has_aux=True)(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, load

    for _ in range(40):
        params, state, load = step(params, state)
    assert float(start.max()) * E > 2.0
    assert float(load.max()) * E < 1.5
    assert np.all(np.asarray(params["router"]["kernel"]) < 1.0)  # Adam moved the router


def test_padded_exchange_has_ragged_all_to_all_semantics():
    """The CPU stand-in for lax.ragged_all_to_all against its documented pseudocode."""
    ranks, per_rank, rows = 4, 2, 20
    mesh = make_mesh(data=2, expert=ranks)
    rng = np.random.default_rng(0)
    operand = rng.normal(size=(ranks, rows, 3)).astype(np.float32)
    send = rng.integers(0, 3, size=(ranks, ranks * per_rank)).astype(np.int32)
    in_off = (np.cumsum(send, 1) - send).astype(np.int32)  # slices in order, no gaps
    # receiver j writes the slices from each sender in rank order, with a gap of one row
    recv_of = lambda j: send[:, j * per_rank : (j + 1) * per_rank]  # noqa: E731  [sender, slice]
    out_off = np.zeros_like(send)
    for j in range(ranks):
        offsets = np.cumsum(recv_of(j).reshape(-1) + 1) - recv_of(j).reshape(-1)
        out_off[:, j * per_rank : (j + 1) * per_rank] = offsets.reshape(ranks, per_rank)
    recv = np.stack([recv_of(j).reshape(-1) for j in range(ranks)])
    want = np.full((ranks, 2 * rows, 3), -1.0, np.float32)
    for src in range(ranks):
        for n in range(ranks * per_rank):
            dst, size = n // per_rank, send[src, n]
            chunk = operand[src, in_off[src, n] : in_off[src, n] + size]
            want[dst, out_off[src, n] : out_off[src, n] + size] = chunk

    def local(op, out, a, b, c, d):
        got = padded_ragged_all_to_all(
            op[0], out[0], a[0], b[0], c[0], d[0], axis_name="expert", max_send=rows
        )
        return got[None]

    specs = (P("expert"),) * 6
    with jax.set_mesh(mesh):
        got = jax.jit(jax.shard_map(local, in_specs=specs, out_specs=P("expert")))(
            operand, want * 0 - 1, in_off, send, out_off, recv
        )
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("batch", [8, 2], ids=["split", "replicated"])
def test_expert_parallel_exchange_equals_one_device(batch):
    """Tokens split over the 8 expert ranks (5 each) or, a batch of 2 that does not split,
    replicated on every rank; values and gradients, and the exchange really is an
    all-to-all (the model's steps on four meshes are below)."""
    x = jax.random.normal(jax.random.PRNGKey(7), (batch, 5, D))
    routing = route(jax.random.normal(jax.random.PRNGKey(8), (batch, 5, 8)) * 2, K)
    keys = jax.random.split(jax.random.PRNGKey(9), 3)
    weights = [
        0.3 * jax.random.normal(key, shape)
        for key, shape in zip(keys, [(8, D, F), (8, D, F), (8, F, D)], strict=True)
    ]
    cotangent = jax.random.normal(jax.random.PRNGKey(10), x.shape)

    def loss(x, route_weights, experts):
        y = dispatch_experts(x, routing.experts, route_weights, *experts)
        return jnp.vdot(y, cotangent)

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2))
    want = grad(x, routing.weights, weights)
    with jax.set_mesh(make_mesh(data=1, expert=8)):
        step = jax.jit(grad).lower(x, routing.weights, weights).compile()
        assert "all-to-all" in step.as_text()
        got = step(x, routing.weights, weights)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_ragged_exchange_lowers_to_ragged_all_to_all():
    """XLA:CPU cannot run lax.ragged_all_to_all, but the ragged exchange (GPU, TPU) must
    lower with the same offsets the padded one runs with, both ways."""
    x = jnp.zeros((8, 5, D))
    routing = route(jax.random.normal(jax.random.PRNGKey(8), (8, 5, 8)), K)
    weights = [jnp.zeros((8, D, F)), jnp.zeros((8, D, F)), jnp.zeros((8, F, D))]
    run = functools.partial(dispatch_experts, exchange="ragged")
    with jax.set_mesh(make_mesh(data=1, expert=8)):
        text = jax.jit(run).lower(x, routing.experts, routing.weights, *weights).as_text()
    assert text.count("ragged_all_to_all") >= 2
    with pytest.raises(ValueError, match="exchange='sideways'; choose one of"):
        dispatch_experts(x, routing.experts, routing.weights, *weights, exchange="sideways")


# -- the model ---------------------------------------------------------------------------------
MOE = preset(
    "tiny-moe",
    vocab_size=264,
    hidden_size=64,
    num_layers=1,
    num_heads=8,
    num_kv_heads=8,
    intermediate_size=96,
    expert_intermediate_size=32,
    shared_intermediate_size=32,
    shared_expert_gate=True,
    router_bias_rate=1e-3,
    router_aux_loss_weight=0.1,
    router_z_loss_weight=0.01,
)


def test_param_counts_active_params_and_flops():
    mixtral, qwen3 = preset("mixtral-8x7b"), preset("qwen3-30b-a3b")
    assert mixtral.num_params() == 46_702_792_704  # Mixtral-8x7B's published count
    assert mixtral.num_params(active=True) == 12_879_925_248  # "12.9B active"
    assert qwen3.num_params() == 30_532_122_624  # Qwen3-30B-A3B: 30.5B
    assert qwen3.num_params(active=True) == 3_353_032_704  # "3.3B activated"
    config = MOE.replace(num_layers=3, first_dense_layers=1, shared_intermediate_size=16)
    init = lambda rng: Mixtral(config).init(rng, jnp.zeros((1, 4), jnp.int32))["params"]  # noqa: E731
    params = jax.eval_shape(init, jax.random.PRNGKey(0))
    assert sum(x.size for x in jax.tree.leaves(params)) == config.num_params()
    assert "experts" not in params["layers_0"]["mlp"] and "experts" in params["layers_1"]["mlp"]
    # FLOPs: a dense model whose MLP is the k routed experts plus the shared one, + the router
    f = config.experts_per_token * config.expert_intermediate_size + config.shared_intermediate_size
    fields = {name: getattr(config, name) for name in LlamaConfig.__dataclass_fields__}
    all_dense = LlamaConfig(**{**fields, "intermediate_size": f})
    dense_layer = 3 * config.hidden_size * (config.intermediate_size - f)
    router = config.hidden_size * (config.num_experts + 1)  # and the shared expert's gate
    want = all_dense.flops_per_token(64) + 6 * (dense_layer + 2 * router)
    assert config.flops_per_token(64) == want


def test_scanned_layers_equal_the_loop_and_report_per_layer_load():
    config = MOE.replace(num_layers=2)
    looped = Mixtral(config)
    ids = jnp.arange(20).reshape(2, 10) % 200
    params = jax.jit(looped.init)(jax.random.PRNGKey(0), ids)["params"]
    stacked = {k: v for k, v in params.items() if not k.startswith("layers_")}
    layers = [params[f"layers_{i}"] for i in range(config.num_layers)]
    stacked["layers"] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}
    scanned = Mixtral(config.replace(scan_layers=True, remat="full"))
    run = lambda model, p: model.apply({"params": p}, ids, mutable=[MOE_COLLECTION])  # noqa: E731
    a, sown_a = jax.jit(functools.partial(run, looped))(params)
    b, sown_b = jax.jit(functools.partial(run, scanned))(stacked)
    np.testing.assert_allclose(a, b, atol=1e-5)
    summary_a, summary_b = moe_summary(sown_a[MOE_COLLECTION]), moe_summary(sown_b[MOE_COLLECTION])
    assert summary_a.load.shape == (config.num_layers, config.num_experts)
    for x, y in zip(summary_a, summary_b, strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)
    with pytest.raises(ValueError, match="every layer must be MoE"):
        config.replace(scan_layers=True, first_dense_layers=1)


@pytest.fixture(scope="module")
def batch():
    data = PackedDataset.from_texts(
        ["experts on eight devices, each its own. " * 20] * 8, ByteTokenizer(), seq_len=32
    )
    return lm_collate([data[i] for i in range(8)])


def test_lm_loss_adds_the_weighted_router_losses(batch):
    model = Mixtral(MOE)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    loss, metrics = jax.jit(lm_functions(model)[0])(params, batch, None)
    unweighted = Mixtral(MOE.replace(router_aux_loss_weight=0.0, router_z_loss_weight=0.0))
    plain, _ = jax.jit(lm_functions(unweighted)[0])(params, batch, None)
    np.testing.assert_allclose(
        loss - plain, 0.1 * metrics["aux_loss"] + 0.01 * metrics["z_loss"], rtol=1e-4
    )
    assert metrics["expert_load"].shape == (MOE.num_experts,)
    np.testing.assert_allclose(metrics["expert_load"].sum(), 1.0, rtol=1e-6)
    assert metrics["expert_load_max"] >= 1.0


def test_the_trainer_moves_the_balancing_biases_by_their_sign_update_only(tmp_path, batch):
    """Through the Python API: the default AdamW never touches ``score_bias``; without the
    rate it is refused, naming the fix."""
    one_device = make_mesh(devices=jax.devices()[:1])
    with pytest.raises(ValueError, match=r"pass Trainer\(router_bias_rate=model.config"):
        lm_trainer(tmp_path, model=Mixtral(MOE), mesh=one_device).init(batch)
    rate = MOE.router_bias_rate
    trainer = lm_trainer(tmp_path, model=Mixtral(MOE), mesh=one_device, router_bias_rate=rate,
                         weight_decay=0.1, warmup_steps=0)  # fmt: skip
    trainer.train_step(batch)  # from zero: -rate * sign(load - 1/E), no Adam, no decay
    biases = [
        np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(trainer.params))
        if path[-1].key == ROUTER_BIAS
    ]
    assert biases and all(set(np.abs(b).tolist()) <= {0.0, np.float32(rate)} for b in biases)
    assert any((np.abs(b) == np.float32(rate)).any() for b in biases)


def _sgd_trainer(tmp_path, mesh):
    # params move by exactly -grad: comparing params after one step compares gradients
    return lm_trainer(
        tmp_path, model=Mixtral(MOE), mesh=mesh, optimizer=optax.sgd(1.0), batch_size=8,
        num_steps=1, warmup_steps=0, grad_clip=None,
    )  # fmt: skip


@pytest.fixture(scope="module")
def single_device_step(tmp_path_factory, batch):
    trainer = _sgd_trainer(tmp_path_factory.mktemp("one"), make_mesh(devices=jax.devices()[:1]))
    metrics = trainer.train_step(batch)
    return float(metrics["loss"]), jax.device_get(trainer.params)


MESHES = [
    dict(expert=8),
    dict(data=2, expert=4),
    dict(data=2, tensor=2, expert=2),
    dict(data=1, fsdp=2, expert=4),
]


@pytest.mark.parametrize("sizes", MESHES, ids=lambda s: "x".join(f"{a}{n}" for a, n in s.items()))
def test_expert_parallel_step_equals_single_device(tmp_path, batch, single_device_step, sizes):
    mesh = make_mesh(**{"data": 1, **sizes})
    trainer = _sgd_trainer(tmp_path, mesh)
    plan = trainer.plan(batch)
    metrics = trainer.train_step(batch)
    loss, params = single_device_step
    np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(trainer.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(np.asarray(a), b, atol=5e-6)
    entries = {entry.path: entry for entry in plan.entries}
    experts = 0
    for path, array in jax.tree_util.tree_flatten_with_path(trainer.params)[0]:
        entry = entries["/".join(str(k.key) for k in path)]
        shard = array.addressable_shards[0].data
        expected = tuple(
            n // math.prod(mesh.shape[a] for a in ((p,) if isinstance(p, str) else p or ()))
            for n, p in zip(entry.shape, (*entry.spec, *[None] * len(entry.shape)), strict=False)
        )
        assert shard.shape == expected and shard.nbytes == entry.bytes_per_device, entry.path
        if "/experts/" in entry.path:
            experts += 1
            assert entry.spec[0] == "expert" and shard.shape[0] == 8 // mesh.shape["expert"]
    assert experts == 3 * MOE.num_layers


def test_plan_counts_expert_weights_and_routing_buffers(tmp_path):
    run = RunConfig(
        model=MOE,
        data=DataConfig(seq_len=32),
        mesh="data=2,tensor=2,expert=2",
        train=TrainConfig(work_dir=str(tmp_path), batch_size=8),
    )
    plan = plan_run(run, 8)
    gate = next(e for e in plan.entries if e.path == "layers_0/mlp/experts/gate")
    assert gate.spec == P("expert", None, "tensor") and "expert-stacked" in gate.reason
    assert gate.bytes_per_device == 8 * 64 * 32 * 4 // 4
    sizes = {"data": 2, "tensor": 2, "expert": 2}
    dense = MOE.replace(num_experts=2, experts_per_token=1, expert_intermediate_size=32)
    more_experts = activation_bytes(MOE, 8, 32, sizes)
    assert more_experts > activation_bytes(dense, 8, 32, sizes)  # k=2 rows and [t, E] logits
    capped = activation_bytes(MOE.replace(capacity_factor=1.0), 8, 32, sizes)
    assert capped < more_experts  # a capacity bounds the expert-parallel receive buffer


def test_train_tiny_moe_from_the_command_line(tmp_path, capsys):
    work_dir = tmp_path / "run"
    argv = [
        "train",
        "--model",
        "tiny-moe",
        "--train.work_dir",
        str(work_dir),
        "--mesh",
        "data=2,expert=4",
        "--data.max_files",
        "8",
        "--data.seq_len",
        "32",
        "--data.eval_examples",
        "16",
        "--train.num_steps",
        "30",
        "--train.batch_size",
        "16",
        "--train.learning_rate",
        "3e-3",
        "--train.log_every",
        "5",
        "--train.save_every",
        "30",
        "--train.progress_bar",
        "false",
        "--model.num_layers",
        "2",
        "--model.scan_layers",  # one compiled layer body: a faster compile
        "true",
        "--model.router_aux_loss_weight",
        "0.1",
    ]
    assert main(argv) == 0
    assert "checkpoint at step 30" in capsys.readouterr().out
    records = [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "expert_load" in r]
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    load = np.asarray(records[-1]["expert_load"])
    assert load.shape == (8,) and abs(load.sum() - 1) < 1e-5
    assert load.max() < 2 * load.mean()  # and in every layer, down from above 2x early on
    assert records[-1]["expert_load_max"] < 2.0 < records[0]["expert_load_max"]
    saved = RunConfig.load(work_dir)
    assert isinstance(saved.model, MixtralConfig) and saved.model.num_layers == 2
    assert saved == RunConfig.from_dict(json.loads((work_dir / "run.json").read_text()))
    assert isinstance(model_for(saved.model), Mixtral)
