"""GPU parity: the routing, RMSNorm and RoPE kernels (gpu/kernels/{routing,rms_norm,rope}.cu) against reference/.

Skipped as a whole without CuPy and a CUDA GPU. Every test draws fresh inputs from `rng` (its seed is printed, so
a failure can be replayed). Output buffers are poisoned first so an element a kernel forgets to write cannot pass:
explicit `out=` buffers are filled with NaN, and `poisoned_pool` fills CuPy's free pool memory with 0xFF bytes
(NaN as float32, -1 as int64) so the buffers the routing functions allocate themselves, scratch included, start
as garbage too. Non-finite float outputs are rejected.

Tolerances, with their reasons:
- top-k on given logits: indices identical to the kernel's NumPy model (same tie rule) and, on tie-free logits,
  to reference.routing; gates within 1e-6 (expf vs NumPy's exp, and a warp-tree vs NumPy's sum: ~1e-7).
- top_k_gating end to end: logits are the linear kernel vs NumPy SGEMM (different summation order, normwise 1e-5); indices
  must match on rows whose top-(K+1) logits are separated by more than that error; gates within 1e-6 of a
  softmax over the GPU's own logits, and within 1e-6 + the logits' own error of the reference's.
- plan: exact (integers), and identical to np.argsort(kind="stable") of the GPU's own top-k indices.
- rms_norm: rtol 1e-5 elementwise (only sum(x^2)'s summation order differs, ~1e-7).
- rope: rtol 1e-5 with atol 1e-5 * max|x| (cosf/sinf vs NumPy's cos/sin differ by an ulp or two).
"""

import ml_dtypes
import numpy as np
import pytest

from gpu import norm as gpu_norm
from gpu import rope as gpu_rope
from gpu import routing as gpu_routing
from reference import norm as ref_norm
from reference import rope as ref_rope
from reference import routing as ref_routing
from reference.io import trace

from gpu_helpers import cp, nan_like

pytestmark = pytest.mark.requires_gpu  # no CUDA GPU: they run on the CPU emulator (tests/conftest.py)

F32 = np.dtype(np.float32)


def assert_finite(got, what):
    assert bool(cp.isfinite(got).all()), f"{what}: non-finite values (an unwritten or NaN output element)"


def bf16_bits(w):
    # w: float32 -> (uint16 bf16 bits, the float32 those bits mean), rounded to nearest even like torch
    rounded = w.astype(ml_dtypes.bfloat16)
    return rounded.view(np.uint16), rounded.astype(np.float32)


def distinct_logits(rng, num_tokens, num_experts):
    # -> [N, E] float32 with no ties in any row (distinct integer parts plus a fraction < 0.5), shuffled per row
    ranks = rng.permuted(np.tile(np.arange(num_experts), (num_tokens, 1)), axis=1)
    return (ranks + rng.uniform(0, 0.5, (num_tokens, num_experts)) - num_experts / 2).astype(np.float32)


# ------------------------------------------------------------------------------------------------ top-k

TOP_K_CASES = [(1, 1), (8, 1), (8, 2), (8, 8), (31, 3), (40, 8), (64, 8), (100, 40)]


@pytest.mark.parametrize("num_experts,top_k", TOP_K_CASES)
def test_top_k_softmax_matches_reference(rng, poisoned_pool, num_experts, top_k):
    num_tokens = 1003  # not a multiple of the 8 tokens per block
    logits = distinct_logits(rng, num_tokens, num_experts)
    indices, gates = gpu_routing.top_k_softmax(cp.asarray(logits), top_k)
    assert indices.dtype == cp.int64 and gates.dtype == cp.float32
    assert indices.shape == gates.shape == (num_tokens, top_k)
    assert_finite(gates, "gates")
    want_indices = ref_routing.top_k_of(logits, top_k)
    want_gates = ref_routing.softmax(np.take_along_axis(logits, want_indices, axis=1), axis=1)
    np.testing.assert_array_equal(indices.get(), want_indices)
    np.testing.assert_allclose(gates.get(), want_gates, rtol=0, atol=1e-6)


@pytest.mark.parametrize("num_experts,top_k", [(8, 2), (8, 8), (40, 6)])
def test_top_k_ties_go_to_the_lower_expert(rng, poisoned_pool, num_experts, top_k):
    # Few distinct values, so most rows have ties; the kernel and its model share the tie rule exactly.
    logits = rng.integers(-2, 3, size=(500, num_experts)).astype(np.float32)
    logits[0] = 0.0
    logits[1, ::2] = -0.0  # -0 ties with +0
    logits[2] = 0.0
    logits[2, ::3] = 1e-40  # a subnormal: CuPy's -ftz=true makes it tie with 0, as the model assumes
    indices, gates = gpu_routing.top_k_softmax(cp.asarray(logits), top_k)
    want_indices, want_gates = gpu_routing.top_k_softmax_model(logits, top_k)
    np.testing.assert_array_equal(indices.get(), want_indices)
    np.testing.assert_allclose(gates.get(), want_gates, rtol=0, atol=1e-6)


def test_top_k_nan_logits_keep_indices_in_range(rng, poisoned_pool):
    # A NaN logit must never produce an out-of-range expert id (the plan kernels index by it).
    num_experts, top_k = 8, 3
    logits = rng.standard_normal((64, num_experts)).astype(np.float32)
    logits[::3, 2] = np.nan
    logits[5] = np.nan
    indices = gpu_routing.top_k_softmax(cp.asarray(logits), top_k)[0].get()
    assert indices.min() >= 0 and indices.max() < num_experts
    assert all(len(set(row)) == top_k for row in indices)
    np.testing.assert_array_equal(indices, gpu_routing.top_k_softmax_model(logits, top_k)[0])


def test_top_k_rejects_bad_k():
    with pytest.raises(ValueError, match="top_k"):
        gpu_routing.top_k_softmax(cp.zeros((4, 8), dtype=cp.float32), 9)


# ------------------------------------------------------------------------------------------------- plan

def skewed_indices(rng, num_tokens, num_experts, top_k, skew):
    # -> [N, K] int64, K distinct experts per token drawn with skewed popularity (skew > 1: some experts empty)
    popularity = rng.dirichlet(np.full(num_experts, 1.0 / skew))
    keys = rng.random((num_tokens, num_experts)) ** (1.0 / np.maximum(popularity, 1e-12))  # weighted sampling
    return np.argsort(-keys, axis=1)[:, :top_k].astype(np.int64)


def want_plan(indices, num_experts, block_rows):
    flat = indices.reshape(-1)
    counts = np.bincount(flat, minlength=num_experts).astype(np.int64)
    return (np.argsort(flat, kind="stable"), np.concatenate([[0], np.cumsum(counts)]),
            gpu_routing.block_offsets_from_counts(np, counts, block_rows))


PLAN_CASES = [  # (N, E, K, block_rows, skew)
    (1, 8, 1, 64, 1.0),  # a single slot
    (1, 8, 2, 64, 1.0),
    (3000, 8, 2, 64, 1.0),  # several 1024-slot chunks
    (20000, 8, 2, 128, 1.0),  # 40 chunks: more than one warp-wide pass of plan_offsets' scan over chunks
    (2000, 64, 8, 64, 1.0),  # E > 32: several passes of the scan over experts
    (777, 40, 5, 16, 30.0),  # skewed: empty experts, one expert with most slots
    (513, 1, 1, 64, 1.0),  # E = 1
    (4096, 16, 4, 1, 30.0),  # block_rows = 1
]


@pytest.mark.parametrize("num_tokens,num_experts,top_k,block_rows,skew", PLAN_CASES)
def test_dispatch_plan_is_a_stable_sort(rng, poisoned_pool, num_tokens, num_experts, top_k, block_rows, skew):
    indices = skewed_indices(rng, num_tokens, num_experts, top_k, skew)
    got = gpu_routing.dispatch_plan(cp.asarray(indices), num_experts, block_rows)
    for name, g, w in zip(("sorted_slots", "expert_offsets", "block_offsets"), got,
                          want_plan(indices, num_experts, block_rows)):
        assert g.dtype == cp.int64, name
        np.testing.assert_array_equal(g.get(), w, err_msg=name)


def test_dispatch_plan_matches_its_model(rng, poisoned_pool):
    indices = skewed_indices(rng, 1500, 12, 2, 5.0)  # 3000 slots: three chunks
    got = gpu_routing.dispatch_plan(cp.asarray(indices), 12, 32)
    for g, w in zip(got, gpu_routing.dispatch_plan_model(indices.reshape(-1), 12, 32)):
        np.testing.assert_array_equal(g.get(), w)


def test_dispatch_plan_no_tokens(poisoned_pool):
    sorted_slots, expert_offsets, block_offsets = gpu_routing.dispatch_plan(cp.zeros((0, 2), cp.int64), 8, 64)
    assert sorted_slots.shape == (0,)
    np.testing.assert_array_equal(expert_offsets.get(), np.zeros(9, np.int64))
    np.testing.assert_array_equal(block_offsets.get(), np.zeros(9, np.int64))


# ---------------------------------------------------------------------------------------- top_k_gating

@pytest.mark.parametrize("weight_dtype", ["float32", "bf16"])
@pytest.mark.parametrize("num_experts,top_k", [(8, 2), (8, 8), (16, 1), (40, 4)])
def test_top_k_gating_matches_reference(rng, poisoned_pool, weight_dtype, num_experts, top_k):
    num_tokens, hidden, block_rows = 700, 128, 64
    x = rng.standard_normal((num_tokens, hidden)).astype(np.float32)
    router = (rng.standard_normal((num_experts, hidden)) * 0.1).astype(np.float32)  # logits ~ N(0, 1.3)
    router_gpu = cp.asarray(router)
    if weight_dtype == "bf16":
        bits, router = bf16_bits(router)
        router_gpu = cp.asarray(bits)
    with trace.capture() as captured:
        plan = gpu_routing.top_k_gating(cp.asarray(x), router_gpu, top_k, block_rows=block_rows)
    want = ref_routing.top_k_gating(x, router, top_k)
    assert list(captured) == ["logits", "top_k_indices", "top_k_gates"]  # the reference's trace names

    logits, indices, gates = plan.logits.get(), plan.top_k_indices.get(), plan.top_k_gates.get()
    assert_finite(plan.logits, "logits")
    assert_finite(plan.top_k_gates, "gates")
    logits_err = float(np.max(np.abs(logits - want.logits)))
    assert logits_err <= 1e-5 * float(np.max(np.abs(want.logits))), f"logits err {logits_err:.3e}"

    # Indices: identical wherever kernel-vs-NumPy rounding cannot reorder the top K+1 logits.
    top = -np.sort(-want.logits, axis=1)[:, :top_k + 1]  # [N, K+1]
    clear = np.all(-np.diff(top, axis=1) > 4 * logits_err + 1e-6, axis=1)  # [N]; all True when K = E = 1
    assert clear.mean() > 0.5, "too few rows with clear margins: the index check would be vacuous"
    np.testing.assert_array_equal(indices[clear], want.top_k_indices[clear])

    own_gates = ref_routing.softmax(np.take_along_axis(logits, indices, axis=1), axis=1)  # the GPU's own logits
    np.testing.assert_allclose(gates, own_gates, rtol=0, atol=1e-6)
    np.testing.assert_allclose(gates[clear], want.top_k_gates[clear], rtol=0, atol=1e-6 + logits_err)

    # The plan must be exactly that of the GPU's own choices (which differ from the reference's only at near-ties).
    names = ("sorted_slots", "expert_offsets", "block_offsets")
    for name, w in zip(names, want_plan(indices, num_experts, block_rows)):
        np.testing.assert_array_equal(getattr(plan, name).get(), w, err_msg=name)
    assert plan.block_rows == block_rows and plan.top_k == top_k and plan.num_experts == num_experts


def test_top_k_gating_is_deterministic(rng, poisoned_pool):
    x = cp.asarray(rng.standard_normal((5000, 64)).astype(np.float32))
    router = cp.asarray(rng.standard_normal((8, 64)).astype(np.float32))
    first = gpu_routing.top_k_gating(x, router, 2)
    second = gpu_routing.top_k_gating(x, router, 2)
    for name in ("logits", "top_k_indices", "top_k_gates", "sorted_slots", "expert_offsets", "block_offsets"):
        np.testing.assert_array_equal(getattr(first, name).get(), getattr(second, name).get(), err_msg=name)


# ------------------------------------------------------------------------------------------------ RMSNorm

@pytest.mark.parametrize("weight_dtype", ["float32", "bf16"])
@pytest.mark.parametrize("shape", [(7, 1), (3, 5, 64), (2, 2048), (4, 4097), (1, 1, 1, 300)])
@pytest.mark.parametrize("eps", [ref_norm.BLOCK_NORM_EPS, 1e-5])
def test_rms_norm_matches_reference(rng, weight_dtype, shape, eps):
    x = (rng.standard_normal(shape) * rng.uniform(0.1, 10)).astype(np.float32)
    weight = rng.standard_normal(shape[-1]).astype(np.float32)
    weight_gpu = cp.asarray(weight)
    if weight_dtype == "bf16":
        bits, weight = bf16_bits(weight)
        weight_gpu = cp.asarray(bits)
    out = nan_like(shape)
    got = gpu_norm.rms_norm(cp.asarray(x), weight_gpu, eps, out=out)
    assert got is out
    assert_finite(got, "rms_norm")
    np.testing.assert_allclose(got.get(), ref_norm.rms_norm(x, weight, eps), rtol=1e-5, atol=0)


def test_rms_norm_in_place_and_strided_input(rng):
    x = rng.standard_normal((6, 96)).astype(np.float32)
    weight = rng.standard_normal(96).astype(np.float32)
    want = ref_norm.rms_norm(x, weight, 1e-6)
    x_gpu = cp.asarray(x)
    assert gpu_norm.rms_norm(x_gpu, cp.asarray(weight), 1e-6, out=x_gpu) is x_gpu
    np.testing.assert_allclose(x_gpu.get(), want, rtol=1e-5, atol=0)
    strided = cp.asarray(np.ascontiguousarray(x.T)).T  # a transposed view: not C-contiguous
    np.testing.assert_allclose(gpu_norm.rms_norm(strided, cp.asarray(weight), 1e-6).get(), want, rtol=1e-5, atol=0)


def test_rms_norm_rejects_float64():
    with pytest.raises(TypeError, match="float32"):
        gpu_norm.rms_norm(cp.zeros((2, 4)), cp.ones(4, dtype=cp.float32), 1e-6)


def test_block_norm_eps_is_the_reference_constant():
    assert gpu_norm.BLOCK_NORM_EPS is ref_norm.BLOCK_NORM_EPS


# --------------------------------------------------------------------------------------------------- RoPE

@pytest.mark.parametrize("batch,heads,tokens,head_dim", [(2, 6, 17, 64), (1, 3, 5, 2), (3, 4, 9, 6), (2, 16, 33, 128)])
@pytest.mark.parametrize("theta", [10000.0, 1e6])
@pytest.mark.parametrize("shared_positions", [False, True])
def test_rope_matches_reference(rng, batch, heads, tokens, head_dim, theta, shared_positions):
    x = rng.standard_normal((batch, heads, tokens, head_dim)).astype(np.float32)
    positions = rng.integers(0, 4096, size=(1 if shared_positions else batch, tokens))
    positions[..., -1] = 300_000  # large angles: sincosf's slow argument reduction
    cos, sin = ref_rope.cos_sin(positions, head_dim, theta, F32)  # [B|1, T, Dh]
    want = ref_rope.apply_rope(x, cos, sin)
    out = nan_like(x.shape)
    got = gpu_rope.apply_rope(cp.asarray(x), cp.asarray(positions), head_dim, theta, out=out)
    assert got is out
    assert_finite(got, "rope")
    np.testing.assert_allclose(got.get(), want, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(x))))


def test_rope_in_place_strided_and_host_positions(rng):
    batch, heads, tokens, head_dim = 2, 4, 11, 32
    x = rng.standard_normal((batch, tokens, heads, head_dim)).astype(np.float32)
    positions = np.arange(tokens)[None] + np.array([[0], [5]])  # [B, T] numpy: uploaded by apply_rope
    cos, sin = ref_rope.cos_sin(positions, head_dim, 10000.0, F32)
    want = ref_rope.apply_rope(x.transpose(0, 2, 1, 3), cos, sin)
    strided = cp.asarray(x).transpose(0, 2, 1, 3)  # [B, heads, T, Dh] view, not C-contiguous
    np.testing.assert_allclose(gpu_rope.apply_rope(strided, positions, head_dim, 10000.0).get(), want,
                               rtol=1e-5, atol=1e-5 * float(np.max(np.abs(x))))
    in_place = cp.ascontiguousarray(strided)
    assert gpu_rope.apply_rope(in_place, cp.asarray(positions), head_dim, 10000.0, out=in_place) is in_place
    np.testing.assert_allclose(in_place.get(), want, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(x))))


def test_rope_rejects_bad_shapes():
    x = cp.zeros((2, 3, 5, 8), dtype=cp.float32)
    with pytest.raises(ValueError, match="position_ids"):
        gpu_rope.apply_rope(x, cp.zeros((3, 5), dtype=cp.int64), 8, 10000.0)
    with pytest.raises(ValueError, match="head_dim"):
        gpu_rope.apply_rope(x, cp.zeros((1, 5), dtype=cp.int64), 6, 10000.0)
