// Dense linear layer y = x @ W^T, for the projections that are not per-expert: kv_proj, the routers, lm_head.
// Written as kernels (not cuBLAS) so a decode step can be captured in a CUDA graph from CuPy.
//
// Shapes: x [M, Kin] float32 (row-major), W [Nout, Kin] float32 or bf16 bits (HF's nn.Linear layout),
// y [M, Nout] float32. Shapes (reference/__init__.py) in the model: M = N tokens (or B at decode), Kin = D, Nout = 2*H*Dh, E or V.
//
// Two algorithms, chosen on the host from M alone:
//   linear_gemv_*   M <= GEMV_MAX_ROWS (decode): one warp per output column n streams W[n, :] once,
//                   coalesced, and dots it with every x row; memory-bound on W, which is the point. Each lane
//                   reads 16 bytes at a time (8 bf16 or 4 float32: 512 B per warp load, against 64 B for bf16
//                   scalars) when k_in is a multiple of that vector and x and W are 16-byte aligned, so that
//                   every row starts aligned; otherwise (a view at an odd offset, an odd k_in) lane-strided
//                   scalars. There is no vector body with a scalar tail: with k_in not a multiple of the vector
//                   the rows after row 0 start misaligned, so the vector path could not serve them anyway.
//                   The choice is made on the device, uniformly per launch; the host needs C-contiguous W.
//   linear_tiled_*  otherwise: 64x64 output tiles, 16-wide K steps staged in shared memory, 4x4 outputs
//                   per thread; correct for any M, Nout, Kin (edges are zero-padded in shared memory).
// Accumulation is float32 in a fixed order: results are bitwise reproducible.
#include "common.cuh"

#define GEMV_MAX_ROWS 8
#define TILE 64
#define TILE_K 16

// W[n, k..k+VEC-1] as floats: one 16-byte load, or (VEC = 1) one scalar.
template <int VEC, typename W>
__device__ __forceinline__ void load_weights(const W* w_row, long long k, float (&v)[VEC]) {
    if constexpr (VEC == 1) v[0] = load_as_float(w_row, k);
    else load_w_vec(w_row, k, v);
}

// x[k..k+VEC-1] of one row: 16-byte loads, or (VEC = 1) one scalar.
template <int VEC>
__device__ __forceinline__ void load_x(const float* x_row, long long k, float (&v)[VEC]) {
    if constexpr (VEC == 1) v[0] = x_row[k];
    else load_f32_vec(x_row + k, v);
}

// Output column n of every x row: lane l takes k = l*VEC .. l*VEC+VEC-1, then the same 32*VEC further on.
template <int VEC, typename W>
__device__ __forceinline__ void gemv_column(const float* x, const W* w_row, float* y, long long n, long long m_rows,
                                            long long n_out, long long k_in) {
    const int lane = threadIdx.x % 32;
    float acc[GEMV_MAX_ROWS];
    for (int r = 0; r < GEMV_MAX_ROWS; ++r) acc[r] = 0.0f;
    for (long long k = (long long)lane * VEC; k < k_in; k += 32 * VEC) {
        float wv[VEC];
        load_weights(w_row, k, wv);
#pragma unroll
        for (int r = 0; r < GEMV_MAX_ROWS; ++r) {
            if (r < m_rows) {
                float xv[VEC];
                load_x(x + r * k_in, k, xv);
#pragma unroll
                for (int q = 0; q < VEC; ++q) acc[r] = fmaf(xv[q], wv[q], acc[r]);
            }
        }
    }
    for (int r = 0; r < GEMV_MAX_ROWS; ++r) {
        if (r >= m_rows) break;
        const float total = warp_sum(acc[r]);
        if (lane == 0) y[r * n_out + n] = total;
    }
}

template <typename W>
__device__ void linear_gemv(const float* x, const W* w, float* y, long long m_rows, long long n_out, long long k_in) {
    const long long warps_per_block = blockDim.x / 32;
    const long long n = blockIdx.x * warps_per_block + threadIdx.x / 32;
    if (n >= n_out) return;
    constexpr int VEC = GemvVec<W>::value;
    const W* w_row = w + n * k_in;
    if (k_in % VEC == 0 && aligned16(x) && aligned16(w))  // the same for every warp: no divergence
        gemv_column<VEC>(x, w_row, y, n, m_rows, n_out, k_in);
    else
        gemv_column<1>(x, w_row, y, n, m_rows, n_out, k_in);
}

template <typename W>
__device__ void linear_tiled(const float* x, const W* w, float* y, long long m_rows, long long n_out, long long k_in) {
    __shared__ float xs[TILE_K][TILE + 1];  // +1: no bank conflicts on the transposed store
    __shared__ float ws[TILE_K][TILE + 1];
    const long long row0 = blockIdx.y * (long long)TILE, col0 = blockIdx.x * (long long)TILE;
    const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;  // 256 threads: 16x16, 4x4 outputs each
    float acc[4][4] = {};
    for (long long k0 = 0; k0 < k_in; k0 += TILE_K) {
        for (int i = threadIdx.x; i < TILE * TILE_K; i += blockDim.x) {
            const int r = i / TILE_K, kk = i % TILE_K;
            const long long gk = k0 + kk;
            xs[kk][r] = (row0 + r < m_rows && gk < k_in) ? x[(row0 + r) * k_in + gk] : 0.0f;
            ws[kk][r] = (col0 + r < n_out && gk < k_in) ? load_as_float(w, (col0 + r) * k_in + gk) : 0.0f;
        }
        __syncthreads();
        for (int kk = 0; kk < TILE_K; ++kk) {
            float a[4], b[4];
            for (int i = 0; i < 4; ++i) a[i] = xs[kk][tr * 4 + i];
            for (int j = 0; j < 4; ++j) b[j] = ws[kk][tc * 4 + j];
            for (int i = 0; i < 4; ++i)
                for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();
    }
    for (int i = 0; i < 4; ++i) {
        const long long r = row0 + tr * 4 + i;
        if (r >= m_rows) continue;
        for (int j = 0; j < 4; ++j) {
            const long long c = col0 + tc * 4 + j;
            if (c < n_out) y[r * n_out + c] = acc[i][j];
        }
    }
}

extern "C" __global__ void linear_gemv_f32w(const float* x, const float* w, float* y, long long m_rows,
                                            long long n_out, long long k_in) {
    linear_gemv(x, w, y, m_rows, n_out, k_in);
}
extern "C" __global__ void linear_gemv_bf16w(const float* x, const bf16_bits* w, float* y, long long m_rows,
                                             long long n_out, long long k_in) {
    linear_gemv(x, w, y, m_rows, n_out, k_in);
}
extern "C" __global__ void linear_tiled_f32w(const float* x, const float* w, float* y, long long m_rows,
                                             long long n_out, long long k_in) {
    linear_tiled(x, w, y, m_rows, n_out, k_in);
}
extern "C" __global__ void linear_tiled_bf16w(const float* x, const bf16_bits* w, float* y, long long m_rows,
                                              long long n_out, long long k_in) {
    linear_tiled(x, w, y, m_rows, n_out, k_in);
}
