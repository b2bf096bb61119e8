"""Planted bugs: mutated copies of gpu/kernels/*.cu must fail on the CPU emulator (cudasim), each with a message
that names the cause; the unmodified kernels give bitwise the same results in forward, reverse and random block
order.

Each mutation replaces one exact piece of the real source (the test fails first if that piece is gone, so a
kernel edit cannot make a planted bug vanish silently) and is loaded in place of the op's module. These tests
are about the emulator's checks, so they run where gpu/device.py hands out cudasim (a GPU may or may not trip
over the same bugs: races there depend on timing); on a CUDA machine they run under JETMOE_GPU=emulate through
`make gpu-check`.
"""

import numpy as np
import pytest

import os

import gpu.kernels
from gpu import experts, linear, norm, routing
from gpu.device import emulated, require_cupy
from gpu.model import JetMoeForCausalLM as GpuCausalLM

from gpu_helpers import cp
from paths import GOLDEN, GOLDEN_NAMES

pytestmark = pytest.mark.requires_gpu


@pytest.fixture(autouse=True)
def emulator_only():
    if not emulated(require_cupy()):
        pytest.skip("planted-bug tests check the CPU emulator's rules (make gpu-check runs them with "
                    "JETMOE_GPU=emulate)")


def mutated(monkeypatch, op, old, new, count=1):
    """Load op's kernels from its source with `old` replaced by `new` (which must occur `count` times)."""
    source = gpu.kernels.source(op)
    assert source.count(old) == count, f"{op}.cu no longer contains the piece this planted bug mutates: {old!r}"
    module = require_cupy().RawModule(code=source.replace(old, new), options=gpu.kernels.NVRTC_OPTIONS)
    real = gpu.kernels.module
    monkeypatch.setattr(gpu.kernels, "module", lambda name: module if name == op else real(name))


def rms_inputs(rng, rows=6, dim=200):
    # dim * 4 bytes a multiple of 16: the last row ends exactly at the allocation's end (its guard page)
    x = rng.standard_normal((rows, dim)).astype(np.float32)
    w = (rng.standard_normal(dim) * 0.5 + 1).astype(np.float32)
    return x, w


def rms_reference(x, w):
    x64 = x.astype(np.float64)
    return w * (x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + norm.BLOCK_NORM_EPS))


def assert_rms_correct(x, w):
    got = norm.rms_norm(cp.asarray(x), cp.asarray(w), norm.BLOCK_NORM_EPS).get()
    assert np.isfinite(got).all(), ("rms_norm output has NaN: a read of memory nobody wrote (the emulator fills "
                                    "shared and device memory with NaN)")
    np.testing.assert_allclose(got, rms_reference(x, w), rtol=1e-5, atol=1e-6)


def test_unmodified_rms_norm_passes(rng):
    assert_rms_correct(*rms_inputs(rng))


def test_removed_barrier_reads_unwritten_shared_memory(rng, monkeypatch):
    # block_sum without the barrier between the warp partials' writes and warp 0 reading them
    mutated(monkeypatch, "rms_norm", "if (lane == 0) warp_partials[warp] = v;\n    __syncthreads();",
            "if (lane == 0) warp_partials[warp] = v;")
    with pytest.raises(AssertionError, match="a read of memory nobody wrote"):
        assert_rms_correct(*rms_inputs(rng))


def test_shared_memory_read_before_written(rng, monkeypatch):
    # warp 0 reads all 32 warp partials, though only blockDim / 32 = 8 were written
    mutated(monkeypatch, "rms_norm", "lane < num_warps ? warp_partials[lane] : 0.0f", "warp_partials[lane]")
    with pytest.raises(AssertionError, match="a read of memory nobody wrote"):
        assert_rms_correct(*rms_inputs(rng))


def test_shuffle_mask_omitting_the_calling_lane(rng, monkeypatch):
    mutated(monkeypatch, "rms_norm", "#include \"common.cuh\"", "#define warp_sum warp_sum_planted\n"
            "#include \"common.cuh\"\n#undef warp_sum\n"
            "__device__ float warp_sum(float v) {\n"
            "    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0x7fffffffu, v, offset);\n"
            "    return v;\n}")
    # lanes 0-30 complete the shuffle before lane 31 arrives, so the error comes from the first lane that reads it
    with pytest.raises(require_cupy().KernelError, match=r"rms_norm_f32: __shfl_xor_sync\(\) at line \d+: (mask "
                                                         r"0x7fffffff omits the calling lane 31|lane \d+ reads lane 31"
                                                         r", which mask 0x7fffffff does not name)"):
        assert_rms_correct(*rms_inputs(rng))


def test_loop_bound_one_past_a_row(rng, monkeypatch):
    mutated(monkeypatch, "rms_norm", "for (long long i = threadIdx.x; i < dim; i += blockDim.x) out[i]",
            "for (long long i = threadIdx.x; i <= dim; i += blockDim.x) out[i]")
    with pytest.raises(require_cupy().KernelError, match=r"rms_norm_f32: invalid memory access .* 0 bytes past the "
                                                         r"end of a \d+-byte allocation, at kernel.cu:\d+"):
        assert_rms_correct(*rms_inputs(rng))


def expert_case(rng):
    n, k, e, d, f = 40, 2, 4, 64, 48
    logits = rng.standard_normal((n, e)).astype(np.float32)
    plan = routing.top_k_gating(cp.asarray(rng.standard_normal((n, d)).astype(np.float32)),
                                cp.asarray(rng.standard_normal((e, d)).astype(np.float32)), k)
    del logits
    a = cp.asarray(rng.standard_normal((n, d)).astype(np.float32))
    w32 = (rng.standard_normal((e, f, d)) / np.sqrt(d)).astype(np.float32)
    u = w32.view(np.uint32).astype(np.uint64)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return a, cp.asarray(bits), plan


def mma_error(rng):
    a, w, plan = expert_case(rng)
    naive = experts.expert_gemm(a, w, plan, "moa_map", path="naive").get()
    fast = experts.expert_gemm(a, w, plan, "moa_map", path="mma").get()
    return float(np.max(np.abs(fast - naive)) / np.max(np.abs(naive)))


def test_unmodified_mma_path_matches_naive(rng):
    assert mma_error(rng) < 2e-2  # A rounded to bf16 on the mma path (test_kernels_experts.py's MMA_RTOL)


def test_swapped_mma_fragment_registers(rng, monkeypatch):
    # A fragment registers 1 and 2 (rows g + 8 and columns + 8) exchanged
    mutated(monkeypatch, "expert_gemm", "af[i][1] = lds32(p + 8 * MMA_SROW);\n                    af[i][2] = "
            "lds32(p + 8);", "af[i][2] = lds32(p + 8 * MMA_SROW);\n                    af[i][1] = lds32(p + 8);")
    err = mma_error(rng)
    assert err > 0.1, f"swapped mma fragment registers went unnoticed (rel err {err:.2e} against the naive path)"


def run_rms_in_order(monkeypatch, order, x, w):
    monkeypatch.setenv("CUDASIM_BLOCK_ORDER", order)
    return norm.rms_norm(cp.asarray(x), cp.asarray(w), norm.BLOCK_NORM_EPS).get()


def test_block_order_dependence(rng, monkeypatch):
    # every block also writes its row's first output to row 0: the last block to run wins
    mutated(monkeypatch, "rms_norm", "for (long long i = threadIdx.x; i < dim; i += blockDim.x) out[i] = "
            "load_as_float(weight, i) * (in[i] * inv_rms);",
            "for (long long i = threadIdx.x; i < dim; i += blockDim.x) out[i] = "
            "load_as_float(weight, i) * (in[i] * inv_rms);\n    if (threadIdx.x == 0 && row > 0) y[0] = out[0];")
    x, w = rms_inputs(rng)
    results = {order: run_rms_in_order(monkeypatch, order, x, w) for order in ("forward", "reverse", "random:1")}
    differs = [o for o in results if not np.array_equal(results[o], results["forward"])]
    assert differs, "the order-dependent kernel gave the same result in every block order"


ORDERS = ("forward", "reverse", "random:12345")


def every_op(rng):
    """One launch of each kind of kernel the twin uses -> {name: host result}."""
    x, w = rms_inputs(rng)
    a, wb, plan = expert_case(rng)
    xs = cp.asarray(x)
    out = {"rms_norm": norm.rms_norm(xs, cp.asarray(w), norm.BLOCK_NORM_EPS),
           "linear_gemv": linear.linear(xs[:3], cp.asarray(rng.standard_normal((70, 200)).astype(np.float32))),
           "linear_tiled": linear.linear(xs, cp.asarray(rng.standard_normal((70, 200)).astype(np.float32)))}
    for path in ("naive", "simt", "gemv", "mma"):
        out[f"experts_{path}"] = experts.expert_gemm(a, wb, plan, "moa_map", path=path)
    out["routing"] = plan.top_k_gates
    out["plan"] = plan.sorted_slots if hasattr(plan, "sorted_slots") else plan.top_k_indices
    return {k: v.get() for k, v in out.items()}


def test_unmodified_kernels_are_independent_of_block_order(seed, monkeypatch):
    results = {}
    for order in ORDERS:
        monkeypatch.setenv("CUDASIM_BLOCK_ORDER", order)
        results[order] = every_op(np.random.default_rng(seed))
    for order in ORDERS[1:]:
        for name, value in results[order].items():
            assert np.array_equal(value, results["forward"][name], equal_nan=True), \
                f"{name} differs between forward and {order} block order"


def test_the_whole_model_is_independent_of_block_order(monkeypatch):
    # every kernel the twin launches (norm, linear, rope, routing and its plan, the expert paths a forward picks,
    # combine, attention prefill and decode, the KV cache writes), in a forward and a captured greedy decode
    model = GpuCausalLM.from_pretrained(os.path.join(GOLDEN, GOLDEN_NAMES[0]))
    ids = np.arange(1, 12, dtype=np.int64)[None] % model.config.vocab_size
    results = {}
    for order in ORDERS:
        monkeypatch.setenv("CUDASIM_BLOCK_ORDER", order)
        results[order] = (model(input_ids=ids).logits.get(), model.generate(ids, max_new_tokens=4).get())
    for order in ORDERS[1:]:
        assert np.array_equal(results[order][0], results["forward"][0]), f"logits differ in {order} block order"
        assert np.array_equal(results[order][1], results["forward"][1]), f"tokens differ in {order} block order"
