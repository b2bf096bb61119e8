"""Rung 4 of the op ladder (tests/reference/helpers.py lists them): the sparse mixture of MLP experts.

moe against every expert run on every token, weighted by dense top-k gates (zero outside a token's K choices).
"""

import numpy as np
import pytest

from reference.experts import moe

from helpers import assert_close, dense_top_k_gates, random_expert_weights


def silu_oracle(x):
    # x * sigmoid(x), sigmoid via tanh (a different formula from the reference's 1 / (1 + exp(-x)))
    return x * 0.5 * (1.0 + np.tanh(0.5 * x))


# ------------------------------------------------------------------------------------------------ 4. sparse MoE

@pytest.mark.parametrize("num_experts,top_k", [(4, 1), (4, 2), (4, 4), (5, 3)])
def test_moe_matches_dense_all_experts(rng, num_experts, top_k):
    batch, tokens, hidden, inter = 2, 5, 12, 7
    w = random_expert_weights(rng, num_experts, hidden, 2 * inter, inter)  # Win [E, 2F, D], Wout [E, D, F]
    x = rng.standard_normal((batch, tokens, hidden))  # [B, T, D]
    got, got_logits = moe(x, w, top_k)  # [B, T, D], [N, E]

    x2d = x.reshape(-1, hidden)  # [N, D]
    logits = np.einsum("ed,nd->ne", w.router, x2d)  # [N, E]
    gates, _ = dense_top_k_gates(logits, top_k)  # [N, E], K nonzeros per row
    assert np.all(np.count_nonzero(gates, axis=1) == top_k) and np.allclose(gates.sum(axis=1), 1.0)
    h = np.einsum("efd,nd->nef", w.input_linear, x2d)  # [N, E, 2F]: every expert on every token
    act = silu_oracle(h[..., :inter]) * h[..., inter:]  # [N, E, F]
    y_all = np.einsum("edf,nef->ned", w.output_linear, act)  # [N, E, D]
    want = np.einsum("ne,ned->nd", gates, y_all) + w.bias  # [N, D]

    # float64: same math, different summation order and sigmoid formula (~1e-16 per op)
    assert_close(got_logits, logits, 1e-12, "moe router logits")
    assert_close(got, want.reshape(batch, tokens, hidden), 1e-12, f"moe E={num_experts} K={top_k} vs dense")
