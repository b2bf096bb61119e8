"""Paths the tests share, computed once from this file: test files sit one or two folders below tests/."""

import os

TESTS = os.path.dirname(os.path.abspath(__file__))  # tests/
ROOT = os.path.dirname(TESTS)  # the repository
GOLDEN = os.path.join(TESTS, "golden")  # tests/golden/<name>/: HF-saved checkpoints and outputs
GOLDEN_NAMES = sorted(d for d in os.listdir(GOLDEN) if os.path.isdir(os.path.join(GOLDEN, d)))
TINY_MODEL = os.path.join(ROOT, "weights", "jetmoe-tiny-shakespeare")  # the bundled checkpoint
