"""The serving benchmark's own code, on fixture timings and records (the benchmark itself runs
outside the suite: ``python benchmarks/serve.py``)."""

import threading

import pytest

from benchmarks import report
from benchmarks import serve as bench


def test_summarize_gives_throughput_and_latency_percentiles():
    # (submit, first token, last token, output tokens) per request
    timings = [(0.0, 0.1, 1.1, 11), (0.0, 0.3, 2.3, 5), (1.0, 1.2, 1.2, 1)]
    row = bench.summarize(timings, wall=4.0)
    assert row["requests"] == 3 and row["output_tokens"] == 17
    assert row["output_tokens_per_s"] == pytest.approx(17 / 4)
    assert row["ttft_p50_s"] == pytest.approx(0.2)  # of 0.1, 0.2, 0.3
    assert row["ttft_p99_s"] == pytest.approx(0.298)
    # the one-token request has no gap; the others have 0.1 s and 0.5 s per token
    assert row["tpot_p50_s"] == pytest.approx(0.3)
    assert row["tpot_p99_s"] == pytest.approx(0.496)


def test_closed_loop_keeps_the_concurrency_in_flight():
    lock, in_flight, peak, served = threading.Lock(), [0], [0], []

    def submit(prompt, done) -> None:
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])

        def finish() -> None:
            with lock:
                in_flight[0] -= 1
                served.append(prompt)
            done(1.0, 2.0, len(prompt))

        threading.Timer(0.002, finish).start()

    prompts = [[i] * (i % 3 + 2) for i in range(20)]
    row = bench.closed_loop(submit, prompts, concurrency=4)
    assert sorted(served) == sorted(prompts) and peak[0] == 4
    assert row["requests"] == 20 and row["output_tokens"] == sum(map(len, prompts))


def serve_record(method: str, tok_s: dict, *, quick: bool = False, date: str = "2026-12-01"):
    """A ``serve`` record as ``benchmarks/serve.py`` writes it, with ``tok_s[(framework,
    concurrency)]`` output tokens/s and fixed latencies."""
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
        [old, serve_record("waves", speeds), serve_record("continuous", speeds, quick=True)]
    )
    lines = [line for line in table.splitlines() if line.startswith("| waves")]
    assert lines == [
        "| waves | 1 | jaxstack | 30.0 | 12.0 ms | 34.5 ms | 2.0 ms | 250.0 ms | 1.50x |",
        "| waves | 1 | transformers | 20.0 | 12.0 ms | 34.5 ms | 2.0 ms | 250.0 ms | 1.00x |",
        "| waves | 8 | jaxstack | 150.0 | 12.0 ms | 34.5 ms | 2.0 ms | 250.0 ms | 2.50x |",
        "| waves | 8 | transformers | 60.0 | 12.0 ms | 34.5 ms | 2.0 ms | 250.0 ms | 1.00x |",
    ]  # the newest run per method only; the smoke run never reaches the table
    assert "continuous" not in table and "2026-11-01" not in table
    assert table.startswith("1,234,567-parameter Llama, 32 output tokens per request")
    only_smoke = [serve_record("continuous", speeds, quick=True)]
    assert "No recorded run" in report.serve_table(only_smoke)
