"""CPU training throughput of jaxstack against a plain JAX step and PyTorch, in one run.

One process, one CPU device, the same thread count for every framework. It measures:

1. this host's matmul peak: a 2048 matmul in JAX (in the compute dtype, accumulating in
   float32) and in PyTorch, re-sampled after every timed round; the best sample of either is
   the denominator of model FLOPs utilisation (MFU);
2. jaxstack training through the real ``Trainer`` (AdamW behind global-norm clipping, the
   ``jaxstack.lm`` loss) on one fixed batch;
3. the floor: the same model and update written in plain JAX (``benchmarks/plain_llama.py``:
   jnp, ``jax.value_and_grad``, optax ``clip_by_global_norm`` + ``adamw``, jit with donation);
4. the same architecture as ``transformers.LlamaForCausalLM`` (eager, SDPA attention) trained
   with ``torch.optim.AdamW(fused=True)`` and the same clipping, betas and cross-entropy, on
   the same batch and dtype (bfloat16 is ``torch.autocast`` over float32 parameters, as
   jaxstack's and the plain step's mixed precision).

After untimed warmup steps (the first compiles), timed steps alternate between the frameworks
one step at a time, the order rotating every round, so that load from other processes on a
shared machine falls on all alike. The run's record (tokens/s and MFU of each framework, the
ratios jaxstack / plain JAX and jaxstack / PyTorch, the peak samples, the setup) is printed as
JSON on stdout (side by side as a text table on stderr) and written to ``benchmarks/results/``
(``benchmarks/common.py``), from which ``python -m benchmarks.report`` makes the table in
docs/benchmarks.md. ``--breakdown`` adds the forward / backward / optimizer split of a
jaxstack and a PyTorch step; ``--profile`` traces jaxstack steps with ``jax.profiler`` and
sums XLA op time by phase and model part.

    python benchmarks/train_cpu.py                         # 100m preset, recorded setup
    python benchmarks/train_cpu.py --dtype bfloat16 --xla-flags=--xla_cpu_use_onednn=true
    python benchmarks/train_cpu.py --breakdown --profile   # ... plus where the time goes
    python benchmarks/train_cpu.py --dtype bfloat16 --plain-dots bf16   # native bf16 dots
    python benchmarks/train_cpu.py --quick   # tiny preset, seconds; recorded in the temp dir
    python benchmarks/train_cpu.py --preset tiny --batch 8 --seq 256 --frameworks jaxstack,torch

XLA flags: the script sets ``JAX_PLATFORMS=cpu``, removes
``--xla_force_host_platform_device_count`` from ``XLA_FLAGS`` (one device owning every core)
and appends ``--xla-flags``; XLA reads them when its CPU backend starts, so each route (dtype
and flags) is its own run and its own result file.
"""

import argparse
import collections
import glob
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if not __package__:  # run as a file, not with -m: make the `benchmarks` package importable
    sys.path.append(str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common, plain_llama
from jaxstack import Trainer
from jaxstack.data import lm_collate
from jaxstack.hf import config_to_hf
from jaxstack.lm import lm_functions
from jaxstack.models import model_for
from jaxstack.models.llama import PRESETS, LlamaConfig, preset

DTYPES = ("float32", "bfloat16")
FRAMEWORKS = ("jaxstack", "plain_jax", "torch")
"""Names of the measured frameworks, in the order of the first timed round."""


@dataclass(frozen=True)
class Setup:
    """What every framework trains: the model config, the batch shape and the protocol."""

    config: LlamaConfig
    """Architecture; ``config.dtype`` is the compute dtype of every framework."""
    batch: int
    """Examples per optimizer step."""
    seq: int
    """Tokens per example."""
    steps: int
    """Timed optimizer steps per framework."""
    warmup: int
    """Untimed steps per framework before them (the first one compiles)."""
    threads: int
    """CPU threads every framework uses."""
    plain_dots: str = "xla"
    """How the plain JAX step writes its weight matmuls (``plain_llama.DOTS``)."""

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one optimizer step's batch."""
        return self.batch * self.seq


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
def jax_matmul_flops(size: int, dtype: str, repeats: int = 3) -> float:
    """JAX matmul FLOP/s on this host now (best of ``repeats``): ``[size, size]`` operands in
    ``dtype``, accumulated and returned in float32 (XLA:CPU's fastest bfloat16 route)."""
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
    return 2 * size**3 / common.best_seconds(lambda: matmul(a).block_until_ready(), repeats)


def torch_matmul_flops(size: int, dtype: str, repeats: int = 3) -> float:
    """PyTorch matmul FLOP/s on this host now (best of ``repeats``), operands in ``dtype``."""
    import torch

    a = torch.ones(size, size, dtype=getattr(torch, dtype))
    return 2 * size**3 / common.best_seconds(lambda: a @ a, repeats)


# ---------------------------------------------------------------------------------- jaxstack
class JaxstackRun:
    """A ``jaxstack.Trainer`` on the model of ``setup.config`` (``jaxstack.models.model_for``:
    ``Llama``, or ``Mixtral`` for ``benchmarks/moe.py``) stepping on one fixed batch."""

    name = "jaxstack"

    def __init__(self, setup: Setup, batch: dict[str, np.ndarray]):
        self.setup, self.batch = setup, batch
        model = model_for(setup.config)
        self.loss_fn, pred_fn = lm_functions(model)
        dummy_ids = jnp.zeros((1, setup.seq), jnp.int32)
        self.work_dir = tempfile.mkdtemp(prefix="jaxstack-bench-")
        train_config = common.jaxstack_train_config(
            self.work_dir, setup.batch, setup.warmup + setup.steps
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


# --------------------------------------------------------------------------------- plain JAX
class PlainJaxRun:
    """``plain_llama``'s jitted step (params and optimizer state donated) on the same batch;
    ``compiled`` summarises what XLA made of it (``compiled_summary``)."""

    name = "plain_jax"

    def __init__(self, setup: Setup, batch: dict[str, np.ndarray]):
        config = setup.config
        if setup.config.scan_layers:
            raise ValueError("the plain JAX step unrolls its layers; drop plain_jax or scan")
        optimizer = plain_llama.optimizer(common.LEARNING_RATE, common.BETAS, common.GRAD_CLIP)
        # eager: jitted whole, XLA:CPU spends minutes constant-folding the initialisers
        self.params = plain_llama.init_params(config, jax.random.PRNGKey(0))
        if (count := sum(x.size for x in jax.tree.leaves(self.params))) != config.num_params():
            raise RuntimeError(
                f"the plain JAX model has {count} parameters but the jaxstack config has "
                f"{config.num_params()}: the two models are not the same architecture"
            )
        self.opt_state = optimizer.init(self.params)
        self.train_step = plain_llama.make_step(config, optimizer, setup.plain_dots)
        self.batch = {k: jnp.asarray(batch[k]) for k in ("input_ids", "positions", "targets")}
        # compiled here once; the jitted step reuses this executable on its first call
        lowered = self.train_step.lower(self.params, self.opt_state, self.batch)
        self.compiled = compiled_summary(lowered.compile().as_text())
        self.losses: list[float] = []

    def step(self) -> float:
        """One jitted step; returns its seconds (waiting for the loss)."""
        start = time.perf_counter()
        self.params, self.opt_state, loss = self.train_step(self.params, self.opt_state, self.batch)
        self.losses.append(float(loss))
        return time.perf_counter() - start

    def close(self) -> None:
        """Nothing to release."""


def compiled_summary(hlo: str) -> dict[str, dict[str, int]]:
    """What XLA:CPU made of a step, from its optimized HLO text: custom fusions by kind
    (``__ynn_fusion``, ``__onednn_fusion``, ...), custom-call targets, and dots counted by
    their operand dtypes (``"bf16 x bf16"``: a native bfloat16 dot; ``"f32 x f32"`` in a
    bfloat16 run: XLA converted the operands)."""
    kinds = collections.Counter(re.findall(r'"kind":"(__\w+)"', hlo))
    calls = collections.Counter(re.findall(r'custom_call_target="([\w.-]+)"', hlo))
    dots = collections.Counter()
    for computation in re.split(r"\n(?=%\S+ \(|ENTRY )", hlo):
        dtypes = dict(re.findall(r"%(\S+) = (\w+)\[", computation))
        for lhs, rhs in re.findall(r" dot\(%(\S+?), %(\S+?)\)", computation):
            dots[f"{dtypes.get(lhs, '?')} x {dtypes.get(rhs, '?')}"] += 1
    return {"fusions": dict(kinds), "custom_calls": dict(calls), "dots": dict(dots)}


# ------------------------------------------------------------------------------------- torch
class TorchRun:
    """``transformers.LlamaForCausalLM`` of the same config, trained like ``JaxstackRun``.

    Same batch, loss (mean cross-entropy over every position), clipping and betas; AdamW is
    torch's fastest CPU implementation (``fused=True``). Each step is timed by phase.
    """

    name = "torch"

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
            self.model.parameters(),
            lr=common.LEARNING_RATE,
            betas=common.BETAS,
            weight_decay=0.0,
            fused=True,
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
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), common.GRAD_CLIP)
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

    def close(self) -> None:
        """Nothing to release."""


RUNS: dict[str, Callable[[Setup, dict[str, np.ndarray]], JaxstackRun | PlainJaxRun | TorchRun]]
RUNS = {"jaxstack": JaxstackRun, "plain_jax": PlainJaxRun, "torch": TorchRun}


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
def summary(setup: Setup, times: list[float], losses: list[float], peak: float) -> dict:
    """Tokens/s and MFU over the timed steps (and of the fastest one), with the losses."""
    tokens_per_sec = setup.tokens_per_step * len(times) / sum(times)
    best_tokens_per_sec = setup.tokens_per_step / min(times)
    per_token = setup.config.flops_per_token(setup.seq)
    return {
        "tokens_per_sec": tokens_per_sec,
        "mfu": tokens_per_sec * per_token / peak,
        "best_step_tokens_per_sec": best_tokens_per_sec,
        "best_step_mfu": best_tokens_per_sec * per_token / peak,
        "step_s": [round(t, 3) for t in times],
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


def describe_setup(setup: Setup, preset_name: str, frameworks: list[str], quick: bool) -> dict:
    """The JSON-ready setup of a run: model, batch, protocol, threads and XLA flags."""
    cfg = setup.config
    return {
        "preset": preset_name,
        "quick": quick,
        "model": {
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
        "tokens_per_step": setup.tokens_per_step,
        "steps": setup.steps,
        "warmup_steps": setup.warmup,
        "threads": setup.threads,
        "frameworks": frameworks,
        "plain_dots": setup.plain_dots,
        "flops_per_token": cfg.flops_per_token(setup.seq),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jax_device": jax.devices()[0].device_kind,
    }


def sample_peaks(peaks: dict[str, list[float]], size: int, dtype: str) -> None:
    """Append one matmul FLOP/s sample to each of ``peaks`` (``"jax"``, maybe ``"torch"``)."""
    peaks["jax"].append(jax_matmul_flops(size, dtype))
    if "torch" in peaks:
        peaks["torch"].append(torch_matmul_flops(size, dtype))


def run(
    setup: Setup, frameworks: list[str], *, breakdown: bool, dump_dir: str | None, peak_size: int
) -> dict:
    """The whole benchmark (``dump_dir`` set: also profile jaxstack); returns the report:
    ``frameworks`` (per framework: tokens/s, MFU, step times, losses), ``ratios``, the matmul
    peak and its samples."""
    devices = jax.devices()
    if len(devices) != 1 or devices[0].platform != "cpu":
        raise RuntimeError(
            f"expected exactly one CPU device, found {devices}; run this script as its own "
            "process so that it sets XLA_FLAGS before jax starts its backend"
        )
    dtype = setup.config.dtype
    peaks = {source: [] for source in ["jax"] + (["torch"] if "torch" in frameworks else [])}
    if "torch" in frameworks:
        import torch

        torch.set_num_threads(setup.threads)
    sample_peaks(peaks, peak_size, dtype)
    batch = random_batch(setup.config.vocab_size, setup.batch, setup.seq)

    runs, first_step_s, times = {}, {}, {name: [] for name in frameworks}
    try:
        for name in frameworks:  # build each, then its first (compiling) step
            start = time.perf_counter()
            runs[name] = RUNS[name](setup, batch)
            runs[name].step()
            first_step_s[name] = time.perf_counter() - start
        for _ in range(setup.warmup - 1):  # untimed, alternating like the timed steps
            for run_ in runs.values():
                run_.step()
        for index in range(setup.steps):  # one step each, the order rotating every round
            order = frameworks[index % len(frameworks) :] + frameworks[: index % len(frameworks)]
            for name in order:
                times[name].append(runs[name].step())
            sample_peaks(peaks, peak_size, dtype)
        extra = {}
        if breakdown and "jaxstack" in runs:
            extra["jaxstack"] = {"breakdown_s": runs["jaxstack"].breakdown(setup.steps // 2 + 1)}
        if breakdown and "torch" in runs:
            extra["torch"] = {"breakdown_s": runs["torch"].breakdown(setup.steps)}
        if dump_dir and "jaxstack" in runs:
            extra.setdefault("jaxstack", {})["profile"] = profile_jaxstack(
                runs["jaxstack"], dump_dir
            )
    finally:
        for run_ in runs.values():
            run_.close()

    peak = max(max(samples) for samples in peaks.values())
    results = {}
    for name in frameworks:
        losses = runs[name].losses
        results[name] = {
            **summary(setup, times[name], losses, peak),
            "first_step_s": first_step_s[name],
            **({"compiled": runs[name].compiled} if name == "plain_jax" else {}),
            **extra.get(name, {}),
        }
    tokens = {name: result["tokens_per_sec"] for name, result in results.items()}
    ratios = {}
    for other in ("plain_jax", "torch"):
        if "jaxstack" in tokens and other in tokens:
            ratios[f"jaxstack_over_{other}"] = tokens["jaxstack"] / tokens[other]
    return {
        "frameworks": results,
        "ratios": ratios,
        "matmul_peak_flops": peak,
        "matmul_peak": (
            f"best {peak_size}x{peak_size} {dtype} matmul of JAX (float32 accumulation) and "
            "PyTorch on this host, sampled before and after every timed round; the MFU "
            "denominator of every framework"
        ),
        "matmul_samples_gflops": {
            source: [round(f / 1e9, 1) for f in samples] for source, samples in peaks.items()
        },
    }


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
    parser.add_argument(
        "--frameworks",
        default=",".join(FRAMEWORKS),
        help=f"comma-separated subset of {','.join(FRAMEWORKS)} (default: all)",
    )
    parser.add_argument("--breakdown", action="store_true", help="forward/backward/optimizer")
    parser.add_argument("--profile", action="store_true", help="XLA op time by model part")
    parser.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS")
    parser.add_argument(
        "--plain-dots",
        default="xla",
        choices=sorted(plain_llama.DOTS),
        help="plain JAX weight matmuls: xla (plain @, the floor) or bf16 (bfloat16 operands, "
        "float32 accumulation, forward and backward; needs --dtype bfloat16)",
    )
    parser.add_argument("--peak-size", type=int, default=2048, help="matmul size for the peak")
    parser.add_argument("--quick", action="store_true", help="tiny preset, 2 steps (smoke)")
    common.add_results_argument(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.preset, args.steps, args.warmup, args.batch, args.seq = "tiny", 2, 1, 2, 32
        args.peak_size = min(args.peak_size, 256)
    args.results_dir = common.results_dir(args.results_dir, args.quick)
    args.frameworks = [name.strip() for name in args.frameworks.split(",") if name.strip()]
    unknown = sorted(set(args.frameworks) - set(FRAMEWORKS))
    if unknown or not args.frameworks or len(set(args.frameworks)) < len(args.frameworks):
        parser.error(f"--frameworks {unknown or args.frameworks}: pick each of {FRAMEWORKS} once")
    for name in ("steps", "warmup", "batch", "seq", "peak_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    max_len = PRESETS[args.preset].max_seq_len
    if args.seq > max_len:
        parser.error(f"--seq {args.seq} exceeds preset {args.preset!r} max_seq_len={max_len}")
    if args.plain_dots == "bf16" and args.dtype != "bfloat16":
        parser.error("--plain-dots bf16 needs --dtype bfloat16")
    if args.scan_layers and "plain_jax" in args.frameworks:
        parser.error("--scan-layers: the plain JAX step unrolls; pass --frameworks without it")
    return args


def main(argv: list[str] | None = None) -> Path:
    """Run the benchmark, print its record as JSON and write it; returns the file's path."""
    args = parse_args(argv)
    dump_dir = tempfile.mkdtemp(prefix="jaxstack-hlo-") if args.profile else None
    extra_flags = args.xla_flags.split()
    if dump_dir:
        extra_flags += [f"--xla_dump_to={dump_dir}", "--xla_dump_hlo_as_text"]
    common.configure_cpu_xla(" ".join(extra_flags))
    config = preset(args.preset, dtype=args.dtype, scan_layers=args.scan_layers, remat="none")
    setup = Setup(
        config,
        args.batch,
        args.seq,
        args.steps,
        args.warmup,
        common.usable_cpus(),
        args.plain_dots,
    )
    try:
        report = {
            "setup": {
                **describe_setup(setup, args.preset, args.frameworks, args.quick),
                "extra_xla_flags": args.xla_flags,
            },
            **run(
                setup,
                args.frameworks,
                breakdown=args.breakdown,
                dump_dir=dump_dir,
                peak_size=args.peak_size,
            ),
        }
    finally:
        if dump_dir:
            shutil.rmtree(dump_dir, ignore_errors=True)
    print(side_by_side(report), file=sys.stderr)
    versions = common.versions("flax", "optax", "numpy", "torch", "transformers")
    return common.write_result("train_cpu", report, versions, args.results_dir)


def side_by_side(report: dict) -> str:
    """The run's frameworks as a text table (tokens/s and MFU over all steps and of the best
    step) followed by the ratios and the MFU denominator: what ``main`` prints on stderr."""
    lines = [f"{'framework':<10} {'tok/s':>8} {'MFU':>6} {'best tok/s':>11} {'best MFU':>9}"]
    for name, run_ in report["frameworks"].items():
        lines.append(
            f"{name:<10} {run_['tokens_per_sec']:>8.1f} {run_['mfu']:>6.1%} "
            f"{run_['best_step_tokens_per_sec']:>11.1f} {run_['best_step_mfu']:>9.1%}"
        )
    lines += [f"{name}: {ratio:.2f}x" for name, ratio in report["ratios"].items()]
    peak = report["matmul_peak_flops"] / 1e9
    lines.append(f"MFU against the measured matmul peak, {peak:.1f} GFLOP/s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
