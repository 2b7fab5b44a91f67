"""Attention throughput: our Pallas kernel beside jax.nn (XLA, cuDNN) and jax's own
Pallas kernels, forward and forward+backward, in TFLOP/s.

Run from the repository root (or after ``pip install -e .``)::

    python -m benchmarks.attention                       # seq 1k..16k, d=128, bf16
    python -m benchmarks.attention --seqs 1024,4096 --causal true \
        --impls "ours (pallas),jax.nn cudnn"

FLOPs follow the FlashAttention-2 convention: forward ``4 * b * h * s^2 * d``
(halved when causal), forward+backward 3.5x that. ``b`` is chosen so that every
row holds ``--tokens`` tokens. Baselines that cannot express a configuration
(e.g. jax's Triton ``mha`` has no GQA: K/V are repeated for it) say so in the
notes column; failures (out of memory, unsupported) print as ``-`` with the error.

Rows print on stderr as they are measured; the run's record is printed as JSON on stdout and
written to ``benchmarks/results/`` (``benchmarks/common.py``), from which
``python -m benchmarks.report`` makes the table in docs/benchmarks.md (accelerator runs
only: on CPU, Pallas runs in interpret mode and the figures only smoke-test the script).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

if not __package__:  # run as a file, not with -m: make the `benchmarks` package importable
    sys.path.append(str(Path(__file__).resolve().parent.parent))

import jax
import jax.numpy as jnp

from benchmarks import common
from pallas_kernels import attention

Attn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _repeat_kv(q: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.repeat(x, q.shape[2] // x.shape[2], axis=2)


def _jax_triton_mha(causal: bool) -> Attn:
    from jax.experimental.pallas.ops.gpu import attention as triton_attention

    def run(q, k, v):
        scale = q.shape[-1] ** -0.5
        return triton_attention.mha(
            q, _repeat_kv(q, k), _repeat_kv(q, v), None, sm_scale=scale, causal=causal
        )

    return run


def _splash(causal: bool, heads: int, seq: int) -> Attn:
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as masks,
    )

    head_mask = masks.CausalMask((seq, seq)) if causal else masks.FullMask((seq, seq))
    multi_head = masks.MultiHeadMask([head_mask] * heads)
    kernel = splash.make_splash_mha(multi_head, head_shards=1, q_seq_shards=1)

    def run(q, k, v):  # splash takes [h, s, d] per batch row, q pre-scaled
        q = q * q.shape[-1] ** -0.5
        to_hsd = lambda x: jnp.swapaxes(x, 1, 2)
        out = jax.vmap(kernel)(to_hsd(q), to_hsd(_repeat_kv(q, k)), to_hsd(_repeat_kv(q, v)))
        return to_hsd(out)

    return run


def implementations(backend: str, causal: bool, heads: int, seq: int) -> dict[str, Attn]:
    """Candidates for this backend; ours first."""
    ours = functools.partial(attention, causal=causal)
    impls: dict[str, Attn] = {
        "ours (pallas)": functools.partial(ours, implementation="pallas"),
        "jax.nn xla": lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="xla"
        ),
    }
    if backend == "gpu":
        impls["jax.nn cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn"
        )
        impls["jax pallas triton mha"] = _jax_triton_mha(causal)
        impls["ours (auto)"] = functools.partial(ours, implementation="auto")
    if backend == "tpu":
        impls["jax splash"] = _splash(causal, heads, seq)
    return impls


def _time(fn: Callable, args: tuple, iters: int) -> float:
    """Median seconds per call of a jitted function (after one warm-up)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(impl: Attn, q, k, v, iters: int) -> tuple[float, float]:
    """(forward seconds, forward+backward seconds)."""
    do = jnp.ones_like(q)
    fwd = jax.jit(impl)

    @jax.jit
    def fwd_bwd(q, k, v):
        out, pullback = jax.vjp(impl, q, k, v)
        return out, pullback(do)

    return _time(fwd, (q, k, v), iters), _time(fwd_bwd, (q, k, v), iters)


def main(argv: list[str] | None = None) -> None:
    """Measure every implementation at every sequence length and mask; record the run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default="1024,2048,4096,8192,16384")
    parser.add_argument("--tokens", type=int, default=16384, help="batch * seq per step")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--causal", choices=["both", "true", "false"], default="both")
    parser.add_argument("--impls", default="", help="comma-separated subset of the names")
    parser.add_argument("--iters", type=int, default=10)
    common.add_results_argument(parser)
    args = parser.parse_args(argv)

    backend = jax.default_backend()
    device = jax.devices()[0]
    log = functools.partial(print, file=sys.stderr, flush=True)
    log(f"# attention benchmark device={device.device_kind} backend={backend}")
    log(
        f"# tokens/step={args.tokens} heads={args.heads}/{args.kv_heads} "
        f"head_dim={args.head_dim} dtype={args.dtype}"
    )
    if backend == "cpu":
        log("# CPU: Pallas runs in interpret mode here; figures only smoke-test the script.")
    log(f"{'seq':>6} {'causal':>6} {'implementation':<24} {'fwd TF/s':>9} {'f+b TF/s':>9}  notes")
    causals = {"both": [False, True], "true": [True], "false": [False]}[args.causal]
    wanted = {name.strip() for name in args.impls.split(",") if name.strip()}
    dtype = jnp.dtype(args.dtype)
    rows = []
    for seq in (int(s) for s in args.seqs.split(",")):
        batch = max(1, args.tokens // seq)
        ks = jax.random.split(jax.random.key(0), 3)
        q = jax.random.normal(ks[0], (batch, seq, args.heads, args.head_dim), dtype)
        k = jax.random.normal(ks[1], (batch, seq, args.kv_heads, args.head_dim), dtype)
        v = jax.random.normal(ks[2], (batch, seq, args.kv_heads, args.head_dim), dtype)
        for causal in causals:
            flops = 4 * batch * args.heads * seq * seq * args.head_dim / (2 if causal else 1)
            for name, impl in implementations(backend, causal, args.heads, seq).items():
                if wanted and name not in wanted:
                    continue
                row = {"seq": seq, "batch": batch, "causal": causal, "implementation": name}
                try:
                    t_fwd, t_both = measure(impl, q, k, v, args.iters)
                    row["forward_tflops"] = flops / t_fwd / 1e12
                    row["forward_backward_tflops"] = 3.5 * flops / t_both / 1e12
                    row["note"] = ""
                except Exception as e:  # report and go on: one failing baseline is a result
                    row["forward_tflops"] = row["forward_backward_tflops"] = None
                    row["note"] = f"{type(e).__name__}: {str(e)[:80]}"
                rows.append(row)
                figures = " ".join(
                    f"{'-' if x is None else format(x, '9.4g'):>9}"
                    for x in (row["forward_tflops"], row["forward_backward_tflops"])
                )
                log(f"{seq:>6} {causal!s:>6} {name:<24} {figures}  {row['note']}")
    report = {
        "backend": backend,
        "device_kind": device.device_kind,
        "config": {
            "tokens": args.tokens,
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "head_dim": args.head_dim,
            "dtype": args.dtype,
            "iters": args.iters,
            "flops": "FlashAttention-2 convention: forward 4*b*h*s^2*d (halved when causal), "
            "forward+backward 3.5x that",
        },
        "rows": rows,
    }
    smoke = backend == "cpu"  # interpret mode: not a measurement to keep
    common.write_result(
        "attention", report, common.versions(), common.results_dir(args.results_dir, smoke)
    )


if __name__ == "__main__":
    main()
