"""Hugging Face interop against ``transformers`` (PyTorch, CPU) on tiny random checkpoints.

Each family/variant is built once with ``transformers``, randomised (norms and biases too),
saved, and reloaded by ``transformers`` as the reference; jaxstack loads the same directory.
"""

import importlib.util
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding
from tokenizers import Tokenizer, models, pre_tokenizers

import jaxstack.hf as hf
from jaxstack.checkpoint import load_params
from jaxstack.generate import generate
from jaxstack.hf.safetensors_io import CorruptFileError, SafetensorsReader, write_safetensors
from jaxstack.lm import lm_param_specs
from jaxstack.mesh import make_mesh
from jaxstack.models import Mixtral
from jaxstack.models.llama import LlamaConfig

VOCAB = 128
WORDS = [f"w{i}" for i in range(VOCAB - 3)]
SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2)

# name -> (transformers config class, config kwargs, save_pretrained kwargs)
FAMILIES = {
    "llama2": (  # multi-head attention, untied, weights split over several files
        transformers.LlamaConfig,
        dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
        dict(max_shard_size="60KB"),
    ),
    "llama3": (  # GQA, llama3 RoPE scaling, tied, head_dim 32 != 64 / 4
        transformers.LlamaConfig,
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            tie_word_embeddings=True,
            max_position_embeddings=256,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
        {},
    ),
    "mistral": (  # sliding window shorter than the sequences
        transformers.MistralConfig,
        dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=6),
        {},
    ),
    "qwen2": (  # QKV bias, tied, stored in bfloat16
        transformers.Qwen2Config,
        dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
        dict(dtype=torch.bfloat16),
    ),
    "qwen3": (  # QK norm, head_dim 32 != 64 / 4, untied
        transformers.Qwen3Config,
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32),
        {},
    ),
}


# mixtures of experts: name -> (transformers config class, config kwargs)
MOE_FAMILIES = {
    "mixtral": (  # every layer MoE, renormalised top-2 of 4
        transformers.MixtralConfig,
        dict(num_attention_heads=4, num_key_value_heads=2, num_local_experts=4),
    ),
    "qwen2_moe": (  # gated shared expert, weights not renormalised, layer 0 dense (step 2)
        transformers.Qwen2MoeConfig,
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            decoder_sparse_step=2,
        ),
    ),
    "qwen3_moe": (  # QK norm, top-3 of 8 renormalised, layer 0 dense (mlp_only_layers)
        transformers.Qwen3MoeConfig,
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            num_experts=8,
            num_experts_per_tok=3,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            mlp_only_layers=[0],
        ),
    ),
}


def make_tokenizer(directory: Path) -> None:
    """A word-level tokenizer over the test vocabulary: <unk>=0, <s>=1, </s>=2, w0..."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def make_hf_model(name: str, directory: Path) -> torch.nn.Module:
    """Save a random model of family ``name`` to ``directory``; return it reloaded in float32."""
    config_cls, kwargs, save_kwargs = FAMILIES.get(name) or (*MOE_FAMILIES[name], {})
    torch.manual_seed(sum(map(ord, name)))
    model = transformers.AutoModelForCausalLM.from_config(config_cls(**SIZES, **kwargs))
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim > 1:
                param.normal_(0.0, 0.2)
            else:  # norm scales and biases: away from their ones/zeros initialisation
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
    if "dtype" in save_kwargs:
        model = model.to(save_kwargs.pop("dtype"))
    model.save_pretrained(directory, **save_kwargs)
    make_tokenizer(directory)
    return load_reference(directory)


def load_reference(directory: Path, dtype=torch.float32) -> torch.nn.Module:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return model


def torch_logits(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def jax_logits(model, params, ids: np.ndarray, mesh=None) -> np.ndarray:
    if mesh is None:
        return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids)))
    with jax.set_mesh(mesh):
        return np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(ids)))


def tensor_parallel_specs(abstract, mesh):
    """Megatron-style specs over (fsdp, tensor); a dimension they do not divide stays whole."""
    layouts = {
        ("q", "kernel"): ("fsdp", "tensor", None),
        ("k", "kernel"): ("fsdp", "tensor", None),
        ("v", "kernel"): ("fsdp", "tensor", None),
        ("q", "bias"): ("tensor", None),
        ("k", "bias"): ("tensor", None),
        ("v", "bias"): ("tensor", None),
        ("o", "kernel"): ("tensor", None, "fsdp"),
        ("gate", "kernel"): ("fsdp", "tensor"),
        ("up", "kernel"): ("fsdp", "tensor"),
        ("down", "kernel"): ("tensor", "fsdp"),
        ("embed", "embedding"): ("tensor", "fsdp"),
        ("lm_head", "kernel"): ("fsdp", "tensor"),
    }

    def spec(path, leaf):
        names = tuple(p.key for p in path)
        axes = layouts.get(names[-2:], (None,) * (leaf.ndim - (names[0] == "layers")))
        if names[0] == "layers":  # scanned: leading layer axis
            axes = (None, *axes)
        dims = zip(axes, leaf.shape, strict=True)
        return PartitionSpec(*(a if a and dim % mesh.shape[a] == 0 else None for a, dim in dims))

    return jax.tree_util.tree_map_with_path(spec, abstract)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """``build(name)`` -> (directory, transformers reference, model, config, params), cached."""
    workspace, cache = tmp_path_factory.mktemp("hf"), {}

    def build(name: str):
        if name not in cache:
            reference = make_hf_model(name, workspace / name)
            cache[name] = (workspace / name, reference, *hf.load(workspace / name))
        return cache[name]

    return build


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, build):
    """(name, directory, transformers reference, jaxstack model, config, params)."""
    return request.param, *build(request.param)


@pytest.fixture(scope="module")
def ids() -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, (2, 12))


def test_logits_match_transformers_float32(family, ids):
    _, _, reference, model, _, params = family
    ours, theirs = jax_logits(model, params, ids), torch_logits(reference, ids)
    assert np.abs(ours - theirs).max() < 1e-4
    assert np.abs(theirs).max() > 1.0  # the comparison is not between near-zero logits


def test_config_reads_every_variant(family):
    name, _, reference, _, config, params = family
    hf_config = reference.config
    assert config.head_dim_ == FAMILIES[name][1].get("head_dim", 64 // 4)
    assert config.tie_embeddings == hf_config.tie_word_embeddings
    assert ("lm_head" in params) != config.tie_embeddings
    assert config.qkv_bias == (name == "qwen2")
    assert config.qk_norm == (name == "qwen3")
    assert config.sliding_window == (6 if name == "mistral" else None)
    assert (config.rope_scaling is not None) == (name == "llama3")
    assert {jnp.dtype(x.dtype) for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}


def assert_greedy_tokens_equal(model, params, reference: torch.nn.Module) -> None:
    """20 greedy tokens (KV-cache generation) for two prompts of unequal lengths equal
    transformers' ``generate``."""
    prompts = [[5, 17, 99, 3, 42], [7, 8, 9, 10, 11, 12, 13, 14, 15]]
    ours = generate(model, params, prompts, max_new_tokens=20)
    for prompt, tokens in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = reference.generate(
                torch.tensor([prompt]), max_new_tokens=20, do_sample=False, pad_token_id=0
            )
        assert tokens == out[0, len(prompt) :].tolist()


def test_greedy_generation_matches_transformers(family):
    _, _, reference, model, _, params = family
    assert_greedy_tokens_equal(model, params, reference)


def test_export_reloads_in_transformers_with_equal_logits(family, ids, tmp_path):
    name, directory, reference, model, config, params = family
    out = hf.save(tmp_path / "export", config, params, tokenizer_dir=directory)
    assert hf.config_from_hf(json.loads((out / "config.json").read_text())) == config
    reloaded = load_reference(out)
    assert type(reloaded) is type(reference)
    np.testing.assert_allclose(torch_logits(reloaded, ids), torch_logits(reference, ids), atol=1e-6)
    assert (out / "tokenizer.json").read_bytes() == (directory / "tokenizer.json").read_bytes()


def test_mesh_1_2_4_gives_single_device_logits(family, ids):
    _, directory, _, model, _, params = family
    mesh = make_mesh(data=1, fsdp=2, tensor=4)
    _, _, sharded = hf.load(directory, mesh=mesh, param_specs=tensor_parallel_specs)
    expected = tensor_parallel_specs(jax.tree.map(jnp.asarray, params), mesh)
    for array, spec in zip(jax.tree.leaves(sharded), jax.tree.leaves(expected), strict=True):
        assert array.sharding.is_equivalent_to(NamedSharding(mesh, spec), array.ndim)
    assert any(not a.sharding.is_fully_replicated for a in jax.tree.leaves(sharded))
    single = jax_logits(model, params, ids)
    # sharded matmuls sum in another order: float32 rounding, not a layout error (that is O(1))
    np.testing.assert_allclose(jax_logits(model, sharded, ids, mesh), single, rtol=1e-5, atol=5e-5)


def test_bfloat16_logits_as_accurate_as_transformers_bfloat16(family, ids):
    _, directory, reference, _, _, _ = family
    model, _, params = hf.load(directory, param_dtype=jnp.bfloat16, dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    ours = jax_logits(model, params, ids)
    theirs = torch_logits(load_reference(directory, torch.bfloat16), ids)
    truth = torch_logits(reference, ids)  # float32
    # two bf16 implementations round differently: each is judged against the float32 truth
    assert np.abs(ours - truth).max() <= 2 * np.abs(theirs - truth).max()
    assert np.abs(ours - theirs).max() < 0.1 * np.abs(truth).max()


def test_scanned_layers_on_mesh_load_and_export_exactly(build, ids, tmp_path):
    qwen2_dir, _, model, config, params = build("qwen2")
    mesh = make_mesh(data=1, fsdp=2, tensor=4)
    scan_model, scan_config, scanned = hf.load(
        qwen2_dir, mesh=mesh, param_specs=tensor_parallel_specs, scan_layers=True
    )
    kernel = scanned["layers"]["block"]["attn"]["q"]["kernel"]
    assert kernel.shape == (2, 64, 4, 16)
    assert kernel.sharding.spec == PartitionSpec(None, "fsdp", "tensor", None)
    np.testing.assert_allclose(
        jax_logits(scan_model, scanned, ids, mesh), jax_logits(model, params, ids), atol=1e-5
    )
    flat = hf.save(tmp_path / "flat", config, params, dtype=jnp.bfloat16)
    stacked = hf.save(tmp_path / "scan", scan_config, scanned, dtype=jnp.bfloat16)
    original, flat_files, scan_files = (SafetensorsReader(d) for d in (qwen2_dir, flat, stacked))
    assert original.keys() == flat_files.keys() == scan_files.keys()
    for key in sorted(original.keys()):  # bf16 -> f32 -> bf16 is lossless
        assert original.read(key).tobytes() == scan_files.read(key).tobytes()
        assert original.read(key).tobytes() == flat_files.read(key).tobytes()


def test_convert_to_checkpoint_and_back(build, tmp_path):
    directory, _, _, config, params = build("llama3")
    work = tmp_path / "work"
    assert hf.convert_to_checkpoint(directory, work) == config
    restored = load_params(work)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    out = hf.convert_to_hf(work, tmp_path / "out", mesh=make_mesh(data=1, fsdp=8))
    original, exported = SafetensorsReader(directory), SafetensorsReader(out)
    assert original.keys() == exported.keys()
    for key in sorted(original.keys()):
        np.testing.assert_array_equal(original.read(key), exported.read(key))
    assert (out / "tokenizer.json").is_file()


def test_generate_text_matches_transformers(build):
    directory, reference, *_ = build("llama2")
    prompts = ["w1 w2 w3", "w40 w7"]
    texts = hf.generate_text(directory, prompts, max_new_tokens=6)
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    for prompt, text in zip(prompts, texts, strict=True):
        ids = [1, *tokenizer.encode(prompt).ids]
        with torch.no_grad():
            out = reference.generate(
                torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=2
            )
        expected = tokenizer.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True)
        assert text == expected


# ----------------------------------------------------------------------------- bad input
@pytest.fixture
def single_file_dir(build, tmp_path) -> Path:
    directory, _, _, config, params = build("llama2")
    return hf.save(tmp_path / "single", config, params)


def rewrite_tensors(directory: Path, change) -> None:
    path = directory / "model.safetensors"
    tensors = safetensors.numpy.load_file(path)
    change(tensors)
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})


def rewrite_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))


def test_missing_tensor_is_named(single_file_dir):
    rewrite_tensors(single_file_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        hf.load(single_file_dir)


def test_unexpected_tensor_is_named(single_file_dir):
    extra = {"model.layers.0.mlp.up_proj.bias": np.zeros(96, np.float32)}
    rewrite_tensors(single_file_dir, lambda t: t.update(extra))
    with pytest.raises(ValueError, match=r"no parameter.*model\.layers\.0\.mlp\.up_proj\.bias"):
        hf.load(single_file_dir)


def test_tied_lm_head_copy_and_rope_buffers_in_files_are_tolerated(build, tmp_path, ids):
    _, reference, _, config, params = build("llama3")  # tied embeddings
    directory = hf.save(tmp_path / "extra", config, params)
    stale = {
        "lm_head.weight": np.asarray(params["embed"]["embedding"]),  # the tied head, stored
        "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(16, np.float32),
    }
    rewrite_tensors(directory, lambda t: t.update(stale))
    model, config, loaded = hf.load(directory)
    assert config.tie_embeddings and "lm_head" not in loaded
    expected = torch_logits(reference, ids)
    np.testing.assert_allclose(jax_logits(model, loaded, ids), expected, atol=1e-4)


def test_distinct_lm_head_under_a_tied_config_loads_untied_like_transformers(build, tmp_path, ids):
    _, _, _, config, params = build("llama3")
    directory = hf.save(tmp_path / "distinct", config, params)
    head = np.random.default_rng(0).normal(0, 0.2, (VOCAB, 64)).astype(np.float32)
    rewrite_tensors(directory, lambda t: t.update({"lm_head.weight": head}))
    with pytest.warns(UserWarning, match="loading the head untied, as transformers does"):
        model, loaded_config, loaded = hf.load(directory)
    assert not loaded_config.tie_embeddings
    expected = torch_logits(load_reference(directory), ids)  # transformers uses the head too
    np.testing.assert_allclose(jax_logits(model, loaded, ids), expected, atol=1e-4)


def test_shape_mismatch_names_tensor_and_shapes(single_file_dir):
    rewrite_config(single_file_dir, intermediate_size=80)
    with pytest.raises(ValueError, match=r"gate_proj\.weight.*\[96, 64\].*\[80, 64\]"):
        hf.load(single_file_dir)


def test_truncated_file_is_named(single_file_dir):
    path = single_file_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CorruptFileError, match=r"model\.safetensors.*truncated"):
        hf.load(single_file_dir)


def test_garbage_header_is_named(single_file_dir):
    path = single_file_dir / "model.safetensors"
    path.write_bytes((16).to_bytes(8, "little") + b"{not json......." + bytes(64))
    with pytest.raises(CorruptFileError, match=r"model\.safetensors.*unreadable"):
        hf.load(single_file_dir)


def test_index_naming_a_missing_shard_is_named(build, tmp_path):
    directory = shutil.copytree(build("llama2")[0], tmp_path / "sharded")
    shard = sorted(directory.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        hf.load(directory)


def test_unsupported_architecture_is_named(single_file_dir):
    rewrite_config(single_file_dir, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match=r"model_type 'gpt2'.*GPT2LMHeadModel"):
        hf.load(single_file_dir)


def test_directory_without_weights_is_explained(tmp_path):
    config = {"model_type": "llama", "num_attention_heads": 4, **SIZES}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        hf.load(tmp_path)


def test_bad_overrides_and_specs_are_explained(single_file_dir):
    with pytest.raises(TypeError, match="unknown config overrides.*'scan_layer'.*scan_layers"):
        hf.load(single_file_dir, scan_layer=True)
    with pytest.raises(ValueError, match="param_specs needs a mesh"):
        hf.load(single_file_dir, param_specs=tensor_parallel_specs)
    mesh = make_mesh(data=1, fsdp=8)
    with pytest.raises(ValueError, match="pytree of PartitionSpec"):
        hf.load(single_file_dir, mesh=mesh, param_specs={"embed": PartitionSpec()})
    uneven = lambda abstract, mesh: jax.tree.map(  # noqa: E731
        lambda x: PartitionSpec(*["fsdp"] * min(x.ndim, 1)), abstract
    )  # 8 does not divide the 4 heads of o_proj's first axis
    with pytest.raises(ValueError, match=r"self_attn\.o_proj\.weight.*fix param_specs"):
        hf.load(single_file_dir, mesh=mesh, param_specs=uneven)


def test_save_rejects_params_of_another_config(build, tmp_path):
    _, _, _, config, params = build("llama2")
    with pytest.raises(ValueError, match=r"wrong shapes.*mlp/gate/kernel"):
        hf.save(tmp_path / "out", config.replace(intermediate_size=80), params)


def test_loaded_params_default_to_the_first_device(build):
    _, _, _, _, params = build("llama2")
    device = SingleDeviceSharding(jax.devices()[0])
    assert all(x.sharding == device for x in jax.tree.leaves(params))


# ------------------------------------------------------------------------ config mapping
LLAMA3_BASE = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    **SIZES,
)
LLAMA3_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)


def test_transformers4_and_5_rope_spellings_give_the_same_config():
    v4 = hf.config_from_hf(
        {**LLAMA3_BASE, "rope_theta": 5e5, "rope_scaling": {"type": "llama3", **LLAMA3_SCALING}}
    )
    v5 = hf.config_from_hf(
        {
            **LLAMA3_BASE,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **LLAMA3_SCALING},
        }
    )
    assert v4 == v5
    assert v4.rope_theta == 5e5
    assert v4.rope_scaling.original_max_position_embeddings == 256
    assert v4.head_dim_ == 16


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE type 'yarn'"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"attention_bias": True}, "o_proj bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"architectures": ["LlamaForSequenceClassification"]}, "LlamaForSequenceClassification"),
        ({"vocab_size": None}, "'vocab_size'"),
        (
            {
                "model_type": "qwen2",
                "architectures": ["Qwen2ForCausalLM"],
                "use_sliding_window": True,
                "sliding_window": 8,
                "max_window_layers": 1,
            },
            "mixes sliding-window and full attention",
        ),
    ],
)
def test_unsupported_config_features_are_named(changes, message):
    with pytest.raises(ValueError, match=message):
        hf.config_from_hf({**LLAMA3_BASE, **changes})


def test_config_to_hf_picks_or_rejects_the_family():
    assert hf.config_to_hf(LlamaConfig(qk_norm=True))["model_type"] == "qwen3"
    assert hf.config_to_hf(LlamaConfig(qkv_bias=True))["model_type"] == "qwen2"
    assert hf.config_to_hf(LlamaConfig(sliding_window=64))["model_type"] == "mistral"
    assert hf.config_to_hf(LlamaConfig())["model_type"] == "llama"
    message = "qkv_bias=True cannot be written as HF model_type 'llama'"
    with pytest.raises(ValueError, match=message):
        hf.config_to_hf(LlamaConfig(qkv_bias=True, extra={"hf_model_type": "llama"}))


# ------------------------------------------------------------------------ file format
def test_writer_output_reads_back_with_the_safetensors_library(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a": rng.standard_normal((3, 5)).astype(jnp.bfloat16),
        "b": rng.standard_normal((7,)).astype(np.float32),
        "c": np.arange(6, dtype=np.int64).reshape(2, 3),
        "d": np.float16(1.5).reshape(()),
    }
    declared = [(name, x.shape, x.dtype) for name, x in tensors.items()]
    files = write_safetensors(tmp_path, declared, tensors.__getitem__, max_shard_bytes=40)
    assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    loaded = {}
    for name in files:
        loaded.update(safetensors.torch.load_file(tmp_path / name))
    for name, x in tensors.items():
        np.testing.assert_array_equal(loaded[name].float().numpy(), x.astype(np.float32))
    reader = SafetensorsReader(tmp_path)
    for name, x in tensors.items():
        assert reader.read(name).dtype == x.dtype
        assert reader.read(name).tobytes() == x.tobytes()


# ------------------------------------------------------------------------ SFT recipe
@pytest.fixture(scope="module")
def recipe():
    path = Path(__file__).parents[2] / "recipes" / "sft_from_hf.py"
    spec = importlib.util.spec_from_file_location("sft_from_hf", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sft_collate_masks_exactly_the_response(recipe, tmp_path):
    from jaxstack.data import load_tokenizer

    tiny = recipe.make_tiny_model(tmp_path / "tiny")
    tokenizer = load_tokenizer(tiny)
    example = {"prompt": "Q: 2 + 3 = ?\nA:", "response": " 5"}
    batch = recipe.make_collate_fn(tokenizer, seq_len=24)([example])
    response = tokenizer.encode(example["response"], add_eos=True)
    masked = batch["targets"][0][batch["loss_mask"][0] == 1].tolist()
    assert masked == response
    prompt = tokenizer.encode(example["prompt"], add_bos=True)
    assert batch["input_ids"][0, : len(prompt)].tolist() == prompt


def test_sft_recipe_trains_and_exports_a_transformers_model(recipe, tmp_path, ids):
    tiny = tmp_path / "tiny"
    recipe.main(["--make-tiny-model", str(tiny)])
    out, work = tmp_path / "sft", tmp_path / "work"
    records = recipe.main(
        ["--hf", str(tiny), "--out", str(out), "--work-dir", str(work)]
        + ["--steps", "2", "--batch-size", "8"]
    )
    assert records[-1]["step"] == 2 and np.isfinite(records[-1]["loss"])
    model, _, params = hf.load(out)
    _, _, before = hf.load(tiny)
    assert not np.array_equal(params["embed"]["embedding"], before["embed"]["embedding"])
    reference = load_reference(out)
    np.testing.assert_allclose(
        jax_logits(model, params, ids), torch_logits(reference, ids), atol=1e-4
    )


# ------------------------------------------------------------------------ mixtures of experts
@pytest.fixture(scope="module", params=list(MOE_FAMILIES))
def moe_family(request, build):
    """(name, directory, transformers reference, jaxstack model, config, params)."""
    return request.param, *build(request.param)


def test_moe_config_logits_and_greedy_tokens_match_transformers(moe_family, ids):
    name, _, reference, model, config, params = moe_family
    hf_config = reference.config
    assert config.num_experts == hf_config.num_experts
    assert config.experts_per_token == hf_config.num_experts_per_tok
    assert config.moe_layers == ((0, 1) if name == "mixtral" else (1,))
    assert config.normalize_router_weights == (name != "qwen2_moe")
    assert (config.shared_intermediate_size, config.shared_expert_gate) == (
        (48, True) if name == "qwen2_moe" else (0, False)
    )
    ours, theirs = jax_logits(model, params, ids), torch_logits(reference, ids)
    assert np.abs(ours - theirs).max() < 1e-4
    assert np.abs(theirs).max() > 1.0
    assert_greedy_tokens_equal(model, params, reference)


def test_moe_export_reloads_equal_in_jaxstack_and_transformers(moe_family, ids, tmp_path):
    _, directory, reference, _, config, params = moe_family
    out = hf.save(tmp_path / "export", config, params, max_shard_bytes=100_000)
    assert len(list(out.glob("*.safetensors"))) > 1  # experts spread over several files
    _, reloaded_config, reloaded = hf.load(out)
    assert reloaded_config == config
    for a, b in zip(jax.tree.leaves(reloaded), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    original, exported = SafetensorsReader(directory), SafetensorsReader(out)
    assert original.keys() == exported.keys()
    theirs = load_reference(out)
    np.testing.assert_allclose(torch_logits(theirs, ids), torch_logits(reference, ids), atol=1e-6)


def test_mixtral_loads_scanned_on_an_expert_mesh_and_exports_exactly(build, ids, tmp_path):
    """Stacked [layers, experts, ...] weights stream onto expert=4 x data=2 shards."""
    directory, _, model, config, params = build("mixtral")
    mesh = make_mesh(data=2, expert=4)
    scan_model = Mixtral(config.replace(scan_layers=True))
    specs = lm_param_specs(scan_model, 16)
    _, scan_config, scanned = hf.load(directory, mesh=mesh, param_specs=specs, scan_layers=True)
    gate = scanned["layers"]["block"]["mlp"]["experts"]["gate"]
    assert gate.shape == (2, 4, 64, 96) and gate.sharding.spec[:2] == (None, "expert")
    assert gate.addressable_shards[0].data.shape == (2, 1, 64, 96)
    np.testing.assert_allclose(
        jax_logits(scan_model, scanned, ids, mesh), jax_logits(model, params, ids), atol=1e-5
    )
    out = hf.save(tmp_path / "scan", scan_config, scanned)
    original, exported = SafetensorsReader(directory), SafetensorsReader(out)
    assert original.keys() == exported.keys()
    for key in sorted(original.keys()):
        assert original.read(key).tobytes() == exported.read(key).tobytes()


def test_moe_config_mapping_rejects_what_hf_cannot_express():
    base = dict(
        model_type="qwen2_moe",
        num_attention_heads=4,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        **SIZES,
    )
    with pytest.raises(ValueError, match=r"MoE layers \[0, 2\].*mlp_only_layers=\[1\]"):
        hf.config_from_hf({**base, "num_hidden_layers": 3, "mlp_only_layers": [1]})
    config = hf.config_from_hf(base)
    assert config.router_aux_loss_weight == 0.0 and config.moe_layers == (0, 1)
    with pytest.raises(ValueError, match="router_score='sigmoid' cannot be written"):
        hf.config_to_hf(config.replace(router_score="sigmoid"))
    with pytest.raises(ValueError, match="cannot be written as HF model_type 'mixtral'"):
        hf.config_to_hf(
            config.replace(
                shared_intermediate_size=0,
                shared_expert_gate=False,
                normalize_router_weights=True,
                first_dense_layers=1,
                extra={"hf_model_type": "mixtral"},
            )
        )
