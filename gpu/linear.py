"""Dense y = x @ W^T on the GPU (kv_proj, routers, lm_head): gpu/kernels/linear.cu, and the embedding lookup.
Shapes: reference/__init__.py.

No reference twin of its own: reference/ writes these as `x @ W.T` and `embed_tokens[ids]`.
"""

import numpy as np

from . import kernels
from .device import require_cupy

GEMV_MAX_ROWS = 8  # linear.cu's GEMV_MAX_ROWS: up to this many rows, stream W once per column (decode)
TILE = 64
GEMV_WARPS_PER_BLOCK = 8


def weight_suffix(w):
    """Kernel variant for a weight array: float32, or bf16 carried as uint16 bits."""
    if w.dtype == np.float32:
        return "f32w"
    if w.dtype == np.uint16:
        return "bf16w"
    raise TypeError(f"GPU weights must be float32 or bf16 (uint16 bits), got {w.dtype}")


def check_linear(x, w, out):
    # x: [M, Kin], w: [Nout, Kin], out: [M, Nout] float32 or None -> the weight's kernel suffix.
    # Host-side only (shapes, dtypes, flags, which NumPy and CuPy arrays share), so CPU tests run it.
    # The kernels read w and out as row-major with a pitch of Kin and Nout: a transposed or sliced view would be
    # read wrongly, and copying a weight on every call (lm_head: V x D) would be a hidden cost, hence errors.
    if x.ndim != 2 or w.ndim != 2:
        raise ValueError(f"linear: x and the weight must be 2-D, got shapes {tuple(x.shape)} and {tuple(w.shape)}")
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"linear: x has {x.shape[1]} features but the weight is {tuple(w.shape)}")
    if not w.flags.c_contiguous:
        raise ValueError(f"linear: the weight {tuple(w.shape)} must be C-contiguous (row-major, rows of Kin), got "
                         f"strides {w.strides}; pass a contiguous copy made once, not a transposed or sliced view")
    if out is not None:
        expected = (x.shape[0], w.shape[0])
        if out.shape != expected or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"linear: out must be a C-contiguous float32 array of shape [M, Nout] = {expected}, "
                             f"got {out.dtype} {tuple(out.shape)} with strides {out.strides}")
    return weight_suffix(w)


def launch_shape(m_rows, n_out):
    """(kernel algorithm, grid, block) from the shapes only, so no host sync is needed."""
    if m_rows <= GEMV_MAX_ROWS:
        return "gemv", (-(-n_out // GEMV_WARPS_PER_BLOCK),), (32 * GEMV_WARPS_PER_BLOCK,)
    return "tiled", (-(-n_out // TILE), -(-m_rows // TILE)), (256,)


def linear(x, w, out=None):
    # x: [M, Kin] float32, w: [Nout, Kin] float32 or bf16 bits (C-contiguous), out: [M, Nout] float32 or None
    # -> [M, Nout] float32
    suffix = check_linear(x, w, out)
    cp = require_cupy()
    m_rows, k_in = x.shape
    n_out = w.shape[0]
    x = cp.ascontiguousarray(x, dtype=cp.float32)
    out = cp.empty((m_rows, n_out), cp.float32) if out is None else out
    if m_rows == 0:
        return out
    algorithm, grid, block = launch_shape(m_rows, n_out)
    kernels.kernel("linear", f"linear_{algorithm}_{suffix}")(
        grid, block, (x, w, out, np.int64(m_rows), np.int64(n_out), np.int64(k_in)))
    return out


def embed(table, input_ids):
    # table: [V, D] float32 or bf16 bits, input_ids: [B, T] device int64 -> [B, T, D] float32
    cp = require_cupy()
    rows = table[input_ids]
    if rows.dtype == cp.uint16:
        return (rows.astype(cp.uint32) << 16).view(cp.float32)
    return rows
