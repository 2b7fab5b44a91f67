"""Per-platform XLA flag bundles that let communication hide behind compute.

XLA reads its flags once, when the first backend initialises, so the stack sets them at
start-up (the ``jaxstack`` CLI calls :func:`apply_xla_flags` before any computation; a
script calls it first thing). The bundle of the platform about to run is appended to the
flag variable that platform reads, and the run log prints what was set (nothing when
nothing was):

* GPU (``XLA_FLAGS``): the latency-hiding scheduler (it moves collectives' starts early and
  their waits late, around independent compute), pipelined all-gather / reduce-scatter /
  all-reduce across loop iterations (scanned layers), double-buffered while loops, and
  collectives on the highest-priority stream. Collectives are asynchronous by default in
  this XLA (the old ``--xla_gpu_enable_async_collectives`` no longer exists).
* TPU (``LIBTPU_INIT_ARGS``, read by libtpu): async collective fusion (also of
  all-gathers, over several steps), compute/collective overlap on the TensorCore, and
  asynchronous all-gathers: the bundle MaxText ships for its training runs.
* CPU: nothing; XLA:CPU runs collectives synchronously.

Overrides: a flag already in the variable wins over the bundle's value for it (set
``XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=false`` to turn one off), and
``JAXSTACK_XLA_FLAGS=off`` skips the bundles entirely.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import MutableMapping

from jax._src import xla_bridge

BUNDLES: dict[str, tuple[str, ...]] = {
    "gpu": (
        "--xla_gpu_enable_latency_hiding_scheduler=true",
        "--xla_gpu_enable_pipelined_all_gather=true",
        "--xla_gpu_enable_pipelined_reduce_scatter=true",
        "--xla_gpu_enable_pipelined_all_reduce=true",
        "--xla_gpu_enable_while_loop_double_buffering=true",
        "--xla_gpu_enable_highest_priority_async_stream=true",
    ),
    "tpu": (
        "--xla_tpu_enable_async_collective_fusion=true",
        "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
        "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
        "--xla_tpu_overlap_compute_collective_tc=true",
        "--xla_enable_async_all_gather=true",
    ),
    "cpu": (),
}
"""The flags each platform gets (module doc)."""

VARIABLES = {"gpu": "XLA_FLAGS", "tpu": "LIBTPU_INIT_ARGS", "cpu": "XLA_FLAGS"}
"""The environment variable each platform's compiler reads its flags from."""

SWITCH = "JAXSTACK_XLA_FLAGS"
"""Set to ``off`` (or ``0``, ``false``, ``none``) to leave the flags alone."""

_PLATFORM_NAMES = {"cuda": "gpu", "rocm": "gpu", "gpu": "gpu", "tpu": "tpu", "cpu": "cpu"}


@dataclasses.dataclass(frozen=True)
class FlagReport:
    """What :func:`apply_xla_flags` did, for the run log."""

    platform: str
    variable: str
    added: tuple[str, ...] = ()
    """Bundle flags appended to ``variable``."""
    kept: tuple[str, ...] = ()
    """Bundle flags not set because ``variable`` already names them (the user's win)."""
    skipped: str | None = None
    """Why nothing was applied, if so."""

    def describe(self) -> str | None:
        """One line for the run log saying what was applied; None when nothing was (no bundle
        for the platform, all its flags set by the user, or ``skipped``)."""
        if not self.added:
            return None
        text = f"xla flags ({self.platform}, {self.variable}): " + (" ".join(self.added))
        if self.kept:
            text += f"; left to your settings: {' '.join(_name(f) for f in self.kept)}"
        return text


def detect_platform(environ: MutableMapping[str, str] = os.environ) -> str:
    """``"gpu"``, ``"tpu"`` or ``"cpu"``: the platform jax will pick, decided without
    initialising a backend (``JAX_PLATFORMS`` first, else the installed plugins)."""
    requested = environ.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
    if requested:
        return _PLATFORM_NAMES.get(requested, "cpu")
    if importlib.util.find_spec("libtpu") is not None:
        return "tpu"
    if any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin")):
        return "gpu"
    return "cpu"


def _name(flag: str) -> str:
    return flag.split("=", 1)[0]


def apply_xla_flags(
    platform: str | None = None, environ: MutableMapping[str, str] = os.environ
) -> FlagReport:
    """Append ``platform``'s bundle (default: :func:`detect_platform`) to its flag variable.

    Flags the variable already names keep their value. Does nothing after a backend has
    initialised (XLA would ignore the flags) or when ``JAXSTACK_XLA_FLAGS=off``.

    Raises:
      ValueError: an unknown ``platform``.
    """
    platform = detect_platform(environ) if platform is None else platform
    if platform not in BUNDLES:
        raise ValueError(f"platform must be one of {sorted(BUNDLES)}, got {platform!r}.")
    variable = VARIABLES[platform]
    if environ.get(SWITCH, "").strip().lower() in ("off", "0", "false", "none"):
        return FlagReport(platform, variable, skipped=f"{SWITCH}={environ[SWITCH]}")
    if xla_bridge.backends_are_initialized():
        return FlagReport(
            platform, variable,
            skipped="a jax backend was already initialised (call apply_xla_flags first)",
        )  # fmt: skip
    present = {_name(flag) for flag in environ.get(variable, "").split()}
    bundle = BUNDLES[platform]
    added = tuple(flag for flag in bundle if _name(flag) not in present)
    kept = tuple(flag for flag in bundle if _name(flag) in present)
    if added:
        environ[variable] = " ".join(filter(None, [environ.get(variable, ""), *added]))
    return FlagReport(platform, variable, added, kept)
