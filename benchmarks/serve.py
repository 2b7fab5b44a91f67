"""Serving throughput and latency on CPU: jaxstack's engine against ``transformers``.

One small random Llama, the same weights in both frameworks (written with ``js.hf.save`` and
loaded by ``transformers``), the same requests (random prompts of 16-128 tokens, a fixed
number of output tokens each, EOS ignored, greedy). A closed-loop client keeps
``concurrency`` requests in flight (a new one starts when one finishes) at concurrency 1, 8
and 32; the two frameworks alternate per concurrency level in one process, so they see the
same machine load. Reported per framework and level: output tokens/s (all output tokens over
the wall time), time to first token (submit -> first token) and time per output token (mean
gap after the first), p50 and p99.

``transformers`` serves through its continuous-batching manager (``generate_batch``'s
engine: paged cache, requests join and leave per step) where the installed version has it,
else through batched ``generate`` in waves of ``concurrency`` requests. Its warm-up is
excluded as jaxstack's compilation is (both run a short warm-up workload first).

    python benchmarks/serve.py            # records benchmarks/results/serve-*.json
    python benchmarks/serve.py --quick    # smoke run, recorded out of the repository
"""

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

if not __package__:  # run as a file, not with -m: make the `benchmarks` package importable
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from benchmarks import common

CONCURRENCY = (1, 8, 32)


def bench_config(quick: bool):
    """A ~12M-parameter Llama (GQA, 4 layers), or a tiny one for ``--quick``."""
    from jaxstack.models import LlamaConfig

    if quick:
        return LlamaConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
                           num_kv_heads=2, intermediate_size=128, max_seq_len=256,
                           extra={"hf_model_type": "llama"})  # fmt: skip
    return LlamaConfig(vocab_size=8192, hidden_size=384, num_layers=4, num_heads=6,
                       num_kv_heads=2, intermediate_size=1024, max_seq_len=512,
                       extra={"hf_model_type": "llama"})  # fmt: skip


def make_requests(n: int, vocab: int, seed: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, int(rng.integers(16, 129))).tolist() for _ in range(n)]


def summarize(timings: list[tuple[float, float, float, int]], wall: float) -> dict:
    """``timings``: per request (submit, first token, last token, output tokens)."""
    ttft = sorted(first - submit for submit, first, _, _ in timings)
    tpot = sorted((last - first) / (n - 1) for _, first, last, n in timings if n > 1)

    def pct(values: list[float], q: float) -> float:
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 \
            else values[0]  # fmt: skip

    tokens = sum(n for *_, n in timings)
    return {
        "requests": len(timings),
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tokens_per_s": tokens / wall,
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "tpot_p50_s": pct(tpot, 50),
        "tpot_p99_s": pct(tpot, 99),
    }


def closed_loop(submit, prompts: list[list[int]], concurrency: int) -> dict:
    """Drive ``submit(prompt, done)`` with ``concurrency`` requests in flight; ``done(first,
    last, n)`` is called by the framework when a request finishes."""
    timings, lock, finished = [], threading.Lock(), threading.Event()
    upcoming = iter(range(len(prompts)))

    def start_next() -> None:
        with lock:
            i = next(upcoming, None)
        if i is None:
            return
        submitted = time.perf_counter()

        def done(first: float, last: float, n: int) -> None:
            with lock:
                timings.append((submitted, first, last, n))
                if len(timings) == len(prompts):
                    finished.set()
            start_next()

        submit(prompts[i], done)

    start = time.perf_counter()
    for _ in range(concurrency):
        start_next()
    if not finished.wait(timeout=3600):
        raise TimeoutError(f"only {len(timings)} of {len(prompts)} requests finished")
    return summarize(timings, time.perf_counter() - start)


class JaxstackServer:
    """``js.LLM``'s engine; ``submit`` timestamps the first and last token callbacks."""

    def __init__(self, model, params, max_tokens: int, quick: bool):
        from jaxstack.serve import LLM

        buckets = dict(token_buckets=(8, 32, 128), seq_buckets=(8, 32)) if not quick else \
            dict(token_buckets=(64,), seq_buckets=(32,))  # fmt: skip
        self.llm = LLM(model, params, page_size=16, num_pages=512, progress=False, **buckets)
        self.max_tokens = max_tokens

    def submit(self, prompt: list[int], done) -> None:
        from jaxstack.serve import SamplingParams

        first = None

        def on_output(out) -> None:
            nonlocal first
            now = time.perf_counter()
            first = first or now
            if out.finished:
                done(first, now, len(out.token_ids))

        params = SamplingParams(max_tokens=self.max_tokens, ignore_eos=True)
        self.llm.engine.submit(prompt, params, on_output)

    def close(self) -> None:
        self.llm.close()


class TransformersServer:
    """``transformers``' continuous-batching manager (or batched ``generate`` in waves), with
    a paged cache sized as jaxstack's (16-token pages, 512 of them, 128 tokens and 32
    requests per step) rather than auto-sized from accelerator memory."""

    def __init__(self, hf_dir: str, max_tokens: int, method: str = "auto"):
        import torch
        import transformers

        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            hf_dir, dtype=torch.float32
        ).eval()
        self.max_tokens = max_tokens
        self.config = transformers.GenerationConfig(
            max_new_tokens=max_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0
        )
        has_continuous = hasattr(self.model, "init_continuous_batching")
        if method == "continuous" and not has_continuous:
            raise ValueError(f"transformers {transformers.__version__} has no continuous batching")
        self.continuous = method == "continuous" or (method == "auto" and has_continuous)
        if self.continuous:
            self.method = "continuous batching (the manager behind generate_batch)"
            self.cb_config = transformers.ContinuousBatchingConfig(
                page_size=16,
                num_blocks=512,
                max_batch_tokens=128,
                max_requests_per_batch=32,
                use_cuda_graph=False,
                use_async_batching=False,
            )
        else:
            self.method = "batched generate, in waves of `concurrency` requests"

    def run(self, prompts: list[list[int]], concurrency: int) -> dict:
        if self.continuous:
            return self._run_continuous(prompts, concurrency)
        return self._run_waves(prompts, concurrency)

    def _run_continuous(self, prompts, concurrency: int) -> dict:
        manager = self.model.init_continuous_batching(
            generation_config=self.config, continuous_batching_config=self.cb_config
        )
        manager.start()
        waiting: dict[str, object] = {}
        lock, stop = threading.Lock(), threading.Event()

        def submit(prompt, done) -> None:
            with lock:
                request_id = manager.add_request(
                    prompt, max_new_tokens=self.max_tokens, record_timestamps=True
                )
                waiting[request_id] = done

        def collect() -> None:
            while not stop.is_set():
                result = manager.get_result(timeout=0.1)
                if result is not None and result.is_finished():
                    with lock:
                        done = waiting.pop(result.request_id)
                    stamps = result.timestamps
                    done(stamps[0], stamps[-1], len(result.generated_tokens))

        collector = threading.Thread(target=collect, daemon=True)
        collector.start()
        try:
            return closed_loop(submit, prompts, concurrency)
        finally:
            stop.set()
            collector.join()
            manager.stop(block=True)

    def _run_waves(self, prompts, concurrency: int) -> dict:
        torch = self.torch
        timings, start = [], time.perf_counter()
        for wave in range(0, len(prompts), concurrency):
            batch = prompts[wave : wave + concurrency]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            submitted, clock = time.perf_counter(), _StepClock()
            with torch.no_grad():
                self.model.generate(
                    ids, attention_mask=mask, generation_config=self.config, streamer=clock
                )
            # put() is called once for the prompt, then once per generated step
            timings += [(submitted, clock.stamps[1], clock.stamps[-1], self.max_tokens)] * len(
                batch
            )
        return summarize(timings, time.perf_counter() - start)


class _StepClock:
    """A ``generate`` streamer that only records when each step's tokens arrive."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, _) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few requests")
    parser.add_argument("--max-tokens", type=int, default=32, help="output tokens per request")
    parser.add_argument(
        "--transformers",
        choices=["auto", "continuous", "generate"],
        default="auto",
        help="how transformers serves: continuous batching (auto: where installed) or waves "
        "of batched generate",
    )
    common.add_results_argument(parser)
    args = parser.parse_args(argv)
    common.configure_cpu_xla()

    import jax
    import jax.numpy as jnp
    import torch

    from jaxstack import hf
    from jaxstack.models import Llama

    config = bench_config(args.quick)
    model = Llama(config)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    max_tokens = 4 if args.quick else args.max_tokens
    hf_dir = tempfile.mkdtemp(prefix="jaxstack-serve-bench-")
    hf.save(hf_dir, config, params)
    torch.set_num_threads(common.usable_cpus())

    jaxstack = JaxstackServer(model, params, max_tokens, args.quick)
    reference = TransformersServer(hf_dir, max_tokens, args.transformers)
    warmup = make_requests(4, config.vocab_size, seed=1)
    closed_loop(jaxstack.submit, warmup, 2)
    reference.run(warmup, 2)

    rows = []
    for concurrency in (1, 8) if args.quick else CONCURRENCY:
        count = (2 if args.quick else 8) if concurrency == 1 else 2 * concurrency
        prompts = make_requests(count, config.vocab_size, seed=concurrency)
        for name, run in (
            ("jaxstack", lambda p, c: closed_loop(jaxstack.submit, p, c)),
            ("transformers", reference.run),
        ):
            result = run(prompts, concurrency)
            rows.append({"framework": name, "concurrency": concurrency, **result})
            print(f"{name:>12} c={concurrency:<3} {result['output_tokens_per_s']:8.1f} tok/s "
                  f"TTFT p50 {result['ttft_p50_s'] * 1e3:7.1f} ms "
                  f"TPOT p50 {result['tpot_p50_s'] * 1e3:6.1f} ms", file=sys.stderr)  # fmt: skip
    jaxstack.close()

    report = {
        "setup": {
            "quick": args.quick,
            "params": config.num_params(),
            "config": {
                k: getattr(config, k)
                for k in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads")
            },  # fmt: skip
            "max_tokens": max_tokens,
            "prompt_tokens": "uniform 16..128",
            "transformers_method": reference.method,
            "cpus": common.usable_cpus(),
        },
        "rows": rows,
    }
    directory = common.results_dir(args.results_dir, smoke=args.quick)
    common.write_result("serve", report, common.versions("transformers", "torch"), directory)


if __name__ == "__main__":
    main()
