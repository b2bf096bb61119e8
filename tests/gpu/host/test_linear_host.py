"""Host-side checks of gpu.linear, on the CPU with NumPy arrays (no CuPy, no GPU).

check_linear reads only shapes, dtypes and flags, which NumPy and CuPy arrays share, so NumPy stands in for the
device arrays here. The kernels read W and out as row-major (pitch Kin and Nout): a transposed or sliced weight, or
an `out` of the wrong shape, dtype or layout, must be refused before any launch. Also: the Python constants agree
with gpu/kernels/linear.cu's #defines.
"""

import os
import re

import numpy as np
import pytest

from gpu import linear as gl
from gpu.kernels import KERNEL_DIR

M, KIN, NOUT = 3, 16, 24


def arrays(rng, w_dtype=np.float32):
    # -> x [M, Kin] float32, w [Nout, Kin]
    return rng.standard_normal((M, KIN), dtype=np.float32), rng.standard_normal((NOUT, KIN)).astype(w_dtype)


@pytest.mark.parametrize("w_dtype,suffix", [(np.float32, "f32w"), (np.uint16, "bf16w")])
def test_contiguous_weight_and_out_pass(rng, w_dtype, suffix):
    x, w = arrays(rng, w_dtype)
    assert gl.check_linear(x, w, None) == suffix
    assert gl.check_linear(x, w, np.empty((M, NOUT), np.float32)) == suffix
    assert gl.check_linear(x, w[2:5], np.empty((M, 3), np.float32)) == suffix  # a row slice is still row-major


def test_transposed_weight_is_refused(rng):
    x, _ = arrays(rng)
    w_t = rng.standard_normal((KIN, NOUT), dtype=np.float32).T  # [Nout, Kin], column-major
    with pytest.raises(ValueError, match="weight .* must be C-contiguous"):
        gl.check_linear(x, w_t, None)


def test_column_sliced_weight_is_refused(rng):
    x, _ = arrays(rng)
    w_wide = rng.standard_normal((NOUT, 2 * KIN), dtype=np.float32)
    with pytest.raises(ValueError, match="weight .* must be C-contiguous"):
        gl.check_linear(x, w_wide[:, :KIN], None)  # rows of Kin inside a pitch of 2*Kin


@pytest.mark.parametrize("bad_out", [np.empty((M, NOUT + 1), np.float32), np.empty((M, NOUT), np.float64),
                                     np.empty((NOUT, M), np.float32).T], ids=["shape", "dtype", "layout"])
def test_bad_out_is_refused(rng, bad_out):
    x, w = arrays(rng)
    with pytest.raises(ValueError, match=r"out must be a C-contiguous float32 array of shape \[M, Nout\]"):
        gl.check_linear(x, w, bad_out)


def test_mismatched_features_and_dtypes_are_refused(rng):
    x, w = arrays(rng)
    with pytest.raises(ValueError, match=f"x has {KIN - 1} features"):
        gl.check_linear(x[:, 1:].copy(), w, None)
    with pytest.raises(ValueError, match="must be 2-D"):
        gl.check_linear(x[0], w, None)
    with pytest.raises(TypeError, match="float32 or bf16"):
        gl.check_linear(x, w.astype(np.float64), None)


def test_constants_match_the_kernel():
    with open(os.path.join(KERNEL_DIR, "linear.cu")) as f:
        defines = dict(re.findall(r"#define (\w+) (\d+)", f.read()))
    assert int(defines["GEMV_MAX_ROWS"]) == gl.GEMV_MAX_ROWS
    assert int(defines["TILE"]) == gl.TILE
