"""A whole language-model run from one typed config: data, model, training, generation.

This is what ``jaxstack demo``, ``jaxstack train`` and ``jaxstack generate`` call; it is built
only on the public pieces (``Trainer``, ``lm_functions``, ``generate``), like a recipe.
"""

import dataclasses
import json
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxstack.checkpoint import load_params
from jaxstack.data import PackedDataset, Prefix, lm_collate, load_tokenizer
from jaxstack.data.text import resolve_paths
from jaxstack.data.tokenizers import Tokenizer
from jaxstack.layers.rope import Llama3RopeScaling
from jaxstack.lm import lm_functions, lm_param_specs
from jaxstack.mesh import make_mesh
from jaxstack.models.llama import Llama, LlamaConfig, preset
from jaxstack.planning import mesh_axis_sizes
from jaxstack.trainer import TrainConfig, Trainer

RUN_FILE = "run.json"


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it is cut into training sequences."""

    source: str = "stdlib"
    """``stdlib`` (this Python's own source files), a glob of text files, a ``.jsonl`` file or
    glob (field ``text``), or a token memmap ``.bin`` written by ``write_token_memmap``."""
    tokenizer: str = "byte"
    """``byte`` or a path to a Hugging Face ``tokenizer.json`` (or its directory)."""
    seq_len: int = 128
    """Tokens per training sequence."""
    max_files: int = 400
    """Cap on the number of text files read (stdlib / globs), in sorted order."""
    eval_examples: int = 64
    """Sequences held out from the end of the data for evaluation."""


@dataclass(frozen=True)
class RunConfig:
    """Everything ``jaxstack train`` needs; overridable as ``--model.x``, ``--train.x``, ...."""

    model: LlamaConfig = field(default_factory=lambda: preset("tiny"))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: str = "data=-1"
    """Mesh axis sizes, e.g. ``data=2,tensor=4`` (one axis may be -1: the rest of devices),
    or ``auto``: the fitting (data, fsdp, tensor) shape with the least communication."""

    def to_dict(self) -> dict:
        """A JSON-ready dict (the inverse of ``from_dict``)."""
        return dataclasses.asdict(self)

    @classmethod
    def load(cls, work_dir: str | Path) -> "RunConfig":
        """The config saved in a run's work dir (``run.json``)."""
        saved = Path(work_dir) / RUN_FILE
        if not saved.exists():
            raise FileNotFoundError(
                f"{saved} not found; pass the --work-dir of a jaxstack train/demo run"
            )
        return cls.from_dict(json.loads(saved.read_text()))

    @classmethod
    def from_dict(cls, raw: dict) -> "RunConfig":
        """Rebuild a RunConfig from ``to_dict`` output (as saved in ``run.json``)."""
        model = dict(raw["model"])
        if model.get("rope_scaling"):
            model["rope_scaling"] = Llama3RopeScaling(**model["rope_scaling"])
        return cls(
            model=LlamaConfig(**model),
            data=DataConfig(**raw["data"]),
            train=TrainConfig(**raw["train"]),
            mesh=raw["mesh"],
        )


def _source_files(data: DataConfig) -> list[str]:
    if data.source == "stdlib":
        pattern = str(Path(sysconfig.get_paths()["stdlib"]) / "*.py")
    else:
        pattern = data.source
    return [str(p) for p in resolve_paths(pattern)][: data.max_files]


def build_datasets(data: DataConfig, tokenizer: Tokenizer) -> tuple[Sequence, list]:
    """The packed training set and a held-out evaluation list from its last sequences."""
    if data.source.endswith(".bin"):
        full = PackedDataset.from_memmap(data.source, seq_len=data.seq_len)
    elif data.source.endswith(".jsonl"):
        full = PackedDataset.from_jsonl(data.source, tokenizer, seq_len=data.seq_len)
    else:
        full = PackedDataset.from_text_files(_source_files(data), tokenizer, seq_len=data.seq_len)
    if len(full) <= 2 * data.eval_examples:
        raise ValueError(
            f"data source {data.source!r} gives only {len(full)} sequences of {data.seq_len} "
            f"tokens; need more than {2 * data.eval_examples} (add data or lower seq_len)"
        )
    train_size = len(full) - data.eval_examples
    eval_set = [full[i] for i in range(train_size, len(full))]
    return Prefix(full, train_size), eval_set


def make_trainer(run: RunConfig, tokenizer: Tokenizer) -> Trainer:
    """A Trainer for ``run``'s model, with the LM loss and prediction functions."""
    if tokenizer.vocab_size > run.model.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
            f"{run.model.vocab_size}; pass --model.vocab_size {tokenizer.vocab_size}"
        )
    model = Llama(run.model)
    loss_fn, pred_fn = lm_functions(model)
    return Trainer(
        params=lambda rng: model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"],
        collate_fn=lm_collate,
        loss_fn=loss_fn,
        pred_fn=pred_fn,
        config=run.train,
        mesh=make_mesh(**mesh_axis_sizes(run)),
        param_specs_fn=lm_param_specs(model, run.data.seq_len),
        flops_per_token=run.model.flops_per_token(run.data.seq_len),
    )


def train(run: RunConfig) -> tuple[Trainer, list[dict]]:
    """Train (or resume) the run in ``run.train.work_dir``; saves ``run.json`` beside it."""
    work_dir = Path(run.train.work_dir)
    saved = work_dir / RUN_FILE
    if saved.exists() and RunConfig.load(work_dir).model != run.model:
        raise ValueError(
            f"{work_dir} holds a run with a different model config; use a new --train.work_dir"
        )
    tokenizer = load_tokenizer(run.data.tokenizer)
    train_set, eval_set = build_datasets(run.data, tokenizer)
    trainer = make_trainer(run, tokenizer)
    work_dir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        saved.write_text(json.dumps(run.to_dict(), indent=2))
    records = trainer.fit(train_set, eval_set)
    trainer.close()
    return trainer, records


def load_run(work_dir: str | Path) -> tuple[RunConfig, Llama, dict]:
    """The config, model and latest params of a training run's work dir."""
    run = RunConfig.load(work_dir)
    return run, Llama(run.model), load_params(work_dir)
