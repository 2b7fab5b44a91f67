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
# # Fine-tune a Hugging Face model with jaxstack
#
# [Open in Colab](https://colab.research.google.com/github/jaxstack/jaxstack/blob/main/docs/notebooks/finetune_hf.ipynb)
#
# Load a Hugging Face Llama directory, fine-tune it with the functions of
# `recipes/sft_from_hf.py` (prompt tokens masked out of the loss), export it back as a
# Hugging Face directory and check that `transformers` computes the same logits. Set
# `HF_DIR` to a local Llama / Mistral / Qwen2 / Qwen3 directory to use a real model; without
# it a tiny random Llama with its own tokenizer is made here (nothing is downloaded).

# %%
import subprocess
import sys
from pathlib import Path

REPOSITORY = "https://github.com/jaxstack/jaxstack"
root = next(
    (p for p in [Path.cwd(), *Path.cwd().parents] if (p / "recipes" / "sft_from_hf.py").exists()),
    None,
)
if root is None:  # a fresh Colab runtime: fetch the repository (for its recipes) and install it
    subprocess.check_call(["git", "clone", "-q", "--depth", "1", REPOSITORY, "jaxstack"])
    root = Path("jaxstack").absolute()
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "-e", str(root)])
sys.path.insert(0, str(root / "recipes"))

# %%
import os
import tempfile

import jax
import sft_from_hf as sft  # from recipes/, put on the path above

import jaxstack as js
from jaxstack import hf
from jaxstack.data import load_tokenizer

backend = jax.default_backend()
print(f"{jax.device_count()} {backend} device(s)")
scratch = Path(tempfile.mkdtemp(prefix="jaxstack-finetune-"))
hf_dir = os.environ.get("HF_DIR") or str(sft.make_tiny_model(scratch / "tiny-llama"))
print("fine-tuning", hf_dir)

# %% [markdown]
# ## Load, with the parameters placed on the mesh
#
# `hf.load` streams the safetensors straight into their placement on `mesh` (here every
# device data-parallel; pass `param_specs=` or use `js.Trainer(mesh=...)` for tensor
# parallelism).

# %%
mesh = js.make_mesh()
model, config, params = hf.load(hf_dir, mesh=mesh)
print(config)

# %% [markdown]
# ## The three functions, from the recipe
#
# `collate_fn` tokenizes `{"prompt", "response"}` examples and masks the prompt out of the
# loss; `loss_fn` is the mean negative log-likelihood of response tokens; `pred_fn` gives
# each example's loss and accuracy.

# %%
seq_len = 32
examples = sft.toy_examples()  # "Q: a + b = ?\nA:" -> " a+b"
collate_fn = sft.make_collate_fn(load_tokenizer(hf_dir), seq_len)
loss_fn, pred_fn = sft.make_loss_and_pred_fns(model)
steps = 300 if backend != "cpu" else 80
trainer = js.Trainer(
    params=params,
    collate_fn=collate_fn,
    loss_fn=loss_fn,
    pred_fn=pred_fn,
    mesh=mesh,
    config=js.TrainConfig(
        work_dir=str(scratch / "run"),
        batch_size=16,
        num_steps=steps,
        learning_rate=3e-3,
        log_every=steps // 4,
        progress_bar=False,
    ),
    flops_per_token=config.flops_per_token(seq_len),
)
records = trainer.fit(examples[16:], examples[:16])
print(f"loss {records[0]['loss']:.3f} -> {records[-1]['loss']:.3f}")
assert records[-1]["loss"] < records[0]["loss"]

# %% [markdown]
# ## Export and compare with `transformers`

# %%
import numpy as np
import torch
import transformers

out_dir = hf.save(scratch / "finetuned", config, trainer.params, tokenizer_dir=hf_dir)
trainer.close()
ids = np.asarray([collate_fn(examples[:2])["input_ids"][0]])
theirs = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
with torch.no_grad():
    reference = theirs(torch.tensor(ids, dtype=torch.long)).logits.numpy()
_, _, tuned = hf.load(out_dir)
ours = np.asarray(model.apply({"params": tuned}, ids))
difference = float(np.abs(ours - reference).max())
print(f"max |logits difference| against transformers: {difference:.2e}")
assert difference < 1e-4

# %%
for prompt, answer in zip(
    ["Q: 3 + 4 = ?\nA:", "Q: 9 + 8 = ?\nA:"],
    hf.generate_text(out_dir, ["Q: 3 + 4 = ?\nA:", "Q: 9 + 8 = ?\nA:"], max_new_tokens=4),
    strict=True,
):
    print(repr(prompt), "->", repr(answer))
