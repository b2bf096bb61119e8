"""RMSNorm on the GPU; the twin of reference/norm.py.  Kernel: gpu/kernels/rms_norm.cu.  Shapes: reference/__init__.py.

BLOCK_NORM_EPS is the reference's (HF's block norms use eps=1e-6 whatever config.rms_norm_eps says).
"""

import numpy as np

from reference.norm import BLOCK_NORM_EPS

from .device import require_cupy
from .kernels import kernel

__all__ = ["BLOCK_NORM_EPS", "rms_norm"]

THREADS = 256  # per row; a multiple of 32 (the kernel's block reduction assumes whole warps)


def rms_norm(x, weight, eps, out=None):
    # x: [..., D] float32, weight: [D] float32 or bf16 bits (uint16) -> [..., D] float32 (into `out` if given;
    # out may be x itself)
    cp = require_cupy()
    dim = x.shape[-1]
    _check(cp, x, weight, out)
    x = cp.ascontiguousarray(x)
    if out is None:
        out = cp.empty_like(x)
    rows = x.size // dim if dim else 0
    if rows == 0:
        return out
    name = "rms_norm_bf16" if weight.dtype == cp.uint16 else "rms_norm_f32"
    weight = cp.ascontiguousarray(weight)
    kernel("rms_norm", name)((rows,), (THREADS,), (x, weight, out, np.int64(dim), np.float32(eps)))
    return out


def _check(cp, x, weight, out):
    if x.dtype != cp.float32:
        raise TypeError(f"rms_norm: x must be float32, got {x.dtype}")
    if weight.dtype not in (cp.float32, cp.uint16):
        raise TypeError(f"rms_norm: weight must be float32 or bf16 bits (uint16), got {weight.dtype}")
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: weight shape {weight.shape} does not match x's last dim {x.shape[-1:]}")
    if out is not None and (out.shape != x.shape or out.dtype != cp.float32 or not out.flags.c_contiguous):
        raise ValueError(f"rms_norm: out must be a C-contiguous float32 array of shape {x.shape}")
