"""A non-LM use of the three-function API: an MNIST-like classifier on generated images.

Ten classes of 16x16 "digits": each class is a fixed random stroke pattern; examples are
that pattern shifted by up to one pixel with noise added. A small Flax CNN learns them.
How to run it:

- CPU: ``python recipes/classifier.py --steps 200`` (well under a minute).
- One GPU: ``pip install -e ".[gpu]"``, then the same command; every local GPU is used.
- A GPU cluster: one process per node, e.g. ``srun --nodes=2 --ntasks-per-node=1 python
  recipes/classifier.py --work-dir /shared/runs/cls`` (the work dir on a shared filesystem).
- A TPU pod: the same command on every worker (``gcloud compute tpus tpu-vm ssh NAME
  --worker=all --command "python recipes/classifier.py --work-dir /shared/runs/cls"``).

On a cluster or pod ``jaxstack.distributed.initialize()`` joins the processes into one job
(SLURM, Cloud TPU and ``JAX_COORDINATOR_ADDRESS`` set-ups are detected); alone it does nothing.
"""

import argparse
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxstack as js
from jaxstack.distributed import initialize


def make_examples(count: int, seed: int) -> list[dict]:
    """``count`` examples ``{"image": [16, 16] float32, "label": int}``."""
    patterns = np.random.default_rng(1234).random((10, 16, 16)) > 0.75
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, count)
    shifts = rng.integers(-1, 2, (count, 2))
    return [
        {
            "image": np.roll(patterns[y], tuple(s), axis=(0, 1)).astype(np.float32)
            + 0.5 * rng.standard_normal((16, 16)).astype(np.float32),
            "label": int(y),
        }
        for y, s in zip(labels, shifts, strict=True)
    ]


class CNN(nn.Module):
    """Two conv layers and a linear head: [b, 16, 16] -> logits [b, 10]."""

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = images[..., None]
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


model = CNN()


def collate_fn(examples: list[dict]) -> dict[str, np.ndarray]:
    return {
        "image": np.stack([e["image"] for e in examples]),
        "label": np.array([e["label"] for e in examples], np.int32),
    }


def loss_fn(params, batch, rng):
    logits = model.apply({"params": params}, batch["image"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, {"accuracy": (logits.argmax(-1) == batch["label"]).mean()}


def pred_fn(params, batch, rng):
    logits = model.apply({"params": params}, batch["image"])
    return {"prediction": logits.argmax(-1), "correct": logits.argmax(-1) == batch["label"]}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--work-dir", default=None)
    args = parser.parse_args(argv)
    initialize()
    trainer = js.Trainer(
        params=lambda rng: model.init(rng, jnp.zeros((1, 16, 16)))["params"],
        collate_fn=collate_fn,
        loss_fn=loss_fn,
        pred_fn=pred_fn,
        config=js.TrainConfig(
            work_dir=args.work_dir or tempfile.mkdtemp(prefix="jaxstack-classifier-"),
            batch_size=64,
            num_steps=args.steps,
            learning_rate=3e-3,
            warmup_steps=10,
            log_every=max(args.steps // 5, 1),
        ),
    )
    trainer.fit(make_examples(4096, seed=0))
    metrics = trainer.evaluate(make_examples(512, seed=1))
    trainer.close()
    print(f"held-out accuracy: {metrics['eval_accuracy']:.3f}")
    return metrics


if __name__ == "__main__":
    main()
