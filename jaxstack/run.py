"""A whole language-model run from one typed config: data, model, training, generation.

This is what ``jaxstack demo``, ``jaxstack train`` and ``jaxstack generate`` call; it is built
only on the public pieces (``Trainer``, ``lm_functions``, ``generate``), like a recipe.
"""

import dataclasses
import datetime
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
from jaxstack.mesh import make_mesh, parse_mesh
from jaxstack.models import FAMILIES, Llama, LlamaConfig, family_of, model_for, preset
from jaxstack.overrides import check_types
from jaxstack.planning import mesh_axis_sizes
from jaxstack.trainer import TrainConfig, Trainer
from jaxstack.workdir import work_path

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

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("seq_len", "max_files", "eval_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name}={getattr(self, name)} must be >= 1")


@dataclass(frozen=True)
class RunConfig:
    """Everything ``jaxstack train`` needs; overridable as ``--model.x``, ``--train.x``, ...."""

    model: LlamaConfig = field(default_factory=lambda: preset("tiny"))
    """The model's config, of any registered family (``jaxstack.models.FAMILIES``: a
    ``MixtralConfig`` is a mixture of experts)."""
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: str = "data=-1"
    """Mesh axis sizes, e.g. ``data=2,tensor=4`` (one axis may be -1: the rest of devices),
    or ``auto``: the fitting (data, fsdp, tensor) shape with the least communication."""

    def __post_init__(self) -> None:
        check_types(self)
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len="
                f"{self.model.max_seq_len} (the longest sequence the model is configured "
                "for); lower --data.seq_len or raise --model.max_seq_len"
            )
        if self.mesh.strip() != "auto":
            parse_mesh(self.mesh)

    def to_dict(self) -> dict:
        """A JSON-ready dict (the inverse of ``from_dict``); ``model.family`` names the model
        family (``jaxstack.models.FAMILIES``)."""
        raw = dataclasses.asdict(self)
        raw["model"] = {"family": family_of(self.model), **raw["model"]}
        return raw

    def with_family_of(self, raw: dict) -> "RunConfig":
        """This config, or with the default model of the family ``raw["model"]["family"]``
        names when that is another family: the base a partial config dict of that family is
        merged onto.

        Raises:
            KeyError: an unknown family.
        """
        family = (raw.get("model") or {}).get("family")
        if family is None or family == family_of(self.model):
            return self
        return dataclasses.replace(self, model=preset(_family(family).default))

    @classmethod
    def load(cls, work_dir: str | Path) -> "RunConfig":
        """The config saved in a run's work dir (``run.json``)."""
        saved = work_path(work_dir) / RUN_FILE
        if not saved.exists():
            raise FileNotFoundError(
                f"{saved} not found; pass the --work-dir of a jaxstack train/demo run"
            )
        return cls.from_dict(json.loads(saved.read_text()))

    @classmethod
    def from_dict(cls, raw: dict) -> "RunConfig":
        """Rebuild a RunConfig from ``to_dict`` output (as saved in ``run.json``).

        Raises:
            KeyError: an unknown section or key, named with its section.
            TypeError / ValueError: a value of the wrong type or range, naming its key.
        """
        model = dict(raw.get("model", {}))
        family = _family(model.pop("family", "llama"))  # run.json files before families: llama
        sections = {"model": family.config, "data": DataConfig, "train": TrainConfig}
        unknown = sorted(set(raw) - {*sections, "mesh"})
        if unknown:
            raise KeyError(f"unknown config sections {unknown}; valid: model, data, train, mesh")
        built = {}
        for name, kind in sections.items():
            values = model if name == "model" else dict(raw.get(name, {}))
            valid = {f.name for f in dataclasses.fields(kind) if f.init}
            wrong = sorted(set(values) - valid)
            if wrong:
                raise KeyError(
                    f"unknown config key {name}.{wrong[0]}; valid keys of {name}: "
                    + ", ".join(sorted(valid))
                )
            if name == "model" and values.get("rope_scaling"):
                values["rope_scaling"] = Llama3RopeScaling(**values["rope_scaling"])
            try:
                built[name] = kind(**values)
            except (TypeError, ValueError) as error:
                raise type(error)(f"{name}: {error}") from None
        return cls(**built, mesh=raw.get("mesh", "data=-1"))

    def differences(self, other: "RunConfig", section: str) -> list[str]:
        """The keys of ``section`` (model / data / train) whose values differ from ``other``'s."""
        mine, theirs = getattr(self, section), getattr(other, section)
        if type(mine) is not type(theirs):
            return [f"{section}.family"]
        return [
            f"{section}.{f.name}"
            for f in dataclasses.fields(mine)
            if f.compare and getattr(mine, f.name) != getattr(theirs, f.name)
        ]


def _family(name: str):
    if name not in FAMILIES:
        raise KeyError(f"unknown model family {name!r}; valid: {', '.join(FAMILIES)}")
    return FAMILIES[name]


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
    model = model_for(run.model)
    loss_fn, pred_fn = lm_functions(model)
    init = lambda rng: model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"]  # noqa: E731
    return Trainer(
        params=init,
        collate_fn=lm_collate,
        loss_fn=loss_fn,
        pred_fn=pred_fn,
        config=run.train,
        mesh=make_mesh(**mesh_axis_sizes(run)),
        router_bias_rate=getattr(run.model, "router_bias_rate", 0.0) or None,
        param_specs_fn=lm_param_specs(model, run.data.seq_len),
        flops_per_token=run.model.flops_per_token(run.data.seq_len),
    )


RESUME_CHOICES = ("auto", "force", "overwrite")


def _check_work_dir(run: RunConfig, resume: str) -> None:
    """Refuse to resume a work dir whose saved run differs, unless asked (``train``'s doc)."""
    work_dir = work_path(run.train.work_dir)
    if resume not in RESUME_CHOICES:
        raise ValueError(f"resume={resume!r}; choose one of {', '.join(RESUME_CHOICES)}")
    if not (work_dir / RUN_FILE).exists():
        return
    if resume == "overwrite":
        if jax.process_index() == 0:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            aside = work_dir / f"replaced-{stamp}"
            aside.mkdir()
            for name in (RUN_FILE, "checkpoints", "metrics.jsonl", "checkpoints.damaged"):
                if (work_dir / name).exists():
                    (work_dir / name).rename(aside / name)
            print(f"jaxstack: the previous run in {work_dir} was moved to {aside}")
        return
    saved = RunConfig.load(work_dir)
    model = run.differences(saved, "model")
    if model:
        raise ValueError(
            f"{work_dir} holds a run of another model (differs in {', '.join(model)}); "
            "use a new --train.work_dir, or --overwrite to start afresh there"
        )
    data = run.differences(saved, "data")
    if data and resume != "force":
        raise ValueError(
            f"{work_dir} holds a run on other data (differs in {', '.join(data)}); "
            "--resume continues its checkpoint on the new data, --overwrite starts afresh, "
            "or use a new --train.work_dir"
        )


def train(run: RunConfig, resume: str = "auto") -> tuple[Trainer, list[dict]]:
    """Train (or resume) the run in ``run.train.work_dir``; saves ``run.json`` beside it.

    ``resume``: ``auto`` resumes a checkpoint of the same model and data config (training
    settings such as num_steps may change) and refuses any other; ``force`` also resumes
    one on other data (the new data starts from its beginning); ``overwrite`` moves the
    previous run aside into ``<work_dir>/replaced-<time>/`` and starts afresh.
    """
    work_dir = work_path(run.train.work_dir)
    saved = work_dir / RUN_FILE
    _check_work_dir(run, resume)
    new_data = saved.exists() and bool(run.differences(RunConfig.load(work_dir), "data"))
    tokenizer = load_tokenizer(run.data.tokenizer)
    train_set, eval_set = build_datasets(run.data, tokenizer)
    trainer = make_trainer(run, tokenizer)
    work_dir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        saved.write_text(json.dumps(run.to_dict(), indent=2))
    try:
        records = trainer.fit(train_set, eval_set, restore_data_position=not new_data)
    finally:
        trainer.close()
    return trainer, records


def load_run(work_dir: str | Path) -> tuple[RunConfig, Llama, dict]:
    """The config, model and latest params of a training run's work dir."""
    run = RunConfig.load(work_dir)
    return run, model_for(run.model), load_params(work_dir)
