"""Notebook 03: the mixture of MLP experts as a plain loop over experts (the naive version)."""

import numpy as np


def my_moe_loop(x, top_k_indices, top_k_gates, input_linear, output_linear, bias):
    # x: [N, D], top_k_indices/top_k_gates: [N, K], input_linear: [E, 2F, D], output_linear: [E, D, F], bias: [D]
    # -> [N, D]
    y = np.tile(bias, (x.shape[0], 1))  # [N, D]
    ffn = output_linear.shape[2]
    for e in range(input_linear.shape[0]):
        tokens, choice = np.nonzero(top_k_indices == e)  # the slots routed to expert e
        h = x[tokens] @ input_linear[e].T  # [n_e, 2F]
        gate, up = h[:, :ffn], h[:, ffn:]
        act = gate / (1 + np.exp(-gate)) * up  # silu(gate) * up: [n_e, F]
        y[tokens] += top_k_gates[tokens, choice][:, None] * (act @ output_linear[e].T)  # [n_e, D]
    return y
