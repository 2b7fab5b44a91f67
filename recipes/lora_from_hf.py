"""LoRA fine-tuning of a Hugging Face model in Python: train adapters of the attention and
MLP projections on a frozen base, then write them as a PEFT adapter and as a merged model.

The data, ``collate_fn`` and the loss are those of ``sft_from_hf.py`` (prompt tokens masked
out of the loss); only the ``lora=`` argument of the Trainer and the two exports differ::

    python recipes/lora_from_hf.py --make-tiny-model /tmp/tiny-llama     # nothing to download
    python recipes/lora_from_hf.py --hf /tmp/tiny-llama --out /tmp/tiny-lora --steps 100

writes ``/tmp/tiny-lora/adapter`` (``adapter_config.json`` + ``adapter_model.safetensors``:
``peft.PeftModel.from_pretrained(base, "/tmp/tiny-lora/adapter")``) and ``/tmp/tiny-lora/
merged`` (the base with the adapters merged in, for ``transformers`` or ``jaxstack serve``).
From the command line: ``jaxstack train --init.hf DIR --lora.rank 16 --train.export_hf OUT``.

How to run it:

- CPU: the two commands above (about a minute for the tiny model).
- One GPU: ``pip install -e ".[gpu]"``, then ``--hf /models/Llama-3.2-1B --rank 16``; every
  local GPU is used (data-parallel; the base is placed by the automatic rules, the adapters
  follow its sharding).
- A TPU pod: the same command on every worker (``gcloud compute tpus tpu-vm ssh NAME
  --worker=all --command "cd jaxstack && python recipes/lora_from_hf.py --hf /gcs-fuse/llama
  --out /gcs-fuse/llama-lora --work-dir /gcs-fuse/runs/lora"``), with paths every worker can
  read and write; ``jaxstack.distributed.initialize()`` joins the workers into one job.
"""

import argparse
import tempfile

from sft_from_hf import make_collate_fn, make_loss_and_pred_fns, make_tiny_model, toy_examples

import jaxstack as js
from jaxstack import hf
from jaxstack.data import load_tokenizer
from jaxstack.distributed import initialize


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the recipe; returns the logged training records (empty with --make-tiny-model)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make-tiny-model", metavar="DIR", help="write a tiny HF model, exit")
    parser.add_argument("--hf", metavar="DIR", help="Hugging Face model directory (the base)")
    parser.add_argument("--out", metavar="DIR", help="write adapter/ and merged/ here")
    parser.add_argument("--work-dir", default=None, help="checkpoints (adapters) and metrics")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--targets", default=js.lora.DEFAULT_TARGETS, help="regex of weights")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    args = parser.parse_args(argv)
    if args.make_tiny_model:
        print(f"wrote {make_tiny_model(args.make_tiny_model)}")
        return []
    if not args.hf or not args.out:
        parser.error("--hf DIR and --out DIR are required (or --make-tiny-model DIR)")

    initialize()
    examples = toy_examples()
    split = max(len(examples) // 10, args.batch_size)
    mesh = js.make_mesh()
    model, config, params = hf.load(args.hf, mesh=mesh)
    loss_fn, pred_fn = make_loss_and_pred_fns(model)
    lora = js.LoRAConfig(rank=args.rank, alpha=args.alpha, targets=args.targets)
    trainer = js.Trainer(
        params=params,
        collate_fn=make_collate_fn(load_tokenizer(args.hf), args.seq_len),
        loss_fn=loss_fn,
        pred_fn=pred_fn,
        mesh=mesh,
        lora=lora,
        config=js.TrainConfig(
            work_dir=args.work_dir or tempfile.mkdtemp(prefix="jaxstack-lora-"),
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
    js.lora.save_peft(f"{args.out}/adapter", config, trainer.params, lora, base_model=args.hf)
    hf.save(f"{args.out}/merged", config, trainer.model_params, tokenizer_dir=args.hf)
    print(f"final: {records[-1]}\nwrote {args.out}/adapter and {args.out}/merged")
    return records


if __name__ == "__main__":
    main()
