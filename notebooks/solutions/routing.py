"""Notebook 02: top-k gates, the router's choice and its weights."""

import numpy as np


def my_top_k_gates(logits, k):
    # logits: [N, E] -> top_k_indices [N, K] (best first, equal logits in expert id order), top_k_gates [N, K]
    top_k_indices = np.argsort(-logits, axis=1, kind="stable")[:, :k]  # a stable sort keeps ties in id order
    chosen = np.take_along_axis(logits, top_k_indices, axis=1)  # [N, K]
    weights = np.exp(chosen - chosen[:, :1])  # the best logit is the largest: no overflow
    return top_k_indices, weights / weights.sum(axis=1, keepdims=True)
