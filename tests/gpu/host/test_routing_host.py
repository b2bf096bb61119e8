"""Host-side logic of the GPU twin, on the CPU with NumPy only (no CuPy, no GPU).

- gpu.routing.max_blocks: the bound on GEMM row blocks a plan can need (sum_e ceil(c_e / M)).
- gpu.routing.block_offsets_from_counts with xp=numpy.
- The NumPy models of the routing kernels (gpu/routing.py, `*_model`; llm.c style: every kernel has a plain
  reference), against reference.routing: the same top-k, gates and plan. tests/gpu/device/test_kernels_routing.py then
  checks the CUDA kernels against these models on a GPU.

Randomness: `rng` (tests/conftest.py) prints its seed; hypothesis prints a failing example.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu.routing import (block_offsets_from_counts, dispatch_plan_model, max_blocks, top_k_softmax_model,
                         topk_keys_model)
from reference import routing as ref_routing


def random_counts(rng, num_slots, num_experts, skew):
    # -> [E] int64 counts summing to NK; skew > 0 piles slots on a few experts, leaving others empty
    probs = rng.dirichlet(np.full(num_experts, 1.0 / skew))
    return rng.multinomial(num_slots, probs).astype(np.int64)


# ------------------------------------------------------------------------------------------ block bound

@settings(max_examples=300, deadline=None)
@given(counts=st.lists(st.integers(0, 500), min_size=1, max_size=64), block_rows=st.integers(1, 130))
def test_max_blocks_bounds_every_split(counts, block_rows):
    counts = np.array(counts, dtype=np.int64)
    needed = int(np.sum(-(-counts // block_rows)))
    assert needed <= max_blocks(int(counts.sum()), len(counts), block_rows)


@pytest.mark.parametrize("num_experts,block_rows", [(1, 64), (8, 64), (8, 8), (16, 16), (64, 128)])
def test_max_blocks_is_reached(num_experts, block_rows):
    # No looser than needed: E-1 experts with one slot and one with 5M+1 need 5 + E blocks, which is
    # ceil(NK / M) + E - 1 when M >= E (then ceil((5M + E) / M) = 6).
    counts = np.array([1] * (num_experts - 1) + [5 * block_rows + 1], dtype=np.int64)
    needed = int(np.sum(-(-counts // block_rows)))
    assert needed == max_blocks(int(counts.sum()), num_experts, block_rows)


@pytest.mark.parametrize("skew", [0.5, 4.0, 50.0])
def test_block_offsets_from_counts_numpy(rng, skew):
    num_experts, block_rows = 12, 16
    counts = random_counts(rng, 1000, num_experts, skew)
    offsets = block_offsets_from_counts(np, counts, block_rows)
    assert offsets.dtype == np.int64 and offsets.shape == (num_experts + 1,)
    assert offsets[0] == 0
    for e, c in enumerate(counts):  # expert e's blocks hold exactly its rows, the last one padded
        blocks = offsets[e + 1] - offsets[e]
        assert (blocks - 1) * block_rows < c <= blocks * block_rows if c else blocks == 0
    assert offsets[-1] <= max_blocks(int(counts.sum()), num_experts, block_rows)


def test_block_offsets_from_counts_no_slots():
    offsets = block_offsets_from_counts(np, np.zeros(5, dtype=np.int64), 64)
    np.testing.assert_array_equal(offsets, np.zeros(6, dtype=np.int64))


# ------------------------------------------------------------------------------------- top-k model

@pytest.mark.parametrize("num_experts,top_k", [(1, 1), (8, 2), (8, 8), (33, 5), (64, 8)])
def test_top_k_model_matches_reference(rng, num_experts, top_k):
    num_tokens = 300
    x = rng.standard_normal((num_tokens, 24), dtype=np.float32)
    router = rng.standard_normal((num_experts, 24), dtype=np.float32)
    plan = ref_routing.top_k_gating(x, router, top_k)
    indices, gates = top_k_softmax_model(plan.logits, top_k)
    np.testing.assert_array_equal(indices, plan.top_k_indices)  # random float32 logits: no ties
    np.testing.assert_allclose(gates, plan.top_k_gates, rtol=0, atol=1e-6)
    assert gates.dtype == np.float32 and indices.dtype == np.int64


def test_top_k_model_breaks_ties_to_the_lower_expert():
    logits = np.array([[1, 3, 3, 0, 3], [0, 0, 0, 0, 0], [-0.0, 0.0, -1, 2, 2]], dtype=np.float32)
    indices, gates = top_k_softmax_model(logits, 3)
    np.testing.assert_array_equal(indices, [[1, 2, 4], [0, 1, 2], [3, 4, 0]])  # -0 ties with +0
    np.testing.assert_allclose(gates[1], [1 / 3] * 3, rtol=1e-6)


@pytest.mark.parametrize("num_experts,top_k", [(8, 2), (8, 8), (40, 6)])
def test_top_k_model_ties_match_reference(rng, num_experts, top_k):
    # One canonical tie rule (lower expert id first) in the kernel's model and in reference.routing.
    logits = rng.integers(-2, 3, size=(300, num_experts)).astype(np.float32)
    logits[0] = 0.0
    logits[1, ::2] = -0.0
    np.testing.assert_array_equal(top_k_softmax_model(logits, top_k)[0], ref_routing.top_k_of(logits, top_k))


def test_top_k_model_flushes_subnormals_like_the_kernel():
    # The one place the two differ: CuPy's -ftz=true makes the kernel see 1e-40 as 0, a tie that expert 0 wins;
    # NumPy (the reference) ranks the subnormal above 0 (tests/reference/test_routing.py).
    logits = np.array([[0.0, 1e-40, -1.0], [-1e-40, 0.0, -1.0]], dtype=np.float32)
    np.testing.assert_array_equal(top_k_softmax_model(logits, 2)[0], [[0, 1], [0, 1]])
    np.testing.assert_array_equal(ref_routing.top_k_of(logits, 2), [[1, 0], [1, 0]])


def test_topk_keys_model_orders_like_floats(rng):
    # Larger float -> larger key, across signs, zeros, infinities and subnormals; NaN ranks by its sign bit.
    values = np.concatenate([rng.standard_normal(200).astype(np.float32) * 10.0 ** rng.integers(-40, 38, 200),
                             np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 3e38, -3e38])]).astype(np.float32)
    values = values[np.isfinite(values) | np.isinf(values)]
    keys = topk_keys_model(values[None, :].copy())[0] >> np.uint64(32)  # the float part of each key
    order = np.argsort(values, kind="stable")
    assert np.all(np.diff(keys[order].astype(np.float64)) >= 0)
    nan_keys = topk_keys_model(np.array([[np.nan, np.inf, -np.inf, -np.nan]], dtype=np.float32))[0]
    assert nan_keys[0] > nan_keys[1] and nan_keys[3] < nan_keys[2]


@pytest.mark.parametrize("bad_k", [0, 9])
def test_top_k_model_rejects_bad_k(bad_k):
    with pytest.raises(ValueError, match="top_k"):
        top_k_softmax_model(np.zeros((2, 8), dtype=np.float32), bad_k)


# -------------------------------------------------------------------------------------- plan model

@pytest.mark.parametrize("chunk", [32, 96, 1024])
@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 8, 2), (257, 8, 2), (500, 16, 4), (100, 3, 3)])
def test_plan_model_matches_reference(rng, chunk, num_tokens, num_experts, top_k):
    x = rng.standard_normal((num_tokens, 16), dtype=np.float32)
    router = rng.standard_normal((num_experts, 16), dtype=np.float32)
    plan = ref_routing.top_k_gating(x, router, top_k)
    block_rows = 8
    sorted_slots, expert_offsets, block_offsets = dispatch_plan_model(
        plan.top_k_indices.reshape(-1), num_experts, block_rows, chunk=chunk)
    np.testing.assert_array_equal(sorted_slots, plan.sorted_slots)
    np.testing.assert_array_equal(expert_offsets, plan.expert_offsets)
    counts = np.diff(plan.expert_offsets)
    np.testing.assert_array_equal(block_offsets, block_offsets_from_counts(np, counts, block_rows))


@pytest.mark.parametrize("skew", [0.3, 20.0])
def test_plan_model_is_a_stable_sort(rng, skew):
    # Skewed ids (empty experts, one expert with most slots) straddling many small chunks.
    num_experts, num_slots = 10, 777
    flat = rng.choice(num_experts, size=num_slots, p=rng.dirichlet(np.full(num_experts, 1.0 / skew)))
    sorted_slots, expert_offsets, _ = dispatch_plan_model(flat, num_experts, 4, chunk=64)
    np.testing.assert_array_equal(sorted_slots, np.argsort(flat, kind="stable"))
    np.testing.assert_array_equal(expert_offsets, np.concatenate([[0], np.cumsum(np.bincount(flat, minlength=10))]))


def test_plan_model_no_slots():
    sorted_slots, expert_offsets, block_offsets = dispatch_plan_model(np.zeros(0, dtype=np.int64), 4, 64)
    assert sorted_slots.shape == (0,)
    np.testing.assert_array_equal(expert_offsets, np.zeros(5, dtype=np.int64))
    np.testing.assert_array_equal(block_offsets, np.zeros(5, dtype=np.int64))
