"""benchmarks/pipeline.py: its bubble arithmetic and its table, on a fixture record."""

import argparse

from benchmarks import common, report
from benchmarks.pipeline import OFFLOAD_VARIANTS, add_bubbles, pipeline_variants


def _fixture_report() -> dict:
    args = argparse.Namespace(microbatches=[4, 8], repeats=[2])
    variants = pipeline_variants(args)
    seconds = {"data=8": 1.0, "fsdp=8": 1.25, "data=2,stage=4 M=4": 2.0,
               "data=2,stage=4 M=8": 1.6, "data=2,stage=4 R=2 M=4": 1.6,
               "data=2,stage=4 R=2 M=8": 1.25}  # fmt: skip
    rows = [
        {"variant": name, "median_step_s": seconds[name], "tokens_per_s": 512 / seconds[name],
         "first_loss": 5.5}
        for name in variants
    ]  # fmt: skip
    offload = [
        {"variant": name, "median_step_s": 0.5, "tokens_per_s": 1024.0, "first_loss": 5.5,
         "device_argument_bytes": 3 * 2**20, "host_argument_bytes": 2**20 * (name != "none"),
         "temp_bytes": 2**19}
        for name in OFFLOAD_VARIANTS
    ]  # fmt: skip
    setup = dict(quick=False, hidden=64, layers=4, batch=16, seq=32, steps=2, warmup=1)
    return {"device_kind": "cpu", "setup": setup, "pipeline": add_bubbles(rows, variants),
            "offload": offload}  # fmt: skip


def test_bubbles_follow_the_formula_and_the_baseline():
    rows = {row["variant"]: row for row in _fixture_report()["pipeline"]}
    assert "bubble_formula" not in rows["fsdp=8"]
    assert rows["data=2,stage=4 M=4"]["bubble_formula"] == 3 / 7
    assert rows["data=2,stage=4 M=8"]["bubble_formula"] == 3 / 11
    assert rows["data=2,stage=4 M=4"]["bubble_measured"] == 0.5  # 1 - 1.0 / 2.0
    # circular: the stages run repeats x microbatches units each, the fill still stages - 1
    assert rows["data=2,stage=4 R=2 M=4"]["bubble_formula"] == 3 / 11
    assert rows["data=2,stage=4 R=2 M=8"]["bubble_formula"] == 3 / 19
    assert abs(rows["data=2,stage=4 R=2 M=8"]["bubble_measured"] - 0.2) < 1e-12  # 1 - 1 / 1.25


def test_the_pipeline_table_is_made_from_a_result_file(tmp_path):
    common.write_result("pipeline", _fixture_report(), {"jax": "0.0"}, tmp_path)
    doc = tmp_path / "benchmarks.md"
    doc.write_text("<!-- table:pipeline -->\n<!-- /table -->\n")
    assert report.main(["--doc", str(doc), "--results-dir", str(tmp_path)]) == 0
    lines = doc.read_text().splitlines()
    staged = next(line for line in lines if line.startswith("| data=2,stage=4 M=4 "))
    assert "| 2,000.0 | 256.0 | 42.9% | 50.0% | 5.50000 |" in staged
    offloaded = next(line for line in lines if line.startswith("| optimizer_offload "))
    assert "| 3.00 | 1.00 | 0.50 | 500.0 |" in offloaded
    assert any(line.startswith("- `benchmarks/results/pipeline-") for line in lines)
