"""Shared by the GPU tests: `cp` (CuPy, imported on first use), NaN-filled outputs, and the attention draws and
float64 reference that gpu/host checks the NumPy models against and gpu/device checks the kernels against.

`cp` is imported lazily (CuPy, or the CPU emulator cudasim) so that the device test files import without CuPy: their tests carry the requires_gpu
marker, which tests/conftest.py turns into one skip reason before any of them touches `cp`.
"""

import numpy as np

from gpu.device import require_cupy

from reference.attention import additive_mask, attend, attention_probs

F64 = np.dtype(np.float64)


class LazyCupy:
    """Forwards every attribute to require_cupy()'s module (CuPy, or cudasim under JETMOE_GPU=emulate)."""

    def __getattr__(self, name):
        return getattr(require_cupy(), name)


cp = LazyCupy()


def nan_like(shape):
    return cp.full(shape, cp.nan, dtype=cp.float32)


def draw(rng, batch, top_k, heads, tokens, keys, head_dim):
    # float64 draws rounded to float32 -> q [B, K*H, T, Dh], k, v [B, H, S, Dh] (NumPy float32). q is scaled
    # by 2 so the softmax is peaked enough for the masking and mapping checks to matter.
    q = (2.0 * rng.standard_normal((batch, top_k * heads, tokens, head_dim))).astype(np.float32)
    k = rng.standard_normal((batch, heads, keys, head_dim)).astype(np.float32)
    v = rng.standard_normal((batch, heads, keys, head_dim)).astype(np.float32)
    return q, k, v


def reference_attention(q, k, v, cache_position, attention_mask, top_k):
    # NumPy (any float dtype, computed in float64) -> probs [B, K*H, T, S], context [B, T, K, H*Dh]
    batch, q_heads, tokens, head_dim = q.shape
    heads, keys = k.shape[1], k.shape[2]
    mask = additive_mask(attention_mask, np.asarray(cache_position), keys, F64)  # [B|1, 1, T, S]
    probs = attention_probs(q.astype(F64).reshape(batch, top_k, heads, tokens, head_dim), k.astype(F64), mask)
    return probs, attend(probs, v.astype(F64), top_k)
