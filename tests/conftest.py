import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


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
    import cupy as cp  # only GPU tests use this fixture; they skip before it runs when CuPy is missing
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    junk = cp.empty(64 << 20, dtype=cp.uint8)
    junk.fill(0xFF)
    del junk  # back to the pool, not to the driver: stream order keeps the fill before any later kernel
    yield
