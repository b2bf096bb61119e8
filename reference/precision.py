"""Which dtype numerically sensitive steps run in.

HF upcasts RMSNorm, RoPE angles, router logits, the attention softmax and the loss to float32. We run them in
"float32 or better": float32 for float32 (and lower) models, float64 for float64 models. For float32 this is
exactly HF; for float64 it keeps full precision, and the golden script runs HF with the same promotion
(scripts/make_goldens.py lists every patched line).

Notebook: notebooks/01_rmsnorm_and_rope.ipynb.
"""

import numpy as np


def compute_dtype(dtype):
    # float16/bfloat16/float32 -> float32; float64 -> float64
    return np.promote_types(np.dtype(dtype), np.float32)
