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
