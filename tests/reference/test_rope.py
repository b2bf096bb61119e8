"""Rung 2 of the op ladder (tests/reference/helpers.py lists them): RoPE.

apply_rope against a rotation of complex pairs, and the property RoPE exists for: the query-key dot product
depends only on the relative position.
"""

import numpy as np
import pytest

from reference.rope import apply_rope, cos_sin

from helpers import F64, assert_close, rope_oracle


# ------------------------------------------------------------------------------------------------ 2. RoPE

@pytest.mark.parametrize("head_dim,theta", [(2, 10000.0), (6, 10000.0), (8, 1e6), (16, 500.0)])
def test_rope_matches_complex_rotation(rng, head_dim, theta):
    batch, heads, tokens = 2, 3, 7
    positions = rng.integers(0, 2048, size=(batch, tokens))  # [B, T]
    x = rng.standard_normal((batch, heads, tokens, head_dim))  # [B, heads, T, Dh]
    cos, sin = cos_sin(positions, head_dim, theta, F64)  # [B, T, Dh]
    assert cos.shape == sin.shape == (batch, tokens, head_dim)
    got = apply_rope(x, cos, sin)  # [B, heads, T, Dh]
    want = np.stack([rope_oracle(x[b], positions[b], theta) for b in range(batch)])  # [B, heads, T, Dh]
    # float64; angle = pos * freq, freq rounded differently here (theta**-e vs 1/theta**e, a few ulp), pos < 2048:
    # angles may differ by ~2048 * 4 * 1.1e-16 ~ 1e-12 rad, so the rotated vector by ~1e-12 * |x|.
    assert_close(got, want, 1e-11, "apply_rope vs complex rotation")
    # Rotation keeps each pair's norm (a check the oracle cannot share a mistake with).
    half = head_dim // 2

    def pair_norm(y):
        # [B, heads, T, Dh] -> [B, heads, T, Dh/2]: |z_i|^2 of each rotated pair
        return y[..., :half] ** 2 + y[..., half:] ** 2

    assert_close(pair_norm(got), pair_norm(x), 1e-13, "RoPE keeps pair norms")  # float64 rounding only


def test_rope_relative_position_invariance(rng):
    head_dim, theta, pairs = 8, 10000.0, 20
    q = rng.standard_normal((pairs, head_dim))  # [P, Dh]
    k = rng.standard_normal((pairs, head_dim))  # [P, Dh]
    m = rng.integers(0, 500, pairs)  # [P]
    n = rng.integers(0, 500, pairs)  # [P]
    shift = rng.integers(1, 500, pairs)  # [P]

    def dots(pos_q, pos_k):
        # <rope(q, pos_q), rope(k, pos_k)> per pair -> [P]
        positions = np.stack([pos_q, pos_k], axis=1)  # [P, 2]: batch P, tokens (q, k)
        cos, sin = cos_sin(positions, head_dim, theta, F64)  # [P, 2, Dh]
        x = np.stack([q, k], axis=1)[:, None]  # [P, 1, 2, Dh]
        r = apply_rope(x, cos, sin)[:, 0]  # [P, 2, Dh]
        return np.sum(r[:, 0] * r[:, 1], axis=-1)

    scale = np.linalg.norm(q, axis=1) * np.linalg.norm(k, axis=1)  # [P]
    base, shifted = dots(m, n), dots(m + shift, n + shift)
    # float64; angles up to ~1000 rad carry ~1e-13 rad rounding, so the dot product ~1e-12 * |q||k|
    assert np.all(np.abs(base - shifted) <= 1e-11 * scale), np.max(np.abs(base - shifted) / scale)
    # ... and it really depends on m - n: moving the key by one position changes it (not a vacuous invariance).
    # Typical change ~0.1 |q||k| (pair 0 turns by 1 rad); the median over 20 pairs is far above 1e-2.
    moved = dots(m, n + 1)
    assert np.median(np.abs(base - moved) / scale) > 1e-2, np.abs(base - moved) / scale
