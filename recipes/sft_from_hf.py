"""Supervised fine-tuning of a Hugging Face model in Python, with prompt tokens masked out of
the loss: the three functions (``collate_fn``, ``loss_fn``, ``pred_fn``) written out.

From the command line the same fine-tune is one command, with chat data too
(``jaxstack train --init.hf DIR --data.source data.jsonl --train.export_hf OUT``; see
docs/quickstart.md); this recipe shows the Python path for a loss or data of your own.

Loads a local Hugging Face directory (config.json, safetensors, tokenizer.json), trains on
``{"prompt": ..., "response": ...}`` examples where only response tokens (and the final EOS)
count in the loss, and writes the result back as a Hugging Face directory::

    python recipes/sft_from_hf.py --make-tiny-model /tmp/tiny-llama    # nothing to download
    python recipes/sft_from_hf.py --hf /tmp/tiny-llama --out /tmp/tiny-sft --steps 100

``--data FILE`` reads a JSONL file of such examples; without it a toy addition task is used.

How to run it:

- CPU: the two commands above (a minute for the tiny model).
- One GPU: ``pip install -e ".[gpu]"``, then ``--hf /models/Llama-3.2-1B``; every local GPU is
  used (data-parallel; the model is placed by the automatic rules).
- A GPU cluster: one process per node, e.g. ``srun --nodes=2 --ntasks-per-node=1 python
  recipes/sft_from_hf.py --hf /shared/llama --out /shared/llama-sft --work-dir /shared/runs/sft``.
- A TPU pod: the same command on every worker (``gcloud compute tpus tpu-vm ssh NAME
  --worker=all --command "..."``), with paths every worker can read and write.

On a cluster or pod ``jaxstack.distributed.initialize()`` joins the processes into one job;
alone it does nothing.
"""

import argparse
import json
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import jaxstack as js
from jaxstack import hf
from jaxstack.data import load_tokenizer
from jaxstack.data.chat import prompt_response_document
from jaxstack.data.text import iter_jsonl
from jaxstack.distributed import initialize


def toy_examples() -> list[dict]:
    """Every ``a + b`` with digits a, b as a prompt and its sum as the response."""
    return [
        {"prompt": f"Q: {a} + {b} = ?\nA:", "response": f" {a + b}"}
        for a in range(10)
        for b in range(10)
    ]


def read_examples(path: str) -> list[dict]:
    """``{"prompt", "response"}`` records of a JSONL file (errors name the file, line and
    field when the records are tokenized)."""
    return [record for _, record in iter_jsonl(path)]


def make_tiny_model(directory: str) -> Path:
    """A small randomly initialised Llama with a byte-level BPE tokenizer, as an HF directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = {"pad": "<pad>", "bos": "<s>", "eos": "</s>"}
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=list(specials.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [e["prompt"] + e["response"] for e in toy_examples()]
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    names = {f"{kind}_token": token for kind, token in specials.items()}
    (directory / "tokenizer_config.json").write_text(json.dumps(names, indent=2))
    config = js.models.LlamaConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        max_seq_len=128,
        extra={
            "hf_model_type": "llama",
            **{f"{kind}_token_id": tokenizer.token_to_id(t) for kind, t in specials.items()},
        },
    )
    model = js.models.Llama(config)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    return hf.save(directory, config, params)


def make_collate_fn(tokenizer, seq_len: int):
    """``collate_fn``: examples -> ``input_ids``, ``targets``, ``loss_mask`` [b, seq_len].

    Position j predicts token j + 1 of ``bos + prompt + response + eos`` (jaxstack's own
    prompt/response tokenization, as ``jaxstack train --data.format prompt_response`` uses);
    ``loss_mask`` is 1 exactly where that token belongs to the response or is the EOS.
    """
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0

    def collate_fn(examples: list[dict]) -> dict[str, np.ndarray]:
        input_ids = np.full((len(examples), seq_len), pad, np.int32)
        targets = np.full((len(examples), seq_len), pad, np.int32)
        loss_mask = np.zeros((len(examples), seq_len), np.float32)
        for row, example in enumerate(examples):
            ids, weights = prompt_response_document(example, f"example {row}", tokenizer)
            ids, weights = ids + [tokenizer.eos_id], weights + [1.0]
            n = min(len(ids), seq_len + 1) - 1  # a long example is cut, its EOS with it
            input_ids[row, :n], targets[row, :n] = ids[:n], ids[1 : n + 1]
            loss_mask[row, :n] = weights[1 : n + 1]
        return {"input_ids": input_ids, "targets": targets, "loss_mask": loss_mask}

    return collate_fn


def make_loss_and_pred_fns(model):
    """``loss_fn`` (mean NLL over response tokens) and ``pred_fn`` (per-example NLL, accuracy)."""

    def token_nll(params, batch):
        logits = model.apply({"params": params}, batch["input_ids"])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        correct = logits.argmax(-1) == batch["targets"]
        return nll * batch["loss_mask"], correct * batch["loss_mask"]

    def loss_fn(params, batch, rng):
        nll, correct = token_nll(params, batch)
        tokens = jnp.maximum(batch["loss_mask"].sum(), 1.0)
        return nll.sum() / tokens, {"response_accuracy": correct.sum() / tokens}

    def pred_fn(params, batch, rng):
        nll, correct = token_nll(params, batch)
        tokens = jnp.maximum(batch["loss_mask"].sum(-1), 1.0)
        return {"loss": nll.sum(-1) / tokens, "accuracy": correct.sum(-1) / tokens}

    return loss_fn, pred_fn


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the recipe; returns the logged training records (empty with --make-tiny-model)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make-tiny-model", metavar="DIR", help="write a tiny HF model, exit")
    parser.add_argument("--hf", metavar="DIR", help="Hugging Face model directory to fine-tune")
    parser.add_argument("--out", metavar="DIR", help="write the fine-tuned model here (HF)")
    parser.add_argument("--data", metavar="JSONL", help="prompt/response examples")
    parser.add_argument("--work-dir", default=None, help="checkpoints and metrics")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    args = parser.parse_args(argv)
    if args.make_tiny_model:
        print(f"wrote {make_tiny_model(args.make_tiny_model)}")
        return []
    if not args.hf or not args.out:
        parser.error("--hf DIR and --out DIR are required (or --make-tiny-model DIR)")

    initialize()
    examples = toy_examples() if args.data is None else read_examples(args.data)
    split = max(len(examples) // 10, args.batch_size)
    mesh = js.make_mesh()
    model, config, params = hf.load(args.hf, mesh=mesh)
    loss_fn, pred_fn = make_loss_and_pred_fns(model)
    trainer = js.Trainer(
        params=params,
        collate_fn=make_collate_fn(load_tokenizer(args.hf), args.seq_len),
        loss_fn=loss_fn,
        pred_fn=pred_fn,
        mesh=mesh,
        config=js.TrainConfig(
            work_dir=args.work_dir or tempfile.mkdtemp(prefix="jaxstack-sft-"),
            batch_size=args.batch_size,
            num_steps=args.steps,
            learning_rate=args.learning_rate,
            save_every=args.steps,
            log_every=max(args.steps // 10, 1),
            progress_bar=False,
        ),
        flops_per_token=config.flops_per_token(args.seq_len),
    )
    records = trainer.fit(examples[split:], examples[:split])
    trainer.close()
    hf.save(args.out, config, trainer.params, tokenizer_dir=args.hf)
    print(f"final: {records[-1]}\nwrote {args.out}")
    return records


if __name__ == "__main__":
    main()
