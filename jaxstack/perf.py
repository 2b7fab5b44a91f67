"""Peak FLOP/s of the devices, for model-FLOPs-utilisation (MFU), and which peak it is.

Accelerators: the vendor's dense bf16 peak per chip (no sparsity) times the chip count.
CPU: no datasheet applies, so the peak is this host's matmul FLOP/s measured in float32
(one matmul of 2048 x 2048, best of 5), and MFU says so.
"""

import functools
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp

SPEC_PEAK_BF16: tuple[tuple[str, float], ...] = (
    # (substring of jax's device_kind, dense bf16 FLOP/s per chip); most specific first
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),  # v5p reports "TPU v5"
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
    ("TPU v6e", 918e12),
)
"""Datasheet peaks: NVIDIA H100/H200/B200/A100/L4 and Google Cloud TPU v4/v5e/v5p/v6e."""


@dataclass(frozen=True)
class Peak:
    """Total peak FLOP/s of a set of devices and where the number comes from."""

    flops: float
    source: str
    """``"spec: <device> bf16 dense x N"`` or ``"measured: <host> float32 matmul"``."""


@functools.cache
def measured_matmul_flops(size: int = 2048, dtype: str = "float32", repeats: int = 5) -> float:
    """Measure this host's matmul FLOP/s on the default device (best of ``repeats``)."""
    a = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def spec_peak(device_kind: str) -> float | None:
    """Datasheet dense bf16 FLOP/s of one chip of ``device_kind``, or None if unknown."""
    for name, flops in SPEC_PEAK_BF16:
        if name.lower() in device_kind.lower():
            return flops
    return None


def peak_flops(devices: list | None = None) -> Peak:
    """Total peak FLOP/s of ``devices`` (default all local devices), said which kind.

    CPU devices (fake ones included) share one host, so their peak is the host's measured
    matmul rate, not a multiple of it. An accelerator missing from ``SPEC_PEAK_BF16`` is
    measured too, per chip.
    """
    devices = devices or jax.local_devices()
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        return Peak(measured_matmul_flops(), "measured: this host's float32 matmul")
    flops = spec_peak(kind)
    if flops is not None:
        return Peak(flops * len(devices), f"spec: {kind} bf16 dense x {len(devices)}")
    return Peak(
        measured_matmul_flops() * len(devices),
        f"measured: {kind} float32 matmul x {len(devices)} (no datasheet entry)",
    )
