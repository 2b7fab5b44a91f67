"""The backend the kernels are picked for, and the Pallas interpret mode that follows from it.

Every dispatch in :mod:`pallas_kernels` asks :func:`backend` through this module's attribute
(``platform.backend()``), so a test stands in a GPU or TPU with one
``monkeypatch.setattr(platform, "backend", lambda: "gpu")``.
"""

from __future__ import annotations

import jax
from jax.experimental.pallas import tpu as pltpu

Interpret = bool | pltpu.InterpretParams
"""Pallas interpret mode: a bool, or ``pltpu.InterpretParams()`` (the TPU-faithful
interpreter: buffers start as NaN, out-of-bounds reads raise) for Mosaic TPU kernels."""


def backend() -> str:
    """The backend kernels are picked for: ``"cpu"``, ``"gpu"`` or ``"tpu"``
    (``jax.default_backend()``)."""
    return jax.default_backend()


def interpret_mode(interpret: Interpret | None) -> Interpret:
    """The interpret mode a kernel runs in: ``interpret`` as given, or when it is None,
    interpreted exactly on CPU (where Pallas kernels cannot be compiled)."""
    return backend() == "cpu" if interpret is None else interpret
