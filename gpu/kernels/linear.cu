// Dense linear layer y = x @ W^T, for the projections that are not per-expert: kv_proj, the routers, lm_head.
// Written as kernels (not cuBLAS) so a decode step can be captured in a CUDA graph from CuPy.
//
// Shapes: x [M, Kin] float32 (row-major), W [Nout, Kin] float32 or bf16 bits (HF's nn.Linear layout),
// y [M, Nout] float32. Shapes (reference/__init__.py) in the model: M = N tokens (or B at decode), Kin = D, Nout = 2*H*Dh, E or V.
//
// Two algorithms, chosen on the host from M alone:
//   linear_gemv_*   M <= GEMV_MAX_ROWS (decode): one warp per output column n streams W[n, :] once,
//                   coalesced, and dots it with every x row; memory-bound on W, which is the point.
//   linear_tiled_*  otherwise: 64x64 output tiles, 16-wide K steps staged in shared memory, 4x4 outputs
//                   per thread; correct for any M, Nout, Kin (edges are zero-padded in shared memory).
// Accumulation is float32 in a fixed order: results are bitwise reproducible.
#include "common.cuh"

#define GEMV_MAX_ROWS 8
#define TILE 64
#define TILE_K 16

template <typename W>
__device__ void linear_gemv(const float* x, const W* w, float* y, long long m_rows, long long n_out, long long k_in) {
    const long long warps_per_block = blockDim.x / 32;
    const long long n = blockIdx.x * warps_per_block + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (n >= n_out) return;
    float acc[GEMV_MAX_ROWS];
    for (int r = 0; r < GEMV_MAX_ROWS; ++r) acc[r] = 0.0f;
    const W* w_row = w + n * k_in;
    for (long long k = lane; k < k_in; k += 32) {
        const float wk = load_as_float(w_row, k);
        for (int r = 0; r < GEMV_MAX_ROWS; ++r)
            if (r < m_rows) acc[r] += wk * x[r * k_in + k];
    }
    for (int r = 0; r < GEMV_MAX_ROWS; ++r) {
        if (r >= m_rows) break;
        const float total = warp_sum(acc[r]);
        if (lane == 0) y[r * n_out + n] = total;
    }
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
