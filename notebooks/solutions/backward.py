"""Notebook 08: the backward of the top-k gates, a softmax over the K chosen logits."""

import numpy as np


def my_top_k_gates_backward(d_gates, top_k_gates, top_k_indices, num_experts):
    # d_gates, top_k_gates, top_k_indices: [N, K] -> d_logits [N, E], zero for the experts a token did not choose
    d_chosen = top_k_gates * (d_gates - np.sum(d_gates * top_k_gates, axis=1, keepdims=True))  # [N, K]
    d_logits = np.zeros((d_gates.shape[0], num_experts))  # [N, E]
    np.put_along_axis(d_logits, top_k_indices, d_chosen, axis=1)
    return d_logits
