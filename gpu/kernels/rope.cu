// Rotary position embedding with rotate_half: the twin of reference/rope.py (cos_sin + apply_rope).
//
// Shapes: reference/__init__.py, and P heads (K*H query heads or H kv heads).
//   x [B, P, T, Dh] float32, position_ids [B or 1, T] int64, inv_freq [Dh/2] float32, y [B, P, T, Dh] float32.
//
// One thread per rotated pair (i, i + Dh/2) of one (b, p, t) row:
//   angle = float32(position) * inv_freq[i]             (HF: inv_freq.float() @ position_ids.float(), one product)
//   y[i]        = x[i] * cos(angle) - x[i + Dh/2] * sin(angle)
//   y[i + Dh/2] = x[i + Dh/2] * cos(angle) + x[i] * sin(angle)
// Products and sums use __fmul_rn/__fadd_rn so they are rounded separately like NumPy's x * cos + rotate_half(x)
// * sin (no FMA contraction); cos/sin are the accurate sincosf (<= 2 ulp over the whole range, large positions
// included), so the only difference from the reference is the last bits of cos and sin.
// y may alias x (in-place): each thread reads and writes only its own pair.
#include "common.cuh"

// position_stride: T when position_ids is [B, T], 0 when it is [1, T] (shared by the whole batch).
// grid * blockDim >= B * P * T * Dh/2 threads.
extern "C" __global__ void rope_f32(const float* x, const long long* __restrict__ position_ids,
                                    const float* __restrict__ inv_freq, float* y, long long batch, long long heads,
                                    long long tokens, long long head_dim, long long position_stride) {
    const long long half = head_dim / 2;
    const long long pair = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (pair >= batch * heads * tokens * half) return;
    const long long i = pair % half;
    const long long row = pair / half;  // flattened (b, p, t)
    const long long t = row % tokens;
    const long long b = row / (heads * tokens);

    const float angle = static_cast<float>(position_ids[b * position_stride + t]) * inv_freq[i];
    float sin_a, cos_a;
    sincosf(angle, &sin_a, &cos_a);

    const float first = x[row * head_dim + i];
    const float second = x[row * head_dim + i + half];
    y[row * head_dim + i] = __fadd_rn(__fmul_rn(first, cos_a), -__fmul_rn(second, sin_a));
    y[row * head_dim + i + half] = __fadd_rn(__fmul_rn(second, cos_a), __fmul_rn(first, sin_a));
}
