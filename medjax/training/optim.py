"""Optimizers: AdamW with a learning-rate schedule and gradient clipping.

Gradient accumulation is not an optax wrapper here: the train step splits a batch into
microbatches and sums loss numerators and denominators across them (`medjax.training.steps`),
which gives the full batch's gradient exactly, whatever the loss's normalisation.
"""

import optax

SCHEDULES = ("constant", "cosine", "linear")


def learning_rate_schedule(
    learning_rate: float,
    *,
    schedule: str = "constant",
    warmup_steps: int = 0,
    total_steps: int | None = None,
    final_fraction: float = 0.0,
) -> optax.Schedule:
    """Linear warm-up from 0, then constant, cosine or linear decay to
    `final_fraction * learning_rate` at `total_steps`."""
    if schedule not in SCHEDULES:
        raise ValueError(
            f"learning_rate_schedule: schedule {schedule!r} is not one of {SCHEDULES}."
        )
    if schedule != "constant" and not total_steps:
        raise ValueError(f"learning_rate_schedule: schedule {schedule!r} needs total_steps.")
    if schedule == "constant":
        after = optax.constant_schedule(learning_rate)
    else:
        decay_steps = max(total_steps - warmup_steps, 1)
        end = final_fraction * learning_rate
        after = (
            optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=final_fraction)
            if schedule == "cosine"
            else optax.linear_schedule(learning_rate, end, decay_steps)
        )
    if warmup_steps <= 0:
        return after
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, after], [warmup_steps])


def make_optimizer(
    learning_rate: float = 1e-5,
    *,
    schedule: str = "constant",
    warmup_steps: int = 0,
    total_steps: int | None = None,
    final_fraction: float = 0.0,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    max_grad_norm: float | None = 1.0,
) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay) after global-norm clipping (None: no clipping)."""
    lr = learning_rate_schedule(
        learning_rate, schedule=schedule, warmup_steps=warmup_steps,
        total_steps=total_steps, final_fraction=final_fraction,
    )  # fmt: skip
    parts = [] if max_grad_norm is None else [optax.clip_by_global_norm(max_grad_norm)]
    parts.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts)
