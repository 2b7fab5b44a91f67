"""``jaxstack train --init.hf``: fine-tune a Hugging Face model on chat data from the command
line, checked against ``transformers``; then export it back."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch
import transformers

from jaxstack.cli import main
from jaxstack.data import load_tokenizer
from jaxstack.data.chat import ChatTemplate, chat_document
from jaxstack.run import RunConfig, build_datasets, load_run

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""Ends every turn with the EOS token: a conversation must still be one document."""


def _conversation(a: int, b: int) -> dict:
    messages = [{"role": "user", "content": f"Q: {a} + {b} = ?"}]
    messages.append({"role": "assistant", "content": f"A: {a + b}"})
    if (a + b) % 3 == 0:
        messages += [{"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes"}]
    return {"messages": messages}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    recipe = Path(__file__).parents[2] / "recipes" / "sft_from_hf.py"
    spec = importlib.util.spec_from_file_location("sft_from_hf", recipe)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    directory = module.make_tiny_model(str(tmp_path_factory.mktemp("hf") / "model"))
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(
        json.dumps({**config, "chat_template": TEMPLATE})
    )
    return directory


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    lines = [json.dumps(_conversation(a, b)) for a in range(10) for b in range(10)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_chat_loss_covers_assistant_turns_only(hf_dir):
    tokenizer = load_tokenizer(hf_dir)
    record = _conversation(1, 2)  # two exchanges
    ids, weights = chat_document(record, "x:1", tokenizer, ChatTemplate.of(hf_dir))
    raw = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    trained = [i for i, w in zip(ids, weights, strict=True) if w]
    assert raw.decode(trained, skip_special_tokens=False).replace(" ", "") == "A:3</s>Yes</s>"
    assert raw.decode(ids, skip_special_tokens=False).replace(" ", "") == (
        "<s><|user|>Q:1+2=?</s><|assistant|>A:3</s><|user|>Sure?</s><|assistant|>Yes</s>"
    )


def test_train_init_hf_on_chat_matches_transformers_and_exports(
    hf_dir, chat_file, tmp_path, capsys
):
    work_dir, out = tmp_path / "run", tmp_path / "export"
    argv = ["train", "--init.hf", str(hf_dir), "--data.source", str(chat_file)]
    argv += ["--data.seq_len", "48", "--data.eval_examples", "8", "--train.batch_size", "8"]
    argv += ["--train.num_steps", "6", "--train.log_every", "1", "--train.shuffle", "false"]
    argv += ["--train.learning_rate", "1e-2", "--train.work_dir", str(work_dir)]
    argv += ["--train.export_hf", str(out)]
    assert main(argv) == 0
    records = [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < records[0]["loss"] - 0.3

    # step 1's loss is transformers' on the same packed batch (unshuffled: examples 0..7)
    run = RunConfig.load(work_dir)
    assert run.data.tokenizer == str(hf_dir) and run.model.hidden_size == 64
    train_set, _ = build_datasets(run.data, load_tokenizer(run.data.tokenizer))
    reference = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    nll_sum = weight_sum = 0.0
    for example in (train_set[i] for i in range(8)):
        for segment in np.unique(example["segment_ids"]):
            rows = example["segment_ids"] == segment
            ids = torch.tensor(example["input_ids"][rows])[None]
            with torch.no_grad():
                logits = reference(ids, position_ids=torch.tensor(example["positions"][rows])[None])
            logp = torch.log_softmax(logits.logits[0].double(), -1).numpy()
            nll = -logp[np.arange(rows.sum()), example["targets"][rows]]
            nll_sum += float((nll * example["loss_mask"][rows]).sum())
            weight_sum += float(example["loss_mask"][rows].sum())
    assert 0 < weight_sum < 8 * 48  # prompts are masked out
    np.testing.assert_allclose(records[0]["loss"], nll_sum / weight_sum, rtol=2e-5)

    # the export loads in transformers, with jaxstack's logits and the chat template
    _, model, params = load_run(work_dir)
    exported = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    ids = np.arange(3, 19)[None]
    with torch.no_grad():
        theirs = exported(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(model.apply({"params": params}, ids), theirs, atol=2e-4)
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE

    # a work dir written by jaxstack convert trains from the same weights: the same first loss
    converted = tmp_path / "converted"
    assert main(["convert", "--to", "jaxstack", str(hf_dir), str(converted)]) == 0
    capsys.readouterr()
    again = [a if a != str(work_dir) else str(converted) for a in argv[3:-2]]
    assert main(["train", *again, "--train.num_steps", "1"]) == 0
    assert "training starts from them with a fresh one" in capsys.readouterr().out
    first = json.loads((converted / "metrics.jsonl").read_text().splitlines()[0])
    np.testing.assert_allclose(first["loss"], records[0]["loss"], rtol=1e-6)


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_record_and_missing_eos_are_one_line(hf_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    messages = [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]
    bad.write_text(json.dumps(_conversation(1, 1)) + "\n" + json.dumps({"messages": messages}))
    common = ["train", "--train.work_dir", str(tmp_path / "run"), "--data.source"]
    err = _error(capsys, [*common, str(bad), "--init.hf", str(hf_dir)])
    assert f"{bad}:2: messages[1] has role 'bot'" in err
    no_eos = tmp_path / "tokenizer"
    no_eos.mkdir()
    (no_eos / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    (no_eos / "tokenizer_config.json").write_text(json.dumps({"eos_token": None}))
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "1 + 1 = 2"}) + "\n")
    err = _error(capsys, [*common, str(text), "--data.tokenizer", str(no_eos)])
    assert "no end-of-document (EOS) token" in err and "--data.eos_token" in err
    assert "--data.eos_id" in err
