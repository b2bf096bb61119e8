"""Notebook 01: RMSNorm, written from its formula."""

import numpy as np


def my_rms_norm(x, weight, eps):
    # x: [..., D], weight: [D] -> [..., D]: w * x / sqrt(mean(x^2) + eps)
    mean_square = np.mean(x * x, axis=-1, keepdims=True)  # [..., 1]
    return weight * (x / np.sqrt(mean_square + eps))
