"""Mixture-of-experts throughput: the expert computation by four routes, and training the
tiny MoE preset against a dense model with the same active parameters, in one run.

1. **Layer, forward + backward.** The same tokens, routing and expert weights through:

   * ``gmm (sorted, ours)``: ``jaxstack.layers.moe.routed_experts``, the layer's dropless
     path: sort the assignments by expert, ``pallas_kernels.moe.gmm`` (its ``custom_vjp``:
     ``tgmm`` for the weight gradient; ``lax.ragged_dot`` inside on CPU), unsort, combine;
   * ``ragged_dot (sorted, autodiff)``: the same sort with ``jax.lax.ragged_dot`` and JAX's
     own derivative of it;
   * ``capacity 1.25 (sorted, ours)``: ``routed_experts`` with ``capacity_factor=1.25``;
   * ``dense one-hot einsum``: every expert on every token, weighted by the one-hot routing
     (``E / k`` times the FLOPs: what a layer without grouped matmuls does);
   * on a GPU or TPU also ``gmm pallas`` (the Triton / megablox kernels, forced).

   Throughput is tokens/s and TFLOP/s of the *active* work (``6 * tokens * k * 3 * d * f``
   for forward + backward), so the dense route's wasted FLOPs show as a lower rate. Every
   route's output is checked against the first's.
2. **Training.** ``jaxstack.Trainer`` steps (the real loss with the router losses, AdamW)
   of the ``tiny-moe`` preset and of the same Llama with a dense MLP of width ``k * f`` (the
   active expert parameters; the router is the only extra), on one fixed batch
   (``benchmarks/train_cpu.py``'s ``JaxstackRun``).

Timed calls alternate between the routes one call at a time, the order rotating each round,
so that load from other processes falls on all alike: compare the ratios, not the absolute
times, on a shared machine. The record is printed as JSON and written to
``benchmarks/results/`` (``benchmarks/common.py``); ``python -m benchmarks.report`` makes the
``moe`` table of docs/benchmarks.md.

    python -m benchmarks.moe              # recorded setup (CPU: one device, every core;
                                          # a GPU or TPU where present)
    python -m benchmarks.moe --quick      # seconds; recorded in the temp dir
"""

import argparse
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

if not __package__:  # run as a file, not with -m: make the `benchmarks` package importable
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from benchmarks import common

Route = Callable[..., object]


def layer_routes(num_experts: int, on_accelerator: bool) -> dict[str, Route]:
    """name -> ``fn(x, experts, weights, w_gate, w_up, w_down) -> [t, d]``."""
    import jax
    import jax.numpy as jnp

    from jaxstack.layers.moe import combine, expert_mlp, routed_experts, sort_by_expert
    from pallas_kernels.moe import gmm

    def sorted_with(matmul):
        def run(x, experts, weights, w_gate, w_up, w_down):
            k = experts.shape[1]
            dispatch = sort_by_expert(experts.reshape(-1), num_experts, None)
            rows = expert_mlp(
                x[dispatch.order // k], w_gate, w_up, w_down, dispatch.group_sizes, matmul
            )
            return combine(rows, dispatch, weights)

        return run

    def dense_one_hot(x, experts, weights, w_gate, w_up, w_down):
        mix = (jax.nn.one_hot(experts, num_experts, dtype=x.dtype) * weights[..., None]).sum(1)
        hidden = jax.nn.silu(jnp.einsum("td,edf->tef", x, w_gate.astype(x.dtype)))
        hidden = hidden * jnp.einsum("td,edf->tef", x, w_up.astype(x.dtype))
        out = jnp.einsum("tef,efd->ted", hidden, w_down.astype(x.dtype))
        return jnp.einsum("ted,te->td", out, mix)

    routes = {
        "gmm (sorted, ours)": routed_experts,
        "ragged_dot (sorted, autodiff)": sorted_with(jax.lax.ragged_dot),
        "capacity 1.25 (sorted, ours)": functools.partial(routed_experts, capacity_factor=1.25),
        "dense one-hot einsum": dense_one_hot,
    }
    if on_accelerator:
        routes["gmm pallas"] = sorted_with(functools.partial(gmm, implementation="pallas"))
    return routes


def measure_layer(args: argparse.Namespace) -> dict:
    """Forward + backward of every route (module doc, part 1)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxstack.layers.moe import route

    t, d, f, e, k = args.tokens, args.hidden, args.expert_width, args.experts, args.top_k
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    dtype = jnp.dtype(args.dtype)
    x = jax.random.normal(keys[0], (t, d), dtype)
    routing = route(jax.random.normal(keys[1], (t, e)), k)
    weights = routing.weights.astype(dtype)
    experts = [  # float32 master weights, as the layer stores them
        jax.random.normal(key, shape) * shape[1] ** -0.5
        for key, shape in zip(keys[2:5], [(e, d, f), (e, d, f), (e, f, d)], strict=True)
    ]
    cotangent = jax.random.normal(keys[5], (t, d), dtype)
    on_accelerator = jax.default_backend() != "cpu"
    steps = {}
    for name, fn in layer_routes(e, on_accelerator).items():

        def loss(x, weights, experts, chosen, fn=fn):  # chosen: an argument, not folded
            y = fn(x, chosen, weights, *experts)
            return jnp.vdot(y.astype(jnp.float32), cotangent.astype(jnp.float32))

        steps[name] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    operands = (x, weights, experts, routing.experts)
    outputs = {name: step(*operands) for name, step in steps.items()}  # compiles
    first = jax.tree.leaves(next(iter(outputs.values())))
    agreement = {
        name: max(
            float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))
            for a, b in zip(jax.tree.leaves(out), first, strict=True)
        )
        for name, out in outputs.items()
    }
    call = {
        name: lambda s=step: jax.block_until_ready(s(*operands)) for name, step in steps.items()
    }
    times = interleaved(call, args.rounds)
    active_flops = 6 * t * k * 3 * d * f
    rows = []
    for name, samples in times.items():
        median = statistics.median(samples)
        rows.append(
            {
                "route": name,
                "median_s": median,
                "tokens_per_s": t / median,
                "active_tflops": active_flops / median / 1e12,
                "max_abs_diff_vs_first": agreement[name],
            }
        )
    reference = rows[0]["median_s"]
    for row in rows:
        row["speedup_vs_gmm"] = reference / row["median_s"]
    return {
        "tokens": t,
        "hidden": d,
        "expert_width": f,
        "experts": e,
        "top_k": k,
        "dtype": args.dtype,
        "rounds": args.rounds,
        "rows": rows,
    }


def interleaved(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds of ``rounds`` calls of each, one call of each per round, the order rotating."""
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return times


def measure_training(args: argparse.Namespace) -> dict:
    """Trainer steps of the tiny MoE preset and its dense twin (module doc, part 2)."""
    from benchmarks.train_cpu import JaxstackRun, Setup, random_batch
    from jaxstack.models import LlamaConfig, preset

    moe = preset(args.preset, dtype=args.dtype)
    fields = {name: getattr(moe, name) for name in LlamaConfig.__dataclass_fields__}
    active = moe.experts_per_token * moe.expert_intermediate_size + moe.shared_intermediate_size
    dense = LlamaConfig(**{**fields, "intermediate_size": active})
    runs = {}
    for name, config in (("moe", moe), ("dense", dense)):
        setup = Setup(config, args.batch, args.seq, args.steps, args.warmup, common.usable_cpus())
        runs[name] = JaxstackRun(setup, random_batch(config.vocab_size, args.batch, args.seq))
    try:
        for run in runs.values():
            for _ in range(args.warmup):
                run.step()
        times = interleaved({name: run.step for name, run in runs.items()}, args.steps)
        losses = {name: run.losses[-1] for name, run in runs.items()}
    finally:
        for run in runs.values():
            run.close()
    tokens = args.batch * args.seq
    result = {
        name: {
            "median_step_s": statistics.median(samples),
            "tokens_per_s": tokens / statistics.median(samples),
            "params": config.num_params(),
            "active_params": (
                config.num_params(active=True) if name == "moe" else config.num_params()
            ),
            "flops_per_token": config.flops_per_token(args.seq),
            "last_loss": losses[name],
        }
        for (name, samples), config in zip(times.items(), (moe, dense), strict=True)
    }
    return {
        "preset": args.preset,
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "dtype": args.dtype,
        **result,
        "moe_over_dense_tokens_per_s": result["moe"]["tokens_per_s"]
        / result["dense"]["tokens_per_s"],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048, help="layer tokens (default 2048)")
    parser.add_argument("--hidden", type=int, default=256, help="layer width d (default 256)")
    parser.add_argument("--expert-width", type=int, default=512, help="expert f (512)")
    parser.add_argument("--experts", type=int, default=8, help="experts E (default 8)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    parser.add_argument("--rounds", type=int, default=10, help="timed layer rounds (10)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--preset", default="tiny-moe", help="MoE preset to train")
    parser.add_argument("--batch", type=int, default=8, help="training batch (default 8)")
    parser.add_argument("--seq", type=int, default=256, help="training sequence (default 256)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model (10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model (2)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    common.add_results_argument(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.tokens, args.hidden, args.expert_width, args.rounds = 256, 64, 128, 2
        args.batch, args.seq, args.steps, args.warmup = 2, 32, 2, 1
    return args


def main(argv: list[str] | None = None) -> Path:
    """Run both parts, print the rows and write the record; returns the result file."""
    args = parse_args(argv)
    # on CPU one device owning every core; a GPU or TPU, where present, is used as it is
    os.environ["XLA_FLAGS"] = common.with_device_count(os.environ.get("XLA_FLAGS", ""), None)
    import jax

    layer = measure_layer(args)
    for row in layer["rows"]:
        print(
            f"{row['route']:32s} {row['tokens_per_s']:12,.0f} tok/s "
            f"{row['active_tflops']:8.4f} TFLOP/s  x{row['speedup_vs_gmm']:.2f}",
            file=sys.stderr,
        )
    training = measure_training(args)
    print(
        f"training {args.preset}: moe {training['moe']['tokens_per_s']:,.0f} tok/s, dense "
        f"{training['dense']['tokens_per_s']:,.0f} tok/s",
        file=sys.stderr,
    )
    report = {
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "setup": {"quick": args.quick, "threads": common.usable_cpus()},
        "layer": layer,
        "training": training,
    }
    directory = common.results_dir(args.results_dir, args.quick)
    return common.write_result("moe", report, common.versions("flax", "optax"), directory)


if __name__ == "__main__":
    main()
