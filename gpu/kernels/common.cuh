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

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}
