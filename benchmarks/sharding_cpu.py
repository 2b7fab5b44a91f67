"""Training tokens/s of jaxstack against Redco on six meshes of 8 fake CPU devices, in one run.

For each mesh ``(data, fsdp, tensor)`` of ``MESHES`` the benchmark trains the same Llama
(``CONFIG_OVERRIDES``: the ``tiny`` preset with 8 query and 8 KV heads, so that ``tensor=8``
divides them) on the same batches, from the same initial parameters, with the same loss
(``jaxstack.lm``) and optimizer (AdamW behind global-norm clipping, constant learning rate),
in two frameworks:

1. jaxstack: ``Trainer.train_step`` on ``make_mesh(data, fsdp, tensor)`` with the automatic
   rules of ``lm_param_specs`` (tensor-parallel pairs, FSDP over the largest remaining dim);
2. Redco (``pip install redco``): ``redco.Trainer.train`` on the nearest mesh Redco can build
   (``redco_layout``), with Redco's own automatic sharding rules.

Each mesh runs in a fresh process of this script (``--worker``, with
``--xla_force_host_platform_device_count=8``) that builds both trainers, runs their warmup
steps (the first ones compile; excluded from the timing), then alternates between them for
``--rounds`` rounds of timed steps (jaxstack first in even rounds, Redco first in odd ones),
so that load from other processes hits both alike. The worker runs under ``--redco-python``,
an interpreter that has redco (e.g. a virtual environment made with
``--system-site-packages``, so that installing redco never touches the main environment).
The parent prints one JSON record (per mesh: both tokens/s, their ratio and notes) and writes
it to ``benchmarks/results/`` (``benchmarks/common.py``), the source of the docs table.

    python benchmarks/sharding_cpu.py --redco-python /tmp/redco-venv/bin/python
    python benchmarks/sharding_cpu.py --quick --skip-redco        # short smoke run
    python benchmarks/sharding_cpu.py --meshes 2,2,2 4,1,2 --steps 12 --batch 32 --seq 64

Redco 0.4.23's mesh is ``(dp, mp)``: ``n_model_shards`` devices split parameters by its
name-based rules and the rest split the batch (``n_model_shards=1`` is ``pmap`` data
parallelism). It has no FSDP axis, so a jaxstack mesh with ``fsdp > 1`` is compared against
Redco with that axis folded into ``dp`` (same batch split, parameters replicated over it).
Under Redco the model traces with no abstract mesh (see ``RedcoRun``): jaxstack's activation
hints name jaxstack's mesh axes and would otherwise replicate every activation on Redco's.
"""

import os
import sys
from pathlib import Path

if not __package__:  # run as a file, not with -m: make the `benchmarks` package importable
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402  (imports no jax)

NUM_DEVICES = 8
# Must run before jax is imported (workers import it; the parent passes the env on).
common.configure_cpu_xla(device_count=NUM_DEVICES)

import argparse  # noqa: E402
import json  # noqa: E402
import json.decoder  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402

import numpy as np  # noqa: E402

MESHES = [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2), (1, 2, 4), (4, 1, 2)]
"""The (data, fsdp, tensor) meshes measured by default."""
CONFIG_OVERRIDES = dict(
    vocab_size=264, hidden_size=128, num_heads=8, num_kv_heads=8, intermediate_size=384
)
"""``preset("tiny", **CONFIG_OVERRIDES)``: 4 layers, 8 heads / 8 KV heads of width 16."""
INIT_SEED = 0
CHECK_EXAMPLES = 8
"""Held-out examples whose loss is computed before and after training, for both."""
CORPUS_MODULES = (argparse, json.decoder, statistics, subprocess, tempfile)
"""Standard-library modules whose source text is the training data (fixed per Python)."""
WORKER_TIMEOUT_S = 600
FRAMEWORKS = ("jaxstack", "redco")


@dataclass(frozen=True)
class Setup:
    """What both frameworks train, the same on every mesh."""

    batch: int
    """Global examples per optimizer step."""
    seq: int
    """Tokens per example."""
    steps: int
    """Timed optimizer steps per framework."""
    warmup: int
    """Untimed steps before them (the first ones compile)."""
    rounds: int
    """The timed steps alternate between the frameworks in this many rounds."""

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one optimizer step's global batch."""
        return self.batch * self.seq


# ------------------------------------------------------------------------------ mesh mapping
def redco_layout(mesh: tuple[int, int, int]) -> tuple[int, int, list[str]]:
    """Redco's nearest mesh ``(dp, mp)`` for a jaxstack ``(data, fsdp, tensor)`` mesh, and
    notes on how they differ: ``dp = data * fsdp`` (the batch split), ``mp = tensor``."""
    data, fsdp, tensor = mesh
    dp, mp = data * fsdp, tensor
    notes = []
    if fsdp > 1:
        notes.append(
            f"nearest, not equal: Redco 0.4.23 has no FSDP (its mesh is (dp, mp) and its rules "
            f"split parameters only over mp), so fsdp={fsdp} is folded into dp={dp}: the same "
            f"batch split, but Redco replicates parameters and optimizer state over that axis "
            f"where jaxstack shards them"
        )
    if mp == 1:
        notes.append(f"Redco with n_model_shards=1 is pmap data parallelism over {dp} devices")
    return dp, mp, notes


def parse_mesh(text: str) -> tuple[int, int, int]:
    """``"2,2,2"`` -> ``(2, 2, 2)``; the product must be the 8 devices."""
    try:
        mesh = tuple(int(part) for part in text.split(","))
    except ValueError:
        mesh = ()
    if len(mesh) != 3 or min(mesh) < 1:
        raise argparse.ArgumentTypeError(
            f"mesh {text!r} is not three positive integers data,fsdp,tensor (e.g. 2,2,2)"
        )
    if mesh[0] * mesh[1] * mesh[2] != NUM_DEVICES:
        raise argparse.ArgumentTypeError(
            f"mesh {text!r} multiplies to {mesh[0] * mesh[1] * mesh[2]}, not the "
            f"{NUM_DEVICES} devices"
        )
    return mesh


# ---------------------------------------------------------------------------- shared inputs
def model_and_loss():
    """The benchmarked ``Llama`` module and jaxstack's LM ``loss_fn`` for it."""
    from jaxstack.lm import lm_functions
    from jaxstack.models import Llama, preset

    model = Llama(preset("tiny", **CONFIG_OVERRIDES))
    loss_fn, _ = lm_functions(model)
    return model, loss_fn


def init_params(model, seq: int):
    """The parameters both frameworks start from: ``model.init`` with ``INIT_SEED``."""
    import jax
    import jax.numpy as jnp

    return model.init(jax.random.PRNGKey(INIT_SEED), jnp.zeros((1, seq), jnp.int32))["params"]


def host_params(model, seq: int):
    """``init_params``, jitted as jaxstack's Trainer runs it, as host numpy arrays (which no
    framework can donate, i.e. delete)."""
    import jax

    params = jax.jit(lambda: init_params(model, seq))()
    return jax.tree.map(np.asarray, jax.device_get(params))


def optimizer():
    """AdamW behind global-norm clipping at a constant rate: the same chain for both."""
    from benchmarks.plain_llama import optimizer as clipped_adamw

    return clipped_adamw(common.LEARNING_RATE, common.BETAS, common.GRAD_CLIP)


def examples(setup: Setup) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """Packed byte-level LM examples of Python source text (stdlib modules of this Python,
    repeated as needed): ``(warmup + steps) * batch`` to train on, then ``CHECK_EXAMPLES``
    held out for the loss check. Fields are ``[seq]``; packing marks document ends."""
    from jaxstack.data import ByteTokenizer, PackedDataset

    train_count = (setup.warmup + setup.steps) * setup.batch
    needed = (train_count + CHECK_EXAMPLES) * (setup.seq + 1)
    sources = [Path(module.__file__).read_text() for module in CORPUS_MODULES]
    texts = sources * -(-needed // sum(len(text) for text in sources))
    data = PackedDataset.from_texts(texts, ByteTokenizer(), seq_len=setup.seq)
    picked = [data[i] for i in range(train_count + CHECK_EXAMPLES)]
    return picked[:train_count], picked[train_count:]


def param_bytes_per_device(params) -> int:
    """Bytes of parameters one device holds (its shard of every leaf)."""
    import jax

    return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(params))


def layer_specs(params) -> dict[str, str]:
    """PartitionSpecs of the first layer's q, o, up and down kernels, for the report."""
    layer = params["layers_0"]
    kernels = {
        "q": layer["attn"]["q"]["kernel"],
        "o": layer["attn"]["o"]["kernel"],
        "up": layer["mlp"]["up"]["kernel"],
        "down": layer["mlp"]["down"]["kernel"],
    }
    return {name: str(tuple(leaf.sharding.spec)) for name, leaf in kernels.items()}


# -------------------------------------------------------------------------------- frameworks
class JaxstackRun:
    """jaxstack's ``Trainer`` on ``make_mesh(data, fsdp, tensor)``, one step per batch."""

    def __init__(self, mesh: tuple[int, int, int], setup: Setup, model, loss_fn, work_dir: str):
        from jaxstack import Trainer
        from jaxstack.data import lm_collate
        from jaxstack.lm import lm_param_specs
        from jaxstack.mesh import make_mesh

        self.collate = lm_collate
        self.trainer = Trainer(
            params=lambda _: init_params(model, setup.seq),  # created sharded, in the jit
            collate_fn=lm_collate,
            loss_fn=loss_fn,
            config=common.jaxstack_train_config(work_dir, setup.batch, setup.warmup + setup.steps),
            mesh=make_mesh(data=mesh[0], fsdp=mesh[1], tensor=mesh[2]),
            optimizer=optimizer(),
            param_specs_fn=lm_param_specs(model, setup.seq),
        )
        self.batch = setup.batch
        self.losses: list[float] = []

    def steps(self, data: list[dict[str, np.ndarray]]) -> list[float]:
        """Train on ``data`` (whole batches), one ``train_step`` each; seconds per step."""
        times = []
        for start in range(0, len(data), self.batch):
            begin = time.perf_counter()
            metrics = self.trainer.train_step(self.collate(data[start : start + self.batch]))
            self.losses.append(float(metrics["loss"]))  # blocks until the step is done
            times.append(time.perf_counter() - begin)
        return times

    def params(self):
        """The current (sharded) parameters."""
        return self.trainer.params

    def report(self) -> dict:
        """Per-step losses and where the parameters live."""
        params = self.params()
        return {
            "loss_first": self.losses[0],
            "loss_last": self.losses[-1],
            "param_bytes_per_device": param_bytes_per_device(params),
            "specs": layer_specs(params),
        }

    def close(self) -> None:
        """Release the trainer's checkpoint manager."""
        self.trainer.close()


class RedcoRun:
    """Redco's ``Trainer`` on its nearest mesh with its own automatic sharding rules.

    Each ``steps`` call is one ``Trainer.train`` over whole batches (Redco's own loop, which
    blocks on every step's metrics); a step's time runs from its ``collate_fn`` call to the
    next one's, the last one's to the end of ``train`` (parameters ready).
    """

    def __init__(self, mesh: tuple[int, int, int], setup: Setup, model, loss_fn, start_params):
        import redco

        from jaxstack.data import lm_collate

        self.dp, self.mp, _ = redco_layout(mesh)
        self.batch = setup.batch
        self.deployer = redco.Deployer(jax_seed=INIT_SEED, n_model_shards=self.mp, verbose=False)
        self.marks: list[float] = []

        def collate_fn(examples):
            self.marks.append(time.perf_counter())
            return lm_collate(examples)

        def redco_loss(rng, state, params, batch, is_training):
            # under Redco's (dp, mp) mesh jaxstack's activation hints stand aside
            # (sharding_rules.uses_our_axes), so XLA partitions from Redco's param shardings
            return loss_fn(params, batch, rng)[0]

        self.trainer = redco.Trainer(
            deployer=self.deployer,
            collate_fn=collate_fn,
            apply_fn=model.apply,
            loss_fn=redco_loss,
            params=start_params,
            optimizer=optimizer(),
            params_sharding_rules=self.deployer.get_sharding_rules(start_params),
        )

    def steps(self, data: list[dict[str, np.ndarray]]) -> list[float]:
        """Train on ``data`` (whole batches) in one ``Trainer.train`` call; seconds per step."""
        import jax

        self.marks = []
        self.trainer.train(data, per_device_batch_size=self.batch // self.dp)
        jax.block_until_ready(self.trainer.state.params)
        self.marks.append(time.perf_counter())
        if len(self.marks) - 1 != len(data) // self.batch:
            raise RuntimeError(
                f"redco ran {len(self.marks) - 1} steps on {len(data) // self.batch} batches"
            )
        return np.diff(self.marks).tolist()

    def params(self):
        """The current parameters (one device's copy under pmap)."""
        import jax

        params = self.trainer.state.params
        if self.deployer.mesh is None:  # pmap: every leaf has a leading device axis
            return jax.tree.map(lambda x: x[0], params)
        return params

    def report(self) -> dict:
        """Redco's mesh and where the parameters live."""
        params = self.params()
        pmap = self.deployer.mesh is None
        return {
            "redco_mesh": {"dp": self.dp, "mp": self.mp},
            "param_bytes_per_device": param_bytes_per_device(params),
            "specs": "replicated (pmap)" if pmap else layer_specs(params),
        }

    def close(self) -> None:
        """Nothing to release."""


# ------------------------------------------------------------------------------------ worker
def throughput(setup: Setup, warmup_times: list[float], round_times: list[list[float]]) -> dict:
    """Tokens/s over all timed steps, per round, and the step-time spread."""
    timed = [t for times in round_times for t in times]
    return {
        "tokens_per_sec": setup.tokens_per_step * len(timed) / sum(timed),
        "tokens_per_sec_by_round": [
            setup.tokens_per_step * len(times) / sum(times) for times in round_times
        ],
        "step_s_median": statistics.median(timed),
        "step_s_min": min(timed),
        "step_s_max": max(timed),
        "warmup_steps_s": warmup_times,
    }


def measure_mesh(mesh: tuple[int, int, int], setup: Setup, with_redco: bool) -> dict:
    """Both frameworks on one mesh: warmup each, then alternate timed rounds; the results
    (or, for Redco, the error that stopped it) per framework."""
    import jax

    from jaxstack.data import lm_collate

    model, loss_fn = model_and_loss()
    data, held_out = examples(setup)
    start_params = host_params(model, setup.seq)
    warm = setup.warmup * setup.batch
    per_round = setup.steps // setup.rounds * setup.batch
    chunks = [data[warm + r * per_round : warm + (r + 1) * per_round] for r in range(setup.rounds)]
    loss = jax.jit(lambda params, batch: loss_fn(params, batch, jax.random.PRNGKey(0))[0])
    check_batch = lm_collate(held_out)
    check_before = float(loss(start_params, check_batch))

    with tempfile.TemporaryDirectory(prefix="jaxstack-shbench-") as work_dir:
        runs = {"jaxstack": JaxstackRun(mesh, setup, model, loss_fn, work_dir)}
        results, warmups = {}, {}
        if with_redco:
            try:
                runs["redco"] = RedcoRun(mesh, setup, model, loss_fn, start_params)
            except Exception as error:  # reported per mesh, never hidden
                results["redco"] = {"error": f"{type(error).__name__}: {error}"}
        try:
            for name, run in list(runs.items()):
                try:
                    warmups[name] = run.steps(data[:warm])
                except Exception as error:
                    if name == "jaxstack":
                        raise
                    results[name] = {"error": f"{type(error).__name__}: {error}"}
                    del runs[name]
            round_times = {name: [] for name in runs}
            for index, chunk in enumerate(chunks):
                order = list(runs) if index % 2 == 0 else list(runs)[::-1]  # ABBA against drift
                for name in order:
                    round_times[name].append(runs[name].steps(chunk))
            for name, run in runs.items():
                host = jax.tree.map(np.asarray, jax.device_get(run.params()))
                results[name] = {
                    **throughput(setup, warmups[name], round_times[name]),
                    "check_loss_before": check_before,
                    "check_loss_after": float(loss(host, check_batch)),
                    **run.report(),
                }
        finally:
            for run in runs.values():
                run.close()
    return results


def worker_versions(with_redco: bool) -> dict[str, str]:
    """Versions of the software the worker measured with (it may run in Redco's venv)."""
    return common.versions("flax", "optax", "numpy", *(["redco"] if with_redco else []))


def worker_main(mesh: tuple[int, int, int], setup: Setup, with_redco: bool, out: Path) -> None:
    """One mesh in this process; the result goes to ``out`` as JSON."""
    import jax

    if jax.device_count() != NUM_DEVICES or jax.devices()[0].platform != "cpu":
        raise RuntimeError(
            f"expected {NUM_DEVICES} CPU devices, found {jax.devices()}; run with "
            "JAX_PLATFORMS=cpu (this script sets --xla_force_host_platform_device_count=8)"
        )
    results = measure_mesh(mesh, setup, with_redco)
    out.write_text(json.dumps({**results, "versions": worker_versions(with_redco)}))


# ------------------------------------------------------------------------------------ parent
def run_worker(python: str, mesh: tuple[int, int, int], setup: Setup, with_redco: bool) -> dict:
    """One worker process for ``mesh``; its results, or ``{"error": ...}`` with the tail of
    its stderr when it failed."""
    with tempfile.TemporaryDirectory(prefix="shbench-") as tmp:
        out = Path(tmp) / "result.json"
        command = [python, str(Path(__file__).resolve()), "--worker"]
        command += ["--mesh", ",".join(map(str, mesh)), "--out", str(out)]
        command += ["--steps", str(setup.steps), "--warmup", str(setup.warmup)]
        command += ["--batch", str(setup.batch), "--seq", str(setup.seq)]
        command += ["--rounds", str(setup.rounds)] + ([] if with_redco else ["--skip-redco"])
        path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(common.REPO_ROOT)]))
        try:
            proc = subprocess.run(
                command,
                env={**os.environ, "PYTHONPATH": path},
                capture_output=True,
                text=True,
                timeout=WORKER_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            return {"error": f"worker exceeded {WORKER_TIMEOUT_S} s"}
        if proc.returncode != 0 or not out.exists():
            tail = proc.stderr.strip().splitlines()[-5:]
            return {"error": f"worker exited {proc.returncode}: " + " | ".join(tail)}
        return json.loads(out.read_text())


def check_redco(python: str) -> None:
    """Fail early, with the fix, when ``python`` cannot import redco."""
    proc = subprocess.run([python, "-c", "import redco"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(
            f"cannot import redco with {python}: {proc.stderr.strip().splitlines()[-1:]}. "
            "Install it into a separate environment, e.g. `python -m venv /tmp/redco-venv "
            "--system-site-packages && /tmp/redco-venv/bin/pip install --no-deps redco==0.4.23`,"
            " then pass --redco-python /tmp/redco-venv/bin/python (or use --skip-redco)"
        )


def mesh_row(mesh: tuple[int, int, int], results: dict, with_redco: bool) -> dict:
    """One mesh's entry of the report: both tokens/s, their ratio, notes and details."""
    jaxstack = results.get("jaxstack", {})
    redco = results.get("redco")
    row = {
        "mesh": {"data": mesh[0], "fsdp": mesh[1], "tensor": mesh[2]},
        "jaxstack_tokens_per_sec": jaxstack.get("tokens_per_sec"),
        "redco_tokens_per_sec": None,
        "ratio_jaxstack_over_redco": None,
        "notes": [results["error"]] if "error" in results else [],
    }
    if not with_redco:
        row["notes"].append("Redco skipped (--skip-redco)")
    else:
        dp, mp, notes = redco_layout(mesh)
        row["redco_mesh"] = {"dp": dp, "mp": mp}
        row["notes"] += notes
        if redco is not None and "error" in redco:
            row["notes"].append(f"Redco failed: {redco['error']}")
        elif redco is not None:
            row["redco_tokens_per_sec"] = redco["tokens_per_sec"]
            if row["jaxstack_tokens_per_sec"]:
                row["ratio_jaxstack_over_redco"] = (
                    row["jaxstack_tokens_per_sec"] / redco["tokens_per_sec"]
                )
    row["jaxstack"] = jaxstack
    if redco is not None:
        row["redco"] = redco
    return row


def run(args: argparse.Namespace) -> tuple[dict, dict[str, str]]:
    """Every mesh in its own worker (both frameworks interleaved); the JSON-ready report and
    the versions the workers measured with."""
    setup = Setup(args.batch, args.seq, args.steps, args.warmup, args.rounds)
    with_redco = not args.skip_redco
    if with_redco:
        check_redco(args.redco_python)
    python = args.redco_python if with_redco else sys.executable
    rows, versions = [], None
    for mesh in args.meshes:
        results = run_worker(python, mesh, setup, with_redco)
        versions = versions or results.pop("versions", None)
        rows.append(mesh_row(mesh, results, with_redco))
        row = rows[-1]
        print(
            f"mesh {mesh}: jaxstack {row['jaxstack_tokens_per_sec']} tokens/s, "
            f"redco {row['redco_tokens_per_sec']} tokens/s",
            file=sys.stderr,
        )
    report = {
        "devices": f"{NUM_DEVICES} fake CPU devices in one process",
        "xla_flags": os.environ["XLA_FLAGS"],
        "model": {"preset": "tiny", **CONFIG_OVERRIDES},
        "setup": {**asdict(setup), "quick": args.quick, "meshes": args.meshes},
        "tokens_per_step": setup.tokens_per_step,
        "optimizer": {
            "name": "clip_by_global_norm + adamw (plain_llama.optimizer), constant rate",
            "learning_rate": common.LEARNING_RATE,
            "betas": common.BETAS,
            "grad_clip": common.GRAD_CLIP,
        },
        "rows": rows,
    }
    return report, versions or common.versions()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; ``--quick`` replaces the defaults by a short smoke run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per framework")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (compile) first")
    parser.add_argument("--batch", type=int, default=16, help="global examples per step")
    parser.add_argument("--seq", type=int, default=128, help="tokens per example")
    parser.add_argument("--rounds", type=int, default=3, help="alternations of timed steps")
    parser.add_argument(
        "--meshes",
        type=parse_mesh,
        nargs="+",
        default=MESHES,
        metavar="D,F,T",
        help="data,fsdp,tensor meshes (default: all six)",
    )
    parser.add_argument("--skip-redco", action="store_true", help="only measure jaxstack")
    parser.add_argument(
        "--redco-python",
        default=os.environ.get("REDCO_PYTHON", sys.executable),
        help="interpreter with redco installed (default: $REDCO_PYTHON, else this one)",
    )
    parser.add_argument("--quick", action="store_true", help="2 steps, batch 8, seq 32 (smoke)")
    common.add_results_argument(parser)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mesh", type=parse_mesh, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.batch, args.seq, args.rounds = 2, 2, 8, 32, 2
    for name in ("steps", "warmup", "batch", "seq", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.steps % args.rounds:
        parser.error(f"--steps {args.steps} does not split into --rounds {args.rounds}")
    if args.worker and (args.mesh is None or args.out is None):
        parser.error("--worker needs --mesh and --out")
    for mesh in [args.mesh] if args.worker else args.meshes:
        if args.batch % (mesh[0] * mesh[1]):
            parser.error(
                f"--batch {args.batch} does not split over the {mesh[0] * mesh[1]} batch shards "
                f"(data x fsdp) of mesh {mesh}; use a multiple of {mesh[0] * mesh[1]}"
            )
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark (or, with ``--worker``, one mesh) and print the JSON report."""
    args = parse_args(argv)
    if args.worker:
        setup = Setup(args.batch, args.seq, args.steps, args.warmup, args.rounds)
        worker_main(args.mesh, setup, not args.skip_redco, args.out)
        return
    report, versions = run(args)
    common.write_result(
        "sharding_cpu", report, versions, common.results_dir(args.results_dir, args.quick)
    )


if __name__ == "__main__":
    main()
