"""RMSNorm.  Shapes: reference/__init__.py.

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
