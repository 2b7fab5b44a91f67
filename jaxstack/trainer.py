"""The three-function pipeline: ``Trainer`` runs ``collate_fn`` / ``loss_fn`` / ``pred_fn``.

The user writes (see docs/pipeline.md):

- ``collate_fn(examples: list) -> dict[str, np.ndarray]``: host-side batching.
- ``loss_fn(params, batch, rng) -> loss`` or ``(loss, metrics)``: the mean loss of one
  (micro-)batch; traced once, jitted and sharded by the stack. ``metrics["num_tokens"]``,
  when given, is what the loss is a mean over (``jaxstack.step``): accumulation and
  evaluation then weight batches by it exactly.
- ``pred_fn(params, batch, rng) -> dict[str, array]``: per-example outputs, for
  ``Trainer.predict`` and for ``eval_metric_fn(examples, predictions) -> dict[str, float]``.

The Trainer owns the mesh, shardings, the global batch split across hosts and devices, the
jitted step with buffer donation, gradient accumulation, the optimizer and schedule,
evaluation, metrics, and checkpoints that resume at the exact step, data position and RNG;
it survives preemption (SIGTERM saves and exits), damaged checkpoints and non-finite steps.
"""

import functools
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxstack.auto import choose_mesh_for
from jaxstack.checkpoint import CheckpointManager
from jaxstack.data import DataLoader, Prefix
from jaxstack.layers.moe import ROUTER_BIAS, route_router_bias
from jaxstack.lora import LoRAConfig, adapter_specs, find_targets, init_adapters, merge
from jaxstack.lora.training import combined_plan, lora_loss, lora_pred, write_reference
from jaxstack.mesh import MeshSpec, batch_divisor, batch_sharding, resolve_mesh
from jaxstack.metrics import MetricsLogger, Throughput, host_value
from jaxstack.optim import HOST, optimizer_for, weight_decay_mask
from jaxstack.perf import peak_flops
from jaxstack.predictor import Predictor
from jaxstack.preemption import PreemptionGuard
from jaxstack.step import LossFn, TrainState, make_eval_step, make_train_step
from jaxstack.train_config import DEFAULT_NUM_STEPS, TrainConfig, global_batch_size
from jaxstack.workdir import WorkDirLock, log_traceback, work_path
from sharding_rules import (
    MemoryPlan,
    ModelAnalysis,
    analyze_model,
    make_plan,
    optimizer_state_specs,
    param_rules,
    specs_tree,
)
from sharding_rules.paths import leaves_with_paths

Params = Any
ParamSpecsFn = Callable[[Params, Mesh], Params]
EvalMetricFn = Callable[[Sequence, dict[str, np.ndarray]], dict[str, float]]

__all__ = ["NonFiniteError", "TrainConfig", "TrainState", "Trainer"]


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, gradient or state and was stopped."""


@dataclass(frozen=True)
class _Placement:
    """Everything decided from the first batch: specs, shardings, optimizer, jitted steps."""

    abstract: TrainState
    param_specs: Params
    opt_specs: Any
    state_shardings: TrainState
    batch_shardings: dict[str, NamedSharding]
    optimizer: optax.GradientTransformation
    train_step: Callable
    eval_step: Callable
    base_specs: Params = None
    """With LoRA: the frozen base's specs (``param_specs`` are then the adapters')."""
    lora_targets: tuple = ()


class Trainer:
    """Train ``params`` with ``loss_fn`` on batches from ``collate_fn``; see the module doc.

    Args:
        params: a pytree, or an init function ``rng -> params`` (then parameters are created
            directly in their sharded placement, never whole on one device).
        collate_fn, loss_fn, pred_fn: the three user functions (module doc).
        config: how to train (``TrainConfig``).
        mesh: a ``Mesh``, ``"data=4,tensor=2"``, ``{"data": 4, "tensor": 2}``, ``"auto"``
            (the fitting mesh with least communication for this model, chosen on the first
            batch from the traced ``loss_fn``) or None (all devices data-parallel).
        optimizer: any optax transformation (default: AdamW with ``config``'s schedule and
            decay mask). ``config.grad_clip`` applies before it either way.
        router_bias_rate: for a MoE model with aux-loss-free balancing biases (parameters
            named ``score_bias``; ``router_bias_rate > 0`` in its config): the model config's
            rate. Those biases then move by ``route_router_bias``'s sign update, never by the
            optimizer. The default optimizer refuses such a model without it.
        param_specs_fn: ``(abstract params, mesh) -> PartitionSpecs``; by default
            ``sharding_rules`` derives them from the computation of ``loss_fn`` on the first
            batch's shapes (tensor pairs, vocab-parallel heads, FSDP, experts).
        sharding_overrides: ``{path_regex: PartitionSpec}`` taking precedence over the rules.
        flops_per_token: model FLOPs per trained token, for MFU in the metrics.
        eval_metric_fn: ``(examples, predictions) -> {name: float}`` computed by
            ``evaluate`` from ``pred_fn``'s outputs (logged as ``eval_<name>``).
        lora: train low-rank adapters of the weights ``LoRAConfig.targets`` selects instead of
            the params (docs/lora.md): ``params`` is then the frozen base, ``self.params``
            the adapters (the optimizer state and checkpoints hold adapters only),
            ``model_params`` the merged model. ``loss_fn`` / ``pred_fn`` are unchanged.

    The train state is created on the first batch (or by ``init(example_batch)``), or
    restored straight into its placement by ``fit`` when the work dir holds a checkpoint.
    """

    def __init__(
        self,
        *,
        params: Params | Callable[[jax.Array], Params],
        collate_fn: Callable[[list], dict[str, np.ndarray]],
        loss_fn: LossFn,
        pred_fn: Callable | None = None,
        config: TrainConfig | None = None,
        mesh: MeshSpec = None,
        optimizer: optax.GradientTransformation | None = None,
        param_specs_fn: ParamSpecsFn | None = None,
        sharding_overrides: dict[str, PartitionSpec] | None = None,
        flops_per_token: float | None = None,
        eval_metric_fn: EvalMetricFn | None = None,
        router_bias_rate: float | None = None,
        lora: LoRAConfig | None = None,
    ):
        config = TrainConfig() if config is None else config
        if lora is not None and not isinstance(lora, LoRAConfig):
            raise TypeError(f"lora must be a LoRAConfig, got {type(lora).__name__}")
        self.lora = lora if lora is not None and lora.enabled else None
        self._base_arg = None if callable(params) else params
        self._base = None
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if eval_metric_fn is not None and pred_fn is None:
            raise ValueError("eval_metric_fn reads pred_fn's outputs: pass pred_fn too")
        self.config = config
        self.collate_fn, self.loss_fn, self.pred_fn = collate_fn, loss_fn, pred_fn
        self.eval_metric_fn = eval_metric_fn
        self.flops_per_token = flops_per_token
        self.sharding_overrides = sharding_overrides
        self._auto_mesh = isinstance(mesh, str) and mesh.strip() == "auto"
        if self._auto_mesh and config.per_device_batch_size is not None:
            raise ValueError(
                "mesh='auto' with per_device_batch_size is ambiguous (each mesh shape gives "
                "another global batch); give batch_size instead"
            )
        self._mesh = None if self._auto_mesh else resolve_mesh(mesh)
        if self._mesh is not None:
            self._check_batch_divides()
        self._init_fn = params if callable(params) else (lambda _: params)
        if router_bias_rate is not None and not router_bias_rate > 0:
            raise ValueError(
                f"router_bias_rate={router_bias_rate} must be > 0 (or None for a model without "
                "router biases)"
            )
        self._optimizer_arg = optimizer
        self.router_bias_rate = router_bias_rate
        self._param_specs_fn = param_specs_fn
        self._num_steps = config.num_steps or (None if config.num_epochs else DEFAULT_NUM_STEPS)
        self._placement: _Placement | None = None
        self._state: TrainState | None = None
        self._host_step = 0
        self.preempted = False
        """True after ``fit`` stopped early for SIGTERM / SIGINT (its checkpoint is saved)."""

    # ------------------------------------------------------------------ sizes
    @property
    def mesh(self) -> Mesh:
        """The device mesh (with ``mesh="auto"``: chosen on the first batch)."""
        if self._mesh is None:
            raise RuntimeError(
                "mesh='auto' is chosen from the model on the first batch: call fit(), "
                "init(example_batch) or plan(example_batch) first"
            )
        return self._mesh

    @property
    def batch_size(self) -> int:
        """Global examples per optimizer update."""
        if self.config.per_device_batch_size is None:
            return global_batch_size(self.config, 1)
        return global_batch_size(self.config, batch_divisor(self.mesh))

    @property
    def micro_batch_size(self) -> int:
        """Global examples per micro-batch (one gradient computation)."""
        return self.batch_size // self.config.grad_accum_steps

    @property
    def num_steps(self) -> int:
        """Optimizer updates of the whole run (with ``num_epochs``: known once ``fit`` sees
        the training set)."""
        if self._num_steps is None:
            raise RuntimeError(
                f"num_epochs={self.config.num_epochs} counts updates from the training set: "
                "call fit(train_dataset), or set num_steps to step by hand"
            )
        return self._num_steps

    def _check_batch_divides(self) -> None:
        micro, shards = self.micro_batch_size, batch_divisor(self.mesh)
        if self.batch_size % self.config.grad_accum_steps:
            raise ValueError(
                f"batch_size={self.batch_size} is not divisible by grad_accum_steps="
                f"{self.config.grad_accum_steps}; pick a multiple"
            )
        if micro % shards or micro % jax.process_count():
            raise ValueError(
                f"micro-batch of {micro} examples (batch_size={self.batch_size} / "
                f"grad_accum_steps={self.config.grad_accum_steps}) does not divide over the "
                f"{shards} batch shards of the mesh (data x fsdp x expert); use a batch_size that "
                f"is a multiple of {shards * self.config.grad_accum_steps}"
            )

    @functools.cached_property
    def checkpoints(self) -> CheckpointManager:
        """The run's checkpoint manager (created on first use, in ``work_dir/checkpoints``)."""
        return CheckpointManager(
            work_path(self.config.work_dir) / "checkpoints",
            save_every=self.config.save_every,
            keep=self.config.keep_checkpoints,
        )

    # -------------------------------------------------------------- placement
    def _abstract_micro_batch(self, example_batch: dict[str, np.ndarray]) -> dict:
        return {
            name: jax.ShapeDtypeStruct((self.micro_batch_size, *np.shape(v)[1:]),
                                       np.asarray(v).dtype)
            for name, v in example_batch.items()
        }  # fmt: skip

    def _analysis(self, abstract_params: Params, example_batch: dict) -> ModelAnalysis:
        rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
        return analyze_model(
            self.loss_fn, abstract_params, self._abstract_micro_batch(example_batch), rng
        )

    def _prepare(self, example_batch: dict[str, np.ndarray]) -> _Placement:
        """Decide the mesh (``auto``), specs, optimizer and jitted steps, once."""
        if self._placement is not None:
            return self._placement
        cfg = self.config
        abstract_params = jax.eval_shape(self._init_fn, jax.random.PRNGKey(cfg.seed))
        lora = self.lora
        uses_decay = self._optimizer_arg is None and cfg.weight_decay > 0 and lora is None
        analysis = None
        if self._param_specs_fn is None or uses_decay or self._mesh is None or lora:
            analysis = self._analysis(abstract_params, example_batch)
        targets = tuple(find_targets(analysis, lora)) if lora else ()
        trained = abstract_params
        if lora:  # the optimizer sees the adapters only
            trained = jax.eval_shape(self._init_adapters(targets), jax.random.PRNGKey(0))
        optimizer = self._optimizer_arg or optimizer_for(
            cfg,
            self._num_steps or 1,  # shapes only until fit counts the epochs' updates
            weight_decay_mask(analysis, cfg) if uses_decay else None,
        )
        optimizer = self._route_router_bias(optimizer, trained)
        if self._mesh is None:
            self._mesh = choose_mesh_for(
                analysis,
                abstract_params,
                batch_size=self.micro_batch_size,
                calls_per_step=cfg.grad_accum_steps,
                opt_state=None if lora else jax.eval_shape(optimizer.init, abstract_params),
                overrides=self.sharding_overrides,
                activation_dtype=cfg.compute_dtype,
            )
            self._check_batch_divides()
        if self._param_specs_fn is not None:
            specs = self._param_specs_fn(abstract_params, self.mesh)
        else:
            specs = specs_tree(analysis, param_rules(analysis, self.mesh, self.sharding_overrides))
        base_specs = None
        if lora:
            base_specs, specs = specs, adapter_specs(abstract_params, specs, trained)
        abstract = jax.eval_shape(
            self._make_state_with(optimizer, targets), jax.random.PRNGKey(cfg.seed)
        )
        opt_specs = optimizer_state_specs(abstract.opt_state, abstract.params, specs)
        named = lambda tree: jax.tree.map(lambda s: NamedSharding(self.mesh, s), tree)  # noqa: E731
        replicated = NamedSharding(self.mesh, PartitionSpec())
        opt_shardings = named(opt_specs)
        offload = opt_shardings if cfg.optimizer_offload else None
        if offload is not None:  # the optimizer state lives on the host between steps
            opt_shardings = jax.tree.map(lambda s: s.with_memory_kind(HOST), opt_shardings)
            moments = make_plan(abstract.params, specs, self.mesh, opt_state=abstract.opt_state,
                                opt_state_specs=opt_specs).opt_state_bytes  # fmt: skip
            _say(f"optimizer_offload: {moments / 2**20:.2f} MiB of optimizer state per device "
                 f"in {HOST} memory between steps", once=True)  # fmt: skip
        state_shardings = TrainState(replicated, named(specs), opt_shardings, replicated,
                                     replicated, replicated)  # fmt: skip
        batch_shardings = {
            name: batch_sharding(self.mesh, np.ndim(v)) for name, v in example_batch.items()
        }
        train_loss, eval_loss = self.loss_fn, self.loss_fn
        frozen: tuple = ()
        if lora:
            train_loss = lora_loss(self.loss_fn, lora, train=True)
            eval_loss = lora_loss(self.loss_fn, lora, train=False)
            frozen = (named(base_specs),)
        step = make_train_step(
            train_loss,
            optimizer,
            grad_accum_steps=cfg.grad_accum_steps,
            grad_clip=cfg.grad_clip,
            compute_dtype=cfg.compute_dtype,
            offload_shardings=offload,
        )
        self._placement = _Placement(
            abstract=abstract,
            param_specs=specs,
            opt_specs=opt_specs,
            state_shardings=state_shardings,
            batch_shardings=batch_shardings,
            optimizer=optimizer,
            train_step=jax.jit(
                step,
                in_shardings=(state_shardings, batch_shardings, *frozen),
                out_shardings=(state_shardings, replicated),
                donate_argnums=0,
            ),
            eval_step=jax.jit(
                make_eval_step(eval_loss, cfg.compute_dtype),
                in_shardings=(state_shardings.params, batch_shardings, replicated, *frozen),
                out_shardings=replicated,
            ),
            base_specs=base_specs,
            lora_targets=targets,
        )
        return self._placement

    def _route_router_bias(
        self, optimizer: optax.GradientTransformation, abstract_params: Params
    ) -> optax.GradientTransformation:
        """``optimizer`` with the balancing biases routed to their own update
        (``router_bias_rate``'s doc); a model and rate that do not go together are refused."""
        has_bias = any(
            path.rsplit("/", 1)[-1] == ROUTER_BIAS for path in leaves_with_paths(abstract_params)[0]
        )
        if self.router_bias_rate is not None:
            if not has_bias:
                raise ValueError(
                    f"router_bias_rate={self.router_bias_rate} but the params have no "
                    f"{ROUTER_BIAS!r} (a model with router_bias_rate = 0): drop router_bias_rate"
                )
            return route_router_bias(optimizer, self.router_bias_rate)
        if has_bias and self._optimizer_arg is None:
            raise ValueError(
                f"the params hold aux-loss-free balancing biases ({ROUTER_BIAS!r}, a MoE model "
                "with router_bias_rate > 0) that AdamW, its weight decay and schedule must not "
                "move: pass Trainer(router_bias_rate=model.config.router_bias_rate)"
            )
        return optimizer

    def _init_adapters(self, targets: tuple) -> Callable[[jax.Array], Params]:
        return lambda rng: init_adapters(rng, list(targets), self.lora.rank)

    def _make_state_with(self, optimizer: optax.GradientTransformation, targets: tuple = ()):
        def make_state(rng: jax.Array) -> TrainState:
            init_rng, state_rng = jax.random.split(rng)
            if self.lora:
                params = self._init_adapters(targets)(jax.random.fold_in(init_rng, 1))
            else:
                params = self._init_fn(init_rng)
            zero = jnp.zeros((), jnp.int32)
            return TrainState(zero, params, optimizer.init(params), state_rng, zero, zero)

        return make_state

    @property
    def optimizer(self) -> optax.GradientTransformation:
        """The optimizer in use (decided with the placement, on the first batch)."""
        if self._placement is None:
            raise RuntimeError("the optimizer is built on the first batch: call init() first")
        return self._placement.optimizer

    def param_specs(self, example_batch: dict[str, np.ndarray]) -> Params:
        """PartitionSpec of every parameter, for batches shaped like ``example_batch``."""
        return self._prepare(example_batch).param_specs

    def plan(self, example_batch: dict[str, np.ndarray], activation_bytes: int = 0) -> MemoryPlan:
        """Per-device memory plan (params, grads, optimizer state, activations); allocates
        nothing. ``activation_bytes`` is the caller's per-device activation estimate."""
        placement = self._prepare(example_batch)
        plan = make_plan(
            placement.abstract.params,
            placement.param_specs,
            self.mesh,
            opt_state=placement.abstract.opt_state,
            opt_state_specs=placement.opt_specs,
            activation_bytes=activation_bytes,
        )
        if self.lora is None:
            return plan
        base = jax.eval_shape(self._init_fn, jax.random.PRNGKey(self.config.seed))
        frozen = make_plan(base, placement.base_specs, self.mesh, gradients=False)
        return combined_plan(frozen, plan)

    def init(self, example_batch: dict[str, np.ndarray]) -> None:
        """Create the train state in its sharded placement (no-op if it exists)."""
        if self._state is not None:
            return
        placement = self._prepare(example_batch)
        with jax.set_mesh(self.mesh):
            self._state = jax.jit(
                self._make_state_with(placement.optimizer, placement.lora_targets),
                out_shardings=placement.state_shardings,
            )(jax.random.PRNGKey(self.config.seed))
        self._host_step = 0
        self._place_base()

    def _place_base(self) -> None:
        """With LoRA: create (or place) the frozen base in its sharding, once."""
        if self.lora is None or self._base is not None:
            return
        placement = self._placement
        shardings = jax.tree.map(lambda s: NamedSharding(self.mesh, s), placement.base_specs)
        with jax.set_mesh(self.mesh):
            if self._base_arg is not None:
                self._base = jax.device_put(self._base_arg, shardings)
            else:
                init_rng = jax.random.split(jax.random.PRNGKey(self.config.seed))[0]
                self._base = jax.jit(self._init_fn, out_shardings=shardings)(init_rng)

    @property
    def _frozen(self) -> tuple:
        """The step's untrained inputs: the LoRA base, or nothing."""
        return () if self.lora is None else (self._base,)

    # ----------------------------------------------------------------- state
    @property
    def state(self) -> TrainState:
        """The train state (step, params, optimizer state, RNG, skip counters)."""
        if self._state is None:
            raise RuntimeError(
                "the Trainer has no state yet: call fit(), train_step(batch) or "
                "init(example_batch) first"
            )
        return self._state

    @property
    def step(self) -> int:
        """Steps done so far (counted on the host: reading it never waits for the device)."""
        return self._host_step

    @property
    def params(self) -> Params:
        """The current (sharded) parameters; with LoRA, the adapters."""
        return self.state.params

    @property
    def base_params(self) -> Params:
        """With LoRA: the frozen base (sharded); without: the params."""
        self.state  # noqa: B018 - a clear error when there is no state
        return self.params if self.lora is None else self._base

    @property
    def model_params(self) -> Params:
        """The params the model runs on: with LoRA the base merged with the adapters
        (``jaxstack.lora.merge``), else ``params``."""
        if self.lora is None:
            return self.params
        with jax.set_mesh(self.mesh):
            return jax.jit(merge)(self._base, self.params, self.lora.scale)

    # ------------------------------------------------------------------ step
    def train_step(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """One optimizer update on a host-local batch; returns the step's metrics (device
        arrays: reading them waits for the step)."""
        placement = self._prepare(batch)
        self.init(batch)
        with jax.set_mesh(self.mesh):
            self._state, metrics = placement.train_step(
                self._state, self.to_global(batch), *self._frozen
            )
        self._host_step += 1
        return metrics

    def compiled_train_step(self, example_batch: dict[str, np.ndarray]) -> jax.stages.Compiled:
        """The train step compiled for ``example_batch``'s shapes, for inspection: its
        ``memory_analysis()`` (device bytes) and ``as_text()`` (collectives, memory spaces).
        Creates the state if there is none."""
        placement = self._prepare(example_batch)
        self.init(example_batch)
        with jax.set_mesh(self.mesh):
            lowered = placement.train_step.lower(
                self._state, self.to_global(example_batch), *self._frozen
            )
        return lowered.compile()

    def to_global(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Assemble each host's share of the batch into global arrays split over (data, fsdp)."""
        return {
            name: jax.make_array_from_process_local_data(
                batch_sharding(self.mesh, np.ndim(value)), np.asarray(value)
            )
            for name, value in batch.items()
        }

    # ------------------------------------------------------------------- fit
    def loader(
        self,
        dataset: Sequence,
        *,
        shuffle: bool,
        batch_size: int | None = None,
        num_epochs: int | None = None,
    ) -> DataLoader:
        """A deterministic, checkpointable loader giving this host its share of each batch
        (``num_epochs=None``: repeating forever)."""
        return DataLoader(
            dataset,
            batch_size=batch_size or self.batch_size,
            collate_fn=self.collate_fn,
            shuffle=shuffle,
            num_epochs=num_epochs,
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
        restore_data_position: bool = True,
    ) -> list[dict]:
        """Train to ``num_steps`` updates, resuming from the work dir's newest intact checkpoint.

        ``stop_after`` ends the run early at that step (as a preemption would), after saving.
        ``restore_data_position=False`` resumes the state but reads ``train_dataset`` from its
        start (a checkpoint continued on other data).
        SIGTERM / SIGINT do the same at the next step boundary (``self.preempted``). Returns
        the logged metric records of this call.

        Raises:
            WorkDirBusyError: another trainer is training in ``work_dir`` (on every process).
            WorkDirLockError: the work dir's lock cannot be taken (on every process).
            CheckpointError / CheckpointMismatchError: saving failed, or the work dir's
                checkpoints cannot be resumed (details in ``work_dir/error.log``).
            NonFiniteError: the run went non-finite (``TrainConfig.nonfinite``); the last
                finite checkpoint is kept.
        """
        lock = WorkDirLock(self.config.work_dir)
        lock.acquire()
        try:
            return self._fit(train_dataset, eval_dataset, stop_after, restore_data_position)
        except Exception as error:
            if jax.process_index() == 0:
                log_traceback(self.config.work_dir, error)
            raise
        finally:
            lock.release()

    def _fit(self, train_dataset, eval_dataset, stop_after, restore_data_position) -> list[dict]:
        cfg = self.config
        if self._mesh is None:  # auto: the batch size is global, the loader needs no mesh
            loader = self.loader(train_dataset, shuffle=cfg.shuffle, batch_size=self.batch_size)
        else:
            loader = self.loader(train_dataset, shuffle=cfg.shuffle)
        if self._num_steps is None:
            self._num_steps = cfg.num_epochs * len(loader)
            self._placement = None  # the schedule's length is known now
        example = self.collate_fn([train_dataset[i] for i in range(loader.local_batch_size)])
        self._prepare(example)
        self.checkpoints.remove_unfinished()
        if self._state is None and not self.restore_latest(
            loader if restore_data_position else None
        ):
            self.init(example)
        self._place_base()
        if self.lora is not None:
            write_reference(cfg.work_dir, self.lora, list(self._placement.lora_targets),
                            self._base)  # fmt: skip
        last = min(self.num_steps, stop_after or self.num_steps)
        start = self.step
        if start >= last:
            _say(f"{cfg.work_dir} is already at step {start} (num_steps={self.num_steps}): "
                 "nothing to train; raise num_steps to continue")  # fmt: skip
            return []
        logger = MetricsLogger(cfg.work_dir, self.num_steps, start, show=cfg.progress_bar)
        try:
            # the final save runs under the guard: after a signal, its grace period covers it
            with PreemptionGuard(cfg.preemption_grace_s) as guard:
                records = self._loop(loader, eval_dataset, last, logger, guard)
                self.preempted = guard.signal_name is not None
                self._save(loader, force=True)
                self.checkpoints.wait()
        finally:
            logger.close()
        if self.preempted:
            _say(f"stopped by {guard.signal_name} at step {self.step}: checkpoint saved in "
                 f"{self.checkpoints.directory}; run the same command to resume")  # fmt: skip
        return records

    def _loop(self, loader, eval_dataset, last: int, logger, guard) -> list[dict]:
        """Steps until ``last`` or a stop signal; syncs with the device only to log, evaluate
        or save, and times training steps alone (not compilation, evaluation or saves)."""
        cfg, records, batches = self.config, [], _forever(loader)
        throughput = Throughput(self.flops_per_token, self._peak_flops())
        first = self.step + 1
        while self.step < last and not guard.should_stop(self.step):
            batch = next(batches)
            metrics = self.train_step(batch)
            step = self.step
            throughput.add(batch)
            if step == first:  # compiled on this step: keep it out of the rates
                jax.block_until_ready(metrics)
                throughput.reset()
            eval_due = eval_dataset is not None and (
                (cfg.eval_every and step % cfg.eval_every == 0) or step == self.num_steps
            )
            log_due = step % cfg.log_every == 0 or step == last or eval_due
            save_due = self.checkpoints.should_save(step)
            if not (log_due or save_due):
                logger.advance(step)
                continue
            record = {k: host_value(v) for k, v in jax.device_get(metrics).items()}
            throughput.pause()
            self.checkpoints.check()
            failure = self._nonfinite_failure(step)
            if failure is None and save_due:
                self._save(loader)
            if failure is None and eval_due:
                record.update(self.evaluate(eval_dataset))
            if log_due or failure is not None:
                record.update(throughput.rates())
                logger.log(step, record)
                records.append({"step": step, **record})
                throughput.reset()
            if failure is not None:
                raise NonFiniteError(failure)
            throughput.resume()
        return records

    def _peak_flops(self):
        return peak_flops(self.mesh.devices.flatten().tolist()) if self.flops_per_token else None

    def _nonfinite_failure(self, step: int) -> str | None:
        """Why the run must stop, from the device's skip counters (``TrainConfig.nonfinite``),
        or None."""
        in_row, total = (int(x) for x in jax.device_get(
            (self.state.skipped_in_row, self.state.skipped_total)))  # fmt: skip
        limit = 1 if self.config.nonfinite == "stop" else self.config.max_nonfinite_skips
        if in_row >= limit or (self.config.nonfinite == "stop" and total):
            latest = self.checkpoints.latest_step()
            kept = f"the newest checkpoint (finite) is step {latest}" if latest else "no checkpoint"
            return (
                f"non-finite loss or gradient norm: {in_row} update(s) in a row skipped by step "
                f"{step} (nonfinite={self.config.nonfinite!r}, max_nonfinite_skips="
                f"{self.config.max_nonfinite_skips}); {kept}. Lower the learning rate or check "
                "the data"
            )
        return None

    @functools.cached_property
    def _all_finite(self) -> Callable[[TrainState], jax.Array]:
        def all_finite(state: TrainState) -> jax.Array:
            leaves = jax.tree.leaves((state.params, state.opt_state))
            checks = [jnp.isfinite(x).all() for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
            return jnp.stack(checks).all()

        return jax.jit(all_finite)

    def _save(self, loader: DataLoader, force: bool = False) -> None:
        """Save the state at the current step (if due, or ``force`` and not saved yet); a
        non-finite state is never saved."""
        step = self.step
        if force and self.checkpoints.latest_step() == step:
            return
        if not (force or self.checkpoints.should_save(step)):
            return
        if not bool(self._all_finite(self.state)):
            raise NonFiniteError(
                f"the parameters or optimizer state are not finite at step {step}; not saving "
                f"them (the newest checkpoint is step {self.checkpoints.latest_step()}). Lower "
                "the learning rate or check the data"
            )
        self.checkpoints.save(step, self.state, loader.get_state(), force=force)

    def restore_latest(self, loader: DataLoader | None = None) -> bool:
        """Resume state (and the loader's position) from the newest intact checkpoint, if any.

        The state is read straight into its sharded placement (no initialiser runs, no second
        copy exists). Returns whether a checkpoint was found.
        """
        if self._placement is None:
            raise RuntimeError("restore_latest needs the placement: call it from fit()")
        target = jax.tree.map(
            lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
            self._placement.abstract,
            self._placement.state_shardings,
        )
        found = self.checkpoints.restore_latest(target)
        if found is None:
            return False
        step, self._state, data_state = found
        self._host_step = step
        if loader is not None:
            loader.set_state(data_state)
        _say(f"resuming from step {step} ({self.checkpoints.directory})")
        return True

    # ------------------------------------------------------------- inference
    @functools.cached_property
    def predictor(self) -> Predictor:
        """The Predictor running ``pred_fn`` on this trainer's mesh and param placement."""
        if self.pred_fn is None:
            raise ValueError("this Trainer has no pred_fn; pass pred_fn=... to predict")
        if self._placement is None:
            raise RuntimeError(
                "the Trainer has no state yet: call fit(), train_step(batch) or "
                "init(example_batch) first"
            )
        pred_fn, specs = self.pred_fn, self._placement.param_specs
        if self.lora is not None:
            pred_fn = lora_pred(pred_fn, self.lora)
            specs = {"base": self._placement.base_specs, "adapters": specs}
        return Predictor(
            collate_fn=self.collate_fn,
            pred_fn=pred_fn,
            mesh=self.mesh,
            seed=self.config.seed,
            param_specs=specs,
            compute_dtype=self.config.compute_dtype,
        )

    def predict(self, dataset: Sequence, batch_size: int | None = None) -> dict[str, np.ndarray]:
        """``pred_fn`` outputs for every example of ``dataset``, in order."""
        self.state  # noqa: B018 - a clear error before anything else when there is none
        params = self.params
        if self.lora is not None:
            params = {"base": self._base, "adapters": params}
        return self.predictor.predict(
            params, dataset, batch_size=batch_size or self.micro_batch_size
        )

    def evaluate(self, dataset: Sequence) -> dict[str, float]:
        """``eval_loss`` (and ``eval_<name>`` of ``loss_fn``'s metrics) over ``dataset``, weighted
        by ``num_tokens`` when ``loss_fn`` gives it, plus ``eval_metric_fn``'s metrics.

        ``loss_fn`` runs on full micro-batches (padding would change its mean); examples past
        the last full one are left out, and said so. ``eval_batches`` caps the batches.
        """
        size = self.micro_batch_size
        batches = len(dataset) // size
        if self.config.eval_batches is not None:
            batches = min(batches, self.config.eval_batches)
        if batches == 0:
            raise ValueError(
                f"the eval set has {len(dataset)} examples, fewer than one micro-batch of "
                f"{size}; add examples or lower batch_size"
            )
        subset = Prefix(dataset, batches * size)
        if len(subset) < len(dataset) and self.config.eval_batches is None:
            _say(f"evaluating {len(subset)} of {len(dataset)} examples (whole micro-batches "
                 f"of {size})", once=True)  # fmt: skip
        placement, sums = self._placement, None
        loader = self.loader(subset, shuffle=False, batch_size=size, num_epochs=1)
        with jax.set_mesh(self.mesh):
            for index, batch in enumerate(loader):
                rng = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), index)
                out = placement.eval_step(self.params, self.to_global(batch), rng, *self._frozen)
                sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
        loss, weight, metrics = jax.device_get(sums)
        weight = weight if weight > 0 else 1.0
        result = {"eval_loss": float(loss / weight)}
        result.update({f"eval_{k}": host_value(v / weight) for k, v in metrics.items()})
        if self.eval_metric_fn is not None:
            predictions = self.predict(subset, batch_size=size)
            computed = self.eval_metric_fn(subset, predictions)
            if not isinstance(computed, dict):
                raise TypeError(
                    f"eval_metric_fn must return a dict of floats, got {type(computed).__name__}"
                )
            result.update({f"eval_{k}": host_value(v) for k, v in computed.items()})
        return result

    def close(self) -> None:
        """Wait for pending checkpoint saves and release resources."""
        if "checkpoints" in self.__dict__:
            self.checkpoints.close()


_SAID: set[str] = set()


def _say(message: str, once: bool = False) -> None:
    """One line on stderr from process 0 (``once``: the first time only)."""
    if jax.process_index() != 0 or (once and message in _SAID):
        return
    _SAID.add(message)
    print(f"jaxstack: {message}", file=sys.stderr, flush=True)


def _forever(loader: DataLoader) -> Iterator[dict]:
    while True:
        yield from loader
