"""The CPU training benchmark: its plain JAX floor is jaxstack's model, and a smoke run
records all three frameworks."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import plain_llama
from jaxstack.lm import lm_functions
from jaxstack.models.llama import Llama, preset

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["tiny", "100m"])
def test_plain_model_has_the_config_parameter_count(name):
    config = preset(name)
    shapes = jax.eval_shape(lambda: plain_llama.init_params(config, jax.random.key(0)))
    assert sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)) == config.num_params()


def test_plain_loss_and_grads_equal_jaxstack_llama_on_the_same_params():
    config = preset("tiny")
    model = Llama(config)
    tokens = jax.random.randint(jax.random.key(1), (2, 33), 0, config.vocab_size)
    batch = {
        "input_ids": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "positions": jnp.broadcast_to(jnp.arange(32), (2, 32)),
        "segment_ids": jnp.ones((2, 32), jnp.int32),
        "loss_mask": jnp.ones((2, 32), jnp.int32),
    }
    params = model.init(jax.random.key(2), batch["input_ids"])["params"]
    jaxstack_loss = lambda p: lm_functions(model)[0](p, batch, jax.random.key(0))[0]  # noqa: E731
    plain_loss = lambda p: plain_llama.loss_fn(config, p, batch)  # noqa: E731

    expected, expected_grads = jax.jit(jax.value_and_grad(jaxstack_loss))(params)
    mapped = plain_llama.params_from_jaxstack(config, params)
    loss, grads = jax.jit(jax.value_and_grad(plain_loss))(mapped)

    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    expected_grads = plain_llama.params_from_jaxstack(config, expected_grads)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_quick_run_records_jaxstack_plain_jax_and_torch(tmp_path):
    command = [sys.executable, "benchmarks/train_cpu.py", "--quick", "--results-dir", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (path,) = tmp_path.glob("train_cpu-*.json")
    record = json.loads(path.read_text())
    assert json.loads(done.stdout) == record  # the JSON on stdout is the file
    assert record["command"].startswith("python benchmarks/train_cpu.py --quick")
    result = record["result"]
    assert result["setup"]["quick"] and result["setup"]["params"] == preset("tiny").num_params()
    assert set(result["frameworks"]) == {"jaxstack", "plain_jax", "torch"}
    for framework in result["frameworks"].values():
        assert framework["tokens_per_sec"] > 0 and framework["mfu"] > 0
        assert len(framework["step_s"]) == result["setup"]["steps"]
        assert abs(framework["loss_first"] - np.log(preset("tiny").vocab_size)) < 0.3
    tokens = {name: f["tokens_per_sec"] for name, f in result["frameworks"].items()}
    assert result["ratios"] == pytest.approx(
        {
            "jaxstack_over_plain_jax": tokens["jaxstack"] / tokens["plain_jax"],
            "jaxstack_over_torch": tokens["jaxstack"] / tokens["torch"],
        }
    )


def test_bf16_dots_route_computes_the_same_loss_and_grads_as_plain_matmuls():
    config = preset("tiny", dtype="bfloat16", num_layers=1)
    params = plain_llama.init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, config.vocab_size)
    batch = {"input_ids": tokens[:, :-1], "targets": tokens[:, 1:]}
    batch["positions"] = jnp.broadcast_to(jnp.arange(16), (2, 16))
    results = {
        dots: jax.jit(
            jax.value_and_grad(lambda p, d=dots: plain_llama.loss_fn(config, p, batch, d))
        )(params)
        for dots in plain_llama.DOTS
    }
    (loss, grads), (bf16_loss, bf16_grads) = results["xla"], results["bf16"]
    np.testing.assert_allclose(bf16_loss, loss, rtol=2e-2)
    for got, want in zip(jax.tree.leaves(bf16_grads), jax.tree.leaves(grads), strict=True):
        assert got.dtype == want.dtype == jnp.float32
        np.testing.assert_allclose(got, want, atol=0.05 * float(jnp.abs(want).max()) + 1e-6)
