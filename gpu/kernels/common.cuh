// Helpers shared by every kernel in gpu/kernels/ (included with -I gpu/kernels by NVRTC and nvcc).
//
// Shapes: the legend in reference/__init__.py (B, T, S, D, E, K, H, Dh, F, V, L, N = B*T, slot s = n*K + k).
// The kernels add NK = N*K, the number of (token, choice) slots.
//
// bf16 is carried as raw uint16 bits (the upper half of a float32), so no CUDA header is needed.
#pragma once

typedef unsigned short bf16_bits;

__device__ __forceinline__ float bf16_to_float(bf16_bits x) {
    return __uint_as_float(static_cast<unsigned int>(x) << 16);
}

// Round to nearest even, as torch and ml_dtypes do (NaN stays NaN).
__device__ __forceinline__ bf16_bits float_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<bf16_bits>((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<bf16_bits>(u >> 16);
}

__device__ __forceinline__ float load_as_float(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float load_as_float(const bf16_bits* p, long long i) { return bf16_to_float(p[i]); }

// Plain aligned vectors (no CUDA header needed): 16-byte global/shared accesses compile to 128-bit loads/stores.
struct alignas(16) f32x4 { float x, y, z, w; };
struct alignas(16) u32x4 { unsigned int x, y, z, w; };

__device__ __forceinline__ bool aligned16(const void* p) {
    return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

// VEC floats p[0..VEC-1] (VEC a multiple of 4, p 16-byte aligned) by 16-byte loads.
template <int VEC>
__device__ __forceinline__ void load_f32_vec(const float* p, float (&v)[VEC]) {
#pragma unroll
    for (int q = 0; q < VEC; q += 4) {
        const f32x4 x4 = *reinterpret_cast<const f32x4*>(p + q);
        v[q] = x4.x; v[q + 1] = x4.y; v[q + 2] = x4.z; v[q + 3] = x4.w;
    }
}

// The GEMVs' weight vectors: GemvVec<W> weights per 16-byte load, p[k..k+VEC-1] as float (p + k 16-byte aligned).
template <typename W> struct GemvVec { static constexpr int value = 4; };
template <> struct GemvVec<bf16_bits> { static constexpr int value = 8; };

__device__ __forceinline__ void load_w_vec(const float* p, long long k, float (&v)[4]) { load_f32_vec(p + k, v); }
__device__ __forceinline__ void load_w_vec(const bf16_bits* p, long long k, float (&v)[8]) {
    const u32x4 q = *reinterpret_cast<const u32x4*>(p + k);
    const unsigned int u[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // little-endian: the lower half of each word is the earlier bf16
        v[2 * i] = __uint_as_float(u[i] << 16);
        v[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
    }
}

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}
