"""Peak FLOP/s of the devices, for model-FLOPs-utilisation (MFU) estimates."""

import functools
import time

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per chip from vendor datasheets.
_PEAK_BF16 = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}


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


def peak_flops(devices: list | None = None) -> float:
    """Total peak FLOP/s of ``devices`` (default all local devices).

    Accelerators: datasheet bf16 peak per chip times the chip count. CPU: a measured matmul
    peak of the whole host, since fake CPU devices share the same cores.
    """
    devices = devices or jax.local_devices()
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        return measured_matmul_flops()
    for name, flops in _PEAK_BF16.items():
        if name.lower() in kind.lower():
            return flops * len(devices)
    return measured_matmul_flops() * len(devices)
