"""The cost of asynchronous checkpoints: training steps that save after every step against
steps that never save, side by side in one run, and the time to restore.

Two ``jaxstack.Trainer``-s train the same model (the ``jaxstack.lm`` loss, AdamW behind
global-norm clipping) on the same fixed random batch, each in its own work dir: one with
``save_every=1`` (``keep_checkpoints`` small), one with ``save_every`` past the end of the run.
An iteration of either is what ``Trainer.fit`` does per step, through the public API:

1. ``trainer.checkpoints.save(step, trainer.state, loader.get_state())`` (the manager saves
   when the step is due: always for one, never for the other); the time spent inside this
   call is the training thread blocked by the save (the device -> host part);
2. one ``trainer.train_step`` on the loader's next batch, waiting for its loss; the write of
   the checkpoint started in 1 runs in the background meanwhile;
3. ``trainer.checkpoints.wait()``: what is left of the background write (0 when it ended
   during the step). Counting it in the iteration keeps every save's work inside the saving
   trainer's time: none of it leaks into the next, non-saving, iteration.

After untimed warmup iterations (the first compiles), the two trainers alternate one
iteration at a time, the order switching every round, so that load from other processes on
a shared machine falls on both alike. Then, on the saving trainer alone: a few more saves
timed from the call to the end of the background write, with the process CPU time they use
(nothing else runs meanwhile), and the bytes on disk; the same params and optimizer state
saved and restored by Orbax directly, stored as jaxstack stores them (uncompressed) and
compressed by zstd as Orbax does by default (where the background time goes); a host memory
copy bandwidth (the floor of any copy of the state); and a fresh ``Trainer`` whose ``fit`` on
the saving trainer's work dir restores the newest checkpoint straight into its placement (the
files were written seconds before, so much of them may still be in the page cache), checked
bit for bit against the state saved.

The record (median iteration of each trainer, the overhead, the blocked and background parts,
bytes, restore time) is printed as JSON and written to ``benchmarks/results/``
(``benchmarks/common.py``); ``python -m benchmarks.report`` makes the table in
docs/benchmarks.md from it. Goal: under 5% overhead with a save every step.

    python benchmarks/checkpoint.py           # 100m preset, the recorded setup (~5 minutes)
    python benchmarks/checkpoint.py --quick   # tiny preset, seconds; recorded in the temp dir
"""

import argparse
import dataclasses
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if not __package__:  # run as a file, not with -m: make the `benchmarks` package importable
    sys.path.append(str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from benchmarks import common
from benchmarks.train_cpu import random_batch
from jaxstack import Trainer
from jaxstack.data import lm_collate
from jaxstack.lm import lm_functions
from jaxstack.models.llama import PRESETS, Llama, LlamaConfig, preset

GOAL_OVERHEAD = 0.05
"""Issue 10: saving every step may cost under 5% of the step time."""
NEVER = 10**9
"""``save_every`` of the trainer that does not save."""


@dataclasses.dataclass(frozen=True)
class Setup:
    """What both trainers train and how the run is timed."""

    preset: str
    config: LlamaConfig
    batch: int
    """Examples per step."""
    seq: int
    """Tokens per example."""
    steps: int
    """Timed iterations per trainer."""
    warmup: int
    """Untimed iterations per trainer before them (the first compiles)."""
    keep: int
    """``keep_checkpoints`` of the saving trainer."""
    isolated_saves: int
    """Saves timed alone after the timed rounds (blocked part + background write)."""


# -------------------------------------------------------------------------------- trainers
class Run:
    """A ``Trainer`` on ``Llama(setup.config)`` in its own work dir, saving every
    ``save_every`` steps, stepping on a loader that repeats one fixed batch."""

    def __init__(self, setup: Setup, examples: list[dict], work_dir: str, save_every: int):
        self.setup, self.examples = setup, examples
        self.trainer = make_trainer(setup, work_dir, NEVER, save_every)
        self.loader = self.trainer.loader(examples, shuffle=self.trainer.config.shuffle)
        self.batches: Iterator[dict[str, np.ndarray]] = iter(self.loader)
        self.losses: list[float] = []
        self.donated: list[bool] = []
        """Per timed iteration: whether the step reused (donated) the previous state's
        buffers."""

    def first_step(self) -> None:
        """The compiling first step (creates the state)."""
        self.losses.append(float(self.trainer.train_step(next(self.batches))["loss"]))

    def save(self) -> bool:
        """Save the current state if due (``CheckpointManager.save``); whether it saved."""
        trainer = self.trainer
        return trainer.checkpoints.save(trainer.step, trainer.state, self.loader.get_state())

    def iteration(self) -> dict[str, float]:
        """Save if due, one step, wait for what is left of the save (module doc); seconds of
        the whole iteration (``step_s``), of the save call (``blocked_s``) and of the final
        wait (``waited_s``)."""
        start = time.perf_counter()
        self.save()
        blocked = time.perf_counter() - start
        previous = jax.tree.leaves(self.trainer.state.params)[0]
        self.losses.append(float(self.trainer.train_step(next(self.batches))["loss"]))
        wait_start = time.perf_counter()
        self.trainer.checkpoints.wait()
        end = time.perf_counter()
        self.donated.append(previous.is_deleted())
        return {"step_s": end - start, "blocked_s": blocked, "waited_s": end - wait_start}

    def close(self) -> None:
        """Finish pending saves and release the checkpoint manager."""
        self.trainer.close()


def make_trainer(setup: Setup, work_dir: str, num_steps: int, save_every: int) -> Trainer:
    """A ``Trainer`` of the training benchmarks' update (``common.jaxstack_train_config``)
    saving every ``save_every`` steps and keeping ``setup.keep`` checkpoints."""
    model = Llama(setup.config)
    loss_fn, pred_fn = lm_functions(model)
    dummy_ids = jnp.zeros((1, setup.seq), jnp.int32)
    config = common.jaxstack_train_config(work_dir, setup.batch, num_steps)
    config = dataclasses.replace(config, save_every=save_every, keep_checkpoints=setup.keep)
    return Trainer(
        params=lambda rng: model.init(rng, dummy_ids)["params"],
        collate_fn=lm_collate,
        loss_fn=loss_fn,
        pred_fn=pred_fn,
        config=config,
    )


def random_examples(setup: Setup) -> list[dict[str, np.ndarray]]:
    """The fixed random batch of ``train_cpu`` as a list of examples (what a loader reads)."""
    batch = random_batch(setup.config.vocab_size, setup.batch, setup.seq)
    return [{name: value[i] for name, value in batch.items()} for i in range(setup.batch)]


# ---------------------------------------------------------------------------- measurements
def cpu_seconds() -> float:
    """User + system CPU time of this process so far (every thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def isolated_save(run: Run) -> dict[str, float]:
    """One untimed step, then one save timed alone: seconds blocked in the call, seconds until
    the background write ended, and the process CPU seconds the save used (the training
    thread only waits meanwhile)."""
    run.first_step()  # an untimed step, so that the save has a new step number
    cpu, start = cpu_seconds(), time.perf_counter()
    if not run.save():
        raise RuntimeError("the saving trainer did not save; is save_every 1?")
    blocked = time.perf_counter() - start
    run.trainer.checkpoints.wait()
    return {
        "blocked_s": blocked,
        "total_s": time.perf_counter() - start,
        "cpu_s": cpu_seconds() - cpu,
    }


def memcpy_bytes_per_sec(size: int = 2**28, repeats: int = 3) -> float:
    """This host's memory copy bandwidth now: bytes copied per second by ``np.copyto`` of a
    ``size``-byte array (best of ``repeats``, after one untimed copy)."""
    source = np.ones(size // 4, np.float32)
    dest = np.empty_like(source)
    seconds = common.best_seconds(lambda: np.copyto(dest, source), repeats)
    return size / seconds


def finite_check_seconds(state: Any, repeats: int = 3) -> float:
    """Seconds of a jitted "is every float of the state finite" reduction over ``state``'s
    params and optimizer state (fastest of ``repeats``): the check ``Trainer.fit`` runs
    before each save, which this benchmark's iterations do not include."""

    @jax.jit
    def all_finite(tree):
        leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
        return jnp.stack([jnp.isfinite(x).all() for x in leaves]).all()

    tree = (state.params, state.opt_state)
    return common.best_seconds(lambda: bool(all_finite(tree)), repeats)


CODECS = {
    "zstd": {"use_compression": True},
    "none": {"use_compression": False, "use_zarr3": True},
}
"""Orbax ``PyTreeCheckpointHandler`` options compared by ``orbax_codecs``: Orbax's default
(Zarr v2 chunks compressed by zstd level 1, what jaxstack stored before) and jaxstack's
storage (``jaxstack.checkpoint``: uncompressed Zarr v3, shard index checksummed)."""


def orbax_codecs(state: Any, directory: Path) -> dict[str, dict[str, float]]:
    """Where the background time goes: ``state``'s params and optimizer state saved
    (asynchronously, OCDBT, as jaxstack saves) and restored by Orbax directly in each of
    ``CODECS``; per codec the seconds and process CPU seconds to the end of the write, the
    bytes written and the seconds to restore."""
    tree = {"params": state.params, "opt_state": state.opt_state}
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
    )
    results = {}
    for name, options in CODECS.items():
        path = directory / f"orbax-{name}"
        checkpointer = ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler(**options))
        cpu, start = cpu_seconds(), time.perf_counter()
        checkpointer.save(path, args=ocp.args.PyTreeSave(tree))
        checkpointer.wait_until_finished()
        saved, saved_cpu = time.perf_counter() - start, cpu_seconds() - cpu
        start = time.perf_counter()
        restored = checkpointer.restore(
            path,
            args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)
            ),
        )
        jax.block_until_ready(restored)
        results[name] = {
            "save_s": saved,
            "save_cpu_s": saved_cpu,
            "bytes_on_disk": directory_bytes(path),
            "restore_s": time.perf_counter() - start,
        }
        del restored
        checkpointer.close()
        shutil.rmtree(path, ignore_errors=True)
    return results


def directory_bytes(path: Path) -> int:
    """Bytes of every file under ``path``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def stored_codecs(step_dir: Path) -> list[str]:
    """The compression codecs of the state's arrays in a checkpoint (``"none"``: stored raw),
    read from its Orbax metadata."""
    metadata = ocp.PyTreeCheckpointHandler().metadata(step_dir / "state")
    codecs = set()
    for leaf in jax.tree.leaves(metadata.tree if hasattr(metadata, "tree") else metadata):
        zarr = getattr(getattr(leaf, "storage", None), "zarr_metadata", None)
        if zarr is not None:
            codecs.add("none" if zarr.compression is None else repr(zarr.compression))
    return sorted(codecs)


def restore(setup: Setup, saving: Run, work_dir: str) -> dict[str, Any]:
    """A fresh ``Trainer`` on the saving trainer's work dir: seconds to decide its placement
    (``param_specs``: traces the loss, compiles nothing), then of ``fit`` restoring the newest
    checkpoint straight into that placement (``num_steps`` is the saved step, so it trains
    nothing); checks the restored state equals the saved one bit for bit."""
    saving.trainer.checkpoints.wait()
    step = saving.trainer.step
    if saving.trainer.checkpoints.latest_step() != step:
        raise RuntimeError(f"the newest checkpoint is not step {step}")
    fresh = make_trainer(setup, work_dir, step, 1)
    start = time.perf_counter()
    fresh.param_specs(lm_collate(saving.examples))
    placement = time.perf_counter() - start
    start = time.perf_counter()
    fresh.fit(saving.examples)
    jax.block_until_ready(fresh.state)
    seconds = time.perf_counter() - start
    saved, restored = jax.tree.leaves(saving.trainer.state), jax.tree.leaves(fresh.state)
    identical = len(saved) == len(restored) and all(
        np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(saved, restored, strict=True)
    )
    state_bytes = sum(x.nbytes for x in restored)
    fresh.close()
    return {
        "step": step,
        "restored_step": fresh.step,
        "placement_s": placement,
        "restore_s": seconds,
        "restore_bytes_per_sec": state_bytes / seconds,
        "bit_identical": identical and fresh.step == step,
    }


# ------------------------------------------------------------------------------------- run
def median(values: list[float]) -> float:
    """The median of ``values``."""
    return statistics.median(values)


def run(setup: Setup) -> dict[str, Any]:
    """The whole benchmark; returns the report (module doc)."""
    devices = jax.devices()
    if len(devices) != 1 or devices[0].platform != "cpu":
        raise RuntimeError(
            f"expected exactly one CPU device, found {devices}; run this script as its own "
            "process so that it sets XLA_FLAGS before jax starts its backend"
        )
    root = Path(tempfile.mkdtemp(prefix="jaxstack-ckpt-bench-"))
    examples = random_examples(setup)
    runs: dict[str, Run] = {}
    first_step_s: dict[str, float] = {}
    try:
        for name, every in (("save_every_step", 1), ("no_save", NEVER)):
            start = time.perf_counter()
            runs[name] = Run(setup, examples, str(root / name), every)
            runs[name].first_step()
            first_step_s[name] = time.perf_counter() - start
        for _ in range(setup.warmup - 1):  # untimed, alternating like the timed ones
            for run_ in runs.values():
                run_.iteration()
        for run_ in runs.values():
            run_.donated.clear()
        names = list(runs)
        timed: dict[str, list[dict[str, float]]] = {name: [] for name in names}
        for index in range(setup.steps):  # one iteration each, the order switching
            for name in names[index % 2 :] + names[: index % 2]:
                timed[name].append(runs[name].iteration())
        trainers = {
            name: {
                **step_summary([t["step_s"] for t in timed[name]]),
                "first_step_s": first_step_s[name],
                "donated_fraction": run_.donated.count(True) / len(run_.donated),
                "loss_first_last": [run_.losses[0], run_.losses[-1]],
            }
            for name, run_ in runs.items()
        }
        runs.pop("no_save").close()  # free its state before the restore
        saving = runs["save_every_step"]
        isolated = [isolated_save(saving) for _ in range(setup.isolated_saves)]
        state = saving.trainer.state
        state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
        step_dir = root / "save_every_step" / "checkpoints" / str(saving.trainer.step)
        checkpoint = {
            "state_bytes": state_bytes,
            "bytes_on_disk": directory_bytes(step_dir),
            "codecs": stored_codecs(step_dir),
            "checkpoints_kept": len(saving.trainer.checkpoints.all_steps()),
        }
        finite_check = finite_check_seconds(state)
        codecs = orbax_codecs(state, root)
        copy_rate = memcpy_bytes_per_sec()
        restored = restore(setup, saving, str(root / "save_every_step"))
    finally:
        for run_ in runs.values():
            run_.close()
        shutil.rmtree(root, ignore_errors=True)
    save, none = ([t["step_s"] for t in timed[name]] for name in ("save_every_step", "no_save"))
    saving_times = timed["save_every_step"]
    return {
        "trainers": trainers,
        "overhead": median(save) / median(none) - 1,
        "overhead_paired": median([s / n for s, n in zip(save, none, strict=True)]) - 1,
        "overhead_mean": statistics.fmean(save) / statistics.fmean(none) - 1,
        "goal_overhead": GOAL_OVERHEAD,
        "save_blocked_s": [round(t["blocked_s"], 4) for t in saving_times],
        "median_save_blocked_s": median([t["blocked_s"] for t in saving_times]),
        "save_waited_s": [round(t["waited_s"], 4) for t in saving_times],
        "isolated_saves": isolated,
        "median_isolated_save": {
            key: median([s[key] for s in isolated]) for key in ("blocked_s", "total_s", "cpu_s")
        },
        "checkpoint": checkpoint,
        "finite_check_s": finite_check,
        "orbax_codecs": codecs,
        "memcpy_bytes_per_sec": copy_rate,
        "state_copy_s_at_memcpy_rate": state_bytes / copy_rate,
        "restore": restored,
    }


def step_summary(times: list[float]) -> dict[str, Any]:
    """Iteration seconds of one trainer, their median and mean."""
    return {
        "step_s": [round(t, 4) for t in times],
        "median_step_s": median(times),
        "mean_step_s": statistics.fmean(times),
    }


def describe_setup(setup: Setup, quick: bool) -> dict[str, Any]:
    """The JSON-ready setup of a run."""
    cfg = setup.config
    return {
        "preset": setup.preset,
        "quick": quick,
        "params": cfg.num_params(),
        "dtype": cfg.dtype,
        "batch": setup.batch,
        "seq": setup.seq,
        "steps": setup.steps,
        "warmup_steps": setup.warmup,
        "keep_checkpoints": setup.keep,
        "isolated_saves": setup.isolated_saves,
        "threads": common.usable_cpus(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax_device": jax.devices()[0].device_kind,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; ``--quick`` replaces the defaults by a seconds-long smoke run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="100m", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=8, help="timed iterations per trainer")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first (compile)")
    parser.add_argument("--batch", type=int, default=2, help="examples per step")
    parser.add_argument("--seq", type=int, default=512, help="tokens per example")
    parser.add_argument("--keep", type=int, default=2, help="keep_checkpoints of the saver")
    parser.add_argument("--isolated-saves", type=int, default=2, help="saves timed alone")
    parser.add_argument("--quick", action="store_true", help="tiny preset, 2 steps (smoke)")
    common.add_results_argument(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.steps, args.warmup, args.seq, args.isolated_saves = "tiny", 2, 2, 32, 1
    args.results_dir = common.results_dir(args.results_dir, args.quick)
    for name in ("steps", "warmup", "batch", "seq", "keep", "isolated_saves"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    max_len = PRESETS[args.preset].max_seq_len
    if args.seq > max_len:
        parser.error(f"--seq {args.seq} exceeds preset {args.preset!r} max_seq_len={max_len}")
    return args


def main(argv: list[str] | None = None) -> Path:
    """Run the benchmark, print its record as JSON and write it; returns the file's path."""
    args = parse_args(argv)
    common.configure_cpu_xla()
    setup = Setup(
        args.preset,
        preset(args.preset, remat="none"),
        args.batch,
        args.seq,
        args.steps,
        args.warmup,
        args.keep,
        args.isolated_saves,
    )
    report = {"setup": describe_setup(setup, args.quick), **run(setup)}
    versions = common.versions("flax", "optax", "orbax-checkpoint", "tensorstore", "numpy")
    return common.write_result("checkpoint", report, versions, args.results_dir)


if __name__ == "__main__":
    main()
