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

from jaxstack import hf
from jaxstack.checkpoint import load_params
from jaxstack.data import PackedDataset, Prefix, lm_collate, load_tokenizer
from jaxstack.data.chat import FORMATS, ChatTemplate, WeightedPackedDataset, detect_format
from jaxstack.data.text import resolve_paths
from jaxstack.data.tokenizers import Tokenizer
from jaxstack.hf.saving import HF_SUBDIR
from jaxstack.layers.rope import Llama3RopeScaling
from jaxstack.lm import lm_functions, lm_param_specs
from jaxstack.lora import LoRAConfig, merge, save_peft
from jaxstack.mesh import make_mesh, parse_mesh
from jaxstack.metrics import long_step
from jaxstack.models import FAMILIES, Llama, LlamaConfig, family_of, model_for, preset
from jaxstack.overrides import check_types
from jaxstack.planning import mesh_axis_sizes
from jaxstack.trainer import TrainConfig, Trainer
from jaxstack.workdir import work_path

RUN_FILE = "run.json"
PEFT_DIR = "peft_adapter"
"""Where a LoRA run writes its adapters in PEFT format when training ends."""
CONVERTED_DIR = "converted-checkpoints"
"""Where training moves the params-only checkpoint of a converted work dir."""


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it is cut into training sequences."""

    source: str = "stdlib"
    """``stdlib`` (this Python's own source files), a glob of text files, a ``.jsonl`` file or
    glob (see ``format``), or a token memmap ``.bin`` written by ``write_token_memmap``."""
    format: str = "auto"
    """What a ``.jsonl`` source holds (``jaxstack.data.chat``): ``text`` (field ``text``),
    ``prompt_response`` (loss on the response), ``chat`` (``messages`` rendered with the
    tokenizer directory's chat template, loss on assistant turns), or ``auto``: decided by
    the first record's fields."""
    tokenizer: str = "byte"
    """``byte`` or a path to a Hugging Face ``tokenizer.json`` (or its directory)."""
    seq_len: int = 128
    """Tokens per training sequence."""
    max_files: int = 400
    """Cap on the number of text files read (stdlib / globs), in sorted order."""
    eval_examples: int = 64
    """Sequences held out from the end of the data for evaluation."""
    eos_id: int | None = None
    """The end-of-document token id that separates packed documents. None: ``eos_token``'s,
    else the tokenizer's EOS, else ``eos_token_id`` of the tokenizer directory's
    ``generation_config.json`` or ``config.json``."""
    eos_token: str | None = None
    """The end-of-document token as text (e.g. ``</s>``, ``<|end_of_text|>``), looked up in
    the tokenizer; used when ``eos_id`` is None."""

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("seq_len", "max_files", "eval_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name}={getattr(self, name)} must be >= 1")
        if self.format not in FORMATS:
            raise ValueError(f"data.format={self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.eos_id is not None and self.eos_id < 0:
            raise ValueError(f"data.eos_id={self.eos_id} must be >= 0")


@dataclass(frozen=True)
class InitConfig:
    """Where a new run's parameters come from; a run resuming its checkpoint ignores it."""

    hf: str | None = None
    """A local Hugging Face model directory to fine-tune: ``RunConfig.from_hf`` takes the
    model config from its ``config.json`` and the tokenizer from it, ``train`` streams its
    weights into the run's sharded placement, with a fresh optimizer state."""


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
    init: InitConfig = field(default_factory=InitConfig)
    lora: LoRAConfig = field(default_factory=lambda: LoRAConfig(rank=0))
    """Low-rank adapters instead of full fine-tuning (``--lora.rank 16``; docs/lora.md); rank 0
    (the default) trains every parameter."""

    def __post_init__(self) -> None:
        check_types(self)
        if not self.lora.enabled and self.lora != LoRAConfig(rank=0):
            raise ValueError(
                "lora.alpha / lora.dropout / lora.targets are set but lora.rank is 0 (LoRA "
                "off); pass --lora.rank N to train adapters"
            )
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_seq_len="
                f"{self.model.max_seq_len} (the longest sequence the model is configured "
                "for); lower --data.seq_len or raise --model.max_seq_len"
            )
        if self.mesh.strip() != "auto" and parse_mesh(self.mesh).get("stage", 1) != 1:
            # pipeline stages run a stack of layers (jaxstack.layers.pipeline)
            object.__setattr__(self, "model", self.model.replace(scan_layers=True))

    def to_dict(self) -> dict:
        """A JSON-ready dict (the inverse of ``from_dict``); ``model.family`` names the model
        family (``jaxstack.models.FAMILIES``)."""
        raw = dataclasses.asdict(self)
        raw["model"] = {"family": family_of(self.model), **raw["model"]}
        return raw

    @classmethod
    def from_hf(cls, hf_dir: str | Path, weights: bool = True) -> "RunConfig":
        """The default run with the model of a Hugging Face directory (its ``config.json``)
        and its tokenizer; ``weights``: with ``init.hf`` set to it (``jaxstack train --init.hf
        DIR``), else the config alone (the ``hf/`` folder of a converted work dir).

        Raises:
            FileNotFoundError / ValueError: no or an unsupported config.json.
        """
        hf_dir = str(hf_dir)
        model = hf.config_from_hf(hf.read_hf_config(hf_dir))
        init = InitConfig(hf=hf_dir if weights else None)
        return cls(model=model, data=DataConfig(tokenizer=hf_dir), init=init)

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
        sections = {"model": family.config, "data": DataConfig, "train": TrainConfig,
                    "init": InitConfig, "lora": LoRAConfig}  # fmt: skip
        unknown = sorted(set(raw) - {*sections, "mesh"})
        if unknown:
            raise KeyError(
                f"unknown config sections {unknown}; valid: model, data, train, init, lora, mesh"
            )
        built = {}
        for name, kind in sections.items():
            values = model if name == "model" else dict(raw.get(name, {}))
            if name == "lora":  # run.json files before LoRA: none
                values = {"rank": 0, **values}
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


def eos_id_for(data: DataConfig, tokenizer: Tokenizer) -> int:
    """The end-of-document id of a run: ``data.eos_id``, ``data.eos_token``'s id, the
    tokenizer's EOS, or ``eos_token_id`` of ``generation_config.json`` / ``config.json``
    beside the tokenizer (the first of a list), in that order.

    Raises:
        ValueError: none of these gives one, or ``eos_token`` is not in the vocabulary; the
            message names the ``--data.eos_token`` / ``--data.eos_id`` flags.
    """
    if data.eos_id is not None:
        return data.eos_id
    if data.eos_token is not None:
        token_id = getattr(tokenizer, "token_id", lambda _: None)(data.eos_token)
        if token_id is None:
            raise ValueError(
                f"--data.eos_token {data.eos_token!r} is not a token of {data.tokenizer}; "
                "give a token it has, or --data.eos_id N"
            )
        return token_id
    if tokenizer.eos_id is not None:
        return tokenizer.eos_id
    folder = _folder(data.tokenizer)
    named = hf.read_eos_ids(folder) if folder else []
    if named:
        return named[0]
    raise ValueError(
        f"the tokenizer {data.tokenizer} has no end-of-document (EOS) token, and no "
        "generation_config.json or config.json beside it names one; pass --data.eos_token "
        "TEXT (e.g. '</s>') or --data.eos_id N"
    )


def _folder(tokenizer: str) -> Path | None:
    """The directory of a tokenizer spec (a directory, or a tokenizer.json's); None for
    ``byte``."""
    if tokenizer == "byte":
        return None
    path = Path(tokenizer)
    return path if path.is_dir() else path.parent


def build_datasets(data: DataConfig, tokenizer: Tokenizer) -> tuple[Sequence, list]:
    """The packed training set and a held-out evaluation list from its last sequences."""
    if data.source.endswith(".bin"):
        full = PackedDataset.from_memmap(data.source, seq_len=data.seq_len)
    else:
        eos = dict(seq_len=data.seq_len, eos_id=eos_id_for(data, tokenizer))
        kind = data.format
        if kind == "auto":
            kind = detect_format(data.source) if data.source.endswith(".jsonl") else "text"
        if kind != "text":
            folder = _folder(data.tokenizer)
            template = ChatTemplate.of(folder) if folder else ChatTemplate()
            full = WeightedPackedDataset.from_jsonl(
                data.source, kind, tokenizer, template=template, **eos
            )
        elif data.source.endswith(".jsonl"):
            full = PackedDataset.from_jsonl(data.source, tokenizer, **eos)
        else:
            full = PackedDataset.from_text_files(_source_files(data), tokenizer, **eos)
    if len(full) <= 2 * data.eval_examples:
        raise ValueError(
            f"data source {data.source!r} gives only {len(full)} sequences of {data.seq_len} "
            f"tokens; need more than {2 * data.eval_examples} (add data or lower seq_len)"
        )
    train_size = len(full) - data.eval_examples
    eval_set = [full[i] for i in range(train_size, len(full))]
    return Prefix(full, train_size), eval_set


def has_checkpoint(work_dir: str | Path) -> bool:
    """Whether ``work_dir/checkpoints`` holds a saved step (looked up without Orbax)."""
    steps = work_path(work_dir) / "checkpoints"
    return steps.is_dir() and any(p.name.isdigit() for p in steps.iterdir())


def is_converted(work_dir: str | Path) -> bool:
    """Whether ``work_dir`` holds a model written by ``jaxstack convert --to jaxstack`` (a
    params-only checkpoint and ``hf/config.json``) and no training run yet."""
    directory = work_path(work_dir)
    return (
        not (directory / RUN_FILE).exists()
        and (directory / HF_SUBDIR / "config.json").exists()
        and has_checkpoint(directory)
    )


def make_trainer(run: RunConfig, tokenizer: Tokenizer, converted: bool = False) -> Trainer:
    """A Trainer for ``run``'s model, with the LM loss and prediction functions. A new run
    starts from the weights of ``init.hf``, or with ``converted`` from the params-only
    checkpoint of its converted work dir (``is_converted``), either streamed into their
    sharded placement; the optimizer state starts fresh."""
    if tokenizer.vocab_size > run.model.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
            f"{run.model.vocab_size}; pass --model.vocab_size {tokenizer.vocab_size}"
        )
    model = model_for(run.model)
    loss_fn, pred_fn = lm_functions(model)
    init = lambda rng: model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"]  # noqa: E731
    mesh = make_mesh(**mesh_axis_sizes(run))
    specs = lm_param_specs(model, run.data.seq_len)
    params = init
    lora = run.lora if run.lora.enabled else None
    if lora and (converted or (work_path(run.train.work_dir) / CONVERTED_DIR).exists()):
        raise ValueError(
            f"{run.train.work_dir} holds a converted model, but LoRA reloads its frozen base "
            "on every start from --init.hf: pass --init.hf DIR (the Hugging Face directory) "
            "and a new --train.work_dir"
        )
    if converted:
        abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
        with long_step(f"loading the converted weights of {run.train.work_dir}"):
            params = load_params(run.train.work_dir, mesh=mesh, param_specs=specs(abstract, mesh))
    elif run.init.hf and (lora or not has_checkpoint(run.train.work_dir)):  # LoRA: the base
        with long_step(f"loading weights from {run.init.hf}"):
            params = hf.read_params(run.init.hf, run.model, mesh=mesh, param_specs=specs)
    return Trainer(
        params=params,
        collate_fn=lm_collate,
        loss_fn=loss_fn,
        pred_fn=pred_fn,
        config=run.train,
        mesh=mesh,
        router_bias_rate=None if lora else getattr(run.model, "router_bias_rate", 0.0) or None,
        param_specs_fn=specs,
        flops_per_token=run.model.flops_per_token(run.data.seq_len),
        lora=lora,
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
    model = run.differences(saved, "model") + run.differences(saved, "lora")
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
    converted = is_converted(work_dir)
    tokenizer = load_tokenizer(run.data.tokenizer)
    train_set, eval_set = build_datasets(run.data, tokenizer)
    trainer = make_trainer(run, tokenizer, converted=converted)
    work_dir.mkdir(parents=True, exist_ok=True)
    if converted and jax.process_index() == 0:  # the run's own checkpoints go in its place
        (work_dir / "checkpoints").rename(work_dir / CONVERTED_DIR)
        print(
            f"jaxstack: {work_dir} holds parameters converted from Hugging Face, without an "
            f"optimizer state: training starts from them with a fresh one (the converted "
            f"checkpoint is kept in {CONVERTED_DIR}/)",
            flush=True,
        )
    if jax.process_index() == 0:
        saved.write_text(json.dumps(run.to_dict(), indent=2))
    try:
        records = trainer.fit(train_set, eval_set, restore_data_position=not new_data)
        if run.lora.enabled and not trainer.preempted:
            export_peft(run, trainer, work_dir / PEFT_DIR)
        if run.train.export_hf and not trainer.preempted:
            export_hf(run, trainer.model_params, run.train.export_hf)
    finally:
        trainer.close()
    return trainer, records


def export_hf(run: RunConfig, params, out_dir: str | Path, dtype: str | None = None) -> Path:
    """Write ``params`` of ``run``'s model to ``out_dir`` as a Hugging Face directory, in
    ``dtype`` (default: the dtype of the ``init.hf`` model, ``torch_dtype`` of its config.json;
    else the params'), with the tokenizer files of the run's tokenizer directory; returns
    ``out_dir``."""
    tokenizer_dir = _folder(run.data.tokenizer)
    if dtype is None and run.init.hf:
        source = hf.read_hf_config(run.init.hf)
        dtype = source.get("torch_dtype") or source.get("dtype")
    with long_step(f"exporting the model to {out_dir}"):
        return hf.save(out_dir, run.model, params, tokenizer_dir=tokenizer_dir, dtype=dtype)


def export_peft(run: RunConfig, trainer: Trainer, out_dir: Path) -> Path:
    """Write a LoRA run's adapters as a Hugging Face PEFT adapter directory (process 0)."""
    replicated = jax.sharding.NamedSharding(trainer.mesh, jax.sharding.PartitionSpec())
    adapters = jax.jit(lambda x: x, out_shardings=replicated)(trainer.params)  # every host
    if jax.process_index() == 0:
        save_peft(out_dir, run.model, adapters, run.lora, base_model=run.init.hf)
        print(f"jaxstack: PEFT adapter written to {out_dir}", flush=True)
    return out_dir


def load_run(work_dir: str | Path) -> tuple[RunConfig, Llama, dict]:
    """The config, model and latest params of a training run's work dir (for a LoRA run:
    its base, from ``init.hf`` or the seeded initialisation, merged with its adapters)."""
    run = RunConfig.load(work_dir)
    model, params = model_for(run.model), load_params(work_dir)
    if not run.lora.enabled:
        return run, model, params
    if run.init.hf:
        base = hf.read_params(run.init.hf, run.model)
    else:  # the Trainer's own initialisation of the base (Trainer.init)
        rng = jax.random.split(jax.random.PRNGKey(run.train.seed))[0]
        base = model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"]
    return run, model, merge(base, params, run.lora.scale)
