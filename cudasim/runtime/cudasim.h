// CUDA C++ built-ins for kernels compiled by the host C++ compiler under cudasim (force-included before the
// kernel source). Only what is defined here exists: any other CUDA built-in is a compile error that names it.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "cudasim_abi.h"

#define __CUDACC__ 1
#define __CUDA_ARCH__ 800  // the mma.sync paths are emulated (sm_80's instruction set as far as cudasim goes)
#define __device__
#define __host__
#ifdef CUDASIM_SCAN
#define __global__ cudasim_global_marker  // compiler.kernel_names finds the kernels by it
#else
#define __global__
#endif
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// A __shared__ variable is a function-local static (CUDA allows no other kind in device code, so the module's local
// statics are exactly its shared memory; cudasim/kernel.py finds them in the symbol table and the core fills them
// with NaN before each block runs). Blocks run one at a time, so a static is exactly one block's shared memory.
#define __shared__ static
#define __constant__ static

struct dim3 { unsigned int x = 1, y = 1, z = 1; };
typedef cudasim_uint3 uint3;

#define threadIdx (cudasim_cur->threadIdx)
#define blockIdx cudasim_blockIdx
#define blockDim cudasim_blockDim
#define gridDim cudasim_gridDim
#define warpSize 32

// ------------------------------------------------------------------------------------------- barriers
#define __syncthreads() cudasim_barrier_wait(CUDASIM_BAR, __LINE__, 0)
#define __syncthreads_count(p) (cudasim_barrier_wait(CUDASIM_BAR_COUNT, __LINE__, (p) != 0), cudasim_barrier_result())
#define __syncthreads_and(p) (cudasim_barrier_wait(CUDASIM_BAR_AND, __LINE__, (p) != 0), cudasim_barrier_result())
#define __syncthreads_or(p) (cudasim_barrier_wait(CUDASIM_BAR_OR, __LINE__, (p) != 0), cudasim_barrier_result())
inline void cudasim_syncwarp(int line, unsigned mask = 0xffffffffu) {
    cudasim_collective(CUDASIM_SYNCWARP, line, "__syncwarp()", mask, 0, 0, 32);
}
#define __syncwarp(...) cudasim_syncwarp(__LINE__, ##__VA_ARGS__)
#define __threadfence() ((void)0)
#define __threadfence_block() ((void)0)

// -------------------------------------------------------------------------------------- warp shuffles
namespace cudasim {
template <typename T>
inline T shuffle(int op, int line, const char* what, unsigned mask, T var, int arg, int width = 32) {
    static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
    uint64_t bits = 0;
    memcpy(&bits, &var, sizeof(T));
    bits = cudasim_collective(op, line, what, mask, bits, arg, width);
    T out;
    memcpy(&out, &bits, sizeof(T));
    return out;
}
}  // namespace cudasim
#define __shfl_sync(...) cudasim::shuffle(CUDASIM_SHFL_IDX, __LINE__, "__shfl_sync()", __VA_ARGS__)
#define __shfl_up_sync(...) cudasim::shuffle(CUDASIM_SHFL_UP, __LINE__, "__shfl_up_sync()", __VA_ARGS__)
#define __shfl_down_sync(...) cudasim::shuffle(CUDASIM_SHFL_DOWN, __LINE__, "__shfl_down_sync()", __VA_ARGS__)
#define __shfl_xor_sync(...) cudasim::shuffle(CUDASIM_SHFL_XOR, __LINE__, "__shfl_xor_sync()", __VA_ARGS__)
#define __ballot_sync(mask, p) \
    static_cast<unsigned>(cudasim_vote(CUDASIM_BALLOT, __LINE__, "__ballot_sync()", (mask), (p) != 0))
#define __any_sync(mask, p) cudasim_vote(CUDASIM_ANY, __LINE__, "__any_sync()", (mask), (p) != 0)
#define __all_sync(mask, p) cudasim_vote(CUDASIM_ALL, __LINE__, "__all_sync()", (mask), (p) != 0)
#define __activemask() cudasim_activemask()

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32: inline PTX is rewritten into this call (cudasim/compiler.py)
namespace cudasim {
inline void mma_m16n8k16_bf16(int line, float& d0, float& d1, float& d2, float& d3, unsigned a0, unsigned a1,
                              unsigned a2, unsigned a3, unsigned b0, unsigned b1, float c0, float c1, float c2,
                              float c3) {
    float in[10];
    const unsigned regs[6] = {a0, a1, a2, a3, b0, b1};
    memcpy(in, regs, sizeof regs);
    in[6] = c0; in[7] = c1; in[8] = c2; in[9] = c3;
    float out[4];
    cudasim_mma(line, in, out);
    d0 = out[0]; d1 = out[1]; d2 = out[2]; d3 = out[3];
}
}  // namespace cudasim

// ldmatrix addresses shared memory by 32-bit offsets (__cvta_generic_to_shared): here, offsets from a per-module
// anchor (the module's statics, its shared memory, lie within 2 GiB of it).
namespace cudasim {
static char shared_anchor;
inline void ldmatrix(int line, int count, int trans, unsigned address, unsigned* out) {
    cudasim_ldmatrix(line, count, trans, &shared_anchor + static_cast<int>(address), out);
}
}  // namespace cudasim
#define __cvta_generic_to_shared(p) \
    static_cast<size_t>(static_cast<unsigned>(reinterpret_cast<const char*>(p) - &cudasim::shared_anchor))

// ------------------------------------------------------------------------------------ float and bit math
// float32 as NVRTC compiles it with -ftz: the core runs kernels with flush-to-zero and denormals-are-zero set.
// The _rn intrinsics round once, as IEEE operations do; the module is compiled with -ffp-contract=off, so only
// explicit fmaf fuses (see docs/gpu.md for what differs from the GPU: expf and friends are glibc's).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float rsqrtf(float a) { return 1.0f / sqrtf(a); }
inline float __expf(float a) { return expf(a); }
inline float __logf(float a) { return logf(a); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __uint_as_float(unsigned int u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned int __float_as_uint(float f) { unsigned int u; memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int u; memcpy(&u, &f, 4); return u; }
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned int __brev(unsigned int x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    x = ((x >> 8) & 0x00ff00ffu) | ((x & 0x00ff00ffu) << 8);
    return (x >> 16) | (x << 16);
}
template <typename T> inline T __ldg(const T* p) { return *p; }
using std::max;
using std::min;

// ------------------------------------------------------------------------------------------------ atomics
// Fibers switch only at barriers and collectives, so a read-modify-write is never interleaved.
template <typename T> inline T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }
template <typename T> inline T atomicSub(T* p, T v) { T old = *p; *p = old - v; return old; }
template <typename T> inline T atomicMax(T* p, T v) { T old = *p; *p = old < v ? v : old; return old; }
template <typename T> inline T atomicMin(T* p, T v) { T old = *p; *p = v < old ? v : old; return old; }
template <typename T> inline T atomicExch(T* p, T v) { T old = *p; *p = v; return old; }
template <typename T> inline T atomicCAS(T* p, T cmp, T v) { T old = *p; if (old == cmp) *p = v; return old; }

#define CUDASIM_UNSUPPORTED(what) cudasim_fail(__LINE__, "unsupported by cudasim: " what)
