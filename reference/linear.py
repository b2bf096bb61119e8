"""The weight product every projection of the model is made of, and the embedding lookup's backward.

Shapes: reference/__init__.py. Notebook: notebooks/03_mixture_of_mlp_experts.ipynb.

A weight is an ndarray, or (for a checkpoint too big to convert: reference/io/mapped.py) a MappedWeight, which
brings its own product: `x @ w.T` and `d_y @ w` read the same for both, so the math below does not change.
"""

import numpy as np


def linear(x, weight):
    # x: [..., in], weight: [out, in] -> [..., out]
    return x @ weight.T


def linear_backward(d_y, x, weight):
    # d_y: [..., out], x: [..., in], weight: [out, in] -> d_x [..., in], d_weight [out, in]
    # y = x @ W^T, so d_x = d_y @ W and d_W = d_y^T @ x (summed over every leading index). Saves x.
    d_y2d, x2d = d_y.reshape(-1, d_y.shape[-1]), x.reshape(-1, x.shape[-1])  # [M, out], [M, in]
    return (d_y2d @ weight).reshape(x.shape), d_y2d.T @ x2d


def embedding_backward(d_h, input_ids, vocab_size, padding_idx):
    # d_h: [B, T, D], input_ids: [B, T] -> d_embed [V, D]: each looked-up row sums the gradients of its positions.
    # HF builds nn.Embedding(V, D, padding_idx=pad_token_id), whose backward gives the pad row no gradient.
    d_embed = np.zeros((vocab_size, d_h.shape[-1]), d_h.dtype)
    np.add.at(d_embed, input_ids.reshape(-1), d_h.reshape(-1, d_h.shape[-1]))
    if padding_idx is not None:
        d_embed[padding_idx] = 0
    return d_embed
