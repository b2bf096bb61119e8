"""Rotary position embedding (rotate_half) on the GPU; the twin of reference/rope.py.  Kernel: gpu/kernels/rope.cu.

Dimension i of the first half of a head pairs with dimension i + Dh/2, rotated by float32(position) * inv_freq[i].
inv_freq is built on the host exactly as the reference (and HF) build it, uploaded once per (Dh, theta, device)
and cached, so a forward pass never copies from the host.
"""

import functools

import numpy as np

from reference.rope import inv_frequencies

from .device import require_cupy
from .kernels import kernel

THREADS = 256


@functools.cache
def _inv_freq_on_device(head_dim, theta, device_id):
    # -> [Dh/2] float32 on device `device_id` (part of the key so each GPU gets its own copy)
    cp = require_cupy()
    return cp.asarray(inv_frequencies(head_dim, theta, np.dtype(np.float32)))


def apply_rope(x, position_ids, head_dim, theta, out=None):
    # x: [B, P, T, Dh] float32 (P heads), position_ids: [B or 1, T] int -> [B, P, T, Dh] float32
    # (into `out` if given; out may be x itself)
    cp = require_cupy()
    _check(cp, x, position_ids, head_dim, out)
    batch, heads, tokens, _ = x.shape
    x = cp.ascontiguousarray(x)
    positions = cp.ascontiguousarray(cp.asarray(position_ids, dtype=cp.int64))  # [B or 1, T]; no-op if already
    if out is None:
        out = cp.empty_like(x)
    pairs = x.size // 2
    if pairs == 0:
        return out
    inv_freq = _inv_freq_on_device(int(head_dim), float(theta), cp.cuda.Device().id)
    position_stride = tokens if positions.shape[0] > 1 else 0  # [1, T]: one row shared by the whole batch
    kernel("rope", "rope_f32")(
        (-(-pairs // THREADS),), (THREADS,),
        (x, positions, inv_freq, out, np.int64(batch), np.int64(heads), np.int64(tokens), np.int64(head_dim),
         np.int64(position_stride)))
    return out


def _check(cp, x, position_ids, head_dim, out):
    if x.dtype != cp.float32 or x.ndim != 4:
        raise TypeError(f"apply_rope: x must be a 4-d float32 array [B, heads, T, Dh], got {x.dtype} {x.shape}")
    if x.shape[-1] != head_dim or head_dim % 2:
        raise ValueError(f"apply_rope: head_dim={head_dim} must be even and equal x's last dim {x.shape[-1]}")
    batch, tokens = x.shape[0], x.shape[2]
    if position_ids.ndim != 2 or position_ids.shape[1] != tokens or position_ids.shape[0] not in (1, batch):
        raise ValueError(f"apply_rope: position_ids has shape {position_ids.shape}, expected ({batch} or 1, {tokens})")
    if not np.issubdtype(position_ids.dtype, np.integer):
        raise TypeError(f"apply_rope: position_ids must be integers, got {position_ids.dtype}")
    if out is not None and (out.shape != x.shape or out.dtype != cp.float32 or not out.flags.c_contiguous):
        raise ValueError(f"apply_rope: out must be a C-contiguous float32 array of shape {x.shape}")
