"""CuPy and the GPU, or a clear error saying what is missing.

Importing `gpu` needs nothing beyond NumPy; the first use of a model or kernel calls `require_cupy()`, which
raises GpuUnavailable with what to install when CuPy is missing or no CUDA device is visible.
"""


class GpuUnavailable(RuntimeError):
    """Raised on first GPU use when CuPy or a CUDA device is missing; the message says what to install."""


def require_cupy():
    """The cupy module, after checking that a CUDA device is usable."""
    try:
        import cupy
    except ImportError as e:
        raise GpuUnavailable(
            "the GPU twin needs CuPy: pip install -e '.[gpu]' (cupy-cuda13x; use cupy-cuda12x with a CUDA 12 "
            f"driver). Import failed with: {e}") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as e:
        raise GpuUnavailable(f"CuPy is installed but no CUDA device is usable ({e}); the GPU twin needs an "
                             "NVIDIA GPU with a CUDA 12+ driver") from None
    if count == 0:
        raise GpuUnavailable("CuPy is installed but no CUDA device is visible; the GPU twin needs an NVIDIA GPU")
    return cupy


def gpu_available():
    """True when require_cupy() would succeed (tests use it to skip with a reason)."""
    try:
        require_cupy()
        return True
    except GpuUnavailable:
        return False
