"""The jaxstack command: train with overrides, generate, demo, and one-line errors."""

import json

from jaxstack.cli import main

SMALL = [
    "--data.max_files", "8", "--data.seq_len", "64", "--data.eval_examples", "8",
    "--train.num_steps", "4", "--train.batch_size", "8", "--train.save_every", "2",
    "--train.log_every", "2", "--train.progress_bar", "false",
    "--model.num_layers", "1", "--model.hidden_size", "64", "--model.intermediate_size", "128",
]  # fmt: skip


def _error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_train_then_generate(tmp_path, capsys):
    work_dir = str(tmp_path / "run")
    assert main(["train", "--train.work_dir", work_dir, "--mesh", "auto", *SMALL]) == 0
    out = capsys.readouterr().out
    assert "checkpoint at step 4" in out
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["model"]["hidden_size"] == 64 and saved["train"]["num_steps"] == 4
    argv = ["generate", "--work-dir", work_dir, "--prompt", "def f", "--max-new-tokens", "5"]
    assert main(argv) == 0
    assert "--- prompt 'def f'" in capsys.readouterr().out


def test_train_config_file_and_print(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"model": {"hidden_size": 96}, "train": {"num_steps": 7}}))
    argv = ["train", "--config", str(config), "--train.num_steps=9", "--print-config"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"]["hidden_size"] == 96
    assert printed["train"]["num_steps"] == 9


def test_unknown_config_key_is_one_line(capsys):
    err = _error(capsys, ["train", "--train.nmu_steps", "3"])
    assert "unknown config key 'train.nmu_steps'" in err and "train.num_steps" in err


def test_bad_value_is_one_line(capsys):
    err = _error(capsys, ["train", "--train.num_steps", "many"])
    assert "cannot read 'many' as int" in err


def test_batch_not_dividing_devices_is_one_line(tmp_path, capsys):
    argv = ["train", "--train.work_dir", str(tmp_path), *SMALL, "--train.batch_size", "12"]
    err = _error(capsys, argv)
    assert "multiple of 8" in err


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    err = _error(capsys, ["generate", "--work-dir", str(tmp_path), "--prompt", "x"])
    assert "run.json not found" in err


def test_demo_runs_end_to_end(tmp_path, capsys):
    assert main(["demo", "--steps", "6", "--work-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "trained 6 steps" in out
    assert "loss fell" in out
    assert "--- prompt 'def '" in out
