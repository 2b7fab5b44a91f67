"""Pipeline stages and host offload, side by side in one run on 8 fake CPU devices (or the
devices present when run on a GPU or TPU host):

1. **Pipeline** (``jaxstack.layers.pipeline``): training step time and tokens/s of one
   Llama with stacked layers on ``data=8``, ``fsdp=8`` and ``data=2 x stage=4`` at several
   microbatch counts, GPipe and circular (``pipeline_repeats`` R > 1), with the bubble the
   formula predicts, ``(stages - 1) / (R x microbatches + stages - 1)``, beside the measured
   one, ``1 - t(data=8) / t(stage)``: the SPMD pipeline
   computes bubble iterations on stale data rather than idling, so on devices that share
   the host's cores it shows up as extra time. The measured figure also holds what else the
   pipeline costs (the permutes, the head and loss on every stage's copy of the batch).
2. **Offload** on ``data=8``: the compiled step's device bytes (``memory_analysis``:
   arguments, less those laid out in host memory, plus temporaries) and step time without
   offload, with ``optimizer_offload`` and with per-name remat of the block input
   (``offload`` to ``pinned_host``, ``save``, or everything recomputed).

Every variant is a ``jaxstack.Trainer`` (AdamW behind clipping, ``benchmarks/common.py``)
stepping on one fixed batch from the same initial parameters (the first losses are recorded:
equal across variants up to rounding). Timed steps alternate between the variants of a part
one step at a time, the order rotating each round, so load from other processes falls on all
alike. The record is printed as JSON and written to ``benchmarks/results/``; ``python -m
benchmarks.report`` makes the ``pipeline`` table of docs/benchmarks.md.

    python -m benchmarks.pipeline            # recorded setup
    python -m benchmarks.pipeline --quick    # seconds; recorded in the temp dir

On CPU host and device memory are the same RAM: offload moves bytes between memory spaces
of one machine, so its step time shows the copies' cost, not a GPU's PCIe transfers.
"""

import os
import sys
from pathlib import Path

if not __package__:  # run as a file, not with -m: make the `benchmarks` package importable
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402  (imports no jax)
from benchmarks.moe import interleaved  # noqa: E402  (imports no jax)

NUM_DEVICES = 8
STAGES = 4

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402


def pipeline_variants(args: argparse.Namespace) -> dict[str, tuple[dict, dict, dict]]:
    """name -> (mesh axes, ``LlamaConfig`` options, ``TrainConfig`` options) of part 1; the
    first is the baseline the bubble is measured against."""
    variants = {"data=8": (dict(data=8), {}, {}), "fsdp=8": (dict(fsdp=8, data=1), {}, {})}
    mesh = dict(data=2, stage=STAGES)
    for m in args.microbatches:
        variants[f"data=2,stage={STAGES} M={m}"] = (mesh, dict(pipeline_microbatches=m), {})
        for r in args.repeats:
            options = dict(pipeline_microbatches=m, pipeline_repeats=r)
            variants[f"data=2,stage={STAGES} R={r} M={m}"] = (mesh, options, {})
    return variants


OFFLOAD_VARIANTS = {
    "none": ({}, {}),
    "optimizer_offload": ({}, dict(optimizer_offload=True)),
    "remat block_input=offload": (dict(remat="block_input=offload"), {}),
    "remat block_input=save": (dict(remat="block_input=save"), {}),
    "remat full (recompute)": (dict(remat="full"), {}),
}
"""name -> (``LlamaConfig`` options, ``TrainConfig`` options) of part 2, on ``data=8``."""


class Variant:
    """A ``Trainer`` of one variant on its mesh, stepping on one fixed batch."""

    def __init__(self, args, axes: dict, model_options: dict, train_options: dict, batch):
        import jax.numpy as jnp

        from jaxstack.data import lm_collate
        from jaxstack.lm import lm_functions, lm_param_specs
        from jaxstack.mesh import make_mesh
        from jaxstack.models import Llama, preset
        from jaxstack.trainer import Trainer

        config = preset(
            "tiny", vocab_size=264, hidden_size=args.hidden, num_layers=args.layers,
            num_heads=8, num_kv_heads=4, intermediate_size=4 * args.hidden,
            max_seq_len=args.seq, scan_layers=True, **model_options,
        )  # fmt: skip
        model = Llama(config)
        loss_fn, _ = lm_functions(model)
        train = common.jaxstack_train_config(
            tempfile.mkdtemp(prefix="jaxstack-bench-"), args.batch, args.warmup + args.steps
        ).replace(**train_options)
        self.batch = batch
        self.trainer = Trainer(
            params=lambda rng: model.init(rng, jnp.zeros((1, args.seq), jnp.int32))["params"],
            collate_fn=lm_collate,
            loss_fn=loss_fn,
            config=train,
            mesh=make_mesh(**axes),
            param_specs_fn=lm_param_specs(model, args.seq),
        )
        self.losses: list[float] = []

    def step(self) -> None:
        """One ``Trainer.train_step``, waiting for its loss."""
        self.losses.append(float(self.trainer.train_step(self.batch)["loss"]))

    def device_bytes(self) -> dict[str, int]:
        """The compiled step's device-resident argument and temporary bytes per device."""
        from jaxstack.optim import host_argument_bytes

        compiled = self.trainer.compiled_train_step(self.batch)
        stats = compiled.memory_analysis()
        host = host_argument_bytes(compiled)
        return {
            "device_argument_bytes": stats.argument_size_in_bytes - host,
            "host_argument_bytes": host,
            "temp_bytes": stats.temp_size_in_bytes,
        }

    def close(self) -> None:
        """Stop the trainer's background work."""
        self.trainer.close()


def measure(args, variants: dict[str, tuple], batch: dict, memory: bool) -> list[dict]:
    """Warm up (compile) every variant, then time them interleaved; rows in variant order."""
    built = {name: Variant(args, *spec, batch) for name, spec in variants.items()}
    try:
        for variant in built.values():
            for _ in range(args.warmup):
                variant.step()
        times = interleaved({name: v.step for name, v in built.items()}, args.steps)
        extra = {name: v.device_bytes() if memory else {} for name, v in built.items()}
    finally:
        for variant in built.values():
            variant.close()
    tokens = args.batch * args.seq
    return [
        {
            "variant": name,
            "median_step_s": statistics.median(samples),
            "tokens_per_s": tokens / statistics.median(samples),
            "first_loss": built[name].losses[0],
            **extra[name],
        }
        for name, samples in times.items()
    ]


def add_bubbles(rows: list[dict], variants: dict[str, tuple]) -> list[dict]:
    """Part 1's rows with, for the staged ones, the formula's and the measured bubble (against
    the first row's time)."""
    baseline = rows[0]["median_step_s"]
    out = []
    for row in rows:
        axes, options, _ = variants[row["variant"]]
        row = dict(row)
        if axes.get("stage", 1) > 1:
            m, s = options["pipeline_microbatches"], axes["stage"]
            r = options.get("pipeline_repeats", 1)
            row["bubble_formula"] = (s - 1) / (r * m + s - 1)
            row["bubble_measured"] = 1 - baseline / row["median_step_s"]
        out.append(row)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256, help="model width (default 256)")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")
    parser.add_argument("--batch", type=int, default=32, help="global batch (default 32)")
    parser.add_argument("--seq", type=int, default=256, help="sequence length (256)")
    parser.add_argument("--microbatches", type=int, nargs="+", default=[4, 8, 16],
                        help="pipeline microbatch counts (4 8 16)")  # fmt: skip
    parser.add_argument("--repeats", type=int, nargs="*", default=[2],
                        help="circular schedule repeats beside GPipe (2); layers must be a "
                             "multiple of 4 stages x each")  # fmt: skip
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant (8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (2)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    common.add_results_argument(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.batch, args.seq = 64, 8, 16, 32
        args.microbatches, args.steps, args.warmup = [4, 8], 2, 1
    return args


def main(argv: list[str] | None = None) -> Path:
    """Measure both parts, print the rows and write the record; returns the result file."""
    args = parse_args(argv)
    common.start_mesh_devices(NUM_DEVICES)
    import jax

    from benchmarks.train_cpu import random_batch

    batch = random_batch(264, args.batch, args.seq)
    variants = pipeline_variants(args)
    pipeline_rows = add_bubbles(measure(args, variants, batch, memory=False), variants)
    offload = {name: (dict(data=8), *spec) for name, spec in OFFLOAD_VARIANTS.items()}
    offload_rows = measure(args, offload, batch, memory=True)
    for row in pipeline_rows + offload_rows:
        print(f"{row['variant']:28s} {row['median_step_s'] * 1e3:9.1f} ms", file=sys.stderr)
    report = {
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "devices": NUM_DEVICES,
        "setup": {
            "quick": args.quick, "hidden": args.hidden, "layers": args.layers,
            "batch": args.batch, "seq": args.seq, "steps": args.steps, "warmup": args.warmup,
            "stages": STAGES, "repeats": args.repeats, "threads": common.usable_cpus(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
        },
        "pipeline": pipeline_rows,
        "offload": offload_rows,
    }  # fmt: skip
    directory = common.results_dir(args.results_dir, args.quick)
    return common.write_result("pipeline", report, common.versions("flax", "optax"), directory)


if __name__ == "__main__":
    main()
