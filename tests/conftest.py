"""Shared by the whole suite: sys.path, the seeded `rng`, and the `requires_gpu` marker.

Layout (forward order inside tests/reference/, see tests/reference/helpers.py):
  reference/   the NumPy reference, one file per subject     gpu/host/    GPU twin logic on the CPU (no CuPy)
  gpu/device/  GPU kernels and model (marked requires_gpu)   oracle/      live HF transformers (marked oracle)
  tools/       the `jetmoe` command                          test_layout.py  who may import what
"""

import functools
import os
import sys

import numpy as np
import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)  # modules shared across folders: paths.py, parity.py, ports.py
from paths import ROOT  # noqa: E402

sys.path.insert(0, os.path.join(TESTS, "gpu"))  # gpu_helpers.py, shared by gpu/host and gpu/device
sys.path.insert(0, ROOT)  # reference, gpu, jetmoe
# A test file's own folder (tests/reference/helpers.py) goes on sys.path through pytest's default "prepend" import
# mode, which is why every test file basename in tests/ must be unique.

GPU_MARKER = ("requires_gpu: runs on CuPy and a CUDA GPU, or on the CPU emulator (cudasim) where there is none; "
              "skipped, all with one reason, only where gpu.gpu_available() is False")


def pytest_configure(config):
    config.addinivalue_line("markers", GPU_MARKER)
    # No CUDA device: the GPU tests run the same kernels on cudasim (JETMOE_GPU=emulate; gpu/device.py).
    if "JETMOE_GPU" not in os.environ:
        from gpu.device import cuda_device_available
        if not cuda_device_available():
            os.environ["JETMOE_GPU"] = "emulate"


@functools.cache
def gpu_skip_reason():
    """None when CuPy and a CUDA device are usable, else the one reason every requires_gpu test skips with."""
    from gpu.device import GpuUnavailable, require_cupy
    try:
        require_cupy()
    except GpuUnavailable as e:
        return f"requires_gpu: {e}; `make gpu-check` runs these tests on a CUDA machine"
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # Before any fixture (poisoned_pool imports cupy). A skip raised here rather than an added skip mark: pytest -ra
    # then sums them all up on one line, this one.
    if item.get_closest_marker("requires_gpu") and gpu_skip_reason():
        pytest.skip(gpu_skip_reason())


@pytest.fixture
def seed():
    """A fresh seed every run (parity tests draw new inputs each time), printed so a failure can be replayed."""
    seed = int(np.random.default_rng().integers(2**31))
    print(f"seed={seed}  (replay: np.random.default_rng({seed}))")  # shown by pytest when the test fails
    return seed


@pytest.fixture
def rng(seed):
    return np.random.default_rng(seed)


@pytest.fixture
def poisoned_pool():
    """GPU tests: leave 64 MiB of 0xFF bytes as free memory in CuPy's pool; later cp.empty calls are carved out of
    it, so an output element a kernel forgot to write is garbage, never a lucky zero."""
    from gpu.device import require_cupy  # only requires_gpu tests use this fixture; they skip before it runs
    cp = require_cupy()
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    junk = cp.empty(64 << 20, dtype=cp.uint8)
    junk.fill(0xFF)
    del junk  # back to the pool, not to the driver: stream order keeps the fill before any later kernel
    yield
