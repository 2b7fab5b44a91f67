"""The Triton tile tables: complete, well formed, within shared memory, overridable.

Shared memory per program is estimated from what each kernel keeps in it: its resident
dot operands, ``num_stages`` buffers of every tile its inner loop loads (Triton's
software pipelining), and the ``[bq, bk]`` probability tiles fed back into a second dot::

    forward  resident Q [bq, d];        pipelined K, V [bk, d];   one tile  P
    dK/dV    resident K, V [bk, d];     pipelined Q, dO [bq, d];  two tiles P^T, dS^T
    dQ       resident Q, dO [bq, d];    pipelined K, V [bk, d];   one tile  dS
    decode   resident q [g, d];         pipelined K, V [bk, d];   one tile  P  [g, bk]

(``d`` padded to a power of two, at the input's element size). An estimate, not
Triton's allocation: layout-conversion scratch is small next to these tiles, and
compiling on the GPU is the real check. The estimates are listed in docs/kernels.md.
"""

from pathlib import Path

import jax.numpy as jnp
import pytest

from pallas_kernels.attention import blocks, decode_gpu, flash_gpu
from pallas_kernels.attention.flash_gpu import BlockSizes

KIB = 1024
H100_SMEM = 227 * KIB  # largest opt-in shared memory of one block (228 KiB per SM)
A100_SMEM = 163 * KIB  # the same on A100 (164 KiB per SM)
DECODE_GROUPS = 16  # query heads per kv head in one decode tile (GQA up to 16)
DOCS = Path(__file__).parents[2] / "docs" / "kernels.md"
DTYPE_NAMES = {2: "bf16/fp16", 4: "fp32"}
KERNEL_NAMES = {"fwd": "forward", "dkv": "dK/dV", "dq": "dQ"}


def flash_smem_bytes(kernel: str, t: BlockSizes, head_dim: int, itemsize: int) -> int:
    """Shared-memory estimate of one flash kernel program (module docstring)."""
    resident, pipelined, prob_tiles = {
        "fwd": (t.block_q, 2 * t.block_kv, 1),
        "dkv": (2 * t.block_kv, 2 * t.block_q, 2),
        "dq": (2 * t.block_q, 2 * t.block_kv, 1),
    }[kernel]
    rows = resident + t.num_stages * pipelined
    return itemsize * (rows * head_dim + prob_tiles * t.block_q * t.block_kv)


def decode_smem_bytes(block_kv: int, head_dim: int, itemsize: int, groups: int) -> int:
    """Shared-memory estimate of one decode kernel program (module docstring)."""
    rows = groups + decode_gpu.NUM_STAGES * 2 * block_kv
    return itemsize * (rows * head_dim + groups * block_kv)


KEYS = [(d, size) for size in (2, 4) for d in (64, 128, 256)]
FLASH_ENTRIES = [
    (key, kernel, tiles)
    for key in KEYS
    for kernel, tiles in zip(("fwd", "dkv", "dq"), flash_gpu.TILE_TABLE[key], strict=True)
]


def test_tables_have_exactly_the_rows_lookups_produce():
    assert sorted(flash_gpu.TILE_TABLE) == sorted(KEYS)
    assert sorted(decode_gpu.DECODE_BLOCK_KV) == sorted(KEYS)
    cases = {
        (40, jnp.float32): (64, 4),
        (64, jnp.bfloat16): (64, 2),
        (96, jnp.float16): (128, 2),
        (128, jnp.float32): (128, 4),
        (200, jnp.bfloat16): (256, 2),
        (256, jnp.float32): (256, 4),
    }
    for (head_dim, dtype), key in cases.items():
        assert blocks.triton_table_key(head_dim, dtype) == key


@pytest.mark.parametrize(("key", "kernel", "tiles"), FLASH_ENTRIES, ids=str)
def test_flash_entry_fits_shared_memory(key, kernel, tiles):
    head_dim, itemsize = key
    for block in (tiles.block_q, tiles.block_kv):
        assert block >= 16 and block & (block - 1) == 0, tiles
    assert tiles.num_warps in (4, 8) and tiles.num_stages in (2, 3), tiles
    smem = flash_smem_bytes(kernel, tiles, head_dim, itemsize)
    assert smem <= H100_SMEM, f"{key} {kernel} {tiles}: {smem / KIB:.0f} KiB > H100"
    assert smem <= A100_SMEM, f"{key} {kernel} {tiles}: {smem / KIB:.0f} KiB > A100"


@pytest.mark.parametrize("key", KEYS, ids=str)
def test_decode_entry_fits_shared_memory(key):
    head_dim, itemsize = key
    block_kv = decode_gpu.DECODE_BLOCK_KV[key]
    assert block_kv >= 16 and block_kv & (block_kv - 1) == 0
    smem = decode_smem_bytes(block_kv, head_dim, itemsize, DECODE_GROUPS)
    assert smem <= A100_SMEM, f"{key} block_kv={block_kv}: {smem / KIB:.0f} KiB > A100"
    # MQA-like groups of 64 query heads per kv head still fit an H100.
    assert decode_smem_bytes(block_kv, head_dim, itemsize, 64) <= H100_SMEM


def test_the_estimate_counts_what_it_says():
    # bf16, head_dim 128, forward 128 x 64 with 2 stages: Q 32 KiB + 2 x (K + V) 64 KiB
    # + P 16 KiB.
    assert flash_smem_bytes("fwd", BlockSizes(128, 64, 8, 2), 128, 2) == 112 * KIB
    # dK/dV 32 x 128: K, V 64 KiB + 2 x (Q + dO) 32 KiB + P^T, dS^T 16 KiB.
    assert flash_smem_bytes("dkv", BlockSizes(32, 128, 8, 2), 128, 2) == 112 * KIB
    # Too big a tile is caught: 128 x 128 at head_dim 256 in float32 with 3 stages.
    assert flash_smem_bytes("fwd", BlockSizes(128, 128, 8, 3), 256, 4) > H100_SMEM


def test_block_sizes_come_from_the_table_and_overrides_win():
    fwd, dkv, dq = flash_gpu.block_sizes(128, jnp.bfloat16, 4096, 4096)
    assert (fwd, dkv, dq) == flash_gpu.TILE_TABLE[(128, 2)]
    assert fwd == BlockSizes(128, 64, 8, 2)
    # Overrides set every kernel's tiles; warps and stages stay the table's.
    tiles = flash_gpu.block_sizes(64, jnp.float32, 4096, 4096, block_q=32, block_kv=16)
    for t, table in zip(tiles, flash_gpu.TILE_TABLE[(64, 4)], strict=True):
        assert (t.block_q, t.block_kv) == (32, 16)
        assert (t.num_warps, t.num_stages) == (table.num_warps, table.num_stages)
    # Tiles shrink to short sequences, never below 16.
    fwd, dkv, dq = flash_gpu.block_sizes(64, jnp.bfloat16, 40, 10)
    assert (fwd.block_q, fwd.block_kv, dkv.block_q, dkv.block_kv) == (64, 16, 32, 16)


def test_decode_block_kv_divides_the_cache():
    assert decode_gpu.default_block_kv(4096, 128, jnp.bfloat16) == 128
    assert decode_gpu.default_block_kv(4096, 256, jnp.bfloat16) == 64
    assert decode_gpu.default_block_kv(4096, 128, jnp.float32) == 64
    assert decode_gpu.default_block_kv(96, 64, jnp.bfloat16) == 32
    assert decode_gpu.default_block_kv(200, 64, jnp.bfloat16) == 0  # padded instead


@pytest.mark.parametrize(
    "call",
    [
        lambda: flash_gpu.block_sizes(512, jnp.bfloat16, 64, 64),
        lambda: decode_gpu.default_block_kv(64, 320, jnp.float32),
    ],
    ids=["flash", "decode"],
)
def test_head_dim_past_the_table_names_the_fix(call):
    with pytest.raises(ValueError, match="head_dim <= 256.*implementation='xla'"):
        call()


def test_docs_list_the_table_and_its_estimates():
    """docs/kernels.md's tile tables are this code's, with these estimates."""
    docs = DOCS.read_text()
    for (head_dim, itemsize), kernel, t in FLASH_ENTRIES:
        smem = flash_smem_bytes(kernel, t, head_dim, itemsize) / KIB
        row = (
            f"| {head_dim} | {DTYPE_NAMES[itemsize]} | {KERNEL_NAMES[kernel]} | "
            f"{t.block_q} x {t.block_kv} | {t.num_warps} | {t.num_stages} | {smem:.0f} |"
        )
        assert row in docs, row
    for (head_dim, itemsize), block_kv in decode_gpu.DECODE_BLOCK_KV.items():
        smem = decode_smem_bytes(block_kv, head_dim, itemsize, DECODE_GROUPS) / KIB
        row = f"| {head_dim} | {DTYPE_NAMES[itemsize]} | {block_kv} | {smem:.0f} |"
        assert row in docs, row
