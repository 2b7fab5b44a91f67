"""The serving benchmark's own code, on fixture timings, streams and records (the benchmark
itself runs outside the suite: ``python benchmarks/serve.py``; no server starts here)."""

import asyncio
import json
import threading

import httpx
import pytest

from benchmarks import report
from benchmarks import serve as bench
from benchmarks import serve_http as http
from benchmarks.serve_http import Completion
from benchmarks.serve_transformers import callback_request


def test_summarize_gives_throughput_and_latency_percentiles():
    completions = [
        Completion(0.0, 0.1, 1.1, list(range(11))),
        Completion(0.0, 0.3, 2.3, list(range(5))),
        Completion(1.0, 1.2, 1.2, [7]),
    ]
    row = bench.summarize(completions, wall=4.0)
    assert row["requests"] == 3 and row["output_tokens"] == 17
    assert row["output_tokens_per_s"] == pytest.approx(17 / 4)
    assert row["ttft_p50_s"] == pytest.approx(0.2)  # of 0.1, 0.2, 0.3
    assert row["ttft_p99_s"] == pytest.approx(0.298)
    # the one-token request has no gap; the others have 0.1 s and 0.5 s per token
    assert row["tpot_p50_s"] == pytest.approx(0.3)
    assert row["tpot_p99_s"] == pytest.approx(0.496)


def test_closed_loop_keeps_the_concurrency_in_flight_and_the_prompt_order():
    in_flight, peak = [0], [0]

    async def request(prompt):
        in_flight[0] += 1
        peak[0] = max(peak[0], in_flight[0])
        await asyncio.sleep(0.001 * (len(prompt) % 3))  # finish out of order
        in_flight[0] -= 1
        return Completion(0.0, 0.5, 1.0, prompt[:2])

    prompts = [[i] * (i % 3 + 2) for i in range(20)]
    row, done = asyncio.run(bench.closed_loop(request, prompts, concurrency=4))
    assert peak[0] == 4 and [c.token_ids for c in done] == [p[:2] for p in prompts]
    assert row["requests"] == 20 and row["output_tokens"] == 40


def test_callback_engines_become_awaitable_requests():
    def submit(prompt, done):  # answers from another thread, as an engine does
        threading.Timer(0.001, done, (1.0, 2.0, [t + 1 for t in prompt])).start()

    row, done = asyncio.run(bench.closed_loop(callback_request(submit), [[1, 2], [5]], 2))
    assert [c.token_ids for c in done] == [[2, 3], [6]] and row["output_tokens"] == 3
    assert (done[0].first, done[0].last) == (1.0, 2.0)


def sse(*events) -> bytes:
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"


def chunk(text):
    return {"choices": [{"index": 0, "text": text, "finish_reason": None}]}


def test_stream_completion_reads_token_ids_and_checks_the_usage():
    sent = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        completion_tokens = 4 if sent[-1]["max_tokens"] == 4 else 5
        body = sse(chunk("t17"), chunk(""), chunk(" t3 t250"), chunk(" t0"),
                   {"choices": [], "usage": {"completion_tokens": completion_tokens}})  # fmt: skip
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    async def call(max_tokens):
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await http.stream_completion(client, "http://x", [1, 2, 3], max_tokens)

    done = asyncio.run(call(4))
    assert done.token_ids == [17, 3, 250, 0] and done.submitted <= done.first <= done.last
    assert sent[0]["prompt"] == [1, 2, 3] and sent[0]["ignore_eos"] is True
    assert sent[0]["temperature"] == 0.0 and sent[0]["stream"] is True
    with pytest.raises(RuntimeError, match="read 4 tokens from the stream but its usage says 5"):
        asyncio.run(call(5))


def test_token_check_finds_the_first_difference():
    ours = [Completion(0, 0, 0, [1, 2, 3]), Completion(0, 0, 0, [4, 5, 6]),
            Completion(0, 0, 0, [7, 8])]  # fmt: skip
    theirs = [Completion(0, 0, 0, [1, 2, 3]), Completion(0, 0, 0, [4, 9, 6]),
              Completion(0, 0, 0, [7, 8, 1])]  # fmt: skip
    check = bench.token_check(ours, theirs)
    assert check == {
        "requests": 3,
        "same": 1,
        "differ": [{"request": 1, "first_difference": 1}, {"request": 2, "first_difference": None}],
    }


def test_step_profile_from_the_phase_counters():
    metrics = (
        "# TYPE jaxstack_engine_phase_seconds_total counter\n"
        'jaxstack_engine_phase_seconds_total{phase="device"} 3.5\n'
        'jaxstack_engine_phase_seconds_total{phase="schedule"} 0.25\n'
        "jaxstack_generation_tokens_total 10.0\n"
    )
    after = http.phase_seconds(metrics)
    assert after == {"device": 3.5, "schedule": 0.25}
    assert http.phase_seconds("jaxstack_generation_tokens_total 10.0\n") is None
    row = {"output_tokens": 100, "wall_s": 5.0}
    profile = bench.step_profile({"device": 1.5}, after, row)
    assert profile["phase_ms_per_token"] == pytest.approx({"device": 20.0, "schedule": 2.5})
    assert profile["engine_ms_per_token"] == pytest.approx(22.5)
    assert profile["client_ms_per_token"] == pytest.approx(50.0)
    assert profile["http_ms_per_token"] == pytest.approx(27.5)


def vllm_record(tok_s: float, *, dtype="float32", quick=False, date="2026-12-07", profile=True):
    """A vLLM-peer ``serve`` record: jaxstack at ``tok_s`` and vLLM at 40 tok/s, c=1 and 8."""

    def row(engine, level, speed, ttft, tpot):
        out = dict(engine=engine, concurrency=level, requests=4, output_tokens=256,
                   wall_s=256 / speed, output_tokens_per_s=speed, ttft_p50_s=ttft,
                   ttft_p99_s=2 * ttft, tpot_p50_s=tpot, tpot_p99_s=2 * tpot)  # fmt: skip
        if profile and engine == "jaxstack":
            out["profile"] = dict(phase_ms_per_token={"device": 10.0, "pack": 1.25},
                                  engine_ms_per_token=11.25, http_ms_per_token=3.75,
                                  client_ms_per_token=15.0)  # fmt: skip
        return out

    rows = [
        row("jaxstack", 1, tok_s, 0.238, 0.121),
        row("vllm", 1, 40.0, 0.176, 0.032),
        row("jaxstack", 8, 2 * tok_s, 1.0, 0.141),
        row("vllm", 8, 80.0, 1.315, 0.062),
    ]
    tokens = [
        dict(concurrency=1, requests=4, same=4, differ=[]),
        dict(concurrency=8, requests=32, same=31, differ=[{"request": 3, "first_difference": 9}]),
    ]
    run = dict(model="124m", params=124_700_000, dtype=dtype, ready_s={"jaxstack": 73.04,
               "vllm": 130.0}, rows=rows, tokens=tokens)  # fmt: skip
    setup = dict(peer="vllm", quick=quick, max_tokens=64, prompt_tokens="uniform 16..128",
                 requests_per_slot=4, idle_server="paused (SIGSTOP)")  # fmt: skip
    return {
        "benchmark": "serve",
        "file": f"serve-{date}-{dtype}-{tok_s}.json",
        "command": "python benchmarks/serve.py",
        "date": f"{date}T00:00:00+00:00",
        "machine": {"cpu": "test cpu", "usable_cores": 2},
        "versions": {"jax": "0.0", "vllm": "0.32.0"},
        "code": {"commit": "0" * 40, "uncommitted": []},
        "result": {"setup": setup, "runs": [run]},
    }


def test_vllm_table_compares_per_model_dtype_and_level():
    records = [
        vllm_record(1.0, date="2026-12-06"),
        vllm_record(20.0),
        vllm_record(30.0, dtype="bfloat16", profile=False),
        vllm_record(99.0, quick=True),
    ]
    table = report.serve_vllm_table(records)
    lines = [line for line in table.splitlines() if line.startswith("| 124.7M")]
    assert lines == [
        "| 124.7M, float32 | 1 | 20.0 | 40.0 | **0.50x** | 238 / 176 ms | 476 / 352 ms "
        "| 121 / 32 ms | 242 / 64 ms | 4/4 |",
        "| 124.7M, float32 | 8 | 40.0 | 80.0 | **0.50x** | 1,000 / 1,315 ms | 2,000 / 2,630 ms "
        "| 141 / 62 ms | 282 / 124 ms | 31/32 |",
        "| 124.7M, bfloat16 | 1 | 30.0 | 40.0 | **0.75x** | 238 / 176 ms | 476 / 352 ms "
        "| 121 / 32 ms | 242 / 64 ms | 4/4 |",
        "| 124.7M, bfloat16 | 8 | 60.0 | 80.0 | **0.75x** | 1,000 / 1,315 ms | 2,000 / 2,630 ms "
        "| 141 / 62 ms | 282 / 124 ms | 31/32 |",
        "| 124.7M, float32 | 73.0 | 130.0 |",
        "| 124.7M, bfloat16 | 73.0 | 130.0 |",
        "| 124.7M, float32 | 1 | device 10.0, pack 1.2 | 11.2 | 3.8 | 15.0 |",
        "| 124.7M, float32 | 8 | device 10.0, pack 1.2 | 11.2 | 3.8 | 15.0 |",
    ]  # the newest measured run per model and dtype; older and smoke runs never show
    assert "2026-12-06" not in table and "99.0" not in table
    assert table.startswith("64 output tokens per request, prompts uniform 16..128 tokens")
    assert "No recorded run" in report.serve_vllm_table([vllm_record(9.0, quick=True)])
    # the transformers table does not take vLLM records
    assert "No recorded run" in report.serve_table(records)


def serve_record(method: str, tok_s: dict, *, quick: bool = False, date: str = "2026-12-01"):
    """A ``--peer transformers`` record as ``benchmarks/serve.py`` writes it (the recorded
    ones have no ``peer`` key), with ``tok_s[(framework, concurrency)]`` output tokens/s."""
    rows = [
        dict(framework=name, concurrency=level, requests=8, output_tokens=256,
             output_tokens_per_s=speed, ttft_p50_s=0.012, ttft_p99_s=0.0345,
             tpot_p50_s=0.002, tpot_p99_s=0.25)
        for (name, level), speed in tok_s.items()
    ]  # fmt: skip
    setup = dict(quick=quick, transformers_method=method, params=1234567, max_tokens=32,
                 prompt_tokens="16-128")  # fmt: skip
    return {
        "benchmark": "serve",
        "file": f"serve-{date}-{method}.json",
        "command": "python benchmarks/serve.py",
        "date": f"{date}T00:00:00+00:00",
        "machine": {"cpu": "test cpu", "usable_cores": 2},
        "versions": {"jax": "0.0"},
        "code": {"commit": "0" * 40, "uncommitted": []},
        "result": {"setup": setup, "rows": rows},
    }


def test_serve_table_compares_with_transformers_per_method_and_level():
    speeds = {("jaxstack", 1): 30.0, ("transformers", 1): 20.0}
    speeds |= {("jaxstack", 8): 150.0, ("transformers", 8): 60.0}
    old = serve_record("waves", {k: 1.0 for k in speeds}, date="2026-11-01")
    table = report.serve_table(
        [old, serve_record("waves", speeds), serve_record("continuous", speeds, quick=True),
         vllm_record(5.0)]
    )  # fmt: skip
    lines = [line for line in table.splitlines() if line.startswith("| waves")]
    assert lines == [
        "| waves | 1 | jaxstack | 30.0 | 12.0 ms | 34.5 ms | 2.0 ms | 250.0 ms | 1.50x |",
        "| waves | 1 | transformers | 20.0 | 12.0 ms | 34.5 ms | 2.0 ms | 250.0 ms | 1.00x |",
        "| waves | 8 | jaxstack | 150.0 | 12.0 ms | 34.5 ms | 2.0 ms | 250.0 ms | 2.50x |",
        "| waves | 8 | transformers | 60.0 | 12.0 ms | 34.5 ms | 2.0 ms | 250.0 ms | 1.00x |",
    ]  # the newest run per method only; the smoke run never reaches the table
    assert "continuous" not in table and "2026-11-01" not in table and "vllm" not in table
    assert table.startswith("1,234,567-parameter Llama, 32 output tokens per request")
    only_smoke = [serve_record("continuous", speeds, quick=True)]
    assert "No recorded run" in report.serve_table(only_smoke)
