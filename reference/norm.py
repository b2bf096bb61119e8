"""RMSNorm and its backward.  Shapes: reference/__init__.py.

HF quirk (reproduced on purpose): JetMoeBlock builds its two norms as `JetMoeRMSNorm(hidden_size)`, so they
use the class default eps=1e-6 whatever config.rms_norm_eps says; only the final norm receives rms_norm_eps.

Notebook: notebooks/01_rmsnorm_and_rope.ipynb.
"""

import numpy as np

from .precision import compute_dtype

BLOCK_NORM_EPS = 1e-6  # JetMoeBlock.input_layernorm / post_attention_layernorm ignore config.rms_norm_eps


def rms_norm(x, weight, eps):
    # x: [..., D], weight: [D] -> [..., D]
    # y = w * x / sqrt(mean(x^2) + eps), computed in float32 or better (HF upcasts to float32).
    xc = x.astype(compute_dtype(x.dtype), copy=False)
    variance = np.mean(xc * xc, axis=-1, keepdims=True)  # [..., 1]
    normed = xc * (1.0 / np.sqrt(variance + xc.dtype.type(eps)))
    return weight * normed.astype(x.dtype, copy=False)


def rms_norm_backward(d_y, x, weight, eps):
    # d_y: [..., D], x: [..., D] the forward's input, weight: [D] -> d_x [..., D], d_weight [D]
    # With r = 1/sqrt(mean(x^2) + eps) and n = x*r:  d_weight = sum over rows of d_y*n;  with g = d_y*w,
    # d_x = r * (g - n * mean(g*n)), the mean over D (the projection that keeps the scale of x out of n).
    # Saves nothing but x (the block's residual input, which the model keeps anyway); r is recomputed, O(1) per row.
    xc = x.astype(compute_dtype(x.dtype), copy=False)
    rstd = 1.0 / np.sqrt(np.mean(xc * xc, axis=-1, keepdims=True) + xc.dtype.type(eps))  # [..., 1]
    normed = xc * rstd  # [..., D]
    d_weight = np.sum((d_y * normed).reshape(-1, x.shape[-1]), axis=0).astype(weight.dtype, copy=False)
    g = d_y * weight
    d_x = rstd * (g - normed * np.mean(g * normed, axis=-1, keepdims=True))
    return d_x.astype(x.dtype, copy=False), d_weight
