"""CuPy and the GPU, the CPU emulator, or a clear error saying what is missing.

Importing `gpu` needs nothing beyond NumPy; the first use of a model or kernel calls `require_cupy()`, the one
place that hands out the array module:
  JETMOE_GPU=emulate  cudasim (the top-level package): the same .cu files compiled for the CPU, CUDA's rules checked;
  JETMOE_GPU=cuda     CuPy on a CUDA device (GpuUnavailable, with what to install, when there is none);
  unset               CuPy where a CUDA device is usable, else GpuUnavailable (the test suite sets `emulate` then).
"""

import os


class GpuUnavailable(RuntimeError):
    """Raised on first GPU use when CuPy or a CUDA device is missing; the message says what to install."""


def backend():
    """'emulate' or 'cuda', from JETMOE_GPU (unset: 'cuda'); anything else is an error naming the variable."""
    value = os.environ.get("JETMOE_GPU", "cuda") or "cuda"
    if value not in ("cuda", "emulate"):
        raise GpuUnavailable(f"JETMOE_GPU={value!r}: use 'cuda' (CuPy on a GPU) or 'emulate' (cudasim on the CPU)")
    return value


def require_cupy():
    """The cupy module after checking that a CUDA device is usable, or cudasim under JETMOE_GPU=emulate."""
    if backend() == "emulate":
        import cudasim
        return cudasim
    return _cuda_cupy()


def _cuda_cupy():
    try:
        import cupy
    except ImportError as e:
        raise GpuUnavailable(
            "the GPU twin needs CuPy: pip install -e '.[gpu]' (cupy-cuda13x; use cupy-cuda12x with a CUDA 12 "
            f"driver), or JETMOE_GPU=emulate to run it on the CPU. Import failed with: {e}") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as e:
        raise GpuUnavailable(f"CuPy is installed but no CUDA device is usable ({e}); the GPU twin needs an "
                             "NVIDIA GPU with a CUDA 12+ driver, or JETMOE_GPU=emulate") from None
    if count == 0:
        raise GpuUnavailable("CuPy is installed but no CUDA device is visible; the GPU twin needs an NVIDIA GPU, "
                             "or JETMOE_GPU=emulate")
    return cupy


def gpu_available():
    """True when require_cupy() would succeed (tests use it to skip with a reason)."""
    try:
        require_cupy()
        return True
    except GpuUnavailable:
        return False


def cuda_device_available():
    """True when CuPy sees a CUDA device, whatever JETMOE_GPU says."""
    try:
        _cuda_cupy()
        return True
    except GpuUnavailable:
        return False


def emulated(cp):
    """True when `cp` (what require_cupy() gave) is the CPU emulator."""
    return cp.__name__ == "cudasim"
