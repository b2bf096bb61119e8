"""Rung 3 of the op ladder (tests/reference/helpers.py lists them): top-k routing.

top_k_gating's plan against a dense oracle (same experts, best first, same gates), then the plan at work in the
MoA: moa_map gathers each (token, choice) slot's expert query projection, moa_reduce combines the slots' outputs
with their gates; both against dense one-hot sums over every expert.
"""

import numpy as np
import pytest

from reference.attention import moa_map, moa_reduce
from reference.routing import top_k_gating

from helpers import assert_close, dense_top_k_gates, random_expert_weights


# ------------------------------------------------------------------------------------------------ 3. routing

@pytest.mark.parametrize("num_experts,top_k", [(4, 1), (4, 2), (4, 4), (5, 3)])
def test_moa_map_reduce_match_dense(rng, num_experts, top_k):
    tokens, hidden, heads, head_dim = 9, 12, 2, 3
    hd = heads * head_dim
    w = random_expert_weights(rng, num_experts, hidden, hd, hd)  # Wq [E, H*Dh, D], Wo [E, D, H*Dh]
    x2d = rng.standard_normal((tokens, hidden))  # [N, D]
    plan = top_k_gating(x2d, w.router, top_k)

    logits = np.einsum("ed,nd->ne", w.router, x2d)  # [N, E]
    gates, chosen = dense_top_k_gates(logits, top_k)  # [N, E], [N, K]
    # The plan routes like the oracle: same experts, best first, same gates (float64 rounding only).
    np.testing.assert_array_equal(plan.top_k_indices, chosen)
    assert_close(plan.top_k_gates, np.take_along_axis(gates, chosen, axis=1), 1e-12, "top-k gates")

    # map: every expert's query projection on every token, then a one-hot [N, K, E] selection of slot (n, k)
    q_all = np.einsum("ehd,nd->neh", w.input_linear, x2d)  # [N, E, H*Dh]
    select = (chosen[..., None] == np.arange(num_experts)).astype(np.float64)  # [N, K, E]
    want_q = np.einsum("nke,neh->nkh", select, q_all)  # [N, K, H*Dh]
    assert_close(moa_map(x2d, plan, w.input_linear), want_q, 1e-12, "moa_map vs dense")  # float64, sum order

    # reduce: put slot (n, k)'s context in column chosen[n, k] of a dense [N, E, H*Dh] tensor whose other
    # columns hold random junk; the zero gates must cancel the junk.
    context = rng.standard_normal((tokens, top_k, hd))  # [N, K, H*Dh]
    dense_context = rng.standard_normal((tokens, num_experts, hd))  # [N, E, H*Dh]
    for n in range(tokens):
        for kk in range(top_k):
            dense_context[n, chosen[n, kk]] = context[n, kk]
    y_all = np.einsum("edh,neh->ned", w.output_linear, dense_context)  # [N, E, D]
    want_y = np.einsum("ne,ned->nd", gates, y_all) + w.bias  # [N, D]
    got_y = moa_reduce(context, plan, w.output_linear, w.bias)  # [N, D]
    assert_close(got_y, want_y, 1e-12, "moa_reduce vs dense")  # float64, summation order only
