"""Rung 3 of the op ladder (tests/reference/helpers.py lists them): top-k routing.

top_k_gating's plan against a dense oracle (same experts, best first, same gates), then the plan at work in the
MoA: moa_map gathers each (token, choice) slot's expert query projection, moa_reduce combines the slots' outputs
with their gates; both against dense one-hot sums over every expert. Then exact ties, where our canonical rule
(reference/routing.py) puts the lower expert id first.
"""

import numpy as np
import pytest

from reference.attention import moa_map, moa_reduce
from reference.routing import top_k_gating, top_k_of

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


# ------------------------------------------------------------------------------------------------ exact ties

@pytest.mark.parametrize("num_experts,top_k", [(8, 1), (8, 2), (8, 8), (40, 6)])
def test_equal_logits_go_to_the_lower_expert(rng, num_experts, top_k):
    # Few distinct integer values, so most rows tie somewhere; row 0 ties everywhere, row 1 ties -0 with +0.
    logits = rng.integers(-2, 3, size=(300, num_experts)).astype(np.float32)
    logits[0] = 0.0
    logits[1, ::2] = -0.0
    _, want = dense_top_k_gates(logits, top_k)
    np.testing.assert_array_equal(top_k_of(logits, top_k), want)
    np.testing.assert_array_equal(top_k_of(logits, top_k)[0], np.arange(top_k))  # all equal: experts 0..K-1


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_duplicated_router_rows_go_to_the_lower_expert(rng, dtype):
    # Four experts share one router row, so their logits are bitwise equal on every token (checked: the premise).
    num_experts, top_k = 8, 3
    router = rng.standard_normal((num_experts, 32)).astype(dtype)
    twins = np.sort(rng.choice(num_experts, size=4, replace=False))
    router[twins] = router[twins[0]]
    x = rng.standard_normal((500, 32)).astype(dtype)
    plan = top_k_gating(x, router, top_k)
    assert np.all(plan.logits[:, twins] == plan.logits[:, twins[:1]])
    _, want = dense_top_k_gates(plan.logits, top_k)
    np.testing.assert_array_equal(plan.top_k_indices, want)


def test_subnormal_logit_ranks_above_zero():
    # Here, in NumPy, 1e-40 (a float32 subnormal) is > 0, so expert 1 wins outright. On the GPU it is a tie: CuPy
    # compiles with -ftz=true, which flushes the subnormal to 0 in the kernel's comparisons, so there expert 0
    # wins (lower id). gpu.routing.topk_keys_model models that; tests/gpu/host/test_routing_host.py checks it.
    logits = np.array([[0.0, 1e-40, -1.0]], dtype=np.float32)
    np.testing.assert_array_equal(top_k_of(logits, 2), [[1, 0]])
