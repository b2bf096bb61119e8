"""Dense y = x @ W^T on the GPU (kv_proj, routers, lm_head): gpu/kernels/linear.cu.  Shapes: reference/__init__.py.

No reference twin of its own: reference/ writes these as `x @ W.T`.
"""

import numpy as np

from . import kernels
from .device import require_cupy

GEMV_MAX_ROWS = 8  # linear.cu's GEMV_MAX_ROWS: up to this many rows, stream W once per column (decode)
TILE = 64
GEMV_WARPS_PER_BLOCK = 8


def weight_suffix(w):
    """Kernel variant for a weight array: float32, or bf16 carried as uint16 bits."""
    cp = require_cupy()
    if w.dtype == cp.float32:
        return "f32w"
    if w.dtype == cp.uint16:
        return "bf16w"
    raise TypeError(f"GPU weights must be float32 or bf16 (uint16 bits), got {w.dtype}")


def launch_shape(m_rows, n_out):
    """(kernel algorithm, grid, block) from the shapes only, so no host sync is needed."""
    if m_rows <= GEMV_MAX_ROWS:
        return "gemv", (-(-n_out // GEMV_WARPS_PER_BLOCK),), (32 * GEMV_WARPS_PER_BLOCK,)
    return "tiled", (-(-n_out // TILE), -(-m_rows // TILE)), (256,)


def linear(x, w, out=None):
    # x: [M, Kin] float32, w: [Nout, Kin] float32 or bf16 bits -> [M, Nout] float32
    cp = require_cupy()
    m_rows, k_in = x.shape
    n_out = w.shape[0]
    if w.shape[1] != k_in:
        raise ValueError(f"linear: x has {k_in} features but the weight is {tuple(w.shape)}")
    x = cp.ascontiguousarray(x, dtype=cp.float32)
    out = cp.empty((m_rows, n_out), cp.float32) if out is None else out
    if m_rows == 0:
        return out
    algorithm, grid, block = launch_shape(m_rows, n_out)
    kernels.kernel("linear", f"linear_{algorithm}_{weight_suffix(w)}")(
        grid, block, (x, w, out, np.int64(m_rows), np.int64(n_out), np.int64(k_in)))
    return out
