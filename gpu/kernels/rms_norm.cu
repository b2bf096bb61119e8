// RMSNorm: the twin of reference/norm.py.
//
// Shapes: reference/__init__.py, and R rows (every leading dim of x flattened).
//   x [R, D] float32, weight [D] float32 (rms_norm_f32) or bf16 bits (rms_norm_bf16), y [R, D] float32.
//
// One block per row: each thread sums x^2 over a strided part of the row in float32, a fixed-shape block tree
// (warp shuffles, then one warp over the warp partials) gives sum(x^2) deterministically; then
//   y = w * (x * (1 / sqrt(sum / D + eps)))
// with the same roundings as the reference (mean = float32 sum / D, IEEE sqrt and division, x * inv rounded
// before the weight multiply); only the summation order of sum(x^2) differs from NumPy's pairwise sum.
// y may alias x: a thread writes only the elements it alone read, after the block-wide reduction.
#include "common.cuh"

// Sum of v over the block (blockDim.x a multiple of 32, <= 1024), returned to every thread.
__device__ float block_sum(float v) {
    __shared__ float warp_partials[32];
    __shared__ float total;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, num_warps = blockDim.x / 32;
    v = warp_sum(v);
    if (lane == 0) warp_partials[warp] = v;
    __syncthreads();
    if (warp == 0) {
        const float partial = lane < num_warps ? warp_partials[lane] : 0.0f;
        const float sum = warp_sum(partial);
        if (lane == 0) total = sum;
    }
    __syncthreads();
    return total;
}

template <typename W>
__device__ void rms_norm_row(const float* x, const W* weight, float* y, long long dim, float eps) {
    const long long row = blockIdx.x;
    const float* in = x + row * dim;
    float* out = y + row * dim;
    float squares = 0.0f;
    for (long long i = threadIdx.x; i < dim; i += blockDim.x) squares += in[i] * in[i];
    const float mean = block_sum(squares) / static_cast<float>(dim);
    const float inv_rms = 1.0f / sqrtf(mean + eps);  // not rsqrtf: the reference rounds sqrt and 1/x separately
    for (long long i = threadIdx.x; i < dim; i += blockDim.x) out[i] = load_as_float(weight, i) * (in[i] * inv_rms);
}

// x: [R, D] float32, weight: [D] float32, y: [R, D] float32. grid R, blockDim a multiple of 32 (<= 1024).
extern "C" __global__ void rms_norm_f32(const float* x, const float* __restrict__ weight, float* y, long long dim,
                                        float eps) {
    rms_norm_row(x, weight, y, dim, eps);
}

// x: [R, D] float32, weight: [D] bf16 bits, y: [R, D] float32. grid R, blockDim a multiple of 32 (<= 1024).
extern "C" __global__ void rms_norm_bf16(const float* x, const bf16_bits* __restrict__ weight, float* y,
                                         long long dim, float eps) {
    rms_norm_row(x, weight, y, dim, eps);
}
