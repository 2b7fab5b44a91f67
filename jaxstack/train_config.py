"""``TrainConfig``: how to train, every field checked where it enters."""

import dataclasses
import math
import re
from dataclasses import dataclass

from jaxstack.overrides import check_types

SCHEDULES = ("cosine", "linear", "constant")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
NONFINITE_POLICIES = ("skip", "stop")
DEFAULT_BATCH_SIZE = 8
DEFAULT_NUM_STEPS = 100


@dataclass(frozen=True)
class TrainConfig:
    """How to train: batch, steps, optimizer, precision, evaluation, checkpoints, logging.

    Every field is validated on construction (types included, so a JSON ``"num_steps":
    "ten"`` fails naming the key); a bad value raises ``ValueError`` / ``TypeError`` saying
    which field and what would be valid.
    """

    work_dir: str = "runs/default"
    """Checkpoints, metrics.jsonl and the run lock go here; a run finding a checkpoint here
    resumes it. One trainer at a time may use a work dir."""
    batch_size: int | None = None
    """Global examples per optimizer update (over all hosts, devices and micro-batches).
    None: ``per_device_batch_size`` decides it, or 8 when that is None too."""
    per_device_batch_size: int | None = None
    """Examples per batch shard (device of the ``data`` x ``fsdp`` axes) per micro-batch; the
    global batch is this x batch shards x ``grad_accum_steps``. Give it or ``batch_size``."""
    grad_accum_steps: int = 1
    """Micro-batches per update; each holds batch_size / grad_accum_steps examples."""
    num_steps: int | None = None
    """Optimizer updates in the whole run. None: ``num_epochs`` decides it, or 100 when that
    is None too."""
    num_epochs: int | None = None
    """Train for this many passes over the training set (``fit`` counts the updates: epochs x
    full batches per epoch). Give it or ``num_steps``."""
    learning_rate: float = 3e-4
    """Peak learning rate (finite, >= 0)."""
    warmup_steps: int = 0
    """Linear warmup updates."""
    schedule: str = "cosine"
    """Decay after warmup: cosine, linear or constant."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay; applied only to weight matrices (parameters some matmul
    reads), never to norm scales or biases, and to embedding tables only with
    ``decay_embeddings``."""
    decay_embeddings: bool = False
    """Apply weight decay to embedding tables too."""
    no_decay: str = ""
    """Regex of parameter paths (``"params/layers_0/mlp/up/kernel"`` style) kept out of
    weight decay besides norms, biases and embeddings; empty: none."""
    b1: float = 0.9
    """AdamW beta1."""
    b2: float = 0.95
    """AdamW beta2."""
    grad_clip: float | None = 1.0
    """Global-norm gradient clipping before the optimizer (any optimizer), or None."""
    compute_dtype: str | None = None
    """Mixed precision: floating parameters are cast to this dtype (``bfloat16``, ``float16``)
    before ``loss_fn`` / ``pred_fn`` see them, while the parameters, gradients and optimizer
    state stay in their own (float32) dtype. None: compute in the parameters' dtype."""
    optimizer_offload: bool = False
    """Keep the optimizer state (Adam's moments) in host memory (``pinned_host``) and bring it
    to the device only for the update, inside the step: saves its bytes of device memory
    for a host transfer each way per step (docs/pipeline_parallel.md)."""
    nonfinite: str = "skip"
    """A non-finite loss or gradient norm: ``skip`` the update (the state stays as it was;
    the run stops after ``max_nonfinite_skips`` in a row) or ``stop`` the run at once. Either
    way a non-finite state is never saved."""
    max_nonfinite_skips: int = 10
    """Consecutive skipped updates after which the run stops."""
    eval_every: int = 0
    """Evaluate every this many updates (0: only at the end, when an eval set is given)."""
    eval_batches: int | None = None
    """Cap on evaluation batches (None: the whole eval set)."""
    save_every: int = 100
    """Checkpoint every this many updates (and always at the end, and on SIGTERM)."""
    keep_checkpoints: int = 3
    """How many recent checkpoints to keep (>= 1)."""
    log_every: int = 10
    """Log metrics every this many updates."""
    seed: int = 0
    """Seed of the RNG passed to loss_fn / pred_fn and of data shuffling."""
    shuffle: bool = True
    """Shuffle the training data (deterministically per epoch)."""
    progress_bar: bool = True
    """Show a live progress bar where the console redraws (a terminal, a notebook). False, or
    stdout to a file or a pipe (a job log): one plain line per logged step instead
    (``jaxstack.metrics``), flushed at once, from process 0."""
    export_hf: str | None = None
    """``jaxstack train`` (``jaxstack.run.train``) writes the final parameters here as a
    Hugging Face directory that ``transformers`` loads: config.json, safetensors in the
    model's dtype, and the tokenizer files (chat template included) of the run's tokenizer
    directory. The ``Trainer`` itself does not read it."""
    preemption_grace_s: float = 300.0
    """After SIGTERM / SIGINT the run finishes its step, saves and exits; if that takes longer
    than this many seconds it exits without the save."""

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("grad_accum_steps", "log_every", "save_every", "keep_checkpoints",
                     "max_nonfinite_skips"):  # fmt: skip
            _at_least(name, getattr(self, name), 1)
        for name in ("batch_size", "per_device_batch_size", "num_steps", "num_epochs",
                     "eval_batches"):  # fmt: skip
            if getattr(self, name) is not None:
                _at_least(name, getattr(self, name), 1)
        for name in ("warmup_steps", "eval_every"):
            _at_least(name, getattr(self, name), 0)
        _both("batch_size", "per_device_batch_size", self)
        _both("num_steps", "num_epochs", self)
        if self.batch_size is not None and self.batch_size % self.grad_accum_steps:
            raise ValueError(
                f"batch_size={self.batch_size} is not divisible by "
                f"grad_accum_steps={self.grad_accum_steps}; pick a multiple"
            )
        if self.num_steps is not None and self.warmup_steps > self.num_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} exceeds num_steps={self.num_steps}")
        for name in ("learning_rate", "weight_decay"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}={value} must be a finite number >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")
        clip = self.grad_clip
        if clip is not None and not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"grad_clip={self.grad_clip} must be a finite number > 0, or None")
        if not (math.isfinite(self.preemption_grace_s) and self.preemption_grace_s > 0):
            raise ValueError(f"preemption_grace_s={self.preemption_grace_s} must be > 0")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed={self.seed} must be in [0, 2**32)")
        _one_of("schedule", self.schedule, SCHEDULES)
        _one_of("nonfinite", self.nonfinite, NONFINITE_POLICIES)
        if self.compute_dtype is not None:
            _one_of("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        try:
            re.compile(self.no_decay)
        except re.error as err:
            raise ValueError(f"no_decay={self.no_decay!r} is not a valid regex: {err}") from None

    def replace(self, **changes) -> "TrainConfig":
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)


def global_batch_size(config: TrainConfig, batch_shards: int) -> int:
    """Examples per optimizer update of ``config`` on a mesh with ``batch_shards`` batch
    shards (data x fsdp x expert)."""
    if config.batch_size is not None:
        return config.batch_size
    if config.per_device_batch_size is not None:
        return config.per_device_batch_size * batch_shards * config.grad_accum_steps
    return DEFAULT_BATCH_SIZE


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ValueError(f"{name}={value} must be >= {low}")


def _both(first: str, second: str, config: TrainConfig) -> None:
    if getattr(config, first) is not None and getattr(config, second) is not None:
        raise ValueError(
            f"give {first} or {second}, not both ({first}={getattr(config, first)}, "
            f"{second}={getattr(config, second)})"
        )


def _one_of(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{name}={value!r}; choose one of {', '.join(options)}")
