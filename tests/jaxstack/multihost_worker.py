"""One process of the multi-host test (run by test_multihost.py, not collected by pytest).

``train`` (one of N processes, 4 CPU devices each): trains to step 3 and saves, copies the
checkpointed work dir for the restore test, then trains step 4 and writes its loss.
``resume`` (one process, 8 devices): restores the copied step-3 checkpoint onto a different
mesh (tensor-parallel instead of FSDP), trains step 4 and writes its loss.
``preempt`` (one of N processes): trains "forever" until the test sends SIGTERM to one of
the processes; every process must stop and save at the same step, then writes it.
``faults`` (one of N processes): with the work dir's lock held on process 0, every process's
``fit`` must fail at once; then trains to step 4 (saves at 2 and 4) and resumes with step 4
damaged as only process N-1 sees it (a DATA_LOSS injected into its reads): every process must
restore step 2. Writes what each saw.
"""

import argparse
import fcntl
import json
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from orbax.checkpoint._src.serialization import serialization

from jaxstack.data import ByteTokenizer, PackedDataset, lm_collate
from jaxstack.distributed import initialize
from jaxstack.lm import lm_functions, lm_param_specs
from jaxstack.mesh import make_mesh
from jaxstack.models import Llama, preset
from jaxstack.trainer import TrainConfig, Trainer
from jaxstack.workdir import LOCK_FILE, WorkDirBusyError

TEXT = ["multi host training with jax on cpu devices and gloo. " * 8] * 40


def build(
    work_dir: str, mesh_axes: dict, num_steps: int = 4, save_every: int = 3
) -> tuple[Trainer, PackedDataset]:
    model = Llama(preset("tiny", num_layers=2, hidden_size=64, intermediate_size=128))
    loss_fn, pred_fn = lm_functions(model)
    config = TrainConfig(
        work_dir=work_dir,
        batch_size=16,
        num_steps=num_steps,
        learning_rate=3e-3,
        save_every=save_every,
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
    parser.add_argument("phase", choices=["train", "resume", "preempt", "faults"])
    parser.add_argument("--work-dir", required=True)
    parser.add_argument("--copy-dir")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    initialize()
    # the restore lands on a different mesh (and process count) than the save
    mesh_axes = dict(data=4, fsdp=2) if args.phase == "train" else dict(data=4, tensor=2)
    if args.phase == "faults":
        seen = faults(args.work_dir, mesh_axes)
        with open(f"{args.out}.{jax.process_index()}", "w") as f:
            json.dump(seen, f)
        return
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


def faults(work_dir: str, mesh_axes: dict) -> dict:
    """The ``faults`` phase (module doc); what this process saw."""
    trainer, data = build(work_dir, mesh_axes, save_every=2)
    seen = {}
    if jax.process_index() == 0:  # another holder of the lock: a second open file
        Path(work_dir).mkdir(parents=True)
        holder = open(Path(work_dir) / LOCK_FILE, "a+")  # noqa: SIM115
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    start = time.monotonic()
    try:
        trainer.fit(data)
    except WorkDirBusyError as error:
        seen.update(busy=str(error), busy_s=time.monotonic() - start)
    if jax.process_index() == 0:
        holder.close()
    trainer.fit(data)
    trainer.close()
    if jax.process_index() == jax.process_count() - 1:
        read_shard = serialization._read_shard

        async def damaged_step_4(t, **kwargs):
            if "/4/" in str(t.spec()):
                raise ValueError("DATA_LOSS: injected: digest mismatch")
            return await read_shard(t=t, **kwargs)

        serialization._read_shard = damaged_step_4
    resumed, data = build(work_dir, mesh_axes, save_every=2)
    resumed.fit(data, stop_after=2)  # restores, then has nothing to train
    resumed.close()
    multihost_utils.sync_global_devices("resumed")
    damaged = Path(work_dir) / "checkpoints.damaged"
    seen.update(restored=resumed.step, moved=sorted(p.name for p in damaged.iterdir()))
    return seen


if __name__ == "__main__":
    main()
