"""The three-function pipeline: ``Trainer`` runs ``collate_fn`` / ``loss_fn`` / ``pred_fn``.

The user writes (see docs/pipeline.md):

- ``collate_fn(examples: list) -> dict[str, np.ndarray]``: host-side batching.
- ``loss_fn(params, batch, rng) -> loss`` or ``(loss, metrics)``: the mean loss of one
  (micro-)batch; traced once, jitted and sharded by the stack.
- ``pred_fn(params, batch, rng) -> dict[str, array]``: per-example outputs, used by
  ``Trainer.predict`` and by periodic evaluation (which reports the mean of each output).

The Trainer owns the mesh, shardings, the global batch split across hosts and devices, the
jitted step with buffer donation, gradient accumulation, the optimizer and schedule,
evaluation, metrics, and checkpoints that resume at the exact step, data position and RNG.
"""

import functools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxstack.checkpoint import CheckpointManager
from jaxstack.data import DataLoader, Prefix
from jaxstack.mesh import batch_divisor, batch_sharding, make_mesh
from jaxstack.metrics import MetricsLogger
from jaxstack.optim import adamw, learning_rate_schedule
from jaxstack.perf import peak_flops
from jaxstack.predictor import Predictor
from sharding_rules import MemoryPlan, infer_param_specs, make_plan, optimizer_state_specs

Params = Any
LossFn = Callable[[Params, dict, jax.Array], jax.Array | tuple[jax.Array, dict]]
ParamSpecsFn = Callable[[Params, Mesh], Params]


@dataclass(frozen=True)
class TrainConfig:
    """How to train: batch, steps, optimizer, evaluation, checkpoints, logging."""

    work_dir: str = "runs/default"
    """Checkpoints and metrics.jsonl go here; a run finding a checkpoint here resumes it."""
    batch_size: int = 8
    """Global examples per optimizer update (over all hosts, devices and micro-batches)."""
    grad_accum_steps: int = 1
    """Micro-batches per update; each holds batch_size / grad_accum_steps examples."""
    num_steps: int = 100
    """Optimizer updates in the whole run."""
    learning_rate: float = 3e-4
    """Peak learning rate."""
    warmup_steps: int = 0
    """Linear warmup updates."""
    schedule: str = "cosine"
    """Decay after warmup: cosine, linear or constant."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    b1: float = 0.9
    """AdamW beta1."""
    b2: float = 0.95
    """AdamW beta2."""
    grad_clip: float | None = 1.0
    """Global-norm gradient clipping threshold, or None."""
    eval_every: int = 0
    """Evaluate every this many updates (0: only at the end, when an eval set is given)."""
    eval_batches: int | None = None
    """Cap on evaluation batches (None: the whole eval set)."""
    save_every: int = 100
    """Checkpoint every this many updates (and always at the end)."""
    keep_checkpoints: int = 3
    """How many recent checkpoints to keep."""
    log_every: int = 10
    """Log metrics every this many updates."""
    seed: int = 0
    """Seed of the RNG passed to loss_fn / pred_fn and of data shuffling."""
    shuffle: bool = True
    """Shuffle the training data (deterministically per epoch)."""
    progress_bar: bool = True
    """Show a console progress bar."""

    def __post_init__(self) -> None:
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(
                f"batch_size={self.batch_size} is not divisible by "
                f"grad_accum_steps={self.grad_accum_steps}; pick a multiple"
            )
        for name in ("batch_size", "grad_accum_steps", "num_steps", "log_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


def schedule_for(config: TrainConfig) -> optax.Schedule:
    """The learning-rate schedule of ``config`` (counting optimizer updates)."""
    return learning_rate_schedule(
        config.learning_rate,
        config.num_steps,
        config.warmup_steps,
        config.schedule,
        config.min_lr_ratio,
    )


def optimizer_for(config: TrainConfig) -> optax.GradientTransformation:
    """AdamW with clipping and the schedule of ``config``."""
    return adamw(
        schedule_for(config),
        weight_decay=config.weight_decay,
        b1=config.b1,
        b2=config.b2,
        grad_clip=config.grad_clip,
    )


@flax.struct.dataclass
class TrainState:
    """Everything a step changes: saved whole in every checkpoint."""

    step: jax.Array
    params: Params
    opt_state: optax.OptState
    rng: jax.Array


def replicated_specs(params: Params, mesh: Mesh) -> Params:
    """Placement for pure data parallelism: every parameter replicated."""
    return jax.tree.map(lambda _: PartitionSpec(), params)


class Trainer:
    """Train ``params`` with ``loss_fn`` on batches from ``collate_fn``; see the module doc.

    ``params`` is a pytree or an init function ``rng -> params`` (then parameters are created
    directly in their sharded placement, never whole on one device). ``param_specs_fn`` maps
    abstract params and the mesh to PartitionSpecs; by default ``sharding_rules`` derives them
    from the computation of ``loss_fn`` on the first batch's shapes (tensor pairs, FSDP,
    experts), with ``sharding_overrides`` (``{path_regex: PartitionSpec}``) taking precedence.
    The train state is created on the first batch (or by ``init(example_batch)``).
    """

    def __init__(
        self,
        *,
        params: Params | Callable[[jax.Array], Params],
        collate_fn: Callable[[list], dict[str, np.ndarray]],
        loss_fn: LossFn,
        pred_fn: Callable | None = None,
        config: TrainConfig = TrainConfig(),
        mesh: Mesh | None = None,
        optimizer: optax.GradientTransformation | None = None,
        param_specs_fn: ParamSpecsFn | None = None,
        sharding_overrides: dict[str, PartitionSpec] | None = None,
        flops_per_token: float | None = None,
    ):
        self.config = config
        self.mesh = mesh or make_mesh()
        self.collate_fn, self.loss_fn, self.pred_fn = collate_fn, loss_fn, pred_fn
        self.flops_per_token = flops_per_token
        micro, shards = config.batch_size // config.grad_accum_steps, batch_divisor(self.mesh)
        if micro % shards:
            raise ValueError(
                f"micro-batch of {micro} examples (batch_size={config.batch_size} / "
                f"grad_accum_steps={config.grad_accum_steps}) does not divide over the "
                f"{shards} batch shards of the mesh (data x fsdp); use a batch_size that "
                f"is a multiple of {shards * config.grad_accum_steps}"
            )
        self.schedule = schedule_for(config)
        self.optimizer = optimizer or optimizer_for(config)
        self._init_fn = params if callable(params) else (lambda _: params)
        self._param_specs_fn = param_specs_fn
        self.sharding_overrides = sharding_overrides
        self._state: TrainState | None = None
        self._step_fn = jax.jit(self._train_step, donate_argnums=0)

    @functools.cached_property
    def checkpoints(self) -> CheckpointManager:
        """The run's checkpoint manager (created on first use, in ``work_dir/checkpoints``)."""
        return CheckpointManager(
            Path(self.config.work_dir) / "checkpoints",
            save_every=self.config.save_every,
            keep=self.config.keep_checkpoints,
        )

    # ----------------------------------------------------------------- state
    @property
    def state(self) -> TrainState:
        """The train state (step, params, optimizer state, RNG)."""
        if self._state is None:
            raise RuntimeError(
                "the Trainer has no state yet: call fit(), train_step(batch) or "
                "init(example_batch) first"
            )
        return self._state

    @state.setter
    def state(self, value: TrainState) -> None:
        self._state = value

    def _make_state(self, rng: jax.Array) -> TrainState:
        init_rng, state_rng = jax.random.split(rng)
        params = self._init_fn(init_rng)
        return TrainState(jnp.zeros((), jnp.int32), params, self.optimizer.init(params), state_rng)

    def _abstract_state(self) -> TrainState:
        return jax.eval_shape(self._make_state, jax.random.PRNGKey(self.config.seed))

    def param_specs(self, example_batch: dict[str, np.ndarray]) -> Params:
        """PartitionSpec of every parameter, for batches shaped like ``example_batch``."""
        return self._placement(example_batch)[1]

    def _placement(self, example_batch: dict[str, np.ndarray]):
        """(abstract state, param specs, optimizer-state specs), allocating nothing."""
        abstract = self._abstract_state()
        if self._param_specs_fn is not None:
            specs = self._param_specs_fn(abstract.params, self.mesh)
        else:
            micro = self.config.batch_size // self.config.grad_accum_steps
            micro_batch = {
                name: jax.ShapeDtypeStruct((micro, *np.shape(v)[1:]), np.asarray(v).dtype)
                for name, v in example_batch.items()
            }
            specs = infer_param_specs(
                self.loss_fn,
                abstract.params,
                micro_batch,
                jax.ShapeDtypeStruct((2,), jnp.uint32),
                mesh_axis_sizes=self.mesh,
                overrides=self.sharding_overrides,
            )
        opt_specs = optimizer_state_specs(abstract.opt_state, abstract.params, specs)
        return abstract, specs, opt_specs

    def plan(self, example_batch: dict[str, np.ndarray], activation_bytes: int = 0) -> MemoryPlan:
        """Per-device memory plan (params, grads, optimizer state, activations); allocates
        nothing. ``activation_bytes`` is the caller's per-device activation estimate."""
        abstract, specs, opt_specs = self._placement(example_batch)
        return make_plan(
            abstract.params,
            specs,
            self.mesh,
            opt_state=abstract.opt_state,
            opt_state_specs=opt_specs,
            activation_bytes=activation_bytes,
        )

    def init(self, example_batch: dict[str, np.ndarray]) -> None:
        """Create the train state in its sharded placement (no-op if it exists)."""
        if self._state is not None:
            return
        _, specs, opt_specs = self._placement(example_batch)
        named = lambda tree: jax.tree.map(lambda s: NamedSharding(self.mesh, s), tree)  # noqa: E731
        replicated = NamedSharding(self.mesh, PartitionSpec())
        shardings = TrainState(replicated, named(specs), named(opt_specs), replicated)
        with jax.set_mesh(self.mesh):
            self._state = jax.jit(self._make_state, out_shardings=shardings)(
                jax.random.PRNGKey(self.config.seed)
            )

    # ------------------------------------------------------------------ step
    def _loss_and_metrics(self, params, batch, rng):
        out = self.loss_fn(params, batch, rng)
        loss, metrics = out if isinstance(out, tuple) else (out, {})
        return loss, metrics

    def _train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng, step_rng = jax.random.split(state.rng)
        grad_fn = jax.value_and_grad(self._loss_and_metrics, has_aux=True)
        accum = self.config.grad_accum_steps
        if accum == 1:
            (loss, metrics), grads = grad_fn(state.params, batch, step_rng)
        else:
            micro_batches = jax.tree.map(lambda x: _split_micro_batches(x, accum), batch)

            def micro_step(grad_sum, inputs):
                micro_batch, index = inputs
                (loss, metrics), grads = grad_fn(
                    state.params, micro_batch, jax.random.fold_in(step_rng, index)
                )
                return jax.tree.map(jnp.add, grad_sum, grads), (loss, metrics)

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            grad_sum, (losses, metrics) = jax.lax.scan(
                micro_step, zeros, (micro_batches, jnp.arange(accum))
            )
            grads = jax.tree.map(lambda g: g / accum, grad_sum)
            loss, metrics = losses.mean(), jax.tree.map(jnp.mean, metrics)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            **metrics,
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "lr": self.schedule(state.step),
        }
        return TrainState(state.step + 1, params, opt_state, rng), metrics

    def train_step(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """One optimizer update on a host-local batch; returns the step's metrics."""
        self.init(batch)
        with jax.set_mesh(self.mesh):
            self.state, metrics = self._step_fn(self.state, self.to_global(batch))
        return metrics

    def to_global(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Assemble each host's share of the batch into global arrays split over (data, fsdp)."""
        return {
            name: jax.make_array_from_process_local_data(
                batch_sharding(self.mesh, np.ndim(value)), np.asarray(value)
            )
            for name, value in batch.items()
        }

    # ------------------------------------------------------------------- fit
    def loader(self, dataset: Sequence, *, shuffle: bool, batch_size: int | None = None):
        """A deterministic, checkpointable loader giving this host its share of each batch."""
        return DataLoader(
            dataset,
            batch_size=batch_size or self.config.batch_size,
            collate_fn=self.collate_fn,
            shuffle=shuffle,
            seed=self.config.seed,
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
        )

    def fit(
        self,
        train_dataset: Sequence,
        eval_dataset: Sequence | None = None,
        *,
        stop_after: int | None = None,
    ) -> list[dict]:
        """Train to ``config.num_steps`` updates, resuming from the work dir's latest checkpoint.

        ``stop_after`` ends the run early at that step (as a preemption would), after saving.
        Returns the logged metric records of this call.
        """
        cfg = self.config
        loader = self.loader(train_dataset, shuffle=cfg.shuffle)
        self.init(self.collate_fn([train_dataset[i] for i in range(loader.local_batch_size)]))
        self.restore_latest(loader)
        last = min(cfg.num_steps, stop_after or cfg.num_steps)
        logger = MetricsLogger(cfg.work_dir, cfg.num_steps, self.step, show=cfg.progress_bar)
        records, batches = [], _forever(loader)
        peak = peak_flops(self.mesh.devices.flatten().tolist()) if self.flops_per_token else None
        window_start, window_tokens = time.perf_counter(), 0
        step = self.step  # counted on the host from here: reading the device step would block
        try:
            while step < last:
                batch = next(batches)
                metrics = self.train_step(batch)
                step += 1
                window_tokens += _global_tokens(batch)
                self.checkpoints.save(step, self.state, loader.get_state())
                eval_due = cfg.eval_every and step % cfg.eval_every == 0
                if eval_dataset is not None and (eval_due or step == cfg.num_steps):
                    metrics = {**metrics, **self.evaluate(eval_dataset)}
                if step % cfg.log_every == 0 or step == last or eval_due:
                    elapsed = time.perf_counter() - window_start
                    record = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    record["tokens_per_sec"] = window_tokens / elapsed
                    if peak:
                        record["mfu"] = record["tokens_per_sec"] * self.flops_per_token / peak
                    logger.log(step, record)
                    records.append({"step": step, **record})
                    window_start, window_tokens = time.perf_counter(), 0
                else:
                    logger.advance(step)
            if self.checkpoints.latest_step() != step:
                self.checkpoints.save(step, self.state, loader.get_state(), force=True)
            self.checkpoints.wait()
        finally:
            logger.close()
        return records

    @property
    def step(self) -> int:
        """Optimizer updates done so far."""
        return int(self.state.step)

    @property
    def params(self) -> Params:
        """The current (sharded) parameters."""
        return self.state.params

    def restore_latest(self, loader: DataLoader | None = None) -> bool:
        """Resume state (and the loader's position) from the newest checkpoint, if any."""
        if self.checkpoints.latest_step() is None:
            return False
        self.state, data_state = self.checkpoints.restore(self.state)
        if loader is not None:
            loader.set_state(data_state)
        return True

    # ------------------------------------------------------------- inference
    @functools.cached_property
    def predictor(self) -> Predictor:
        """The Predictor running ``pred_fn`` on this trainer's mesh (compiled once)."""
        if self.pred_fn is None:
            raise ValueError("this Trainer has no pred_fn; pass pred_fn=... to predict/evaluate")
        return Predictor(
            collate_fn=self.collate_fn, pred_fn=self.pred_fn, mesh=self.mesh, seed=self.config.seed
        )

    def predict(self, dataset: Sequence, batch_size: int | None = None) -> dict[str, np.ndarray]:
        """``pred_fn`` outputs for every example of ``dataset``, in order."""
        return self.predictor.predict(
            self.params, dataset, batch_size=batch_size or self.config.batch_size
        )

    def evaluate(self, dataset: Sequence) -> dict[str, float]:
        """Mean of each numeric ``pred_fn`` output over ``dataset``, as ``eval_<name>``."""
        batch_size = self.config.batch_size // self.config.grad_accum_steps
        limit = None
        if self.config.eval_batches is not None:
            limit = min(len(dataset), self.config.eval_batches * batch_size)
        subset = dataset if limit is None else Prefix(dataset, limit)
        outputs = self.predictor.predict(self.params, subset, batch_size=batch_size)
        return {
            f"eval_{name}": float(np.mean(value))
            for name, value in outputs.items()
            if np.issubdtype(np.asarray(value).dtype, np.number) or np.asarray(value).dtype == bool
        }

    def close(self) -> None:
        """Wait for pending checkpoint saves and release resources."""
        if "checkpoints" in self.__dict__:
            self.checkpoints.close()


def _split_micro_batches(x: jax.Array, accum: int) -> jax.Array:
    """[accum * micro, ...] -> [accum, micro, ...], taking every accum-th example per micro-batch
    so that each micro-batch stays spread over all batch shards."""
    micro = x.shape[0] // accum
    return jnp.swapaxes(x.reshape(micro, accum, *x.shape[1:]), 0, 1)


def _forever(loader: DataLoader) -> Iterator[dict]:
    while True:
        yield from loader


def _global_tokens(batch: dict[str, np.ndarray]) -> int:
    """Tokens in the global batch: input_ids elements if present, else examples."""
    key = "input_ids" if "input_ids" in batch else next(iter(batch))
    local = np.asarray(batch[key])
    count = local.size if key == "input_ids" else local.shape[0]
    return count * jax.process_count()
