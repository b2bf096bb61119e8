"""cudasim's CUDA rules, each with a kernel that breaks it (and its fixed twin, which must pass).

The emulator knows nothing of JetMoE: these kernels are written here. Each rule test runs the broken kernel and
checks that the error names the cause and the source line.
"""

import numpy as np
import pytest

import cudasim as cp
from cudasim import KernelError

SOURCE = r"""
extern "C" __global__ void block_sum(const float* x, float* out, long long n) {
    __shared__ float partial[32];
    float v = 0.0f;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) v += x[blockIdx.x * n + i];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        float p = threadIdx.x < blockDim.x / 32 ? partial[threadIdx.x] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) p += __shfl_down_sync(0xffffffffu, p, o);
        if (threadIdx.x == 0) out[blockIdx.x] = p;
    }
}

extern "C" __global__ void early_exit_barrier(float* out) {
    if (threadIdx.x == 5) return;
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}

extern "C" __global__ void two_barriers(float* out) {
    if (threadIdx.x < 32) {
        __syncthreads();  // low warp
    } else {
        __syncthreads();  // high warp
    }
    out[threadIdx.x] = 1.0f;
}

extern "C" __global__ void barrier_in_branch(float* out) {
    // every thread reaches the same barrier through different control flow: legal
    float v = 0.0f;
    if (threadIdx.x % 2) { v = 1.0f; }
    for (int i = 0; i < (int)threadIdx.x % 3; ++i) v += 1.0f;
    __syncthreads();
    out[threadIdx.x] = v;
}

extern "C" __global__ void mask_omits_self(float* out) {
    const float v = __shfl_xor_sync(0x0000ffffu, (float)threadIdx.x, 1);
    out[threadIdx.x] = v;
}

extern "C" __global__ void lane_never_arrives(float* out) {
    if (threadIdx.x == 7) return;
    out[threadIdx.x] = __shfl_sync(0xffffffffu, (float)threadIdx.x, 0);
}

extern "C" __global__ void half_warp_shuffles(int* out) {
    // two disjoint masks in one warp, each complete: legal
    const unsigned mask = threadIdx.x < 16 ? 0x0000ffffu : 0xffff0000u;
    const int up = __shfl_up_sync(mask, (int)threadIdx.x, 1, 16);
    const unsigned ballot = __ballot_sync(mask, threadIdx.x % 2);
    const int any = __any_sync(mask, threadIdx.x == 3);
    const int all = __all_sync(mask, threadIdx.x < 40);
    out[threadIdx.x] = up * 1000 + (int)__popc(ballot) * 10 + any * 2 + all;
}

extern "C" __global__ void write_past(float* out, long long n) {
    for (long long i = threadIdx.x; i <= n; i += blockDim.x) out[i] = 1.0f;
}

extern "C" __global__ void read_unwritten_shared(float* out) {
    __shared__ float s[64];
    if (threadIdx.x < 32) s[threadIdx.x] = 1.0f;
    __syncthreads();
    out[threadIdx.x] = s[threadIdx.x];
}

extern "C" __global__ void last_block_wins(int* out) {
    if (threadIdx.x == 0) out[0] = blockIdx.x;
}

extern "C" __global__ void uses_unsupported_ptx(float* out) {
    float v;
    asm volatile("cvt.rn.f32.f16 %0, %1;" : "=f"(v) : "h"((unsigned short)0));
    out[threadIdx.x] = v;
}

extern "C" __global__ void counts_and_masks(int* out) {
    const int count = __syncthreads_count(threadIdx.x % 3 == 0);
    const int all = __syncthreads_and(threadIdx.x < 1000);
    const int any = __syncthreads_or(threadIdx.x == 63);
    if (threadIdx.x % 32 >= 24) return;  // whole-warp barriers are done: these lanes may leave
    out[threadIdx.x] = count * 100 + all * 10 + any + (int)(__activemask() >> (threadIdx.x % 32) & 1u) * 1000;
}

extern "C" __global__ void denormal_flush(const float* x, float* out) {
    out[threadIdx.x] = x[threadIdx.x] * 0.5f;
}
"""


@pytest.fixture(scope="module")
def module():
    return cp.RawModule(code=SOURCE, options=("--std=c++17",))


def line_of(text):
    """The line of SOURCE holding `text`, numbered as the compiler numbers them."""
    return next(i for i, line in enumerate(SOURCE.split("\n"), start=1) if text in line)


def test_block_sum_matches_numpy(module, rng):
    x = rng.standard_normal((3, 1000)).astype(np.float32)
    out = cp.empty(3, cp.float32)
    module.get_function("block_sum")((3,), (256,), (cp.asarray(x), out, np.int64(1000)))
    np.testing.assert_allclose(out.get(), x.astype(np.float64).sum(1), rtol=1e-5, atol=1e-4)


def test_barrier_after_an_early_exit_is_an_error(module):
    out = cp.empty(64, cp.float32)
    line = line_of("if (threadIdx.x == 5) return;") + 1
    with pytest.raises(KernelError, match=rf"early_exit_barrier: divergent barrier.*__syncthreads\(\) at line "
                                          rf"{line}.*has exited"):
        module.get_function("early_exit_barrier")((1,), (64,), (out,))


def test_threads_at_two_different_barriers_is_an_error(module):
    out = cp.empty(64, cp.float32)
    low, high = line_of("// low warp"), line_of("// high warp")
    with pytest.raises(KernelError, match=rf"two_barriers: divergent barrier.*line {low}.*line {high}"):
        module.get_function("two_barriers")((1,), (64,), (out,))


def test_a_barrier_reached_through_any_control_flow_works(module):
    out = cp.empty(64, cp.float32)
    module.get_function("barrier_in_branch")((1,), (64,), (out,))
    t = np.arange(64)
    np.testing.assert_array_equal(out.get(), (t % 2) + (t % 3))


def test_mask_that_omits_the_calling_lane_is_an_error(module):
    out = cp.empty(32, cp.float32)
    with pytest.raises(KernelError, match=r"mask_omits_self: __shfl_xor_sync\(\) at line \d+: mask 0x0000ffff omits "
                                          r"the calling lane 16"):
        module.get_function("mask_omits_self")((1,), (32,), (out,))


def test_a_named_lane_that_never_arrives_is_an_error(module):
    out = cp.empty(32, cp.float32)
    with pytest.raises(KernelError, match=r"lane_never_arrives: __shfl_sync\(\) at line \d+.*lane 7.*(exited|never)"):
        module.get_function("lane_never_arrives")((1,), (32,), (out,))


def test_collectives_over_half_warps(module):
    out = cp.empty(32, cp.int32)
    module.get_function("half_warp_shuffles")((1,), (32,), (out,))
    t = np.arange(32)
    seg = t % 16
    up = np.where(seg >= 1, t - 1, t)
    any_ = np.where(t < 16, 1, 0)  # lane 3 is in the low half only
    want = up * 1000 + 8 * 10 + any_ * 2 + 1
    np.testing.assert_array_equal(out.get(), want)


def test_write_past_an_allocation_is_caught(module):
    n = 64  # 256 bytes: the allocation ends exactly at its guard page
    out = cp.empty(n, cp.float32)
    with pytest.raises(KernelError, match=r"write_past: invalid memory access.*0 bytes past the end of a 256-byte "
                                          r"allocation"):
        module.get_function("write_past")((1,), (32,), (out, np.int64(n)))


def test_unwritten_memory_reads_as_nan(module):
    out = cp.empty(64, cp.float32)
    assert np.isnan(cp.empty(16, cp.float32).get()).all()
    module.get_function("read_unwritten_shared")((1,), (64,), (out,))
    got = out.get()
    assert (got[:32] == 1).all() and np.isnan(got[32:]).all()


@pytest.mark.parametrize("order, first", [("forward", 9), ("reverse", 0)])
def test_block_order_is_selectable(module, monkeypatch, order, first):
    monkeypatch.setenv("CUDASIM_BLOCK_ORDER", order)
    out = cp.zeros(1, cp.int32)
    module.get_function("last_block_wins")((10,), (32,), (out,))
    assert int(out.get()[0]) == first


def test_random_block_order_is_seeded(module, monkeypatch):
    results = set()
    for seed in range(8):
        monkeypatch.setenv("CUDASIM_BLOCK_ORDER", f"random:{seed}")
        out = cp.zeros(1, cp.int32)
        module.get_function("last_block_wins")((10,), (32,), (out,))
        results.add(int(out.get()[0]))
    assert len(results) > 1, "eight seeds gave the same last block: the order is not random"


def test_unsupported_ptx_is_an_error_naming_it(module):
    out = cp.empty(32, cp.float32)
    with pytest.raises(KernelError, match=r"unsupported inline PTX under cudasim: cvt.rn.f32.f16"):
        module.get_function("uses_unsupported_ptx")((1,), (32,), (out,))


def test_unsupported_intrinsic_is_a_compile_error_naming_it():
    with pytest.raises(cp.CompileError, match="__nanosleep"):
        cp.RawModule(code='extern "C" __global__ void k() { __nanosleep(10); }')


def test_barrier_reductions_and_the_active_mask(module):
    out = cp.full(64, -1, cp.int32)
    module.get_function("counts_and_masks")((1,), (64,), (out,))
    got = out.get().reshape(2, 32)
    assert (got[:, 24:] == -1).all()
    assert (got[:, :24] == 22 * 100 + 10 + 1 + 1000).all()  # 22 of 0..63 are multiples of 3


def test_denormals_are_flushed(module):
    x = np.full(32, 1e-38, np.float32)  # normal; half of it is a float32 denormal
    out = cp.empty(32, cp.float32)
    module.get_function("denormal_flush")((1,), (32,), (cp.asarray(x), out))
    assert (out.get() == 0).all()


def test_argument_of_the_wrong_size_is_refused(module):
    out = cp.empty(64, cp.float32)
    with pytest.raises(TypeError, match=r"argument 1 of kernel write_past \(long long\) got int32"):
        module.get_function("write_past")((1,), (32,), (out, np.int32(64)))


def test_host_array_argument_is_refused(module):
    with pytest.raises(TypeError, match="host NumPy array"):
        module.get_function("write_past")((1,), (32,), (np.zeros(64, np.float32), np.int64(1)))
