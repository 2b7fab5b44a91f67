"""CPU training throughput of jaxstack against PyTorch ``transformers``, in one run.

One process, one CPU device, the same thread count for both frameworks. It measures:

1. this host's matmul peak with JAX (``jaxstack.perf.measured_matmul_flops``: float32, plus
   bfloat16 when that is the compute dtype), re-measured after every timed round and the best
   kept, the denominator of model FLOPs utilisation (MFU);
2. jaxstack training through the real ``Trainer`` (AdamW behind global-norm clipping, the
   ``jaxstack.lm`` loss) on one fixed batch, after untimed warmup steps (the first compiles);
3. the same architecture as ``transformers.LlamaForCausalLM`` (eager, SDPA attention) trained
   with ``torch.optim.AdamW(fused=True)`` and the same clipping, betas and cross-entropy, on
   the same batch and dtype (bfloat16 is ``torch.autocast`` over float32 parameters, as
   jaxstack's mixed precision).

Timed steps alternate between the frameworks (one jaxstack step, one torch step, ...), so
that load from other processes on a shared machine falls on both alike. It prints one JSON
object: tokens/s, MFU (``LlamaConfig.flops_per_token`` / measured peak) of both, and their
ratio. ``--breakdown`` adds the forward / backward / optimizer split of a step for both;
``--profile`` traces jaxstack steps with ``jax.profiler`` and sums XLA op time by phase and
model part (attention, MLP, LM head, ...).

    python benchmarks/train_cpu.py                         # 100m preset, recorded setup
    python benchmarks/train_cpu.py --breakdown --profile   # ... plus where the time goes
    python benchmarks/train_cpu.py --quick                 # tiny preset, 3 steps, seconds
    python benchmarks/train_cpu.py --preset tiny --batch 8 --seq 256 --skip-torch

XLA flags: the script sets ``JAX_PLATFORMS=cpu``, removes
``--xla_force_host_platform_device_count`` from ``XLA_FLAGS`` (one device owning every core)
and appends ``--xla-flags``; XLA reads them when its CPU backend starts, so run the script as
its own process.
"""

import argparse
import collections
import datetime
import glob
import json
import os
import platform
import re
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

from jaxstack.data import lm_collate
from jaxstack.hf import config_to_hf
from jaxstack.lm import lm_functions
from jaxstack.models.llama import PRESETS, Llama, LlamaConfig, preset
from jaxstack.perf import measured_matmul_flops
from jaxstack.trainer import TrainConfig, Trainer

DTYPES = ("float32", "bfloat16")
LEARNING_RATE = 3e-4
BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0


@dataclass(frozen=True)
class Setup:
    """What both frameworks train: the model config and the batch shape."""

    config: LlamaConfig
    """Architecture; ``config.dtype`` is the compute dtype of both frameworks."""
    batch: int
    """Examples per optimizer step."""
    seq: int
    """Tokens per example."""
    steps: int
    """Timed optimizer steps per framework."""
    warmup: int
    """Untimed steps per framework before them (jaxstack's first one compiles)."""
    threads: int
    """CPU threads both frameworks use."""

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one optimizer step's batch."""
        return self.batch * self.seq


# --------------------------------------------------------------------------------- XLA flags
def configure_xla_flags(extra_flags: str = "", dump_dir: str | None = None) -> str:
    """Set ``XLA_FLAGS`` for this process before the CPU backend starts; returns them.

    Drops any fake-device count (one CPU device owns all cores), appends ``extra_flags``,
    and with ``dump_dir`` dumps the optimized HLO there (for ``--profile``).
    """
    flags = os.environ.get("XLA_FLAGS", "")
    flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", flags)
    extra = extra_flags.split()
    if dump_dir is not None:
        extra += [f"--xla_dump_to={dump_dir}", "--xla_dump_hlo_as_text"]
    os.environ["XLA_FLAGS"] = " ".join([*flags.split(), *extra])
    os.environ["JAX_PLATFORMS"] = "cpu"  # a CPU benchmark, even on a machine with a GPU
    return os.environ["XLA_FLAGS"]


def _usable_cpus() -> int:
    """CPU cores this process may run on (its affinity where the OS reports one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# ------------------------------------------------------------------------------------ inputs
def random_batch(vocab_size: int, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One packed LM batch of random tokens, every field ``[batch, seq]``: a single document
    per row (segment id 1, positions 0..seq-1), targets the next token, no masked positions."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, size=(batch, seq + 1), dtype=np.int32)
    examples = [
        {
            "input_ids": row[:-1],
            "targets": row[1:],
            "positions": np.arange(seq, dtype=np.int32),
            "segment_ids": np.ones(seq, np.int32),
            "loss_mask": np.ones(seq, np.int32),
        }
        for row in tokens
    ]
    return lm_collate(examples)


# ------------------------------------------------------------------------------------- peaks
def matmul_flops_now(size: int, dtype: str) -> float:
    """JAX matmul FLOP/s of this host measured now (``measured_matmul_flops`` without its
    cache, so that the peak can be sampled again between timed rounds)."""
    return measured_matmul_flops.__wrapped__(size, dtype)


def torch_matmul_flops(size: int, dtype: str, repeats: int = 5) -> float:
    """PyTorch's matmul FLOP/s on this host (best of ``repeats``), for context only."""
    import torch

    a = torch.ones(size, size, dtype=getattr(torch, dtype))
    a @ a
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


# ---------------------------------------------------------------------------------- jaxstack
class JaxstackRun:
    """A ``jaxstack.Trainer`` on ``Llama(setup.config)`` stepping on one fixed batch."""

    def __init__(self, setup: Setup, batch: dict[str, np.ndarray]):
        self.setup, self.batch = setup, batch
        model = Llama(setup.config)
        self.loss_fn, pred_fn = lm_functions(model)
        dummy_ids = jnp.zeros((1, setup.seq), jnp.int32)
        self.work_dir = tempfile.mkdtemp(prefix="jaxstack-bench-")
        train_config = TrainConfig(
            work_dir=self.work_dir,
            batch_size=setup.batch,
            num_steps=setup.warmup + setup.steps,
            learning_rate=LEARNING_RATE,
            b1=BETAS[0],
            b2=BETAS[1],
            grad_clip=GRAD_CLIP,
            save_every=10**9,
            progress_bar=False,
        )
        self.trainer = Trainer(
            params=lambda rng: model.init(rng, dummy_ids)["params"],
            collate_fn=lm_collate,
            loss_fn=self.loss_fn,
            pred_fn=pred_fn,
            config=train_config,
            flops_per_token=setup.config.flops_per_token(setup.seq),
        )
        self.losses: list[float] = []

    def step(self) -> float:
        """One ``Trainer.train_step``; returns its seconds (waiting for the result)."""
        start = time.perf_counter()
        metrics = self.trainer.train_step(self.batch)
        self.losses.append(float(metrics["loss"]))
        return time.perf_counter() - start

    def breakdown(self, rounds: int) -> dict[str, float]:
        """Median seconds of the phases of a step, each jitted on its own and run in
        alternation with full steps: forward (the loss), backward (loss and grads minus the
        forward) and optimizer (clipping + AdamW on param-shaped grads), beside the step.

        The phases need not add up to the step: alone, each allocates its outputs afresh
        and XLA cannot fuse across them.
        """
        trainer, rng = self.trainer, jax.random.PRNGKey(0)
        loss_only = lambda params, batch: self.loss_fn(params, batch, rng)[0]  # noqa: E731

        def optimizer_update(params, opt_state, grads):
            updates, opt_state = trainer.optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        forward, grad = jax.jit(loss_only), jax.jit(jax.grad(loss_only))
        update = jax.jit(optimizer_update)
        device_batch = trainer.to_global(self.batch)
        phases = {  # read trainer.state on every call: each step donates the previous one
            "forward": lambda: forward(trainer.params, device_batch),
            "forward_backward": lambda: grad(trainer.params, device_batch),
            "optimizer": lambda: update(trainer.params, trainer.state.opt_state, trainer.params),
        }
        times = collections.defaultdict(list)
        with jax.set_mesh(trainer.mesh):
            for phase in phases.values():  # compile outside the timed rounds
                jax.block_until_ready(phase())
            for _ in range(rounds):
                for name, phase in phases.items():
                    start = time.perf_counter()
                    jax.block_until_ready(phase())
                    times[name].append(time.perf_counter() - start)
                times["step"].append(self.step())
        median = {name: statistics.median(values) for name, values in times.items()}
        return {
            "forward": median["forward"],
            "backward": median["forward_backward"] - median["forward"],
            "optimizer": median["optimizer"],
            "step": median["step"],
        }

    def close(self) -> None:
        """Release the trainer and its (empty) work directory."""
        self.trainer.close()
        shutil.rmtree(self.work_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------- torch
class TorchRun:
    """``transformers.LlamaForCausalLM`` of the same config, trained like ``JaxstackRun``.

    Same batch, loss (mean cross-entropy over every position), clipping and betas; AdamW is
    torch's fastest CPU implementation (``fused=True``). Each step is timed by phase.
    """

    def __init__(self, setup: Setup, batch: dict[str, np.ndarray]):
        import torch
        import transformers

        torch.set_num_threads(setup.threads)
        torch.manual_seed(0)
        hf_config = transformers.LlamaConfig.from_dict(config_to_hf(setup.config))
        self.model = transformers.LlamaForCausalLM(hf_config)
        self.model.train()
        n_params = sum(p.numel() for p in self.model.parameters())
        if n_params != setup.config.num_params():
            raise RuntimeError(
                f"transformers model has {n_params} parameters but the jaxstack config has "
                f"{setup.config.num_params()}: the two models are not the same architecture"
            )
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=LEARNING_RATE, betas=BETAS, weight_decay=0.0, fused=True
        )
        self.input_ids = torch.from_numpy(batch["input_ids"]).long()
        self.positions = torch.from_numpy(batch["positions"]).long()
        self.targets = torch.from_numpy(batch["targets"]).long().reshape(-1)
        self.autocast = lambda: torch.autocast(  # noqa: E731
            "cpu", torch.bfloat16, enabled=setup.config.dtype == "bfloat16"
        )
        self.losses: list[float] = []
        self.phases: list[tuple[float, float, float]] = []

    def step(self) -> float:
        """One forward, backward, clip and AdamW update; returns its seconds."""
        import torch

        start = time.perf_counter()
        with self.autocast():
            logits = self.model(
                input_ids=self.input_ids, position_ids=self.positions, use_cache=False
            ).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), self.targets
        )
        forward_done = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        backward_done = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
        self.optimizer.step()
        self.losses.append(loss.item())
        end = time.perf_counter()
        phases = (forward_done - start, backward_done - forward_done, end - backward_done)
        self.phases.append(phases)
        return end - start

    def breakdown(self, last: int) -> dict[str, float]:
        """Median seconds of each phase over the ``last`` steps."""
        phases = self.phases[-last:]
        return {
            "forward": statistics.median(p[0] for p in phases),
            "backward": statistics.median(p[1] for p in phases),
            "optimizer": statistics.median(p[2] for p in phases),
            "step": statistics.median(sum(p) for p in phases),
        }


# ---------------------------------------------------------------------------------- profile
def profile_jaxstack(run: JaxstackRun, dump_dir: str, steps: int = 2) -> dict:
    """Trace ``steps`` jaxstack steps with ``jax.profiler`` and sum XLA op time per step by
    phase (forward, backward, optimizer and metrics) and model part.

    Ops are named by the ``op_name`` metadata of the optimized HLO that XLA dumped to
    ``dump_dir``; a fusion counts toward its root instruction's op. ``op_seconds_per_step``
    sums the ops' durations (each op uses every thread itself; ops that XLA runs
    concurrently overlap, so the sum can exceed the step's wall time).
    """
    trace_dir = tempfile.mkdtemp(prefix="jaxstack-trace-")
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    try:
        with jax.profiler.trace(trace_dir, profiler_options=options):
            for _ in range(steps):
                run.step()
        (trace,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
        profile = jax.profiler.ProfileData.from_file(trace)
    finally:
        shutil.rmtree(trace_dir, ignore_errors=True)
    op_seconds = collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                if "hlo_op" in stats:
                    key = (stats.get("hlo_module", ""), stats["hlo_op"])
                    op_seconds[key] += event.duration_ns / 1e9 / steps
    module = collections.Counter()
    for (name, _), seconds in op_seconds.items():
        module[name] += seconds
    step_module = module.most_common(1)[0][0]
    op_names = _hlo_op_names(dump_dir, step_module)
    by_part = collections.Counter()
    top = []
    for (name, op), seconds in op_seconds.items():
        if name != step_module:
            continue
        shape, op_name = op_names.get(op, ("?", "?"))
        by_part[_classify(op_name)] += seconds
        top.append((seconds, op, shape, op_name))
    total = sum(by_part.values())
    top.sort(reverse=True)
    return {
        "op_seconds_per_step": total,
        "share": {part: round(s / total, 3) for part, s in by_part.most_common()},
        "top_ops": [
            {"op": op, "seconds": round(s, 3), "shape": shape, "op_name": op_name}
            for s, op, shape, op_name in top[:12]
        ],
    }


def _hlo_op_names(dump_dir: str, module: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (result shape, op_name metadata) of a dumped optimized module."""
    paths = glob.glob(os.path.join(dump_dir, f"*.{module}.cpu_after_optimizations.txt"))
    if not paths:
        raise RuntimeError(f"XLA dumped no optimized HLO of {module!r} into {dump_dir}")
    pattern = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\S+) .*?op_name=\"([^\"]*)\"")
    names = {}
    with open(max(paths, key=os.path.getmtime)) as f:
        for line in f:
            match = pattern.match(line)
            if match:
                names[match.group(1)] = (match.group(2), match.group(3))
    return names


def _classify(op_name: str) -> str:
    """``phase/part`` of an op from its JAX ``op_name`` (e.g. ``jit(_train_step)/transpose(
    jvp(Llama))/layers_3/mlp/up/dot_general`` is ``backward/mlp``)."""
    if "transpose(jvp" in op_name:
        phase = "backward"
    elif "jvp(" in op_name:
        phase = "forward"
    else:
        return "optimizer_and_metrics"
    if "/attn/" in op_name:
        projection = re.search(r"/attn/(attn\._project/)?[qkvo]/", op_name)
        part = "attention_projections" if projection else "attention_core"
    elif "/mlp/" in op_name:
        part = "mlp"
    elif "norm/" in op_name:
        part = "rmsnorm"
    elif "lm_head" in op_name:
        part = "lm_head"
    elif "embed" in op_name:
        part = "embedding"
    elif "(Llama)" in op_name:
        part = "residual_and_other"
    else:
        part = "loss_and_accuracy"
    return f"{phase}/{part}"


# ----------------------------------------------------------------------------------- results
def _summary(setup: Setup, times: list[float], losses: list[float], flops: float) -> dict:
    """Tokens/s and MFU over the timed steps (and of the fastest one), with the loss."""
    tokens_per_sec = setup.tokens_per_step * len(times) / sum(times)
    best_tokens_per_sec = setup.tokens_per_step / min(times)
    per_token = setup.config.flops_per_token(setup.seq)
    return {
        "tokens_per_sec": tokens_per_sec,
        "mfu": tokens_per_sec * per_token / flops,
        "best_step_tokens_per_sec": best_tokens_per_sec,
        "best_step_mfu": best_tokens_per_sec * per_token / flops,
        "step_s": [round(t, 3) for t in times],
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


def versions() -> dict[str, str]:
    """Versions of the measured software (torch and transformers when importable)."""
    out = {"python": platform.python_version(), "jax": jax.__version__}
    out["jaxlib"] = jaxlib.__version__
    try:
        import torch
        import transformers
    except ImportError:
        return out
    return {**out, "torch": torch.__version__, "transformers": transformers.__version__}


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run(
    setup: Setup, *, skip_torch: bool, breakdown: bool, dump_dir: str | None, peak_size: int
) -> dict:
    """The whole benchmark (``dump_dir`` set: also profile); returns the JSON-ready report."""
    devices = jax.devices()
    if len(devices) != 1 or devices[0].platform != "cpu":
        raise RuntimeError(
            f"expected exactly one CPU device, found {devices}; run this script as its own "
            "process so that it sets XLA_FLAGS before jax starts its backend"
        )
    cfg = setup.config
    peak_dtypes = ["float32"] + (["bfloat16"] if cfg.dtype == "bfloat16" else [])
    peaks = {dtype: [matmul_flops_now(peak_size, dtype)] for dtype in peak_dtypes}
    batch = random_batch(cfg.vocab_size, setup.batch, setup.seq)

    compile_start = time.perf_counter()
    jax_run = JaxstackRun(setup, batch)
    first_step_s = jax_run.step()
    jax_setup_s = time.perf_counter() - compile_start
    torch_run = None if skip_torch else TorchRun(setup, batch)
    # untimed warmup (jaxstack's first step was the compile), alternating like the timed
    # steps so that the first timed step of either framework has the same history as the rest
    for i in range(setup.warmup):
        if i:
            jax_run.step()
        if torch_run is not None:
            torch_run.step()

    jax_times, torch_times = [], []
    try:
        for _ in range(setup.steps):  # alternate, so both see the same background load
            jax_times.append(jax_run.step())
            if torch_run is not None:
                torch_times.append(torch_run.step())
            for dtype in peak_dtypes:
                peaks[dtype].append(matmul_flops_now(peak_size, dtype))
        jax_losses = list(jax_run.losses)
        jax_breakdown = jax_run.breakdown(max(2, setup.steps // 2)) if breakdown else None
        profile = profile_jaxstack(jax_run, dump_dir) if dump_dir else None
    finally:
        jax_run.close()

    peak = max(peaks[cfg.dtype])
    jaxstack = _summary(setup, jax_times, jax_losses, peak)
    jaxstack["first_step_s"] = first_step_s
    jaxstack["setup_and_first_step_s"] = jax_setup_s
    if jax_breakdown:
        jaxstack["breakdown_s"] = jax_breakdown
    if profile:
        jaxstack["profile"] = profile
    report = {
        "device": f"{cpu_model()}, {setup.threads} threads, jax device {devices[0].device_kind}",
        "date": datetime.date.today().isoformat(),
        "versions": versions(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "preset": {
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size,
            "num_layers": cfg.num_layers,
            "num_heads": cfg.num_heads,
            "num_kv_heads": cfg.num_kv_heads,
            "intermediate_size": cfg.intermediate_size,
            "tie_embeddings": cfg.tie_embeddings,
            "scan_layers": cfg.scan_layers,
            "remat": cfg.remat,
        },
        "params": cfg.num_params(),
        "dtype": cfg.dtype,
        "batch": setup.batch,
        "seq": setup.seq,
        "steps": setup.steps,
        "warmup_steps": setup.warmup,
        "threads": setup.threads,
        "flops_per_token": cfg.flops_per_token(setup.seq),
        "matmul_peak_flops": peak,
        "matmul_peak_samples_gflops": {d: [round(f / 1e9, 1) for f in v] for d, v in peaks.items()},
        "jaxstack_tokens_per_sec": jaxstack["tokens_per_sec"],
        "jaxstack_mfu": jaxstack["mfu"],
    }
    if torch_run is not None:
        torch_summary = _summary(setup, torch_times, torch_run.losses, peak)
        if breakdown:
            torch_summary["breakdown_s"] = torch_run.breakdown(setup.steps)
        report.update(
            torch_tokens_per_sec=torch_summary["tokens_per_sec"],
            torch_mfu=torch_summary["mfu"],
            ratio_jaxstack_over_torch=(
                jaxstack["tokens_per_sec"] / torch_summary["tokens_per_sec"]
            ),
            torch_matmul_flops={d: torch_matmul_flops(peak_size, d) for d in peak_dtypes},
            torch=torch_summary,
        )
    report["jaxstack"] = jaxstack
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; ``--quick`` replaces the defaults by a seconds-long smoke run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="100m", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=6, help="timed steps per framework")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile)")
    parser.add_argument("--batch", type=int, default=2, help="examples per step")
    parser.add_argument("--seq", type=int, default=512, help="tokens per example")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="compute dtype")
    parser.add_argument("--scan-layers", action="store_true", help="nn.scan over the layers")
    parser.add_argument("--skip-torch", action="store_true", help="only measure jaxstack")
    parser.add_argument("--breakdown", action="store_true", help="forward/backward/optimizer")
    parser.add_argument("--profile", action="store_true", help="XLA op time by model part")
    parser.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS")
    parser.add_argument("--peak-size", type=int, default=2048, help="matmul size for the peak")
    parser.add_argument("--quick", action="store_true", help="tiny preset, 3 steps (smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.steps, args.warmup, args.batch, args.seq = "tiny", 3, 1, 2, 64
        args.peak_size = min(args.peak_size, 512)
    for name in ("steps", "warmup", "batch", "seq", "peak_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    max_len = PRESETS[args.preset].max_seq_len
    if args.seq > max_len:
        parser.error(f"--seq {args.seq} exceeds preset {args.preset!r} max_seq_len={max_len}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print its JSON report on stdout."""
    args = parse_args(argv)
    dump_dir = tempfile.mkdtemp(prefix="jaxstack-hlo-") if args.profile else None
    configure_xla_flags(args.xla_flags, dump_dir)
    config = preset(args.preset, dtype=args.dtype, scan_layers=args.scan_layers, remat="none")
    setup = Setup(
        config=config,
        batch=args.batch,
        seq=args.seq,
        steps=args.steps,
        warmup=args.warmup,
        threads=_usable_cpus(),
    )
    try:
        report = run(
            setup,
            skip_torch=args.skip_torch,
            breakdown=args.breakdown,
            dump_dir=dump_dir,
            peak_size=args.peak_size,
        )
    finally:
        if dump_dir:
            shutil.rmtree(dump_dir, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
