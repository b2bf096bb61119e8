"""Notebook 01: RMSNorm and RoPE, written from their formulas."""

import numpy as np


def my_rms_norm(x, weight, eps):
    # x: [..., D], weight: [D] -> [..., D]: w * x / sqrt(mean(x^2) + eps)
    mean_square = np.mean(x * x, axis=-1, keepdims=True)  # [..., 1]
    return weight * (x / np.sqrt(mean_square + eps))


def my_rope(x, positions, theta):
    # x: [heads, T, Dh], positions: [T] -> [heads, T, Dh]: plane i (dimension i with i + Dh/2) turns by
    # position * theta^(-2i/Dh)
    half = x.shape[-1] // 2
    angles = positions[:, None] * theta ** (-2 * np.arange(half) / x.shape[-1])  # [T, Dh/2]
    cos, sin = np.cos(angles), np.sin(angles)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
