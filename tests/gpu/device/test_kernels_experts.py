"""The fused expert GEMMs of gpu/experts.py (gpu/kernels/expert_gemm.cu) against the NumPy reference.

Every variant (moe_in, moe_out, moa_map, moa_reduce) on every path (naive, simt and gemv with float32 and with
bf16 weights; mma with bf16 weights on sm_80+), each path forced whatever the automatic choice would be, against
reference/experts.py and reference/attention.py run in float64 on the same inputs (bf16 weights are passed
to the reference as their exact float64 values). Then the ladder's middle rung: every fast path against the naive
kernel on the same device inputs. Then the combine kernel, the whole MoE with its router and trace, and the MoA
projections.

Every run draws fresh random inputs from the `rng` fixture (its seed is printed for replay): normal values,
never zeros. Outputs are written into NaN-poisoned buffers with two NaN guard rows on each side, so a row the
kernel forgets stays NaN (rejected by the finiteness check) and a write past either end shows in the guards.
Each launch runs twice into fresh buffers and the results must be bitwise equal (no atomics anywhere).

Sizes: odd D/F (not multiples of the 4/8-element vector loads, nor of the 16/32/64 tiles), aligned ones (16-byte
vector loads), A at a 4-byte offset (vector loads must fall back), an expert with no tokens, all rows on one
expert, K=1, K=E, decode N=1 and 3, N at the gemv threshold, block_rows 16 / 64 / 128 (row blocks smaller than,
equal to and twice the 64-row tile), and k_in=520 (many k tiles).

Tolerances, normwise (max|got - want| <= rtol * max|want|):
  F32_RTOL = 1e-5   naive, simt and gemv, float32 or bf16 weights: A stays float32 and bf16 weights are exact in float32,
                    so only float32 accumulation over <= 520 terms differs from float64 (~1e-6 expected); the
                    same bound the reference's float32 goldens use.
  MMA_RTOL = 2e-2   mma: A is rounded to bf16 (relative 2^-9) when staged; random rounding errors over k_in terms
                    give ~1e-3 relative per output, a few times that at the worst element, and the MoE chains two
                    such GEMMs; 2e-2 leaves a ~4x margin while still catching any wrong fragment or index.
                    The CPU emulator (cudasim) cannot reproduce the tensor cores' accumulation order: it sums the
                    exact bf16 products in double and rounds once, within the same bound.
  Router logits and gates are float32 matmul/softmax: 1e-5. Expert ids must be equal (inputs are redrawn until
  every token's logits are separated by far more than float32 error, so the top-k cannot differ legitimately).
"""

from dataclasses import dataclass

import numpy as np
import pytest

from gpu import experts
from gpu.routing import RoutingPlan
from reference.attention import moa_map as ref_moa_map
from reference.attention import moa_reduce as ref_moa_reduce
from reference.experts import combine as ref_combine
from reference.experts import grouped_linear, swiglu
from reference.experts import moe as ref_moe
from reference.experts import ungroup as ref_ungroup
from reference.inputs import to_numpy
from reference.io import trace
from reference.model import ExpertWeights
from reference.routing import RoutingPlan as RefPlan

from gpu_helpers import cp

pytestmark = pytest.mark.requires_gpu  # no CUDA GPU: they run on the CPU emulator (tests/conftest.py)

F64 = np.float64
F32_RTOL = 1e-5
MMA_RTOL = 2e-2
ROUTER_RTOL = 1e-5
GUARD = 2  # NaN rows before and after every output

PATHS = [("naive", "f32"), ("naive", "bf16"), ("simt", "f32"), ("simt", "bf16"), ("gemv", "f32"), ("gemv", "bf16"),
         ("mma", "bf16")]
FAST_PATHS = [(p, w) for p, w in PATHS if p != "naive"]
PATH_IDS = [f"{p}-{w}" for p, w in PATHS]


def rtol_for(path):
    return MMA_RTOL if path == "mma" else F32_RTOL


def skip_if_unsupported(path):
    if path == "mma" and experts.compute_capability() < experts.MMA_MIN_CC:
        pytest.skip(f"the mma path needs sm_{experts.MMA_MIN_CC}+, this GPU is sm_{experts.compute_capability()}")


# ---------------------------------------------------------------------------------------------- helpers

def assert_close(got, want, rtol, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert np.all(np.isfinite(got)), f"{what}: {np.count_nonzero(~np.isfinite(got))} non-finite values"
    err = float(np.max(np.abs(got.astype(F64) - want)))
    scale = float(np.max(np.abs(want)))
    assert scale > 0, f"{what}: the oracle is all zeros, the check would be vacuous"
    assert err <= rtol * scale, f"{what}: max abs err {err:.3e}, max rel err {err / scale:.3e} > rtol {rtol:g}"


def normal(rng, shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def to_bf16_bits(x32):
    # float32 -> bf16 bits (uint16), round to nearest even, as torch and ml_dtypes (no NaN/inf in our data)
    u = np.ascontiguousarray(x32, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_bits_to_f64(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(F64)


def expert_weights(rng, shape, kind):
    """Random [E, out, in] weights scaled by 1/sqrt(in) -> (device array, exact float64 values)."""
    w32 = normal(rng, shape, 1.0 / np.sqrt(shape[-1]))
    if kind == "bf16":
        bits = to_bf16_bits(w32)
        return cp.asarray(bits), bf16_bits_to_f64(bits)
    return cp.asarray(w32), w32.astype(F64)


def device(host, misaligned=False):
    """A C-contiguous device copy; misaligned: its data starts 4 bytes past a 16-byte boundary."""
    if not misaligned:
        return cp.asarray(host)
    buf = cp.empty(host.size + 4, dtype=cp.float32)
    offset = next(i for i in range(4) if (buf.data.ptr + 4 * i) % 16 == 4)
    view = buf[offset:offset + host.size].reshape(host.shape)
    view[...] = cp.asarray(host)
    assert view.flags.c_contiguous and view.data.ptr % 16 == 4
    return view


def launch_twice(launch, shape):
    """Run launch(out) into two NaN-poisoned, NaN-guarded buffers; check guards and bitwise determinism."""
    results = []
    for _ in range(2):
        buf = cp.full((shape[0] + 2 * GUARD, shape[1]), cp.nan, dtype=cp.float32)
        out = buf[GUARD:GUARD + shape[0]]
        assert launch(out) is out
        host = buf.get()
        assert np.isnan(host[:GUARD]).all() and np.isnan(host[GUARD + shape[0]:]).all(), "write outside the output"
        results.append(host[GUARD:GUARD + shape[0]])
    assert np.array_equal(results[0].view(np.uint32), results[1].view(np.uint32)), "two runs differ bitwise"
    return results[0]


@dataclass(frozen=True)
class Case:
    name: str
    n: int  # tokens N
    d: int  # D: k_in of moe_in / moa_map, n_out of moe_out / moa_reduce
    f: int  # F (MoE) or H*Dh (MoA)
    e: int  # experts E
    k: int  # top-k K
    block_rows: int = 64
    experts: tuple = ()  # the experts tokens may choose (empty: all); the others receive no rows
    misaligned: bool = False  # A starts 4 bytes off a 16-byte boundary


CASES = [
    Case("prefill_odd", n=150, d=37, f=45, e=4, k=2),
    Case("prefill_aligned", n=200, d=136, f=72, e=8, k=2),
    Case("zero_token_expert", n=70, d=64, f=96, e=6, k=2, experts=(0, 1, 2, 4, 5)),
    Case("k1", n=90, d=48, f=40, e=5, k=1),
    Case("k_eq_e", n=33, d=40, f=24, e=3, k=3),
    Case("decode_1", n=1, d=64, f=48, e=8, k=2),
    Case("decode_odd", n=3, d=33, f=17, e=4, k=2),
    Case("gemv_threshold", n=experts.GEMV_MAX_TOKENS, d=72, f=56, e=8, k=2),
    Case("block_rows_16", n=100, d=40, f=36, e=3, k=2, block_rows=16),
    Case("block_rows_128", n=300, d=24, f=20, e=2, k=1, block_rows=128),
    Case("one_expert_all_rows", n=130, d=32, f=24, e=4, k=1, experts=(2,)),
    Case("long_k", n=64, d=520, f=264, e=4, k=2),
    Case("misaligned_a", n=40, d=64, f=48, e=4, k=2, misaligned=True),
]
CASE_IDS = [c.name for c in CASES]


def make_plans(rng, case):
    """A GPU RoutingPlan and the equal reference RoutingPlan for random top-k choices (distinct per token)."""
    allowed = np.array(case.experts) if case.experts else np.arange(case.e)
    assert len(allowed) >= case.k
    top_k_indices = np.stack([rng.permutation(allowed)[:case.k] for _ in range(case.n)]).astype(np.int64)
    gates = (rng.random((case.n, case.k)) + 0.5).astype(np.float32)
    gates /= gates.sum(axis=1, keepdims=True)
    flat = top_k_indices.reshape(-1)
    sorted_slots = np.argsort(flat, kind="stable").astype(np.int64)
    counts = np.bincount(flat, minlength=case.e).astype(np.int64)
    expert_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    block_offsets = np.concatenate([[0], np.cumsum(-(-counts // case.block_rows))]).astype(np.int64)
    logits = normal(rng, (case.n, case.e))  # not read by the kernels
    gpu_plan = RoutingPlan(logits=cp.asarray(logits), top_k_indices=cp.asarray(top_k_indices),
                           top_k_gates=cp.asarray(gates), sorted_slots=cp.asarray(sorted_slots),
                           expert_offsets=cp.asarray(expert_offsets), block_offsets=cp.asarray(block_offsets),
                           block_rows=case.block_rows)
    ref_plan = RefPlan(logits.astype(F64), top_k_indices, gates.astype(F64), sorted_slots, expert_offsets)
    if case.experts:
        assert all(counts[e] == 0 for e in range(case.e) if e not in case.experts)
    return gpu_plan, ref_plan


# ------------------------------------------------------------------------------------- the four variants

@pytest.mark.parametrize("path,kind", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_moe_in(rng, case, path, kind):
    # x [N, D] gathered by token, input_linear [E, 2F, D] -> silu(gate) * up [NK, F] in grouped order
    skip_if_unsupported(path)
    plan, ref_plan = make_plans(rng, case)
    x = normal(rng, (case.n, case.d))
    w, w64 = expert_weights(rng, (case.e, 2 * case.f, case.d), kind)
    x_dev = device(x, case.misaligned)
    got = launch_twice(lambda out: experts.expert_gemm(x_dev, w, plan, "moe_in", out=out, path=path),
                       (case.n * case.k, case.f))
    want = swiglu(grouped_linear(x.astype(F64)[ref_plan.sorted_tokens], w64, ref_plan))  # [NK, F]
    assert_close(got, want, rtol_for(path), f"moe_in {case.name} {path}-{kind}")


@pytest.mark.parametrize("path,kind", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_moe_out(rng, case, path, kind):
    # act [NK, F] grouped, output_linear [E, D, F] -> y_slot [NK, D] scattered to slot order, unweighted
    skip_if_unsupported(path)
    plan, ref_plan = make_plans(rng, case)
    act = normal(rng, (case.n * case.k, case.f))
    w, w64 = expert_weights(rng, (case.e, case.d, case.f), kind)
    act_dev = device(act, case.misaligned)
    got = launch_twice(lambda out: experts.expert_gemm(act_dev, w, plan, "moe_out", out=out, path=path),
                       (case.n * case.k, case.d))
    want = ref_ungroup(grouped_linear(act.astype(F64), w64, ref_plan), ref_plan).reshape(-1, case.d)
    assert_close(got, want, rtol_for(path), f"moe_out {case.name} {path}-{kind}")


@pytest.mark.parametrize("path,kind", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_moa_map(rng, case, path, kind):
    # x [N, D] gathered by token, query weights [E, H*Dh, D] -> q [NK, H*Dh] scattered to slot order
    skip_if_unsupported(path)
    plan, ref_plan = make_plans(rng, case)
    x = normal(rng, (case.n, case.d))
    w, w64 = expert_weights(rng, (case.e, case.f, case.d), kind)
    x_dev = device(x, case.misaligned)
    got = launch_twice(lambda out: experts.expert_gemm(x_dev, w, plan, "moa_map", out=out, path=path),
                       (case.n * case.k, case.f))
    want = ref_moa_map(x.astype(F64), ref_plan, w64)  # [N, K, H*Dh]
    assert_close(got, want.reshape(-1, case.f), rtol_for(path), f"moa_map {case.name} {path}-{kind}")
    public = experts.moa_map(x_dev, plan, w, path=path)  # the [N, K, H*Dh] API around the same launch
    assert public.shape == (case.n, case.k, case.f)
    assert np.array_equal(public.get().reshape(-1, case.f).view(np.uint32), got.view(np.uint32))


@pytest.mark.parametrize("path,kind", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_moa_reduce(rng, case, path, kind):
    # context [N, K, H*Dh] gathered by slot, output weights [E, D, H*Dh] -> y_slot [NK, D]; then combine
    skip_if_unsupported(path)
    plan, ref_plan = make_plans(rng, case)
    context = normal(rng, (case.n, case.k, case.f))
    w, w64 = expert_weights(rng, (case.e, case.d, case.f), kind)
    bias = normal(rng, (case.d,))
    ctx_dev = device(context, case.misaligned)
    got = launch_twice(
        lambda out: experts.expert_gemm(ctx_dev.reshape(-1, case.f), w, plan, "moa_reduce", out=out, path=path),
        (case.n * case.k, case.d))
    grouped = context.astype(F64).reshape(-1, case.f)[ref_plan.sorted_slots]
    want_slot = ref_ungroup(grouped_linear(grouped, w64, ref_plan), ref_plan).reshape(-1, case.d)
    assert_close(got, want_slot, rtol_for(path), f"moa_reduce y_slot {case.name} {path}-{kind}")

    y = experts.moa_reduce(ctx_dev, plan, w, cp.asarray(bias), path=path)  # [N, D], gates and bias applied
    want = ref_moa_reduce(context.astype(F64), ref_plan, w64, bias.astype(F64))
    assert_close(y.get(), want, rtol_for(path), f"moa_reduce {case.name} {path}-{kind}")
    again = experts.moa_reduce(ctx_dev, plan, w, cp.asarray(bias), path=path)
    assert np.array_equal(y.get().view(np.uint32), again.get().view(np.uint32)), "two runs differ bitwise"


@pytest.mark.parametrize("path,kind", PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_moe_experts(rng, case, path, kind):
    # The whole expert part of the MoE on a given plan: moe_in, moe_out, combine (gates and bias)
    skip_if_unsupported(path)
    plan, ref_plan = make_plans(rng, case)
    x = normal(rng, (case.n, case.d))
    w_in, w_in64 = expert_weights(rng, (case.e, 2 * case.f, case.d), kind)
    w_out, w_out64 = expert_weights(rng, (case.e, case.d, case.f), kind)
    bias = normal(rng, (case.d,))
    w = ExpertWeights(cp.asarray(normal(rng, (case.e, case.d))), w_in, w_out, cp.asarray(bias))
    y = experts.moe_experts(device(x, case.misaligned), plan, w, path=path).get()
    act = swiglu(grouped_linear(x.astype(F64)[ref_plan.sorted_tokens], w_in64, ref_plan))
    slot_y = ref_ungroup(grouped_linear(act, w_out64, ref_plan), ref_plan)
    want = ref_combine(slot_y, ref_plan.top_k_gates, bias.astype(F64))
    assert_close(y, want, rtol_for(path), f"moe experts {case.name} {path}-{kind}")


@pytest.mark.parametrize("variant", experts.VARIANTS)
@pytest.mark.parametrize("path,kind", FAST_PATHS, ids=[f"{p}-{w}" for p, w in FAST_PATHS])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fast_paths_equal_the_naive_kernel(rng, case, path, kind, variant):
    # The ladder's middle rung: each tiled path against the one-thread-per-output kernel on the same device
    # inputs. simt and gemv differ from naive only in float32 summation order (F32_RTOL); mma rounds A to bf16.
    skip_if_unsupported(path)
    plan, _ = make_plans(rng, case)
    rows = case.n if variant in experts.GATHER_BY_TOKEN else case.n * case.k
    k_in = case.d if variant in experts.GATHER_BY_TOKEN else case.f
    n_out = {"moe_in": 2 * case.f, "moe_out": case.d, "moa_map": case.f, "moa_reduce": case.d}[variant]
    a = device(normal(rng, (rows, k_in)), case.misaligned)
    w, _ = expert_weights(rng, (case.e, n_out, k_in), kind)
    out_cols = case.f if variant == "moe_in" else n_out
    naive = launch_twice(lambda out: experts.expert_gemm(a, w, plan, variant, out=out, path="naive"),
                         (case.n * case.k, out_cols))
    fast = launch_twice(lambda out: experts.expert_gemm(a, w, plan, variant, out=out, path=path),
                        (case.n * case.k, out_cols))
    assert_close(fast, naive.astype(F64), rtol_for(path), f"{variant} {case.name} {path}-{kind} against naive")


# ------------------------------------------------------------------------------------------------- combine

@pytest.mark.parametrize("n,k,d", [(37, 3, 45), (5, 1, 64), (64, 2, 130), (1, 8, 7)])
def test_combine_is_the_float32_fixed_order_sum(rng, n, k, d):
    y = normal(rng, (n, k, d))
    gates = (rng.random((n, k)) + 0.5).astype(np.float32)
    bias = normal(rng, (d,))
    got = launch_twice(lambda out: experts.combine(cp.asarray(y), cp.asarray(gates), cp.asarray(bias), out=out),
                       (n, d))
    # float32, k in order, each product and sum rounded once (what NumPy's float32 combine does)
    want32 = y[:, 0] * gates[:, 0, None]
    for j in range(1, k):
        want32 = want32 + y[:, j] * gates[:, j, None]
    want32 = want32 + bias
    assert np.array_equal(got.view(np.uint32), want32.view(np.uint32)), "combine differs from the float32 sum"
    assert_close(got, ref_combine(y.astype(F64), gates.astype(F64), bias.astype(F64)), F32_RTOL, "combine")


def test_combine_grid_stride_loop(rng, monkeypatch):
    monkeypatch.setattr(experts, "COMBINE_MAX_BLOCKS", 2)  # 512 threads for 40*300 elements
    y, gates, bias = normal(rng, (40, 2, 300)), (rng.random((40, 2)) + 0.5).astype(np.float32), normal(rng, (300,))
    got = launch_twice(lambda out: experts.combine(cp.asarray(y), cp.asarray(gates), cp.asarray(bias), out=out),
                       (40, 300))
    assert_close(got, ref_combine(y.astype(F64), gates.astype(F64), bias.astype(F64)), F32_RTOL, "combine")


# ------------------------------------------------------------------------------------- the MoE, end to end

def routable_tokens(rng, n, d, router):
    """x [N, D] whose router logits (float64) are all at least 1e-3 apart in every row, far above float32
    error (~1e-6 here), so the GPU's float32 router must pick the same experts in the same order."""
    x = normal(rng, (n, d))
    for _ in range(1000):
        logits = np.sort(x.astype(F64) @ router.astype(F64).T, axis=1)
        bad = np.diff(logits, axis=1).min(axis=1, initial=np.inf) < 1e-3
        if not bad.any():
            return x
        x[bad] = normal(rng, (int(bad.sum()), d))
    raise AssertionError("could not draw well-separated router logits")


MOE_CASES = [  # name, B, T, D, F, E, K
    ("prefill", 2, 75, 40, 36, 6, 2),
    ("prefill_aligned", 1, 96, 64, 48, 8, 2),
    ("decode", 1, 1, 64, 48, 8, 2),
    ("decode_batch", 3, 1, 33, 17, 4, 2),
    ("k1", 1, 40, 24, 20, 4, 1),
    ("k_eq_e", 2, 20, 32, 16, 3, 3),
]


@pytest.mark.parametrize("path,kind", [(None, "f32"), (None, "bf16")] + PATHS,
                         ids=["auto-f32", "auto-bf16"] + PATH_IDS)
@pytest.mark.parametrize("name,batch,tokens,hidden,inter,num_experts,top_k", MOE_CASES, ids=[c[0] for c in MOE_CASES])
def test_moe_matches_reference(rng, name, batch, tokens, hidden, inter, num_experts, top_k, path, kind):
    skip_if_unsupported(path)
    n = batch * tokens
    router = normal(rng, (num_experts, hidden), 1.0 / np.sqrt(hidden))
    x = routable_tokens(rng, n, hidden, router).reshape(batch, tokens, hidden)
    w_in, w_in64 = expert_weights(rng, (num_experts, 2 * inter, hidden), kind)
    w_out, w_out64 = expert_weights(rng, (num_experts, hidden, inter), kind)
    bias = normal(rng, (hidden,))
    w = ExpertWeights(cp.asarray(router), w_in, w_out, cp.asarray(bias))
    w64 = ExpertWeights(router.astype(F64), w_in64, w_out64, bias.astype(F64))
    used = path or experts.select_path(n, w_in.dtype, experts.compute_capability())
    rtol = rtol_for(used)

    with trace.capture() as got_trace:
        y, logits = experts.moe(cp.asarray(x), w, top_k, path=path)
    with trace.capture() as want_trace:
        want_y, want_logits = ref_moe(x.astype(F64), w64, top_k)

    assert y.shape == (batch, tokens, hidden) and logits.shape == (n, num_experts)
    assert_close(logits.get(), want_logits, ROUTER_RTOL, "router logits")
    assert_close(y.get(), want_y, rtol, f"moe {name} {used}-{kind}")
    assert list(got_trace) == list(want_trace), "trace names or order differ from reference/experts.py"
    for key in want_trace:
        got, want = to_numpy(got_trace[key]), want_trace[key]
        if key.endswith("top_k_indices"):
            assert np.array_equal(got, want), "router chose different experts"
        else:
            assert_close(got, want, ROUTER_RTOL if key.startswith("router.") else rtol, f"trace {key}")

    # Tracing changes nothing: the untraced forward is bitwise the traced one (and deterministic).
    y_again, _ = experts.moe(cp.asarray(x), w, top_k, path=path)
    assert np.array_equal(y.get().view(np.uint32), y_again.get().view(np.uint32))
