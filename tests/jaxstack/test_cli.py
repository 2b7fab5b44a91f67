"""The jaxstack command: train with overrides, generate, convert, demo, one-line errors."""

import contextlib
import importlib.util
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxstack import hf, xla_flags
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


def test_train_logs_plain_lines_to_a_pipe_then_generate(tmp_path, capsys, monkeypatch):
    """stdout is a block-buffered pipe (a job log): with the progress bar on, every logged
    step is one complete line that reaches the pipe when logged, not when the process ends;
    no XLA flag line on CPU, where the stack sets none."""
    monkeypatch.setattr(xla_flags.xla_bridge, "backends_are_initialized", lambda: False)
    work_dir = str(tmp_path / "run")
    argv = ["train", "--train.work_dir", work_dir, "--mesh", "auto", *SMALL]
    argv += ["--train.num_steps", "6", "--train.progress_bar", "true"]
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    with open(write_end, "w", buffering=1 << 16) as pipe:
        with contextlib.redirect_stdout(pipe):
            assert main(argv) == 0
        logged = os.read(read_end, 1 << 16).decode()  # flushed output only
    rest = os.read(read_end, 1 << 16).decode()
    os.close(read_end)
    steps = [line for line in logged.splitlines() if line.startswith("train step ")]
    assert [line.split()[2] for line in steps] == ["2/6", "4/6", "6/6"], logged
    for line in steps:
        assert "…" not in line
        for field in ("loss=", "lr=", "tokens/s=", "mfu=", "elapsed=", "eta="):
            assert field in line, line
    assert "eval_loss=" in steps[-1]
    assert "xla flags" not in logged + rest
    assert "checkpoint at step 6" in logged + rest
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["model"]["hidden_size"] == 64 and saved["train"]["num_steps"] == 6
    argv = ["generate", "--work-dir", work_dir, "--prompt", "def f", "--max-new-tokens", "5"]
    assert main(argv) == 0
    assert "--- prompt 'def f'" in capsys.readouterr().out


def test_overrides_in_any_order_give_one_config(tmp_path, capsys):
    configs = []
    first, then = ["--data.seq_len", "1024"], ["--model.max_seq_len", "1024"]
    for argv in (first + then, then + first):
        assert main(["train", *argv, "--print-config"]) == 0
        configs.append(json.loads(capsys.readouterr().out))
    assert configs[0] == configs[1]
    assert configs[0]["data"]["seq_len"] == 1024 == configs[0]["model"]["max_seq_len"]
    config = tmp_path / "long.json"
    config.write_text(json.dumps({"data": {"seq_len": 1024}}))
    assert main(["train", "--config", str(config), *then, "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out) == configs[0]
    err = _error(capsys, ["plan", "--model.max_seq_len", "256", "--data.seq_len", "512"])
    assert "data.seq_len=512 exceeds model.max_seq_len=256" in err
    err = _error(capsys, ["train", "--train.num_steps", "5", "--train.warmup_steps", "9"])
    assert "warmup_steps=9 exceeds num_steps=5" in err


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


def test_work_dir_without_a_run_or_checkpoint_is_one_line(tmp_path, capsys):
    prompt = ["--prompt", "x"]
    err = _error(capsys, ["generate", "--work-dir", str(tmp_path / "nope"), *prompt])
    assert "no such work dir" in err
    err = _error(capsys, ["generate", "--work-dir", str(tmp_path), *prompt])
    assert f"work dir {tmp_path} has no run.json" in err
    (tmp_path / "run.json").write_text("{}")
    err = _error(capsys, ["serve", "--work-dir", str(tmp_path)])
    assert f"work dir {tmp_path} has no checkpoint yet" in err


def test_train_names_a_missing_data_path(tmp_path, capsys):
    work_dir = ["--train.work_dir", str(tmp_path)]
    err = _error(capsys, ["train", *work_dir, "--data.source", str(tmp_path / "*.txt")])
    assert err.startswith("jaxstack: error: --data.source: glob") and "matches no files" in err
    err = _error(capsys, ["train", *work_dir, "--data.tokenizer", str(tmp_path / "tok.json")])
    assert f"--data.tokenizer {tmp_path / 'tok.json'}: no such file or directory" in err


def test_serve_names_what_a_model_directory_lacks(tmp_path, capsys, monkeypatch):
    """Each check fails before anything loads (the engine is never built)."""
    monkeypatch.setattr("jaxstack.serve.LLM", lambda **_: pytest.fail("the model was loaded"))
    no_config, no_weights, no_tokenizer = (tmp_path / n for n in ("a", "b", "c"))
    for directory, files in ((no_config, ["tokenizer.json"]),
                             (no_weights, ["config.json", "tokenizer.json"]),
                             (no_tokenizer, ["config.json", "model.safetensors"])):  # fmt: skip
        directory.mkdir()
        for name in files:
            (directory / name).write_text("{}")
    (no_weights / "pytorch_model.bin").write_text("")
    expected = {
        tmp_path / "missing": "no such model directory",
        no_config: "has no config.json",
        no_weights: "has no weights (*.safetensors); it has PyTorch weights (pytorch_model.bin)",
        no_tokenizer: "has no tokenizer (tokenizer.json)",
    }
    for directory, message in expected.items():
        err = _error(capsys, ["serve", "--hf", str(directory)])
        assert message in err and str(directory) in err, err
    err = _error(capsys, ["convert", "--to", "jaxstack", str(no_weights), str(tmp_path / "out")])
    assert "has no weights" in err


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
