"""Loads gpu/kernels/<op>.cu with cupy.RawModule(code=...), once per op.

Every .cu file is self-contained CUDA C++ apart from `common.cuh` in this folder (bf16 bit conversions, silu,
warp reductions); kernels are `extern "C"` so NVRTC (here) and nvcc (tests/gpu/host/test_compile.py, sm_80 and
sm_90, -Werror) compile the same source. No CUDA toolkit headers are included, so NVRTC needs no include path
beyond this folder.
"""

import functools
import os

from ..device import require_cupy

KERNEL_DIR = os.path.dirname(os.path.abspath(__file__))
NVRTC_OPTIONS = ("--std=c++17", f"-I{KERNEL_DIR}")


def source(op):
    """The CUDA source of one op (also shown by the GPU notebook)."""
    with open(os.path.join(KERNEL_DIR, f"{op}.cu")) as f:
        return f.read()


@functools.cache
def module(op):
    cupy = require_cupy()
    return cupy.RawModule(code=source(op), options=NVRTC_OPTIONS)


def kernel(op, name):
    """A compiled kernel: kernel("rms_norm", "rms_norm_f32")(grid, block, args, shared_mem=...)."""
    return module(op).get_function(name)


def ops():
    """Every op that has a .cu file."""
    return sorted(f[:-3] for f in os.listdir(KERNEL_DIR) if f.endswith(".cu"))
