"""Rotary position embedding (RoPE), HF's default rope type with rotate_half, and its backward.
Shapes: reference/__init__.py.

Dimension i of the first half of a head pairs with dimension i + Dh/2 (rotate_half), rotated by
angle position * theta^(-2i/Dh).

Notebook: notebooks/01_rmsnorm_and_rope.ipynb.
"""

import numpy as np

from .precision import compute_dtype


def inv_frequencies(head_dim, theta, dtype):
    # -> [Dh/2]: theta^(-2i/Dh), built like HF's default rope init (arange(0, Dh, 2) / Dh) in `dtype`
    dtype = np.dtype(dtype)
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(dtype) / dtype.type(head_dim)
    return dtype.type(1.0) / (dtype.type(theta) ** exponents)


def cos_sin(position_ids, head_dim, theta, dtype):
    # position_ids: [B, T] int -> cos, sin: [B, T, Dh] in `dtype`; angles in float32 or better as in HF
    cdtype = compute_dtype(dtype)
    freqs = position_ids.astype(cdtype)[..., None] * inv_frequencies(head_dim, theta, cdtype)  # [B, T, Dh/2]
    angles = np.concatenate([freqs, freqs], axis=-1)  # [B, T, Dh]
    return np.cos(angles).astype(dtype, copy=False), np.sin(angles).astype(dtype, copy=False)


def rotate_half(x):
    # x: [..., Dh] -> [..., Dh]: (x1, x2) -> (-x2, x1)
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x, cos, sin):
    # x: [B, heads, T, Dh], cos/sin: [B, T, Dh] -> [B, heads, T, Dh]
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, Dh]: broadcast over heads
    return x * cos + rotate_half(x) * sin


def apply_rope_backward(d_y, cos, sin):
    # d_y: [B, heads, T, Dh], cos/sin: [B, T, Dh] -> d_x [B, heads, T, Dh]
    # RoPE is a rotation, so its backward is the transposed rotation. rotate_half is the matrix [[0, -I], [I, 0]],
    # whose transpose is -rotate_half: d_x = d_y * cos - rotate_half(d_y * sin). Saves nothing (cos, sin are
    # the forward's tables, one [T, Dh] pair for all layers).
    cos, sin = cos[:, None], sin[:, None]
    return d_y * cos - rotate_half(d_y * sin)
