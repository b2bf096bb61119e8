"""The big-checkpoint runtime: weights left in the checkpoint file, converted only where the forward reads them.

Shapes: reference/__init__.py. Notebook: notebooks/05_the_whole_model.ipynb. docs/big-models.md.

A bf16 checkpoint run in float32 needs twice its file size once converted: 34 GB for jetmoe-8b, more than the
machines this project runs on. So `select_tensors` (reference/io/checkpoint.py) converts at load only when the
converted tensors fit a memory budget; otherwise each big matrix stays memory-mapped in the file's dtype as a
`MappedWeight`, and only what the forward touches is converted:
- `stack[e]` of an expert stack [E, out, in] is expert e's slice, still in the file: nothing is read;
- `x @ w.T` (reference/linear.py, every weight product of the model) multiplies a prefill by the whole matrix,
  converted into a reusable buffer, and a decode step block by block, each block converted just before its
  product: the converted copy never outlives its matmul, and a decoded token reads only its routed experts' bytes;
- `w[ids]`, an embedding lookup, converts only the rows it returns.
The model code cannot tell the two apart: `x @ w.T`, `d_y @ w`, `w[e]` and `w[ids]` read the same, so the math
and the trace names do not change. A converted weight's product is NumPy's; a mapped one's decode product runs
block by block, so the two agree to float32 rounding (the order BLAS accumulates in depends on the product's
shape), which tests/reference/test_weights.py and test_memory.py check with a stated tolerance.
"""

import contextlib
import ctypes
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .safetensors import BF16
# Of the memory available at load, the share the converted weights may take before they stay in the file.
MEMORY_FRACTION = 0.5
# A decode step's block of weight rows: small enough to stay in cache from its conversion to its product (4 MiB
# decoded fastest of 1, 4 and 16: docs/benchmarks.md), and a multiple of BLOCK_ROWS rows (OpenBLAS gives other
# bits for some other block heights).
DECODE_BLOCK_BYTES = 4 << 20
BLOCK_ROWS = 64
DECODE_ROWS = 16  # x with at most this many rows is multiplied block by block
THREADS = min(2, os.cpu_count() or 1)  # NumPy releases the GIL in the shift and the matmul, so blocks overlap

_buffers = threading.local()


def _openblas():
    """The OpenBLAS NumPy is linked against, found among this process's libraries, or None (another BLAS)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line}
    except OSError:
        return None
    for path in sorted(paths):
        library = ctypes.CDLL(path)
        for prefix, suffix in [("scipy_openblas", "64_"), ("scipy_openblas", ""), ("openblas", "")]:
            setter, getter = f"{prefix}_set_num_threads{suffix}", f"{prefix}_get_num_threads{suffix}"
            if hasattr(library, setter) and hasattr(library, getter):
                return getattr(library, setter), getattr(library, getter)
    return None


_blas = _openblas()
# Blocks run on our threads only where each can call BLAS single-threaded: else OpenBLAS's own threads and ours
# fight over the cores, many times slower on 2 cores (docs/benchmarks.md).
_pool = ThreadPoolExecutor(THREADS - 1) if THREADS > 1 and _blas is not None else None
# A second pool for map_threads, so a shard's own block products (on _pool) never wait on the shards themselves.
_shard_pool = ThreadPoolExecutor(THREADS) if _pool is not None else None


@contextlib.contextmanager
def _single_threaded_blas():
    set_threads, get_threads = _blas
    before = get_threads()
    set_threads(1)
    try:
        yield
    finally:
        set_threads(before)


def map_threads(fn, items):
    """[fn(item) for item in items], on THREADS threads of their own with single-threaded BLAS (sequentially where
    BLAS threads cannot be set): for independent shards of work, such as value_and_grad's batch shards."""
    items = list(items)
    if _shard_pool is None or len(items) < 2:
        return [fn(item) for item in items]
    with _single_threaded_blas():
        return list(_shard_pool.map(fn, items))


def convert(src, out):
    # src: [...] in the file's dtype, out: [...] float32 or float64 -> out
    # bf16 is the upper half of a float32, so bf16 -> float32 is a 16-bit shift: widened to uint32 into the
    # preallocated buffer, then shifted in place. Exact, and faster than ml_dtypes' astype or a widening shift in
    # one ufunc, which NumPy runs through a buffered cast (docs/benchmarks.md; make bench-8b prints this rate).
    if src.dtype == BF16 and out.dtype == np.float32:
        bits = out.view(np.uint32)
        np.copyto(bits, src.view(np.uint16), casting="safe")
        np.left_shift(bits, 16, out=bits)
    else:
        np.copyto(out, src, casting="unsafe")
    return out


def available_memory():
    """Bytes the kernel could give this process now (MemAvailable), or None where /proc/meminfo is missing."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def converted(src, dtype):
    # src: [...] in the file's dtype -> [...] in dtype, in this thread's reusable buffer (grown, never shrunk),
    # valid until this thread converts again. A bf16 -> float32 buffer is one float32 longer than its contents and
    # takes a single widening cast: each bf16, widened to a uint32 and written 2 bytes into the buffer, puts its
    # 16 bits in the upper half of float32 i and its 16 zeros in the lower half of float32 i+1 (little-endian).
    # The first lower half is zero since allocation, so every float32 is exact, and it is faster than convert's
    # cast-then-shift (docs/benchmarks.md; make bench-8b prints both rates).
    count = src.size
    key = f"{np.dtype(dtype).str}-from-{src.dtype.str}"
    buf = getattr(_buffers, key, None)
    if buf is None or buf.size < count + 1:
        buf = np.zeros(count + 1, dtype)
        setattr(_buffers, key, buf)
    out = buf[:count].reshape(src.shape)
    if src.dtype == BF16 and out.dtype == np.float32 and sys.byteorder == "little":
        shifted = np.ndarray(count, np.uint32, buffer=buf, offset=2)  # [count] uint32, 2 bytes into buf
        np.copyto(shifted, src.reshape(-1).view(np.uint16), casting="safe")
        return out
    return convert(src, out)


class MappedWeight:
    """A tensor kept in the checkpoint file's dtype (read-only, memory-mapped), converted to `dtype` when used."""

    def __init__(self, data, dtype):
        self.data = data  # [...] memory-mapped, the file's dtype
        self.dtype = np.dtype(dtype)

    @property
    def shape(self):
        return self.data.shape

    @property
    def ndim(self):
        return self.data.ndim

    def __getitem__(self, key):
        # An expert of a stack stays in the file; anything else (rows by token id) is converted now.
        if self.data.ndim == 3 and isinstance(key, (int, np.integer)):
            return MappedWeight(self.data[key], self.dtype)
        picked = self.data[key]
        return convert(picked, np.empty(picked.shape, self.dtype))

    @property
    def T(self):
        """The transpose, as `x @ w.T` reads it: a MappedWeight brings its own product (mapped_linear)."""
        return _Transposed(self)

    def __array__(self, dtype=None, copy=None):
        """The whole tensor converted: for `d_y @ w` (a backward's product) and state_dict users (save_pretrained,
        the GPU twin's upload, tests)."""
        whole = convert(self.data, np.empty(self.data.shape, self.dtype))
        return whole if dtype is None else whole.astype(dtype, copy=False)


def rows_of(weight, start, end):
    # weight: [out, in] MappedWeight -> rows start..end-1 in the compute dtype, converted into this thread's
    # reusable buffer
    return converted(weight.data[start:end], weight.dtype)


class _Transposed:
    """w.T of a MappedWeight: what `x @ w.T` multiplies by. NumPy hands the product to __rmatmul__ (a class whose
    __array_ufunc__ is None is never converted into an array by an ndarray operator)."""

    __array_ufunc__ = None

    def __init__(self, weight):
        self.weight = weight

    def __rmatmul__(self, x):
        return mapped_linear(x, self.weight)


def mapped_linear(x, weight):
    # x: [..., in], weight: [out, in] MappedWeight -> [..., out] = x @ weight^T
    # A prefill multiplies by the whole matrix; a decode step (at most DECODE_ROWS rows of x) block by block, each
    # block of weight rows converted just before its product, so it is still in cache, on THREADS threads.
    rows, cols = weight.shape
    if x.size // cols > DECODE_ROWS:
        return x @ rows_of(weight, 0, rows).T
    x2d = x.reshape(-1, cols)  # [M, in], M <= DECODE_ROWS
    out = np.empty(x.shape[:-1] + (rows,), np.result_type(x.dtype, weight.dtype))  # [..., out]
    out2d = out.reshape(-1, rows)  # [M, out], a view

    def product(start, end):
        w = rows_of(weight, start, end)  # [end - start, in]
        if len(x2d) == 1:
            np.matmul(x2d, w.T, out=out2d[:, start:end])
        else:  # out^T = W x^T: for 2-16 rows OpenBLAS runs it faster than x W^T (docs/benchmarks.md).
            # Not out= a transposed view: that is NumPy's own loop, not BLAS.
            out2d[:, start:end] = (w @ x2d.T).T

    block = max(BLOCK_ROWS, DECODE_BLOCK_BYTES // (cols * weight.dtype.itemsize) // BLOCK_ROWS * BLOCK_ROWS)
    starts = iter(range(0, rows, block))  # shared by the threads: each takes the next block when it is done

    def products():
        for start in starts:  # a range iterator's next() holds the GIL: no block is taken twice
            product(start, min(start + block, rows))

    if _pool is None or block >= rows:
        products()
    else:  # this thread takes blocks too, beside THREADS - 1 helpers; no core waits on a slower one's share
        with _single_threaded_blas():
            helpers = [_pool.submit(products) for _ in range(THREADS - 1)]
            products()
            for helper in helpers:
                helper.result()
    return out
