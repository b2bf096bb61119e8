"""Golden parity: the reference against HF outputs stored by scripts/make_goldens.py (no torch needed)."""

import os

import numpy as np
import pytest
from safetensors.numpy import load_file

from parity import FLOAT32_RTOL, FLOAT64_RTOL, assert_matches, run_all
from paths import GOLDEN, GOLDEN_NAMES as NAMES


def test_goldens_exist():
    assert len(NAMES) >= 4, f"expected at least 4 golden configs in {GOLDEN}, found {NAMES}"


@pytest.mark.parametrize("dtype,rtol", [(np.float64, FLOAT64_RTOL), (np.float32, FLOAT32_RTOL)],
                         ids=["float64", "float32"])
@pytest.mark.parametrize("name", NAMES)
def test_golden(name, dtype, rtol):
    path = os.path.join(GOLDEN, name)
    inputs = load_file(os.path.join(path, "inputs.safetensors"))
    expected = load_file(os.path.join(path, f"outputs_{np.dtype(dtype).name}.safetensors"))
    ours = run_all(path, dtype, inputs)
    assert_matches(ours, expected, rtol, f"{name} {np.dtype(dtype).name}")
