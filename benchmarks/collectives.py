"""Training step time with and without the overlapped collective paths, side by side in one
run on 8 fake CPU devices (or the devices present when run on a GPU or TPU host):

1. **Tensor parallelism** on ``data=2 x tensor=4``: ``tensor_parallel="plain"`` (the
   residual stream whole on every device, an all-reduce after o and down),
   ``"sequence_parallel"`` (Megatron-SP: the residual stream split over the sequence on
   ``tensor``, an all-gather before q/k/v and one before gate/up, a reduce-scatter after o
   and one after down),
   ``"collective_matmul"`` (the same layout, each all-gather / reduce-scatter decomposed
   into ring steps that overlap the matmul; ``jaxstack.layers.tensor_parallel``) and
   ``"collective_matmul_bidirectional"`` (those rings both ways: half the ring each way,
   about half the steps).
2. **Context parallelism** on ``data=2 x sequence=4``: ``context_parallel="ring"`` (K/V
   blocks travel the ring while each device attends to the block at hand) and
   ``"all_gather"`` (K/V gathered once); ``jaxstack.layers.context_parallel``.

Every variant is a ``jaxstack.Trainer`` (AdamW behind clipping, ``benchmarks/common.py``)
stepping on the same fixed batch from the same initial parameters (the first steps' losses
are recorded: equal across variants up to rounding). Timed steps alternate between the
variants one step at a time, the order rotating each round, so load from other processes
falls on all alike: compare the ratios within a group, not absolute times. The record is
printed as JSON and written to ``benchmarks/results/``; ``python -m benchmarks.report``
makes the ``collectives`` table of docs/benchmarks.md.

    python -m benchmarks.collectives            # recorded setup
    python -m benchmarks.collectives --quick    # seconds; recorded in the temp dir

On CPU the fake devices share the host's cores and XLA:CPU runs collectives synchronously,
so nothing overlaps: this run shows what the decomposition costs (more, smaller messages
and matmuls), not what overlap gains; that needs a GPU or TPU (docs/long_context.md).
"""

import os
import sys
from pathlib import Path

if not __package__:  # run as a file, not with -m: make the `benchmarks` package importable
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402  (imports no jax)
from benchmarks.moe import interleaved  # noqa: E402  (imports no jax)

NUM_DEVICES = 8

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402

GROUPS = {
    "tensor parallel (data=2, tensor=4)": (
        dict(data=2, tensor=4),
        {
            "plain": dict(tensor_parallel="plain"),
            "sequence_parallel": dict(tensor_parallel="sequence_parallel"),
            "collective_matmul": dict(tensor_parallel="collective_matmul"),
            "collective_matmul_bidirectional": dict(
                tensor_parallel="collective_matmul_bidirectional"
            ),
        },
    ),
    "context parallel (data=2, sequence=4)": (
        dict(data=2, sequence=4),
        {
            "ring": dict(context_parallel="ring"),
            "all_gather": dict(context_parallel="all_gather"),
        },
    ),
}
"""group -> (mesh axes, variant -> ``LlamaConfig`` options); the first variant of a group is
its baseline."""


def model_config(args: argparse.Namespace, **options):
    """The benchmarked Llama: ``args``' sizes, 8 query / 4 KV heads (``tensor=4`` divides
    both), with the variant's ``options``."""
    from jaxstack.models import preset

    return preset(
        "tiny", vocab_size=264, hidden_size=args.hidden, num_layers=args.layers, num_heads=8,
        num_kv_heads=4, intermediate_size=4 * args.hidden, max_seq_len=args.seq, **options,
    )  # fmt: skip


class Variant:
    """A ``Trainer`` of one variant on its mesh, stepping on one fixed batch."""

    def __init__(self, args: argparse.Namespace, axes: dict, options: dict, batch: dict):
        import jax.numpy as jnp

        from jaxstack.data import lm_collate
        from jaxstack.lm import lm_functions, lm_param_specs
        from jaxstack.mesh import make_mesh
        from jaxstack.models import Llama
        from jaxstack.trainer import Trainer

        model = Llama(model_config(args, **options))
        loss_fn, _ = lm_functions(model)
        self.batch = batch
        self.trainer = Trainer(
            params=lambda rng: model.init(rng, jnp.zeros((1, args.seq), jnp.int32))["params"],
            collate_fn=lm_collate,
            loss_fn=loss_fn,
            config=common.jaxstack_train_config(
                tempfile.mkdtemp(prefix="jaxstack-bench-"), args.batch, args.warmup + args.steps
            ),
            mesh=make_mesh(**axes),
            param_specs_fn=lm_param_specs(model, args.seq),
        )
        self.losses: list[float] = []

    def step(self) -> None:
        """One ``Trainer.train_step``, waiting for its loss."""
        self.losses.append(float(self.trainer.train_step(self.batch)["loss"]))

    def close(self) -> None:
        """Stop the trainer's background work."""
        self.trainer.close()


def measure_group(args: argparse.Namespace, axes: dict, options: dict, batch: dict) -> dict:
    """Warm up (compile) every variant of a group, then time them interleaved."""
    variants = {name: Variant(args, axes, opts, batch) for name, opts in options.items()}
    try:
        for variant in variants.values():
            for _ in range(args.warmup):
                variant.step()
        times = interleaved({name: v.step for name, v in variants.items()}, args.steps)
    finally:
        for variant in variants.values():
            variant.close()
    baseline = statistics.median(next(iter(times.values())))
    tokens = args.batch * args.seq
    rows = []
    for name, samples in times.items():
        median = statistics.median(samples)
        rows.append(
            {
                "variant": name,
                "median_step_s": median,
                "tokens_per_s": tokens / median,
                "step_time_vs_baseline": median / baseline,
                "first_loss": variants[name].losses[0],
            }
        )
    return {"mesh": axes, "rows": rows}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256, help="model width (default 256)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    parser.add_argument("--batch", type=int, default=4, help="global batch (default 4)")
    parser.add_argument("--seq", type=int, default=1024, help="sequence length (1024)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant (8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (2)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    common.add_results_argument(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.seq, args.steps, args.warmup = 64, 1, 64, 2, 1
    return args


def main(argv: list[str] | None = None) -> Path:
    """Measure every group, print the rows and write the record; returns the result file."""
    args = parse_args(argv)
    common.start_mesh_devices(NUM_DEVICES)
    import jax

    from benchmarks.train_cpu import random_batch

    batch = random_batch(264, args.batch, args.seq)
    groups = {}
    for group, (axes, options) in GROUPS.items():
        groups[group] = measure_group(args, axes, options, batch)
        for row in groups[group]["rows"]:
            print(
                f"{group:40s} {row['variant']:31s} {row['median_step_s'] * 1e3:9.1f} ms "
                f"x{row['step_time_vs_baseline']:.2f}  loss {row['first_loss']:.5f}",
                file=sys.stderr,
            )
    report = {
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "devices": NUM_DEVICES,
        "setup": {
            "quick": args.quick, "hidden": args.hidden, "layers": args.layers,
            "batch": args.batch, "seq": args.seq, "steps": args.steps, "warmup": args.warmup,
            "threads": common.usable_cpus(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
        },
        "groups": groups,
    }  # fmt: skip
    directory = common.results_dir(args.results_dir, args.quick)
    return common.write_result("collectives", report, common.versions("flax", "optax"), directory)


if __name__ == "__main__":
    main()
