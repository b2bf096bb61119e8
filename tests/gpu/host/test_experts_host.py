"""Host-side logic of gpu/experts.py, without a GPU: path selection, kernel names, launch geometry, shape errors.

The kernels themselves are checked on a GPU by tests/gpu/device/test_kernels_experts.py. Here: the choice of path is a
pure function of shapes and the compute capability; every kernel name the host can ask for is an entry point of
gpu/kernels/expert_gemm.cu (compiled to PTX with nvcc when it is installed); the tiled grid covers every row
block the routing plan can produce; the geometry constants agree with the .cu #defines.
"""

import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from gpu import experts
from gpu.kernels import KERNEL_DIR, source
from gpu.routing import block_offsets_from_counts, max_blocks

F32, BF16 = np.dtype(np.float32), np.dtype(np.uint16)


# ---------------------------------------------------------------------------------------------- path choice

@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("cc", [75, 80, 90])
def test_decode_sizes_use_gemv(dtype, cc):
    for n in (1, 2, experts.GEMV_MAX_TOKENS):
        assert experts.select_path(n, dtype, cc) == "gemv"


def test_prefill_path_depends_on_weights_and_device():
    n = experts.GEMV_MAX_TOKENS + 1
    assert experts.select_path(n, BF16, 80) == "mma"
    assert experts.select_path(n, BF16, 90) == "mma"
    assert experts.select_path(n, BF16, 75) == "simt"  # no bf16 mma.sync before sm_80
    assert experts.select_path(n, F32, 90) == "simt"  # float32 weights stay exact float32 FMAs


@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.int16])
def test_unsupported_weight_dtypes_are_rejected(dtype):
    with pytest.raises(ValueError, match="float32 or bf16"):
        experts.select_path(100, np.dtype(dtype), 90)


def test_forced_paths_are_checked():
    experts.check_path("simt", F32, 75)
    experts.check_path("gemv", BF16, 75)
    experts.check_path("mma", BF16, 80)
    with pytest.raises(ValueError, match="bf16 weights"):
        experts.check_path("mma", F32, 90)
    with pytest.raises(ValueError, match="compute capability"):
        experts.check_path("mma", BF16, 75)
    with pytest.raises(ValueError, match="unknown expert GEMM path"):
        experts.check_path("tensor", BF16, 90)


# ------------------------------------------------------------------------------------------- kernel names

def all_launchable_names():
    names = {"expert_combine_f32"}
    for variant in experts.VARIANTS:
        for path in experts.PATHS:
            for dtype in (F32, BF16):
                if path == "mma" and dtype == F32:
                    continue
                names.add(experts.kernel_name(path, variant, dtype))
    return names


def test_kernel_names():
    assert experts.kernel_name("mma", "moe_in", BF16) == "expert_gemm_mma_moe_in_bf16w"
    assert experts.kernel_name("simt", "moa_reduce", F32) == "expert_gemm_simt_moa_reduce_f32w"
    assert experts.kernel_name("gemv", "moe_out", BF16) == "expert_gemm_gemv_moe_out_bf16w"
    assert experts.kernel_name("naive", "moa_map", F32) == "expert_gemm_naive_moa_map_f32w"
    with pytest.raises(ValueError, match="unknown expert GEMM variant"):
        experts.kernel_name("simt", "moe", F32)
    assert len(all_launchable_names()) == 1 + 4 * 7  # naive, simt, gemv x 2 weight kinds, mma bf16 only


NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)


@pytest.mark.skipif(NVCC is None, reason="nvcc not installed: the entry-point check compiles expert_gemm.cu to PTX")
def test_every_launchable_kernel_is_an_entry_point(tmp_path):
    # The names are built by macros, so compile and read the PTX's .entry list (extern "C": unmangled).
    ptx = tmp_path / "expert_gemm.ptx"
    subprocess.run([NVCC, "-std=c++17", "-arch=sm_80", "-ptx", "-I", KERNEL_DIR, "-o", str(ptx),
                    os.path.join(KERNEL_DIR, "expert_gemm.cu")], check=True, capture_output=True)
    entries = set(re.findall(r"\.entry\s+(\w+)", ptx.read_text()))
    assert entries == all_launchable_names()


def test_geometry_constants_match_the_kernel_source():
    defines = dict(re.findall(r"^#define (\w+) (\d+)\b", source("expert_gemm"), flags=re.M))
    assert int(defines["SIMT_BN"]) == int(defines["MMA_BN"]) == experts.TILE_COLS
    assert int(defines["SIMT_THREADS"]) == experts.SIMT_THREADS
    assert int(defines["MMA_THREADS"]) == experts.MMA_THREADS
    assert int(defines["GEMV_WARPS"]) == experts.GEMV_COLS
    assert int(defines["GEMV_THREADS"]) == 32 * int(defines["GEMV_WARPS"])
    assert experts.GEMV_THREADS == 32 * experts.GEMV_COLS
    assert int(defines["NAIVE_THREADS"]) == experts.NAIVE_THREADS


# ------------------------------------------------------------------------------------------ launch geometry

def test_gemv_grid_is_experts_by_column_groups():
    grid, block = experts.launch_config("gemv", num_slots=6, num_experts=8, block_rows=64, n_out=2049)
    assert grid == (8, 257) and block == (256,)


def test_naive_grid_has_a_thread_per_output():
    grid, block = experts.launch_config("naive", num_slots=6, num_experts=8, block_rows=64, n_out=2049)
    assert grid == (-(-6 * 2049 // 256),) and block == (256,)
    assert grid[0] * block[0] >= 6 * 2049  # fewer would leave outputs to the grid-stride loop, which is for huge sizes
    huge, _ = experts.launch_config("naive", num_slots=1 << 20, num_experts=8, block_rows=64, n_out=4096)
    assert huge == (experts.NAIVE_MAX_BLOCKS,)  # the kernel's grid-stride loop covers the rest
    assert experts.launch_config("naive", 0, 8, 64, 64)[0] == (1,)


def test_naive_is_never_chosen_but_always_allowed():
    for n in (1, 16, 17, 5000):
        for dtype in (F32, BF16):
            for cc in (75, 90):
                assert experts.select_path(n, dtype, cc) != "naive"
                experts.check_path("naive", dtype, cc)


@pytest.mark.parametrize("path,threads", [("simt", 256), ("mma", 128)])
def test_tiled_grid(path, threads):
    grid, block = experts.launch_config(path, num_slots=1000, num_experts=8, block_rows=64, n_out=130)
    assert grid == (max_blocks(1000, 8, 64), 3) and block == (threads,)


def test_tiled_grid_covers_every_row_block(rng):
    # Whatever the routing, the plan's row blocks (block_offsets[E]) fit in the launched grid.x.
    for _ in range(200):
        num_experts = int(rng.integers(1, 12))
        top_k = int(rng.integers(1, num_experts + 1))
        num_tokens = int(rng.integers(0, 300))
        block_rows = int(rng.choice([16, 64, 128]))
        choices = np.stack([rng.permutation(num_experts)[:top_k] for _ in range(num_tokens)]).reshape(-1) \
            if num_tokens else np.zeros(0, np.int64)
        counts = np.bincount(choices, minlength=num_experts).astype(np.int64)
        offsets = block_offsets_from_counts(np, counts, block_rows)
        grid, _ = experts.launch_config("simt", num_tokens * top_k, num_experts, block_rows, 64)
        assert offsets[-1] <= grid[0]


def test_grid_limits_are_checked():
    with pytest.raises(ValueError, match="exceeds the CUDA limits"):
        experts.launch_config("gemv", 4, 8, 64, n_out=8 * 65536)
    experts.launch_config("gemv", 4, 8, 64, n_out=8 * 65535)


def test_combine_launch():
    assert experts.combine_launch(1, 1) == ((1,), (256,))
    assert experts.combine_launch(3, 100) == ((2,), (256,))
    assert experts.combine_launch(10**6, 10**4) == ((experts.COMBINE_MAX_BLOCKS,), (256,))  # grid-stride past this


# --------------------------------------------------------------------------------------------- shape checks

def test_out_features():
    assert experts.out_features("moe_in", (8, 2 * 45, 37)) == 45
    assert experts.out_features("moe_out", (8, 37, 45)) == 37
    with pytest.raises(ValueError, match="2F rows"):
        experts.out_features("moe_in", (8, 45, 37))


def test_check_shapes():
    n, k, e = 10, 2, 4
    experts.check_shapes("moe_in", (n, 16), (e, 24, 16), n * k, k, e)  # gathers by token: [N, D]
    experts.check_shapes("moa_map", (n, 16), (e, 24, 16), n * k, k, e)
    experts.check_shapes("moe_out", (n * k, 12), (e, 16, 12), n * k, k, e)  # one row per slot: [NK, F]
    experts.check_shapes("moa_reduce", (n * k, 12), (e, 16, 12), n * k, k, e)
    with pytest.raises(ValueError, match="N tokens=10"):
        experts.check_shapes("moe_in", (n * k, 16), (e, 24, 16), n * k, k, e)
    with pytest.raises(ValueError, match="N\\*K slots=20"):
        experts.check_shapes("moe_out", (n, 12), (e, 16, 12), n * k, k, e)
    with pytest.raises(ValueError, match="in=12"):
        experts.check_shapes("moa_reduce", (n * k, 13), (e, 16, 12), n * k, k, e)
    with pytest.raises(ValueError, match="E=4"):
        experts.check_shapes("moa_map", (n, 16), (e + 1, 24, 16), n * k, k, e)
    with pytest.raises(ValueError, match="2F rows"):
        experts.check_shapes("moe_in", (n, 16), (e, 23, 16), n * k, k, e)
