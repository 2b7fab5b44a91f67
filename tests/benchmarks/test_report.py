"""docs/benchmarks.md tables are made from benchmarks/results/ (never typed by hand)."""

import json

import pytest

from benchmarks import common, report


def test_docs_tables_are_up_to_date_with_the_committed_results():
    # the --check mode: exits 1 (printing the diff) when a table differs from its files
    assert report.main(["--check"]) == 0


def fake_train_cpu_report(tokens: dict[str, float], quick: bool = False) -> dict:
    """The part of a train_cpu report the table reads, for a run of ``tokens`` tokens/s."""
    setup = {"preset": "100m", "quick": quick, "dtype": "float32", "extra_xla_flags": ""}
    setup.update(batch=2, seq=512, model={"scan_layers": False}, frameworks=list(tokens))
    return {
        "setup": setup,
        "frameworks": {
            name: {"tokens_per_sec": t, "mfu": t / 1000, "best_step_tokens_per_sec": 2 * t}
            for name, t in tokens.items()
        },
        "ratios": {
            "jaxstack_over_plain_jax": tokens["jaxstack"] / tokens["plain_jax"],
            "jaxstack_over_torch": tokens["jaxstack"] / tokens["torch"],
        },
        "matmul_peak_flops": 201.5e9,
    }


def test_a_result_file_round_trips_into_its_table(tmp_path, monkeypatch, capsys):
    script = str(common.REPO_ROOT / "benchmarks" / "train_cpu.py")
    monkeypatch.setattr("sys.orig_argv", ["python3", "-u", script, "--dtype", "float32"])
    tokens = {"jaxstack": 123.4, "plain_jax": 150.0, "torch": 200.0}
    path = common.write_result("train_cpu", fake_train_cpu_report(tokens), {"jax": "0.0"}, tmp_path)
    record = json.loads(path.read_text())
    assert json.loads(capsys.readouterr().out) == record  # the same JSON goes to stdout
    assert path.name.startswith(f"train_cpu-{record['date'][:10]}-")
    assert record["command"] == "python benchmarks/train_cpu.py --dtype float32"
    assert {"cpu", "usable_cores"} <= set(record["machine"]) and record["versions"] == {
        "jax": "0.0"
    }
    # a smoke run in the same directory never reaches a table
    common.write_result("train_cpu", fake_train_cpu_report(tokens, quick=True), {}, tmp_path)

    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Prose\n\n<!-- table:train_cpu -->\nstale\n<!-- /table -->\n\nMore prose.\n")
    args = ["--doc", str(doc), "--results-dir", str(tmp_path)]
    assert report.main([*args, "--check"]) == 1
    assert report.main(args) == 0
    assert report.main([*args, "--check"]) == 0
    text = doc.read_text()
    assert text.startswith("# Prose\n\n<!-- table:train_cpu -->\n| route: preset")
    assert text.endswith("<!-- /table -->\n\nMore prose.\n") and "stale" not in text
    row = next(line for line in text.splitlines() if line.startswith("| 100m"))
    assert "123.4 (12.3%); 246.8" in row and "150.0 (15.0%); 300.0" in row
    assert "200.0 (20.0%); 400.0" in row and "201.5" in row and path.name in row
    assert "**0.82x**; 0.82x" in row and "**0.62x**; 0.62x" in row
    assert text.count("| 100m") == 1


def test_the_sources_give_the_load_at_the_start_and_at_the_end(tmp_path, monkeypatch):
    """A benchmark's own processes load the machine, so the load when the record is written
    cannot say whether it started quiet: the record keeps both, the sources print both."""
    monkeypatch.setattr(common, "START_LOAD", [0.11, 0.5, 0.7])
    monkeypatch.setattr(common, "_load_average", lambda: [1.95, 1.2, 0.9])
    tokens = {"jaxstack": 123.4, "plain_jax": 150.0, "torch": 200.0}
    path = common.write_result("train_cpu", fake_train_cpu_report(tokens), {}, tmp_path)
    machine = json.loads(path.read_text())["machine"]
    assert machine["load_average_at_start_1_5_15"] == [0.11, 0.5, 0.7]
    assert machine["load_average_1_5_15"] == [1.95, 1.2, 0.9]
    doc = tmp_path / "benchmarks.md"
    doc.write_text("<!-- table:train_cpu -->\n<!-- /table -->\n")
    assert report.main(["--doc", str(doc), "--results-dir", str(tmp_path)]) == 0
    assert "load average 0.11 at the start, 1.95 at the end" in doc.read_text()


def test_an_unknown_table_marker_is_an_error():
    with pytest.raises(ValueError, match="no such table"):
        report.render("<!-- table:nope -->\n<!-- /table -->\n", [])


def _committed(name: str) -> dict:
    """A committed result file as ``load_results`` gives it: the fixture record."""
    path = common.RESULTS_DIR / name
    return {**json.loads(path.read_text()), "file": path.name}


def test_checkpoint_row_reads_its_record():
    record = _committed("checkpoint-2026-12-01-baf2682e.json")
    result = record["result"]
    (row,) = [r for r in report.checkpoint_table([record]).splitlines() if r.startswith("| 100m")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[0] == "100m, 2 x 512"
    assert cells[1] == ", ".join(result["checkpoint"]["codecs"]) and cells[-1] == record["file"]
    trainers = result["trainers"]
    assert cells[4] == (
        f"{trainers['no_save']['median_step_s']:.2f}; "
        f"{trainers['save_every_step']['median_step_s']:.2f}"
    )
    assert cells[5].strip("*").startswith(f"{100 * result['overhead']:.1f}%")
    # a smoke run of the same setup never reaches the docs
    quick = {**record, "result": {**result, "setup": {**result["setup"], "quick": True}}}
    assert "No recorded run" in report.checkpoint_table([quick])
