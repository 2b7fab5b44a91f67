"""The jaxstack command: train with overrides, generate, convert, demo, one-line errors."""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxstack import hf
from jaxstack.cli import main
from jaxstack.run import load_run

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


def _tiny_hf_model(directory):
    recipe = Path(__file__).parents[2] / "recipes" / "sft_from_hf.py"
    spec = importlib.util.spec_from_file_location("sft_from_hf", recipe)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_tiny_model(str(directory))


def test_generate_hf_and_convert_both_ways(tmp_path, capsys):
    hf_dir = _tiny_hf_model(tmp_path / "hf")
    argv = ["generate", "--hf", str(hf_dir), "--prompt", "hello", "--max-new-tokens", "4"]
    assert main(argv) == 0
    from_hf = capsys.readouterr().out
    assert "--- prompt 'hello'" in from_hf
    work_dir, back = tmp_path / "converted", tmp_path / "back"
    assert main(["convert", "--to", "jaxstack", str(hf_dir), str(work_dir)]) == 0
    assert main(["convert", "--to", "hf", str(work_dir), str(back)]) == 0
    original, exported = (
        hf.read_params(hf_dir, _config(hf_dir)),
        hf.read_params(back, _config(back)),
    )
    for a, b in zip(jax.tree.leaves(original), jax.tree.leaves(exported), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_trained_run_exports_to_hf(tmp_path, capsys):
    work_dir, out = tmp_path / "run", tmp_path / "hf"
    assert main(["train", "--train.work_dir", str(work_dir), *SMALL]) == 0
    assert main(["convert", "--to", "hf", str(work_dir), str(out)]) == 0
    _, model, params = load_run(work_dir)
    model_hf, _, params_hf = hf.load(out)
    ids = jnp.arange(10)[None] + 3
    np.testing.assert_allclose(
        model.apply({"params": params}, ids), model_hf.apply({"params": params_hf}, ids), atol=1e-5
    )


def _config(directory):
    return hf.config_from_hf(json.loads((Path(directory) / "config.json").read_text()))
