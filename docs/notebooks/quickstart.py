# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # jaxstack quickstart
#
# [Open in Colab](https://colab.research.google.com/github/jaxstack/jaxstack/blob/main/docs/notebooks/quickstart.ipynb)
#
# Train a small Llama-style model on text, look at its sharding plan, checkpoint it,
# resume it and generate from it. The notebook uses whatever runtime it finds: on a CPU it
# trains the tiny preset for a few dozen steps (about a minute); on a GPU or TPU runtime
# (Colab: *Runtime > Change runtime type*) it trains longer in bfloat16 on every device.

# %%
import importlib.util
import subprocess
import sys

if importlib.util.find_spec("jaxstack") is None:  # a fresh Colab runtime: install jaxstack
    subprocess.check_call(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "jaxstack @ git+https://github.com/jaxstack/jaxstack",
        ]
    )

# %%
import tempfile

import jax

backend = jax.default_backend()  # "cpu", "gpu" or "tpu"
on_accelerator = backend != "cpu"
print(f"{jax.device_count()} {backend} device(s): {jax.devices()}")
steps = 300 if on_accelerator else 40
work_dir = tempfile.mkdtemp(prefix="jaxstack-quickstart-")

# %% [markdown]
# ## A run
#
# A `RunConfig` holds the model (`LlamaConfig`; the default is the `tiny` preset), the data
# (by default this Python's own standard-library sources, read with a byte tokenizer: nothing
# to download) and the training settings. Every field is checked where it enters.

# %%
import dataclasses

from jaxstack.models import preset
from jaxstack.run import DataConfig, RunConfig
from jaxstack.train_config import TrainConfig

run = RunConfig(
    model=preset("tiny", dtype="bfloat16" if on_accelerator else "float32"),
    data=DataConfig(max_files=40 if on_accelerator else 8, eval_examples=16),
    train=TrainConfig(
        work_dir=work_dir,
        batch_size=16 * jax.device_count(),
        num_steps=steps,
        learning_rate=3e-3,
        warmup_steps=min(20, steps),
        save_every=steps // 2,
        eval_every=steps // 2,
        eval_batches=2,
        log_every=max(steps // 5, 1),
        progress_bar=False,
    ),
)
print(f"{run.model.num_params():,} parameters")

# %% [markdown]
# ## The plan
#
# Before anything is allocated, the plan says where every parameter goes on the mesh and
# how much memory each device needs (`jaxstack plan` prints the same).

# %%
from jaxstack.planning import plan_run
from jaxstack.sharding import format_plan

print(format_plan(plan_run(run)))

# %% [markdown]
# ## Train, checkpoint, resume
#
# `train` stops here halfway (as a preempted job would, after saving); the second call finds
# the checkpoint and continues at the exact step, data position and random state.

# %%
from jaxstack.run import train

half = dataclasses.replace(run, train=dataclasses.replace(run.train, num_steps=steps // 2))
trainer, first_records = train(half)
print("stopped at step", trainer.step)
trainer, records = train(run)  # "resuming from step ..."
print("finished at step", trainer.step)
print(f"loss {first_records[0]['loss']:.3f} -> {records[-1]['loss']:.3f}")
assert trainer.step == steps and records[-1]["loss"] < first_records[0]["loss"]

# %% [markdown]
# ## Generate
#
# `load_run` reads the work dir's config and newest parameters; `complete` tokenizes the
# prompts, decodes with a KV cache and detokenizes.

# %%
from jaxstack.data import load_tokenizer
from jaxstack.generate import complete
from jaxstack.run import load_run

_, model, params = load_run(work_dir)
tokenizer = load_tokenizer(run.data.tokenizer)
prompts = ["def ", "import "]
samples = complete(model, params, tokenizer, prompts, max_new_tokens=60, temperature=0.8, top_k=20)
for prompt, text in zip(prompts, samples, strict=True):
    print(repr(prompt + text))
