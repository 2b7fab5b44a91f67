"""Pipeline parallelism over the ``stage`` axis trains like one device, moving only activations."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from lm_setup import lm_trainer, packed_dataset

from jaxstack.cli import main
from jaxstack.layers.pipeline import PipelineSchedule, choose_microbatches, pipeline
from jaxstack.lm import lm_analysis
from jaxstack.mesh import make_mesh
from jaxstack.models import Llama, model_for, preset
from jaxstack.planning import plan_notes, plan_run, start_notes
from jaxstack.run import DataConfig, RunConfig
from jaxstack.trainer import TrainConfig
from sharding_rules import ShardingRuleError, param_rules
from sharding_rules.plan import format_bytes

MODEL = Llama(preset("tiny", num_layers=8, hidden_size=64, intermediate_size=128,
                     scan_layers=True))  # fmt: skip
LAYERS = MODEL.config.num_layers
STEPS = 4


def _trainer(work_dir, mesh, model=MODEL, **config):
    settings = dict(batch_size=16, warmup_steps=0, num_steps=STEPS, save_every=STEPS) | config
    return lm_trainer(work_dir, model=model, mesh=mesh, **settings)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(pipeline repeats, mesh axes) -> (trainer, logged records) of STEPS AdamW steps, each
    run once."""
    done = {}

    def run(repeats=1, **axes):
        key = (repeats, *sorted(axes.items()))
        if key not in done:
            mesh = make_mesh(**axes) if axes else make_mesh(devices=jax.devices()[:1])
            model = Llama(MODEL.config.replace(pipeline_repeats=repeats))
            trainer = _trainer(tmp_path_factory.mktemp("run"), mesh, model)
            done[key] = trainer, trainer.fit(packed_dataset())
        return done[key]

    return run


@pytest.mark.parametrize(
    "repeats, axes",
    [
        (1, dict(stage=4, data=2)),
        (2, dict(stage=2, fsdp=2, data=2)),
        (2, dict(stage=4, data=2)),
    ],
    ids=["gpipe-stage4-data2", "circular-stage2-fsdp2-data2", "circular-stage4-data2"],
)  # fmt: skip
def test_stages_train_like_one_device(runs, repeats, axes):
    trainer, records = runs(repeats, **axes)
    one, expected = runs()
    assert len(records) == len(expected) == STEPS
    for got, want in zip(records, expected, strict=True):
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=2e-5)
        np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=2e-4)
    pairs = zip(jax.tree.leaves(trainer.params), jax.tree.leaves(one.params), strict=True)
    for got, want in pairs:
        # Adam moves a parameter of near-zero gradient by up to ~lr = 3e-3 on float32 noise
        np.testing.assert_allclose(got, want, atol=3e-4)
    # each stage holds only its own block of layers
    q = trainer.params["layers"]["block"]["attn"]["q"]["kernel"]
    assert q.addressable_shards[0].data.shape[0] == LAYERS // axes["stage"]
    assert q.sharding.spec[0] == "stage"


def test_checkpoint_from_stages_restores_without_them(runs):
    staged, _ = runs(stage=4, data=2)
    flat = _trainer(staged.config.work_dir, make_mesh(data=8))
    assert flat.fit(packed_dataset()) == []  # resumed at the last step: nothing to train
    assert flat.step == STEPS
    q = flat.params["layers"]["block"]["attn"]["q"]["kernel"]
    assert "stage" not in q.sharding.spec
    for a, b in zip(jax.tree.leaves(flat.state), jax.tree.leaves(staged.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # and back onto stages (a checkpoint of the data-only run, restored split over stage=2)
    data_state = flat.loader(packed_dataset(), shuffle=True).get_state()
    flat.checkpoints.save(STEPS + 1, flat.state, data_state, force=True)
    flat.checkpoints.wait()
    again = _trainer(staged.config.work_dir, make_mesh(stage=2, data=4), num_steps=STEPS + 1)
    assert again.fit(packed_dataset()) == [] and again.step == STEPS + 1
    q = again.params["layers"]["block"]["attn"]["q"]["kernel"]
    assert q.sharding.spec[0] == "stage" and q.addressable_shards[0].data.shape[0] == LAYERS // 2
    for a, b in zip(jax.tree.leaves(again.state), jax.tree.leaves(flat.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _collectives(text: str, op: str) -> list[str]:
    return [line for line in text.splitlines() if re.search(rf"= \S+ {op}(-start)?\(", line)]


@pytest.mark.parametrize("repeats", [1, 2], ids=["gpipe", "circular"])
def test_step_permutes_activations_and_gathers_no_stage_weights(repeats):
    model = Llama(MODEL.config.replace(pipeline_repeats=repeats))
    mesh = make_mesh(stage=4, data=2)
    ids = jnp.zeros((8, 16), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids)["params"])
    specs = jax.tree.map(
        lambda r: jax.sharding.NamedSharding(mesh, r.spec),
        list(param_rules(lm_analysis(model, 16, params), mesh).values()),
    )
    specs = jax.tree.unflatten(jax.tree.structure(params), specs)
    loss = lambda p, x: model.apply({"params": p}, x).mean()  # noqa: E731
    with jax.set_mesh(mesh):
        text = (
            jax.jit(jax.grad(loss), in_shardings=(specs, None)).lower(params, ids).compile()
        ).as_text()
    permutes = _collectives(text, "collective-permute")
    # activations cross stage boundaries ([1 stage, 1 row, 16 tokens, 64 wide] per device)
    activations = [line for line in permutes if "f32[1,1,16,64]" in line]
    assert activations, "activations should cross stage boundaries by collective permutes"
    # GPipe moves nothing else; circular regroups the contiguously stored layers into each
    # stage's groups, each layer sent to the one stage that runs it (at most a stage's
    # L / S = 2 layers per permute), never gathered on every stage
    weights = [line for line in permutes if line not in activations]
    assert bool(weights) == (repeats > 1), weights
    assert all(re.search(r"= f32\[[12],\d", line) for line in weights), weights
    assert not _collectives(text, "all-gather")


def test_pipeline_function_on_a_user_block():
    """Any stacked block: here a residual tanh layer, pipelined by hand under a stage mesh
    (circular: 8 layers on 4 stages x 2 repeats)."""
    weights = jax.random.normal(jax.random.PRNGKey(0), (8, 4, 4)) * 0.3  # [layers, in, out]
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 3, 4))
    layer = lambda w, h, extras: h + jnp.tanh(h @ w) * extras[:, :, None]  # noqa: E731
    scale = jnp.arange(24.0).reshape(8, 3) / 24

    def sequential(weights):
        h = x
        for w in weights:
            h = layer(w, h, scale)
        return h

    with jax.set_mesh(make_mesh(stage=4, data=2)):
        run = jax.jit(lambda w: pipeline(layer, w, x, scale, stages=4, microbatches=4,
                                         repeats=2))  # fmt: skip
        np.testing.assert_allclose(run(weights), sequential(weights), atol=1e-6)
        grads = jax.jit(jax.grad(lambda w: (run(w) ** 2).sum()))(weights)
    expected = jax.grad(lambda w: (sequential(w) ** 2).sum())(weights)
    np.testing.assert_allclose(grads, expected, atol=1e-5)


@pytest.mark.parametrize(
    "make_error, fix",
    [
        (lambda: PipelineSchedule(stages=3, layers=4, microbatches=6), "divides the layer count"),
        (lambda: PipelineSchedule(stages=4, layers=4, microbatches=6), "multiple of stage=4"),
        (lambda: PipelineSchedule(2, layers=4, microbatches=4, repeats=4), "product divides"),
        (lambda: PipelineSchedule(2, layers=4, microbatches=4, repeats=0), "1 \\(GPipe\\)"),
        (lambda: preset("tiny", pipeline_repeats=0), "1 \\(GPipe\\)"),
        (lambda: choose_microbatches(batch=2, stages=4), "raise the batch size"),
        (lambda: choose_microbatches(batch=8, stages=2, requested=6), "divides the batch"),
        (lambda: preset("tiny", pipeline_microbatches=-1), "positive multiple"),
    ],
)
def test_bad_schedules_are_one_line_errors(make_error, fix):
    with pytest.raises(ValueError, match=fix) as error:
        make_error()
    assert "\n" not in str(error.value)


def test_layers_not_divisible_by_stages_is_a_rule_error():
    ids = jnp.zeros((1, 8), jnp.int32)
    model = Llama(MODEL.config.replace(num_layers=3))
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids)["params"])
    with pytest.raises(ShardingRuleError, match="use a stage count that divides") as error:
        param_rules(lm_analysis(model, 8, params), {"stage": 2, "data": 4})
    assert "\n" not in str(error.value)


def test_unstacked_layers_under_stages_name_the_fix():
    model = Llama(MODEL.config.replace(scan_layers=False))
    ids = jnp.zeros((8, 8), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids)["params"])
    mesh = make_mesh(stage=4, data=2)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="scan_layers") as error:
        jax.eval_shape(lambda p: model.apply({"params": p}, ids), params)
    assert "\n" not in str(error.value)


def test_schedule_bubble():
    assert PipelineSchedule(stages=4, layers=8, microbatches=8).bubble_fraction == 3 / 11
    circular = PipelineSchedule(stages=4, layers=8, microbatches=8, repeats=2)
    assert circular.bubble_fraction == 3 / 19 and circular.layers_per_group == 1


def test_plan_shows_bubble_stage_memory_and_boundary_bytes(tmp_path):
    def run(mesh, **train):
        return RunConfig(
            model=MODEL.config.replace(scan_layers=False),  # a stage mesh stacks the layers
            data=DataConfig(seq_len=32),
            train=TrainConfig(work_dir=str(tmp_path), batch_size=16, num_steps=1, **train),
            mesh=mesh,
        )

    staged = run("data=2,stage=4", optimizer_offload=True)
    assert staged.model.scan_layers
    plan, flat = plan_run(staged), plan_run(run("data=2,fsdp=4"))
    notes = "\n".join(plan_notes(staged, plan))
    # 8 microbatches (2 x stages) of 2 rows, one per data shard: bubble 3 / 11
    assert "8 microbatches of 2 rows" in notes and f"{3 / 11:.1%}" in notes
    # per device and direction: 11 iterations of [1 row, 32 tokens, 64 wide] float32
    assert f"{format_bytes(2 * 11 * 32 * 64 * 4)} (forward and backward)" in notes
    assert "optimizer offload" in notes
    layer_bytes = sum(e.bytes_per_device for e in plan.entries if e.path.startswith("layers/"))
    whole = sum(math.prod(e.shape) * 4 for e in plan.entries if e.path.startswith("layers/"))
    assert layer_bytes == whole // 4  # a stage holds a quarter of the layers
    # GPipe keeps 11 iterations of 2-row microbatches: more than 16 / 2 rows, less than 16
    assert flat.activation_bytes < plan.activation_bytes < 2 * flat.activation_bytes


@pytest.mark.parametrize("gather", ["per_microbatch", "once"])
def test_fsdp_inside_stages_gathers_either_way(gather):
    model = Llama(MODEL.config.replace(pipeline_fsdp_gather=gather))
    ids = jnp.asarray(np.arange(8 * 16).reshape(8, 16) % 250)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), ids)["params"]
    mesh = make_mesh(stage=4, fsdp=2, data=1)
    specs = param_rules(lm_analysis(model, 16, params), mesh)
    shardings = [jax.sharding.NamedSharding(mesh, r.spec) for r in specs.values()]
    placed = jax.device_put(params, jax.tree.unflatten(jax.tree.structure(params), shardings))
    assert placed["layers"]["block"]["mlp"]["up"]["kernel"].sharding.spec == P(
        "stage", None, "fsdp"
    )
    apply = jax.jit(lambda p: model.apply({"params": p}, ids))
    with jax.set_mesh(mesh):
        staged = apply(placed)
    np.testing.assert_allclose(staged, apply(params), atol=1e-5)


def test_cli_plan_of_a_stage_mesh_prints_the_bubble(capsys):
    assert main(["plan", "--mesh", "data=2,stage=4", "--data.seq_len", "32"]) == 0
    out = capsys.readouterr().out
    # the default batch of 8 rows: 2 x stages = 8 microbatches leave 1 row for 2 data
    # shards, so 4 microbatches of 2 rows: bubble 3 / 7
    assert "4 microbatches of 2 rows" in out and f"{3 / 7:.1%}" in out
    args = ["plan", "--mesh", "data=2,stage=4", "--data.seq_len", "32", "--model.num_layers",
            "8", "--model.pipeline_repeats", "2"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out  # circular: bubble 3 / (2 x 4 + 3)
    assert "circular, 4 stages x 2 repeats x 1 layers" in out and f"{3 / 11:.1%}" in out
    assert "circular regroup per step" in out


def test_a_mixture_of_experts_under_stages_names_the_fix():
    model = model_for(preset("tiny-moe", scan_layers=True))
    ids = jnp.zeros((8, 8), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids)["params"])
    mesh = make_mesh(stage=4, data=2)
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="mesh without stage") as error:
        jax.eval_shape(lambda p: model.apply({"params": p}, ids), params)
    assert "\n" not in str(error.value)


def test_a_mixture_of_experts_run_with_stages_is_refused_up_front():
    with pytest.raises(ValueError, match="--mesh data=2,expert=2") as error:
        RunConfig(model=preset("tiny-moe"), mesh="data=2,stage=2")
    assert "\n" not in str(error.value)


def test_start_notes_log_the_schedule_and_the_offloaded_activations(tmp_path):
    run = RunConfig(
        model=MODEL.config.replace(num_layers=2, remat="block_input=offload"),
        data=DataConfig(seq_len=32),
        train=TrainConfig(work_dir=str(tmp_path), batch_size=16, num_steps=1),
        mesh="data=4,stage=2",
    )
    schedule, offload = start_notes(run)
    # 4 microbatches of 4 rows (1 per data shard): bubble 1 / 5
    assert schedule == f"pipeline: GPipe on 2 stages, 4 microbatches, bubble {1 / 5:.1%}"
    # 5 iterations x 1 layer x block_input [1 row, 32 tokens, 64 wide] float32
    assert format_bytes(5 * 32 * 64 * 4) in offload and "pinned_host" in offload


def test_auto_mesh_over_slow_links_weighs_stage_against_data(capsys):
    base = ["plan", "--mesh", "auto", "--dcn", "2", "--devices", "8", "--data.seq_len", "32"]
    assert main(base) == 0  # tiny model: its gradients outweigh the boundary activations
    out = capsys.readouterr().out
    assert "(stage, None)" in out and "stage chosen" in out
    assert main([*base, "--model", "tiny-moe"]) == 0  # experts do not run under stages
    out = capsys.readouterr().out
    assert "data over the slow links" in out and "stage not possible" in out
