"""LoRA adapters <-> Hugging Face PEFT on a tiny random ``transformers`` Llama: logits agree
both ways, merged exports equal ``merge_and_unload``, bad adapters fail in one line."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
import transformers

import jaxstack as js
from jaxstack.lm import lm_functions
from jaxstack.lora import LoRAConfig, load_peft, merge, save_peft
from jaxstack.mesh import make_mesh

VOCAB, SEQ = 128, 16
IDS = np.random.default_rng(0).integers(0, VOCAB, size=(2, SEQ))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    directory = tmp_path_factory.mktemp("base")
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def hf_model(base_dir):
    return transformers.LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


def jax_logits(model, params) -> np.ndarray:
    return np.asarray(model.apply({"params": params}, jnp.asarray(IDS)))


@pytest.fixture(scope="module")
def peft_adapter(base_dir, tmp_path_factory):
    """An adapter made and saved by ``peft`` (random B: not a no-op), and PEFT's logits."""
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False)  # fmt: skip
    model = peft.get_peft_model(hf_model(base_dir), config)
    directory = tmp_path_factory.mktemp("peft_adapter")
    model.save_pretrained(directory)
    return directory, torch_logits(model)


def test_peft_adapter_loads_with_peft_logits(base_dir, peft_adapter):
    directory, expected = peft_adapter
    model, config, params = js.hf.load(base_dir)
    adapters, lora = load_peft(directory, config)
    assert (lora.rank, lora.scale) == (4, 2.0)
    assert set(adapters["layers_0"]) == {"attn", "mlp"}
    np.testing.assert_allclose(jax_logits(model, merge(params, adapters, lora.scale)), expected,
                               atol=1e-4)  # fmt: skip


@pytest.fixture(scope="module")
def trained(base_dir, tmp_path_factory):
    """Adapters trained by jaxstack (scanned layers) on the HF base, exported for PEFT."""
    model, config, params = js.hf.load(base_dir, scan_layers=True)
    loss_fn, _ = lm_functions(model)
    rng = np.random.default_rng(2)
    ids = rng.integers(0, VOCAB, size=(4, SEQ + 1)).astype(np.int32)
    batch = {"input_ids": ids[:, :-1], "targets": ids[:, 1:],
             "positions": np.tile(np.arange(SEQ, dtype=np.int32), (4, 1)),
             "segment_ids": np.ones((4, SEQ), np.int32),
             "loss_mask": np.ones((4, SEQ), np.float32)}  # fmt: skip
    lora = LoRAConfig(rank=4, alpha=16.0, targets="q_proj|k_proj|up_proj")
    trainer = js.Trainer(
        params=params, collate_fn=list, loss_fn=loss_fn, lora=lora,
        mesh=make_mesh(devices=jax.devices()[:1]),
        config=js.TrainConfig(batch_size=4, learning_rate=1e-2, warmup_steps=0,
                              work_dir=str(tmp_path_factory.mktemp("work"))),
    )  # fmt: skip
    for _ in range(3):
        trainer.train_step(batch)
    directory = save_peft(tmp_path_factory.mktemp("exported"), config, trainer.params, lora,
                          base_model=str(base_dir))  # fmt: skip
    return model, config, trainer, directory


def test_jaxstack_adapter_loads_into_peft(base_dir, trained):
    model, _, trainer, directory = trained
    saved = json.loads((directory / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == ["k_proj", "q_proj", "up_proj"]
    loaded = peft.PeftModel.from_pretrained(hf_model(base_dir), directory).eval()
    ours = jax_logits(model, trainer.model_params)
    np.testing.assert_allclose(torch_logits(loaded), ours, atol=1e-4)
    assert np.abs(ours - torch_logits(hf_model(base_dir))).max() > 1e-3  # training moved it


def test_merged_export_equals_merge_and_unload(base_dir, trained, tmp_path):
    _, config, trainer, directory = trained
    js.hf.save(tmp_path, config, trainer.model_params)
    exported = hf_model(tmp_path)
    merged = peft.PeftModel.from_pretrained(hf_model(base_dir), directory).merge_and_unload()
    np.testing.assert_allclose(torch_logits(exported), torch_logits(merged.eval()), atol=1e-4)


def edited(source, tmp_path, config=None, rename=None):
    """A copy of an adapter dir with config keys changed and/or tensor names replaced."""
    target = tmp_path / "edited"
    shutil.copytree(source, target)
    if config:
        path = target / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if rename:
        file = str(target / "adapter_model.safetensors")
        tensors = safetensors.numpy.load_file(file)
        tensors = {k.replace(*rename): v for k, v in tensors.items()}
        safetensors.numpy.save_file(tensors, file)
    return target


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(config={"r": 8}), "has rank 4 but adapter_config.json says r=8"),
        (
            dict(rename=("layers.1.", "layers.7.")),
            r"adapts model\.layers\.7\.\S+, which the "
            "base model lacks",
        ),
        (dict(config={"use_dora": True}), "use_dora=True is not supported"),
    ],
    ids=["rank", "module", "option"],
)
def test_bad_adapters_fail_in_one_line(base_dir, peft_adapter, tmp_path, change, message):
    config = js.hf.load_config(base_dir)
    with pytest.raises(ValueError, match=message) as error:
        load_peft(edited(peft_adapter[0], tmp_path, **change), config)
    assert "\n" not in str(error.value)


def test_adapter_of_another_base_is_refused(base_dir, peft_adapter):
    other = js.hf.load_config(base_dir).replace(hidden_size=32)
    with pytest.raises(ValueError, match="made for another base model"):
        load_peft(peft_adapter[0], other)
