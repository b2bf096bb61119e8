"""cudasim: run CUDA C++ kernels on the CPU, with CUDA's rules checked. A CuPy-shaped module (see README.md).

    import cudasim as cp
    kernel = cp.RawModule(code=source).get_function("my_kernel")
    kernel((blocks,), (threads,), (x, y, np.int64(n)))

Arrays are NumPy underneath; kernels are compiled from the unmodified .cu source by the host C++ compiler and run
one fiber per CUDA thread (cudasim/runtime/core.cpp).
"""

import numpy as _np

from . import cuda, random  # noqa: F401
from .array import (arange, array, asarray, ascontiguousarray, asnumpy, empty, empty_like, full, full_like,  # noqa
                    ndarray, ones, zeros, zeros_like)
from .kernel import KernelError, RawModule  # noqa: F401
from .memory import get_default_memory_pool  # noqa: F401
from .compiler import CompileError  # noqa: F401

__version__ = "0.1 (cudasim)"

nan, inf, pi, newaxis = _np.nan, _np.inf, _np.pi, None
float16, float32, float64 = _np.float16, _np.float32, _np.float64
int8, int16, int32, int64 = _np.int8, _np.int16, _np.int32, _np.int64
uint8, uint16, uint32, uint64 = _np.uint8, _np.uint16, _np.uint32, _np.uint64
bool_ = _np.bool_
dtype = _np.dtype


def _device_function(name):
    fn = getattr(_np, name)

    def call(*args, **kwargs):
        return fn(*args, **kwargs)  # dispatched to ndarray.__array_function__ / __array_ufunc__
    call.__name__ = name
    return call


for _name in ("exp", "log", "sqrt", "abs", "maximum", "minimum", "isfinite", "isnan", "isinf", "where", "argmax",
              "argmin", "take_along_axis", "concatenate", "stack", "array_equal", "allclose", "sum", "max", "min",
              "mean", "cumsum", "sort", "argsort", "clip", "tanh", "square", "matmul", "dot", "einsum", "broadcast_to",
              "expand_dims", "squeeze", "reshape", "transpose", "take", "all", "any", "count_nonzero", "unique",
              "zeros_like", "ones_like", "logical_and", "logical_or", "logical_not", "equal", "not_equal", "less",
              "greater", "floor", "ceil", "round", "log1p", "expm1", "sign", "negative"):
    if _name not in globals():
        globals()[_name] = _device_function(_name)


def __getattr__(name):
    raise AttributeError(f"cudasim does not provide cupy.{name}: the CPU emulator covers the CuPy API its users "
                         "call (see cudasim/README.md); add it there, or run on CuPy")
