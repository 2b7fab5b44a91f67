"""One process of the multi-host test (run by test_multihost.py, not collected by pytest).

``train`` (one of N processes, 4 CPU devices each): trains to step 3 and saves, copies the
checkpointed work dir for the restore test, then trains step 4 and writes its loss.
``resume`` (one process, 8 devices): restores the copied step-3 checkpoint onto a different
mesh (tensor-parallel instead of FSDP), trains step 4 and writes its loss.
``preempt`` (one of N processes): trains "forever" until the test sends SIGTERM to one of
the processes; every process must stop and save at the same step, then writes it.
"""

import argparse
import json
import shutil

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

from jaxstack.data import ByteTokenizer, PackedDataset, lm_collate
from jaxstack.distributed import initialize
from jaxstack.lm import lm_functions, lm_param_specs
from jaxstack.mesh import make_mesh
from jaxstack.models import Llama, preset
from jaxstack.trainer import TrainConfig, Trainer

TEXT = ["multi host training with jax on cpu devices and gloo. " * 8] * 40


def build(work_dir: str, mesh_axes: dict, num_steps: int = 4) -> tuple[Trainer, PackedDataset]:
    model = Llama(preset("tiny", num_layers=2, hidden_size=64, intermediate_size=128))
    loss_fn, pred_fn = lm_functions(model)
    config = TrainConfig(
        work_dir=work_dir,
        batch_size=16,
        num_steps=num_steps,
        learning_rate=3e-3,
        save_every=3,
        log_every=1,
        progress_bar=False,
    )
    trainer = Trainer(
        params=lambda rng: model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"],
        collate_fn=lm_collate,
        loss_fn=loss_fn,
        pred_fn=pred_fn,
        config=config,
        mesh=make_mesh(**mesh_axes),
        param_specs_fn=lm_param_specs(model, 32),
    )
    return trainer, PackedDataset.from_texts(TEXT, ByteTokenizer(), seq_len=32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=["train", "resume", "preempt"])
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--copy-dir")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    initialize()
    # the restore lands on a different mesh (and process count) than the save
    mesh_axes = dict(data=4, fsdp=2) if args.phase == "train" else dict(data=4, tensor=2)
    if args.phase == "preempt":
        trainer, data = build(args.work_dir, mesh_axes, num_steps=100000)
        trainer.fit(data)
        trainer.close()
        with open(f"{args.out}.{jax.process_index()}", "w") as f:
            json.dump({"step": trainer.step, "preempted": trainer.preempted}, f)
        return
    trainer, data = build(args.work_dir, mesh_axes)
    if args.phase == "train":
        trainer.fit(data, stop_after=3)
        trainer.close()
        multihost_utils.sync_global_devices("saved step 3")
        if jax.process_index() == 0:
            shutil.copytree(args.work_dir, args.copy_dir)
        multihost_utils.sync_global_devices("copied")
        trainer, data = build(args.work_dir, mesh_axes)
    records = trainer.fit(data)
    trainer.close()
    if jax.process_index() == 0:
        with open(args.out, "w") as f:
            json.dump({"records": records, "processes": jax.process_count(),
                       "devices": jax.device_count()}, f)  # fmt: skip


if __name__ == "__main__":
    main()
