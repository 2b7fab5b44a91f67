"""``python benchmarks/serve.py --peer transformers``: jaxstack's engine (``js.LLM``, in
process) against ``transformers`` serving the same requests from the same weights.

``transformers`` serves through its continuous-batching manager (``generate_batch``'s engine:
paged cache, requests join and leave per step) where the installed version has it, else
through batched ``generate`` in waves of ``concurrency`` requests. Both run a short warm-up
workload first (jaxstack's compilation and transformers' warm-up are excluded); the two
alternate per concurrency level in one process, so they see the same machine load.
"""

import asyncio
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import common
from benchmarks.serve import CONCURRENCY, MODELS, closed_loop, make_requests, summarize, write_model
from benchmarks.serve_http import Completion


def callback_request(submit):
    """An awaitable request over ``submit(prompt, done)``, where the framework calls
    ``done(first, last, token_ids)`` from any thread when the request finishes."""

    async def request(prompt: list[int]) -> Completion:
        loop = asyncio.get_running_loop()
        finished = loop.create_future()
        submitted = time.perf_counter()

        def done(first: float, last: float, token_ids: list[int]) -> None:
            completion = Completion(submitted, first, last, list(token_ids))
            loop.call_soon_threadsafe(finished.set_result, completion)

        submit(prompt, done)
        return await finished

    return request


class JaxstackEngine:
    """``js.LLM``'s engine on a Hugging Face directory; ``submit`` timestamps the first and
    last token callbacks."""

    def __init__(self, hf_dir: Path, max_tokens: int):
        from jaxstack.serve import LLM

        self.llm = LLM(hf=str(hf_dir), page_size=16, num_pages=512, progress=False,
                       token_buckets=(8, 32, 128), seq_buckets=(8, 32))  # fmt: skip
        self.max_tokens = max_tokens

    def submit(self, prompt: list[int], done) -> None:
        from jaxstack.serve import SamplingParams

        first = None

        def on_output(out) -> None:
            nonlocal first
            now = time.perf_counter()
            first = first or now
            if out.finished:
                done(first, now, out.token_ids)

        params = SamplingParams(max_tokens=self.max_tokens, ignore_eos=True)
        self.llm.engine.submit(prompt, params, on_output)

    def run(self, prompts: list[list[int]], concurrency: int) -> dict:
        return asyncio.run(closed_loop(callback_request(self.submit), prompts, concurrency))[0]

    def close(self) -> None:
        self.llm.close()


class TransformersServer:
    """``transformers``' continuous-batching manager (or batched ``generate`` in waves), with
    a paged cache sized as jaxstack's (16-token pages, 512 of them, 128 tokens and 32
    requests per step) rather than auto-sized from accelerator memory."""

    def __init__(self, hf_dir: Path, max_tokens: int, method: str = "auto"):
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
                    done(stamps[0], stamps[-1], result.generated_tokens)

        collector = threading.Thread(target=collect, daemon=True)
        collector.start()
        try:
            return asyncio.run(closed_loop(callback_request(submit), prompts, concurrency))[0]
        finally:
            stop.set()
            collector.join()
            manager.stop(block=True)

    def _run_waves(self, prompts, concurrency: int) -> dict:
        torch = self.torch
        completions, start = [], time.perf_counter()
        for wave in range(0, len(prompts), concurrency):
            batch = prompts[wave : wave + concurrency]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            submitted, clock = time.perf_counter(), _StepClock()
            with torch.no_grad():
                out = self.model.generate(
                    ids, attention_mask=mask, generation_config=self.config, streamer=clock
                )
            # put() is called once for the prompt, then once per generated step
            completions += [Completion(submitted, clock.stamps[1], clock.stamps[-1],
                                       row[width:].tolist()) for row in out]  # fmt: skip
        return summarize(completions, time.perf_counter() - start)


class _StepClock:
    """A ``generate`` streamer that only records when each step's tokens arrive."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, _) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_transformers_peer(args) -> None:
    """The jaxstack-vs-transformers benchmark on the small model; writes the record."""
    import torch

    common.configure_cpu_xla()
    hf_dir = Path(tempfile.mkdtemp(prefix="jaxstack-serve-bench-"))
    params = write_model(hf_dir, "small")
    vocab = MODELS["small"]["vocab_size"]
    max_tokens = 4 if args.quick else args.max_tokens
    torch.set_num_threads(common.usable_cpus())
    jaxstack = JaxstackEngine(hf_dir, max_tokens)
    reference = TransformersServer(hf_dir, max_tokens, args.transformers)
    warmup = make_requests(4, vocab, seed=1)
    jaxstack.run(warmup, 2)
    reference.run(warmup, 2)

    rows = []
    for concurrency in (1, 8) if args.quick else CONCURRENCY:
        count = (2 if args.quick else 8) if concurrency == 1 else 2 * concurrency
        prompts = make_requests(count, vocab, seed=concurrency)
        for name, server in (("jaxstack", jaxstack), ("transformers", reference)):
            result = server.run(prompts, concurrency)
            rows.append({"framework": name, "concurrency": concurrency, **result})
            print(f"{name:>12} c={concurrency:<3} {result['output_tokens_per_s']:8.1f} tok/s "
                  f"TTFT p50 {result['ttft_p50_s'] * 1e3:7.1f} ms "
                  f"TPOT p50 {result['tpot_p50_s'] * 1e3:6.1f} ms", file=sys.stderr)  # fmt: skip
    jaxstack.close()

    report = {
        "setup": {
            "peer": "transformers",
            "quick": args.quick,
            "params": params,
            "config": MODELS["small"],
            "max_tokens": max_tokens,
            "prompt_tokens": "uniform 16..128",
            "transformers_method": reference.method,
            "cpus": common.usable_cpus(),
        },
        "rows": rows,
    }
    directory = common.results_dir(args.results_dir, smoke=args.quick)
    common.write_result("serve", report, common.versions("transformers", "torch"), directory)
