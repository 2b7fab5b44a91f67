"""Optimizer and learning-rate schedule built from a TrainConfig."""

import optax

SCHEDULES = ("cosine", "linear", "constant")


def learning_rate_schedule(
    peak: float, total_steps: int, warmup_steps: int, kind: str, min_ratio: float
) -> optax.Schedule:
    """Linear warmup to ``peak`` then cosine/linear decay to ``peak * min_ratio`` (or constant).

    Steps count optimizer updates, never micro-batches.
    """
    if kind not in SCHEDULES:
        raise ValueError(f"schedule={kind!r}; choose one of {SCHEDULES}")
    if warmup_steps > total_steps:
        raise ValueError(f"warmup_steps={warmup_steps} exceeds num_steps={total_steps}")
    warmup = optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
    decay_steps = max(total_steps - warmup_steps, 1)
    if kind == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=min_ratio)
    elif kind == "linear":
        decay = optax.linear_schedule(peak, peak * min_ratio, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup_steps == 0:
        return decay
    return optax.join_schedules([warmup, decay], [warmup_steps])


def adamw(
    schedule: optax.Schedule,
    *,
    weight_decay: float,
    b1: float,
    b2: float,
    grad_clip: float | None,
) -> optax.GradientTransformation:
    """AdamW with optional global-norm gradient clipping in front."""
    transforms = [] if grad_clip is None else [optax.clip_by_global_norm(grad_clip)]
    transforms.append(optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))
    return optax.chain(*transforms)
