"""The serving step alone: the compiled ``ModelRunner`` step (paged forward + sampling) timed
on a random model, against the weight-read floor (weight bytes / measured copy bandwidth).

Shapes: ``--seqs`` decodes (each ``--context`` keys, one new token), plus with
``--prefill N`` one prefill chunk of N tokens (a mixed step). Variants are timed in turns in
one process, so a shared machine's load weighs on them alike: ``--quantize int8`` times
int8 weights beside the float ones (and prints the int8 logits' error), ``--versus-buckets``
a second bucket set beside the first. ``--trace DIR`` writes a jax profiler trace (XLA ops
only) of the timed steps. Prints one line per shape and variant; nothing is recorded.

    python benchmarks/serve_step.py                            # the 124.7M model, float32
    python benchmarks/serve_step.py --quantize int8 --seqs 1 8
    python benchmarks/serve_step.py --versus-buckets "16,32,64,128,256;4,16,64"
"""

import argparse
import sys
import time
from pathlib import Path

if not __package__:  # run as a file, not with -m: make the `benchmarks` package importable
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from benchmarks import common


def copy_bandwidth(nbytes: int = 1 << 29, repeats: int = 5) -> float:
    """Bytes/s of the best of ``repeats`` copies of an ``nbytes`` numpy array (read + write
    counted)."""
    import numpy as np

    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def weight_bytes_read(params, config) -> int:
    """Bytes a decode step reads: every parameter except the embedding table (gathered by row),
    which the head re-reads when tied."""
    import jax

    total = sum(x.nbytes for x in jax.tree.leaves(params))
    embed = params["embed"]["embedding"].nbytes
    return total if config.tie_embeddings else total - embed


def make_step(runner, seqs: int, context: int, prefill: int):
    """Step inputs: ``seqs`` decodes at ``context`` keys, plus one ``prefill``-token chunk."""
    from jaxstack.serve.sampling import SamplingParams
    from jaxstack.serve.scheduler import RequestState

    per_seq = -(-(context + prefill) // runner.page_size)
    step, next_page = [], 0
    for i in range(seqs + (prefill > 0)):
        is_prefill = i == seqs
        length = prefill if is_prefill else context
        seq = RequestState(f"r{i}", list(range(length)), SamplingParams(max_tokens=8), 0, i)
        seq.pages = list(range(next_page, next_page + per_seq))
        seq.num_computed = 0 if is_prefill else context - 1
        next_page += per_seq
        step.append((seq, prefill if is_prefill else 1))
    return runner.pack(step)


def time_steps(runs: dict, repeats: int, rounds: int = 3) -> dict[str, float]:
    """Seconds per step of each ``name: (runner, inputs)``: the best over ``rounds`` of the
    median of ``repeats`` runs, the variants taking turns (a shared machine's load then
    weighs on all alike)."""
    import statistics

    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, (runner, inputs) in runs.items():
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                runner.run(inputs)
                times.append(time.perf_counter() - start)
            best[name] = min(best[name], statistics.median(times))
    return best


def logits_error(model, params, quantized, vocab: int) -> tuple[float, float]:
    """(median, worst) over vocabulary entries of the int8 logits' RMS error over the spread
    of the float logits, on 4 x 64 random tokens (unpaged forward)."""
    import flax.linen as nn
    import jax
    import numpy as np

    from jaxstack.serve import quantize

    ids = jax.random.randint(jax.random.PRNGKey(1), (4, 64), 0, vocab)

    @jax.jit
    def both(params, quantized):
        exact = model.apply({"params": params}, ids, return_hidden=True) @ model.head_kernel(params)
        with nn.intercept_methods(quantize.dense_interceptor):
            hidden = model.apply({"params": quantized}, ids, return_hidden=True)
        return exact, quantize.head_logits(hidden, quantized["lm_head"])

    exact, approx = (np.asarray(x).reshape(-1, vocab) for x in both(params, quantized))
    rel = np.sqrt(np.mean((approx - exact) ** 2, axis=0)) / exact.std(axis=0)
    return float(np.median(rel)), float(rel.max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="100m", help="model preset (random weights)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantize", choices=("none", "int8"), default="none",
                        help="int8: time int8 weights beside the float ones")  # fmt: skip
    parser.add_argument("--seqs", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--prefill", type=int, default=0, help="a mixed step's chunk tokens")
    parser.add_argument("--token-buckets", default=None, help="default: EngineConfig's")
    parser.add_argument("--seq-buckets", default=None, help="default: EngineConfig's")
    parser.add_argument(
        "--versus-buckets", default=None, help="a TOKENS;SEQS bucket set timed beside the first"
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--trace", default=None, help="write a jax profiler trace here")
    parser.add_argument("--xla-flags", default="", help="extra XLA_FLAGS")
    args = parser.parse_args()
    common.configure_cpu_xla(args.xla_flags)
    import jax
    import jax.numpy as jnp

    from jaxstack.models.llama import Llama, preset
    from jaxstack.serve.engine import EngineConfig
    from jaxstack.serve.quantize import quantize_params
    from jaxstack.serve.runner import ModelRunner

    config = preset(args.preset, dtype=args.dtype)
    model = Llama(config)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    params = jax.tree.map(lambda x: x.astype(args.dtype), params)
    defaults = EngineConfig()
    parse = lambda s, d: tuple(int(x) for x in s.split(",")) if s else d  # noqa: E731
    buckets = {"": (parse(args.token_buckets, defaults.token_buckets),
                    parse(args.seq_buckets, defaults.seq_buckets))}  # fmt: skip
    if args.versus_buckets:
        tokens, seqs = args.versus_buckets.split(";")
        buckets[f" buckets {tokens};{seqs}"] = (parse(tokens, None), parse(seqs, None))
    weights = {args.dtype: params}
    if args.quantize != "none":
        weights[args.quantize] = quantize_params(params, args.quantize)
    pages_per_seq = -(-(args.context + args.prefill) // 16)
    runners = {
        f"{w}{b}": ModelRunner(
            model,
            p,
            num_pages=(max(args.seqs) + 1) * pages_per_seq + 8,
            page_size=16,
            pages_per_seq=pages_per_seq,
            token_buckets=tb,
            seq_buckets=sb,
        )
        for w, p in weights.items()
        for b, (tb, sb) in buckets.items()
    }
    bandwidth = copy_bandwidth()
    floors = {}
    for name, runner in runners.items():
        floors[name] = weight_bytes_read(runner.params, config) / bandwidth
        mb, ms, gbs = floors[name] * bandwidth / 1e6, floors[name] * 1e3, bandwidth / 1e9
        print(f"{name}: weights read per step {mb:.0f} MB, floor {ms:.1f} ms at {gbs:.1f} GB/s")
    if args.quantize != "none":
        median, worst = logits_error(model, params, weights[args.quantize], config.vocab_size)
        print(f"{args.quantize} logits error (RMS / spread per vocab entry): median "
              f"{median:.2%}, worst {worst:.2%}")  # fmt: skip
    for seqs in args.seqs:
        runs = {}
        for name, runner in runners.items():
            inputs = make_step(runner, seqs, args.context, args.prefill)
            traces = runner.num_traces
            runner.run(inputs)  # compile before timing
            runs[name] = (runner, inputs)
            assert runner.num_traces - traces <= 1
        if args.trace:
            options = jax.profiler.ProfileOptions()
            options.python_tracer_level = 0  # XLA's ops only
            jax.profiler.start_trace(args.trace, profiler_options=options)
        seconds = time_steps(runs, args.repeats)
        if args.trace:
            jax.profiler.stop_trace()
        for name, (_, inputs) in runs.items():
            t, s = inputs.tokens.shape[0], inputs.last_rows.shape[0]
            print(f"{name:>8}: {seqs:3d} decodes + {args.prefill:3d} prefill, bucket "
                  f"(T={t}, S={s}): {seconds[name] * 1e3:7.1f} ms/step, "
                  f"{seqs / seconds[name]:7.1f} decode tok/s, "
                  f"{seconds[name] / floors[name]:4.1f}x floor")  # fmt: skip


if __name__ == "__main__":
    main()
