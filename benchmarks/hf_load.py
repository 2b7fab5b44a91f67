"""Load time and peak host memory of ``jaxstack.hf.load`` on a ~1 GB Hugging Face checkpoint.

Writes a random Llama checkpoint (bfloat16, ~1 GB, split over several safetensors files with
an index) unless one is already in ``--dir``, then loads it in a fresh process per scenario
and reports load seconds, the bytes of the placed params (every device's
shards), the largest tensor, and the peak resident memory during the load beyond the
process's memory before it and beyond the placed params. On CPU the "devices" live in host
memory, so the params' own bytes are subtracted; what remains is the loader's overhead,
which should stay under 2x the largest tensor plus a small constant. Each scenario prints a
JSON line on stderr as it finishes; the run's record (all scenarios) is printed as JSON on
stdout and written to ``benchmarks/results/`` (``benchmarks/common.py``).

    python benchmarks/hf_load.py                      # writes /tmp/jaxstack-hf-bench once
    python benchmarks/hf_load.py --dir DIR --keep     # reuse / keep the checkpoint

Peak memory: Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

if not __package__:  # run as a file, not with -m: make the `benchmarks` package importable
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from benchmarks import common

SCENARIOS = [  # (label, devices, fsdp, param dtype)
    ("1 device, bf16 params", 1, 1, "bfloat16"),
    ("1 device, bf16 file -> f32 params", 1, 1, "float32"),
    ("8 CPU devices, fsdp=8, bf16 params", 8, 8, "bfloat16"),
]


def bench_config():
    """A Llama shape of ~490M parameters: ~0.98 GB in bfloat16, largest tensor 131 MB."""
    from jaxstack.models import LlamaConfig

    return LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        num_layers=8,
        num_heads=16,
        num_kv_heads=4,
        intermediate_size=5632,
        extra={"hf_model_type": "llama"},
    )


def write_checkpoint(directory: Path) -> None:
    """Random bfloat16 weights streamed to safetensors shards of at most 400 MB."""
    import ml_dtypes
    import numpy as np

    from jaxstack import hf
    from jaxstack.hf.safetensors_io import write_safetensors
    from jaxstack.models.llama import hf_tensors

    config = bench_config()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf.config_to_hf(config, "bfloat16")))
    dtype = np.dtype(ml_dtypes.bfloat16)
    shapes = {}
    for entry in hf_tensors(config):
        for key in (entry.key,) if isinstance(entry.key, str) else entry.key:
            shapes[key] = entry.hf_shape
    rng = np.random.default_rng(0)

    def fetch(key: str) -> np.ndarray:
        return (0.02 * rng.standard_normal(shapes[key], np.float32)).astype(dtype)

    declared = [(key, shape, dtype) for key, shape in shapes.items()]
    write_safetensors(directory, declared, fetch, max_shard_bytes=400 * 2**20)


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(directory: Path, fsdp: int, param_dtype: str) -> dict:
    """Load once in this process; memory figures from /proc/self/status."""
    import jax
    import jax.numpy as jnp

    from jaxstack import hf
    from jaxstack.mesh import make_mesh
    from jaxstack.models.llama import hf_tensors

    jnp.zeros(8).block_until_ready()  # backend initialised before the baseline
    mesh = make_mesh(data=1, fsdp=fsdp) if fsdp > 1 else None
    specs = None if mesh is None else fsdp_specs
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _status_bytes("VmRSS")
    start = time.perf_counter()
    _, config, params = hf.load(directory, mesh=mesh, param_specs=specs, param_dtype=param_dtype)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    peak = _status_bytes("VmHWM")
    leaves = jax.tree.leaves(params)
    placed = sum(shard.data.nbytes for x in leaves for shard in x.addressable_shards)
    largest = max(x.nbytes for x in leaves)
    largest_file = max(2 * math.prod(entry.hf_shape) for entry in hf_tensors(config))  # bf16
    overhead = peak - before - placed
    return {
        "load_seconds": round(seconds, 2),
        "placed_param_bytes": placed,
        "largest_tensor_bytes": largest,
        "largest_file_tensor_bytes": largest_file,
        "peak_rss_growth_bytes": peak - before,
        "overhead_bytes": overhead,
        "overhead_over_largest_tensor": round(overhead / largest, 3),
        "devices": len(jax.devices()),
    }


def fsdp_specs(abstract, mesh):
    """Shard every matrix over its first axis that the fsdp axis divides; vectors replicated."""
    import jax
    from jax.sharding import PartitionSpec

    def spec(x):
        n = mesh.shape["fsdp"]
        axis = next((i for i, d in enumerate(x.shape) if d % n == 0), None) if x.ndim > 1 else None
        return PartitionSpec(*("fsdp" if i == axis else None for i in range(x.ndim)))

    return jax.tree.map(spec, abstract)


def main() -> None:
    """Write the checkpoint if needed, load it once per scenario, record the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/jaxstack-hf-bench", help="checkpoint location")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards")
    parser.add_argument("--measure", nargs=2, metavar=("FSDP", "DTYPE"), help=argparse.SUPPRESS)
    common.add_results_argument(parser)
    args = parser.parse_args()
    directory = Path(args.dir)
    if args.measure:
        print(json.dumps(measure(directory, int(args.measure[0]), args.measure[1])))
        return
    config = bench_config()
    report = {
        "checkpoint": {
            "params": config.num_params(),
            "layers": config.num_layers,
            "hidden_size": config.hidden_size,
            "heads": f"{config.num_heads} / {config.num_kv_heads} KV",
            "intermediate_size": config.intermediate_size,
            "vocab_size": config.vocab_size,
            "file_dtype": "bfloat16",
        },
        "scenarios": [],
    }
    if not (directory / "config.json").is_file():
        start = time.perf_counter()
        write_checkpoint(directory)
        report["checkpoint"]["write_seconds"] = round(time.perf_counter() - start, 1)
    files = sorted(directory.glob("*.safetensors"))
    report["checkpoint"]["bytes"] = sum(p.stat().st_size for p in files)
    report["checkpoint"]["files"] = len(files)
    try:
        for label, devices, fsdp, dtype in SCENARIOS:
            env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
            env["XLA_FLAGS"] = common.with_device_count(env.get("XLA_FLAGS", ""), devices)
            command = [sys.executable, __file__, "--dir", str(directory)]
            command += ["--measure", str(fsdp), dtype]
            result = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            scenario = {"scenario": label, **json.loads(result.stdout.splitlines()[-1])}
            print(json.dumps(scenario), file=sys.stderr)
            report["scenarios"].append(scenario)
    finally:
        if not args.keep:
            shutil.rmtree(directory)
    versions = common.versions("numpy", "ml_dtypes", "safetensors")
    common.write_result("hf_load", report, versions, common.results_dir(args.results_dir, False))


if __name__ == "__main__":
    main()
