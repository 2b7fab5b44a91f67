"""The serving step alone: the compiled ``ModelRunner`` step (paged forward + sampling) timed
on a random model, against the weight-read floor (weight bytes / measured copy bandwidth).

Shapes: decodes of ``--seqs`` sequences (each ``--context`` tokens long, one new token) and
a mixed step (decodes plus one prefill chunk filling the token bucket). Buckets, dtype and
``--quantize`` as the engine takes them; ``--trace DIR`` writes a jax profiler trace of the
timed steps. Prints one line per shape; nothing is recorded.

    python benchmarks/serve_step.py                            # the 124.7M model, float32
    python benchmarks/serve_step.py --quantize int8 --seqs 1 8
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


def time_step(runner, inputs, repeats: int) -> float:
    """Median seconds of ``runner.run(inputs)`` after one warm-up run."""
    import statistics

    runner.run(inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.run(inputs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="100m", help="model preset (random weights)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantize", choices=("none", "int8"), default="none")
    parser.add_argument("--seqs", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--prefill", type=int, default=0, help="a mixed step's chunk tokens")
    parser.add_argument("--token-buckets", default=None, help="e.g. 1,2,4,8,16,32,64,128,256")
    parser.add_argument("--seq-buckets", default=None, help="e.g. 1,2,4,8,16,32,64")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--trace", default=None, help="write a jax profiler trace here")
    parser.add_argument("--xla-flags", default="", help="extra XLA_FLAGS")
    args = parser.parse_args()
    common.configure_cpu_xla(args.xla_flags)
    import jax
    import jax.numpy as jnp

    from jaxstack.models.llama import Llama, preset
    from jaxstack.serve.engine import EngineConfig
    from jaxstack.serve.runner import ModelRunner

    config = preset(args.preset, dtype=args.dtype)
    model = Llama(config)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    params = jax.tree.map(lambda x: x.astype(args.dtype), params)
    if args.quantize != "none":
        from jaxstack.serve.quantize import quantize_params

        params = quantize_params(params, args.quantize)
    defaults = EngineConfig()
    parse = lambda s, d: tuple(int(x) for x in s.split(",")) if s else d  # noqa: E731
    runner = ModelRunner(
        model,
        params,
        num_pages=max(args.seqs) * (-(-(args.context + args.prefill) // 16)) + 8,
        page_size=16,
        pages_per_seq=-(-(args.context + args.prefill) // 16),
        token_buckets=parse(args.token_buckets, defaults.token_buckets),
        seq_buckets=parse(args.seq_buckets, defaults.seq_buckets),
    )
    read = weight_bytes_read(runner.params, config)
    bandwidth = copy_bandwidth()
    floor = read / bandwidth
    print(f"weights read per step {read / 1e6:.0f} MB, copy bandwidth {bandwidth / 1e9:.1f} GB/s,"
          f" floor {floor * 1e3:.1f} ms")  # fmt: skip
    for seqs in args.seqs:
        inputs = make_step(runner, seqs, args.context, args.prefill)
        traces = runner.num_traces
        runner.run(inputs)  # compile outside the trace
        if args.trace:
            options = jax.profiler.ProfileOptions()
            options.python_tracer_level = 0  # XLA's ops only
            jax.profiler.start_trace(args.trace, profiler_options=options)
        seconds = time_step(runner, inputs, args.repeats)
        if args.trace:
            jax.profiler.stop_trace()
        t, s = inputs.tokens.shape[0], inputs.last_rows.shape[0]
        print(f"seqs {seqs:3d} prefill {args.prefill:4d} bucket (T={t}, S={s}): "
              f"{seconds * 1e3:7.1f} ms/step, {seqs / seconds:7.1f} decode tok/s, "
              f"{seconds / floor:4.1f}x floor, compiled {runner.num_traces - traces}")  # fmt: skip


if __name__ == "__main__":
    main()
