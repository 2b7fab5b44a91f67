"""The serving benchmark: a smoke run serves the same requests with jaxstack and transformers
and its record makes the ``serve`` table."""

import json
import subprocess
import sys
from pathlib import Path

from benchmarks import report

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_records_both_frameworks_and_makes_a_table(tmp_path):
    command = [sys.executable, "benchmarks/serve.py", "--quick", "--results-dir", str(tmp_path)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (path,) = tmp_path.glob("serve-*.json")
    record = json.loads(path.read_text())
    assert json.loads(done.stdout) == record
    result = record["result"]
    assert result["setup"]["quick"] and "continuous" in result["setup"]["transformers_method"]
    rows = result["rows"]
    assert {(r["framework"], r["concurrency"]) for r in rows} == {
        (name, c) for name in ("jaxstack", "transformers") for c in (1, 8)
    }
    for row in rows:
        assert row["output_tokens"] == row["requests"] * result["setup"]["max_tokens"]
        assert 0 < row["ttft_p50_s"] <= row["ttft_p99_s"]
        assert 0 < row["tpot_p50_s"] <= row["tpot_p99_s"]
        assert row["output_tokens_per_s"] > 0
    # smoke runs never reach the docs; the same record as a measurement makes the table
    record["file"] = path.name
    assert "No recorded run" in report.serve_table([record])
    record["result"]["setup"]["quick"] = False
    table = report.serve_table([record])
    assert "| 8 | jaxstack |" in table and "| 8 | transformers |" in table
    assert result["setup"]["transformers_method"] in table
    assert "1.00x" in table  # transformers against itself
