"""Long context and overlap in the stack: training with the sequence split over ``sequence``
(ring and all-gather attention) and with collective-matmul tensor parallelism equals the
single-device step; activations are really split; the XLA flag bundles; plans."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lm_setup import SEQ_LEN, sgd_trainer

from jaxstack import xla_flags
from jaxstack.data import ByteTokenizer, PackedDataset, lm_collate
from jaxstack.mesh import make_mesh
from jaxstack.models import Llama, preset
from jaxstack.trainer import TrainConfig
from pallas_kernels import platform

CONFIG = preset(
    "tiny", vocab_size=264, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=4,
    intermediate_size=128, sliding_window=12,
)  # fmt: skip


@pytest.fixture(scope="module")
def batch():
    # documents of unequal lengths, so packed rows hold several segments
    texts = [("long context, split over devices. " * (3 + i % 4))[: 40 + 13 * i] for i in range(16)]
    data = PackedDataset.from_texts(texts, ByteTokenizer(), seq_len=SEQ_LEN)
    return lm_collate([data[i] for i in range(8)])


@pytest.fixture(scope="module")
def single_device_step(tmp_path_factory, batch):
    mesh = make_mesh(devices=jax.devices()[:1])
    trainer = sgd_trainer(tmp_path_factory.mktemp("one"), mesh, CONFIG)
    metrics = trainer.train_step(batch)
    return float(metrics["loss"]), jax.device_get(trainer.params)


MESHES = {
    "sequence4-data2-ring": (dict(data=2, sequence=4), dict(context_parallel="ring")),
    "sequence2-tensor2-data2-allgather-collective": (
        dict(data=2, tensor=2, sequence=2),
        dict(context_parallel="all_gather", tensor_parallel="collective_matmul"),
    ),
    "tensor4-data2-collective-bidirectional": (
        dict(data=2, tensor=4), dict(tensor_parallel="collective_matmul_bidirectional"),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MESHES))
def test_step_equals_single_device(tmp_path, batch, single_device_step, case):
    axes, options = MESHES[case]
    trainer = sgd_trainer(tmp_path, make_mesh(**axes), CONFIG.replace(**options))
    metrics = trainer.train_step(batch)
    loss, params = single_device_step
    np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(trainer.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(np.asarray(a), b, atol=3e-6)


SPLITS = {  # mesh, options, collectives the forward must (not) contain
    "ring-sequence4": (dict(data=2, sequence=4), dict(context_parallel="ring"), (), ()),
    "sequence-parallel-tensor4": (
        dict(data=2, tensor=4), dict(tensor_parallel="sequence_parallel"),
        ("reduce-scatter",), (),
    ),
    "collective-matmul-sequence2-tensor2": (
        dict(data=2, sequence=2, tensor=2),
        dict(context_parallel="all_gather", tensor_parallel="collective_matmul"),
        ("collective-permute",), ("reduce-scatter",),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(SPLITS))
def test_residual_stream_is_split(batch, case):
    """Each device holds [b / data, s / (sequence x tensor), hidden] of every block's output
    (Megatron sequence parallelism splits the residual stream over ``tensor`` too), and the
    tensor-parallel collectives are the expected ones: after o and down a reduce-scatter in
    place of an all-reduce, with collective matmul ring steps (``ppermute``) instead."""
    axes, options, present, absent = SPLITS[case]
    model = Llama(CONFIG.replace(**options))
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    mesh = make_mesh(**axes)

    def block_outputs(params, ids):
        _, state = model.apply({"params": params}, ids, capture_intermediates=True)
        return state["intermediates"]["layers_0"]["__call__"][0][0]

    with jax.set_mesh(mesh):
        ids = jax.device_put(batch["input_ids"], jax.NamedSharding(mesh, jax.P("data")))
        compiled = jax.jit(block_outputs).lower(params, ids).compile()
        x = compiled(params, ids)
    split = axes.get("sequence", 1) * axes.get("tensor", 1)
    assert x.shape == (8, SEQ_LEN, CONFIG.hidden_size)
    shapes = {s.data.shape for s in x.addressable_shards}
    assert shapes == {(4, SEQ_LEN // split, CONFIG.hidden_size)}
    hlo = compiled.as_text()
    for op in present:
        assert f" {op}(" in hlo or f" {op}-start(" in hlo, op
    for op in absent:
        assert f" {op}(" not in hlo and f" {op}-start(" not in hlo, op


@pytest.mark.parametrize(
    "attention_impl, window, flash",
    [("auto", None, True), ("auto", 12, False), ("xla", None, False)],
)
def test_attention_impl_picks_the_per_block_compute(monkeypatch, attention_impl, window, flash):
    """On a GPU, ring attention's blocks run the flash kernel unless asked for XLA or a
    sliding window (which a kernel call cannot express per block) is set."""
    monkeypatch.setattr(platform, "backend", lambda: "gpu")
    config = CONFIG.replace(
        context_parallel="ring", attention_impl=attention_impl, sliding_window=window
    )
    model = Llama(config)
    ids = jnp.zeros((2, 32), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), ids[:1, :8])
    with jax.set_mesh(make_mesh(data=2, sequence=4)):
        jaxpr = str(jax.make_jaxpr(model.apply)(params, ids))
    assert ("flash_attention_fwd" in jaxpr) == flash
    if window is not None:
        with (
            jax.set_mesh(make_mesh(data=2, sequence=4)),
            pytest.raises(ValueError, match="block_impl='pallas' cannot run a sliding window"),
        ):
            jax.eval_shape(Llama(config.replace(attention_impl="pallas")).apply, params, ids)


def test_a_length_that_does_not_split_names_a_working_one():
    model = Llama(CONFIG.replace(context_parallel="ring"))
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    working = "sequence length 36 .* multiple of 8 .* 40 or 32"
    with jax.set_mesh(make_mesh(data=2, sequence=4)), pytest.raises(ValueError, match=working):
        jax.eval_shape(model.apply, params, jnp.zeros((2, 36), jnp.int32))


def test_a_width_that_does_not_split_over_tensor_names_a_working_mesh():
    model = Llama(CONFIG.replace(num_kv_heads=2, tensor_parallel="collective_matmul"))
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    working = "tensor=4, but num_kv_heads=2 is not a multiple of 4; use tensor=2"
    with jax.set_mesh(make_mesh(data=2, tensor=4)), pytest.raises(ValueError, match=working):
        jax.eval_shape(model.apply, params, jnp.zeros((2, 32), jnp.int32))


def test_a_length_that_does_not_split_over_sequence_and_tensor_names_a_working_one():
    model = Llama(CONFIG.replace(context_parallel="ring", tensor_parallel="sequence_parallel"))
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    working = "length 36 over sequence=2 x tensor=4, and of 4 .* multiple of 8, e.g. 40 or 32"
    with jax.set_mesh(make_mesh(sequence=2, tensor=4)), pytest.raises(ValueError, match=working):
        jax.eval_shape(model.apply, params, jnp.zeros((1, 36), jnp.int32))


def test_init_needs_no_split():
    """The CLI initialises with 8 dummy tokens under the run's mesh, fewer than 2 x sequence
    zig-zag chunks (16 here): parameters do not depend on the split."""
    model = Llama(CONFIG.replace(context_parallel="ring"))
    with jax.set_mesh(make_mesh(sequence=8)):
        params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    assert params["params"]["layers_0"]["attn"]["q"]["kernel"].shape == (64, 8, 8)


def test_unknown_context_parallel_option_lists_the_choices():
    with pytest.raises(ValueError, match="choose one of \\('none', 'ring', 'all_gather'\\)"):
        CONFIG.replace(context_parallel="rings")


def test_flag_bundle_appends_and_leaves_user_flags(monkeypatch):
    monkeypatch.setattr(xla_flags.xla_bridge, "backends_are_initialized", lambda: False)
    env = {"XLA_FLAGS": "--xla_gpu_enable_latency_hiding_scheduler=false --foo=1"}
    report = xla_flags.apply_xla_flags("gpu", env)
    flags = env["XLA_FLAGS"].split()
    assert flags[:2] == ["--xla_gpu_enable_latency_hiding_scheduler=false", "--foo=1"]
    assert "--xla_gpu_enable_pipelined_all_gather=true" in flags
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" not in flags
    assert report.kept == ("--xla_gpu_enable_latency_hiding_scheduler=true",)
    assert "left to your settings: --xla_gpu_enable_latency_hiding_scheduler" in report.describe()
    tpu_env = {"JAXSTACK_XLA_FLAGS": "off"}
    assert xla_flags.apply_xla_flags("tpu", tpu_env).skipped == "JAXSTACK_XLA_FLAGS=off"
    assert "LIBTPU_INIT_ARGS" not in tpu_env
    with pytest.raises(ValueError, match="platform must be one of"):
        xla_flags.apply_xla_flags("npu", {})


def test_flags_arriving_after_backend_start_are_reported_not_applied():
    jax.devices()  # start this process's backend, whichever test ran before
    env = {}
    report = xla_flags.apply_xla_flags("gpu", env)
    assert env == {} and "already initialised" in report.skipped


def test_gpu_bundle_is_known_to_this_xla():
    """XLA aborts on an unknown flag: a fresh process with the GPU bundle applied must start
    its (CPU) backend. Catches a flag renamed or removed in a new jaxlib."""
    script = (
        "from jaxstack import xla_flags; import os, jax;"
        "r = xla_flags.apply_xla_flags('gpu'); jax.devices();"
        "print(len(r.added), 'xla_gpu_enable_latency_hiding' in os.environ['XLA_FLAGS'])"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    env.pop("JAXSTACK_XLA_FLAGS", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(len(xla_flags.BUNDLES["gpu"])), "True"]


def _long_run(seq_len: int, mesh: str, batch_size: int = 1):
    from jaxstack.run import DataConfig, RunConfig

    model = preset("tiny", hidden_size=64, intermediate_size=128, context_parallel="ring",
                   max_seq_len=seq_len)  # fmt: skip
    train = TrainConfig(work_dir="unused", batch_size=batch_size, num_steps=1)
    return RunConfig(model=model, data=DataConfig(seq_len=seq_len), train=train, mesh=mesh)


def test_plan_activation_memory_falls_at_least_as_one_over_sequence():
    from jaxstack.planning import plan_run

    plans = {n: plan_run(_long_run(8192, f"sequence={n}"), n) for n in (1, 2, 4, 8)}
    for n, plan in plans.items():
        # at least 1/n of one device's (whose XLA attention keeps [s, s] scores per layer);
        # over sequence shards per-layer activations fall as 1/n, the live block as 1/n^2
        assert plan.activation_bytes / plans[1].activation_bytes <= 1.02 / n, n
        ratio = plan.activation_bytes / plans[2].activation_bytes
        assert n == 1 or 0.9 * (2 / n) ** 2 <= ratio <= 1.02 * 2 / n, (n, ratio)
        assert plan.param_bytes == plans[1].param_bytes  # sequence shards hold all weights


def test_a_context_four_times_too_long_for_one_device_fits_on_four():
    from jaxstack.planning import choose_mesh, plan_run

    budget = plan_run(_long_run(4096, "sequence=1"), 1).total_bytes  # one device, full
    assert plan_run(_long_run(4 * 4096, "sequence=1"), 1).total_bytes > 3 * budget
    assert plan_run(_long_run(4 * 4096, "sequence=4"), 4).total_bytes <= budget
    # --mesh auto splits the sequence only when it must: four sequences that fit go data=4
    short = choose_mesh(_long_run(4096, "auto", batch_size=4), 4, budget).axis_sizes
    assert (short["data"], short["sequence"]) == (4, 1)
    long = choose_mesh(_long_run(4 * 4096, "auto"), 4, budget).axis_sizes
    assert long["sequence"] == 4


def test_the_loss_takes_the_hidden_state_in_the_split_order(batch):
    """Under context parallelism the LM loss takes the hidden state in the zig-zag order
    the sequence split uses and permutes its targets instead: no collective of the loss's
    forward holds the whole sequence of hidden states ``[b, s, hidden]`` on a device (the
    natural-order output gathers it with an all-reduce), and loss and gradients equal the
    one-device ones."""
    from jaxstack.lm import lm_functions

    model = Llama(CONFIG.replace(context_parallel="ring"))
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    loss_fn, _ = lm_functions(model)
    loss = lambda p, b: loss_fn(p, b, None)[0]  # noqa: E731
    want = jax.value_and_grad(loss)(params, batch)
    mesh = make_mesh(data=2, sequence=4)
    with jax.set_mesh(mesh):
        sharded = jax.device_put(batch, jax.NamedSharding(mesh, jax.P("data")))
        got = jax.jit(jax.value_and_grad(loss))(params, sharded)
        forward = jax.jit(loss).lower(params, sharded).compile().as_text()
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=3e-6)
    whole_sequence = f"[4,{SEQ_LEN},{CONFIG.hidden_size}]"  # a device's rows, every position
    collectives = ("all-gather", "all-reduce", "all-to-all")
    gathered = [line for line in forward.splitlines() if whole_sequence in line
                and any(f" {op}" in line for op in collectives)]  # fmt: skip
    assert not gathered, gathered[:2]
