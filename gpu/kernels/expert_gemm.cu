// Grouped expert GEMM with fused gather and scatter (scattermoe's scatter2scatter), and the fixed-order combine.
//
// Shapes: reference/__init__.py, and NK = N*K slots (common.cuh). The routing plan (gpu/routing.py) gives
//   sorted_slots   [NK]  int64  grouped row r -> slot s (rows of one expert are contiguous)
//   expert_offsets [E+1] int64  expert e owns grouped rows expert_offsets[e] .. expert_offsets[e+1]-1
//   block_offsets  [E+1] int64  expert e owns row blocks block_offsets[e] .. block_offsets[e+1]-1 of block_rows
//
// Every variant computes, for each grouped row r of expert e (s = sorted_slots[r], n = s / K),
//   out[dst(r), c] = sum_i A[src(r), i] * W[e, c, i]        (y = A W^T, W [E, n_out, k_in] row-major)
// with the gather src and the scatter dst fused into the tile loads and the epilogue stores:
//   moe_in     A = x [N, D],          W = input_linear  [E, 2F, D]: src = n, dst = r (grouped [NK, F]) and the
//              epilogue out[r, f] = silu(acc[f]) * acc[F + f] (HF chunk(2): first half through silu)
//   moe_out    A = act [NK, F],       W = output_linear [E, D, F]:    src = r, dst = s (slot order [NK, D])
//   moa_map    A = x [N, D],          W = input_linear  [E, H*Dh, D]: src = n, dst = s (slot order [NK, H*Dh])
//   moa_reduce A = context [NK, H*Dh], W = output_linear [E, D, H*Dh]: src = s, dst = s (slot order [NK, D])
// The gates are not applied here: expert_combine_f32 computes y[n] = sum_k gate[n, k] * y_slot[n*K + k] + bias
// in fixed k order, exactly the reference's `sum(slot_y * gates) + bias`, and the unweighted y_slot is the
// traced `expert_out` at no extra cost. Every output element is written by exactly one thread with a fixed
// summation order (no atomics), so results are bitwise deterministic run to run.
//
// Weights are float32 (`_f32w`) or bf16 carried as raw uint16 bits (`_bf16w`); activations and accumulation are
// float32. Three fast paths, chosen on the host from shapes only (gpu/experts.py select_path), and the naive
// first rung, which is never chosen automatically (path="naive"):
//   naive one thread per output, a plain dot product: the oracle the tests hold the fast paths to.
//   simt  any weights. Grid (max_blocks(NK, E, block_rows), ceil(n_out / 64)), 256 threads. A CTA takes one row
//         block (expert found by binary search in block_offsets; blocks past block_offsets[E] exit) and walks it
//         in 64-row tiles (so any block_rows works), 64 output columns, k in steps of 16: float32 tiles in shared
//         memory (register prefetch + double buffer, one barrier per step), 4x4 outputs per thread
//         (moe_in: 4x4 gate + 4x4 up). Exact float32 FMAs, any sizes (edges masked with zeros).
//   mma   bf16 weights, sm_80+. Same grid, 128 threads = 4 warps of 32x32 outputs. A is gathered as float32,
//         rounded to bf16 (round to nearest even) while staged to shared memory; k in steps of 32;
//         mma.sync.m16n8k16.row.col.f32.bf16.bf16.f32 with float32 accumulators; fragments read with plain
//         32-bit shared loads from rows padded to 40 bf16 (80 bytes: 16-byte aligned, conflict-free).
//         16-byte global loads when k_in % 4 (A) / % 8 (W) == 0 and the base is aligned, else masked scalars.
//   gemv  decode (few rows per expert). Grid (E, ceil(n_out / 8)), 256 threads: one warp per output column
//         (moe_in: the gate and up columns f and F + f), reading the weight row once per chunk of 8 of the
//         expert's rows (coalesced, 16-byte loads when aligned), lane-strided dot products, butterfly warp sum.
//         Experts with no rows exit at once. A stays float32, so bf16 weights lose nothing beyond their storage.
//
// All sizes and offsets are 64-bit (long long). Kernels (all take the same arguments, see EXPERT_GEMM_PARAMS):
//   expert_gemm_{naive,simt,gemv}_{moe_in,moe_out,moa_map,moa_reduce}_{f32w,bf16w}
//   expert_gemm_mma_{moe_in,moe_out,moa_map,moa_reduce}_bf16w      (an empty body when compiled below sm_80)
//   expert_combine_f32(y_slot [NK, D], gates [NK], bias [D], out [N, D], n_tokens, top_k, d)
//
// Reading order: source_row / dest_row (the gather and scatter, the file's central idea) and expert_owning;
// naive_gemm (the whole computation in 30 lines); stage_tile_rows, then simt_gemm (tiling and double
// buffering); mma_gemm (bf16 tensor cores, same tiling); gemv_column and gemv (decode); the entry points; and
// expert_combine_f32 (the gates, applied after the GEMM).

#include "common.cuh"

#define VAR_MOE_IN 0
#define VAR_MOE_OUT 1
#define VAR_MOA_MAP 2
#define VAR_MOA_REDUCE 3

// Row of A that grouped row r (slot s) reads.
template <int VAR>
__device__ __forceinline__ long long source_row(long long r, long long s, long long top_k) {
    if (VAR == VAR_MOE_OUT) return r;
    if (VAR == VAR_MOA_REDUCE) return s;
    return s / top_k;  // moe_in, moa_map: the token
}

// Row of the output that grouped row r (slot s) writes.
template <int VAR>
__device__ __forceinline__ long long dest_row(long long r, long long s) {
    return VAR == VAR_MOE_IN ? r : s;
}

// The expert owning item i (a grouped row, with expert_offsets, or a row block, with block_offsets), given
// offsets[0] = 0 <= i < offsets[E]: the e with offsets[e] <= i < offsets[e+1] (binary search; empty experts are
// skipped naturally).
__device__ __forceinline__ long long expert_owning(const long long* offsets, long long num_experts, long long i) {
    long long lo = 0, hi = num_experts;  // invariant: offsets[lo] <= i < offsets[hi]
    while (hi - lo > 1) {
        const long long mid = lo + (hi - lo) / 2;
        if (offsets[mid] <= i) lo = mid; else hi = mid;
    }
    return lo;
}

struct alignas(8) u32x2 { unsigned int x, y; };  // f32x4, u32x4: common.cuh

__device__ __forceinline__ long long min_ll(long long a, long long b) { return a < b ? a : b; }

// Stages the gather/scatter rows of the tile of grouped rows tile .. tile+TILE_ROWS-1 (ending at blk_end) into
// shared memory, -1 past the end; threads 0..TILE_ROWS-1 write. Both barriers are inside: the first waits until
// the previous tile's epilogue is done with s_dst, the second publishes the rows. Call it with the whole CTA.
template <int VAR, int TILE_ROWS>
__device__ __forceinline__ void stage_tile_rows(const long long* __restrict__ sorted_slots, long long tile,
                                                long long blk_end, long long top_k, long long* s_src,
                                                long long* s_dst) {
    __syncthreads();
    const int t = threadIdx.x;
    if (t < TILE_ROWS) {
        const long long r = tile + t;
        if (r < blk_end) {
            const long long s = sorted_slots[r];
            s_src[t] = source_row<VAR>(r, s, top_k);
            s_dst[t] = dest_row<VAR>(r, s);
        } else {
            s_src[t] = -1;
            s_dst[t] = -1;
        }
    }
    __syncthreads();
}

#define EXPERT_GEMM_PARAMS(WT)                                                                              \
    const float* __restrict__ a, const WT* __restrict__ w, float* __restrict__ out,                         \
        const long long* __restrict__ sorted_slots, const long long* __restrict__ expert_offsets,           \
        const long long* __restrict__ block_offsets, long long num_experts, long long block_rows,           \
        long long top_k, long long n_out, long long k_in
#define EXPERT_GEMM_ARGS \
    a, w, out, sorted_slots, expert_offsets, block_offsets, num_experts, block_rows, top_k, n_out, k_in

// ----------------------------------------------------------------------------------------------- naive path

// The first rung (llm.c's dev/cuda style): one thread per output element (grouped row r, column c), a plain dot
// product over k_in in index order, no shared memory. Slow, and obviously right: the GPU tests' oracle between
// the NumPy model and the tiled paths. Grid-stride over the NK * n_out outputs; block_offsets and block_rows are
// not used.
#define NAIVE_THREADS 256

template <typename WT, int VAR>
__device__ __forceinline__ void naive_gemm(EXPERT_GEMM_PARAMS(WT)) {
    const long long rows = expert_offsets[num_experts];  // NK
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < rows * n_out;
         idx += (long long)gridDim.x * blockDim.x) {
        const long long r = idx / n_out, c = idx - r * n_out;
        const long long e = expert_owning(expert_offsets, num_experts, r);
        const long long s = sorted_slots[r];
        const float* a_row = a + source_row<VAR>(r, s, top_k) * k_in;
        if (VAR == VAR_MOE_IN) {  // W rows c (gate) and n_out + c (up) of expert e's [2F, D]
            const WT* gate_row = w + (e * 2 * n_out + c) * k_in;
            const WT* up_row = gate_row + n_out * k_in;
            float gate = 0.0f, up = 0.0f;
            for (long long i = 0; i < k_in; ++i) {
                gate = fmaf(a_row[i], load_as_float(gate_row, i), gate);
                up = fmaf(a_row[i], load_as_float(up_row, i), up);
            }
            out[dest_row<VAR>(r, s) * n_out + c] = silu(gate) * up;
        } else {
            const WT* w_row = w + (e * n_out + c) * k_in;
            float acc = 0.0f;
            for (long long i = 0; i < k_in; ++i) acc = fmaf(a_row[i], load_as_float(w_row, i), acc);
            out[dest_row<VAR>(r, s) * n_out + c] = acc;
        }
    }
}

// ------------------------------------------------------------------------------------------------ simt path

#define SIMT_BM 64
#define SIMT_BN 64
#define SIMT_BK 16
#define SIMT_THREADS 256
#define SIMT_PAD 1  // smem rows of 65 floats: the transposed tile stores hit at most 2 threads per bank

template <typename WT, int VAR>
__device__ __forceinline__ void simt_gemm(EXPERT_GEMM_PARAMS(WT)) {
    constexpr int NB = VAR == VAR_MOE_IN ? 2 : 1;  // moe_in: gate half (rows f) and up half (rows F + f)
    __shared__ float As[2][SIMT_BK][SIMT_BM + SIMT_PAD];          // [stage][k][row]
    __shared__ float Bs[2][NB][SIMT_BK][SIMT_BN + SIMT_PAD];      // [stage][half][k][col]
    __shared__ long long s_src[SIMT_BM];
    __shared__ long long s_dst[SIMT_BM];

    const long long b = blockIdx.x;
    if (b >= block_offsets[num_experts]) return;  // uniform per CTA, before any barrier
    const long long e = expert_owning(block_offsets, num_experts, b);
    const long long blk_begin = expert_offsets[e] + (b - block_offsets[e]) * block_rows;
    const long long blk_end = min_ll(blk_begin + block_rows, expert_offsets[e + 1]);
    const long long col0 = (long long)blockIdx.y * SIMT_BN;
    const WT* we = w + e * NB * n_out * k_in;

    const int t = threadIdx.x;
    const int tx = t % 16, ty = t / 16;  // compute: rows ty + 16 i, cols tx + 16 j; loads: k = tx, row/col ty + 16 i
    const long long num_k_tiles = (k_in + SIMT_BK - 1) / SIMT_BK;

    // Weight rows this thread loads: column col0 + ty + 16 j of half h is row h * n_out + col0 + ty + 16 j.
    const WT* wbase = we + (col0 + ty) * k_in;

    for (long long tile = blk_begin; tile < blk_end; tile += SIMT_BM) {
        stage_tile_rows<VAR, SIMT_BM>(sorted_slots, tile, blk_end, top_k, s_src, s_dst);

        float ra[4], rb[NB][4];
        auto load_tile = [&](long long kt) {  // source rows re-read from shared memory: fewer live registers
            const long long k = kt * SIMT_BK + tx;
            const bool kin = k < k_in;
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const long long src = s_src[ty + 16 * i];
                ra[i] = (src >= 0 && kin) ? a[src * k_in + k] : 0.0f;
            }
#pragma unroll
            for (int h = 0; h < NB; ++h)
#pragma unroll
                for (int j = 0; j < 4; ++j)
                    rb[h][j] = (col0 + ty + 16 * j < n_out && kin)
                                   ? load_as_float(wbase, (h * n_out + 16 * j) * k_in + k) : 0.0f;
        };
        auto store_tile = [&](int stage) {
#pragma unroll
            for (int i = 0; i < 4; ++i) As[stage][tx][ty + 16 * i] = ra[i];
#pragma unroll
            for (int h = 0; h < NB; ++h)
#pragma unroll
                for (int j = 0; j < 4; ++j) Bs[stage][h][tx][ty + 16 * j] = rb[h][j];
        };

        float acc[NB][4][4];
#pragma unroll
        for (int h = 0; h < NB; ++h)
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[h][i][j] = 0.0f;

        load_tile(0);
        store_tile(0);
        __syncthreads();
        for (long long kt = 0; kt < num_k_tiles; ++kt) {
            const int stage = (int)(kt & 1);
            const bool more = kt + 1 < num_k_tiles;
            if (more) load_tile(kt + 1);  // global loads in flight while this stage is multiplied
#pragma unroll
            for (int kk = 0; kk < SIMT_BK; ++kk) {
                float av[4], bv[NB][4];
#pragma unroll
                for (int i = 0; i < 4; ++i) av[i] = As[stage][kk][ty + 16 * i];
#pragma unroll
                for (int h = 0; h < NB; ++h)
#pragma unroll
                    for (int j = 0; j < 4; ++j) bv[h][j] = Bs[stage][h][kk][tx + 16 * j];
#pragma unroll
                for (int h = 0; h < NB; ++h)
#pragma unroll
                    for (int i = 0; i < 4; ++i)
#pragma unroll
                        for (int j = 0; j < 4; ++j) acc[h][i][j] = fmaf(av[i], bv[h][j], acc[h][i][j]);
            }
            if (more) store_tile(stage ^ 1);  // that stage was last read before the previous barrier
            __syncthreads();
        }

#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const long long dst = s_dst[ty + 16 * i];
            if (dst < 0) continue;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const long long c = col0 + tx + 16 * j;
                if (c >= n_out) continue;
                const float v = VAR == VAR_MOE_IN ? silu(acc[0][i][j]) * acc[NB - 1][i][j] : acc[0][i][j];
                out[dst * n_out + c] = v;
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------- mma path

#define MMA_BM 64
#define MMA_BN 64
#define MMA_BK 32
#define MMA_THREADS 128
#define MMA_SROW 40  // bf16 per smem row: 32 + 8 pad = 80 bytes (16-byte aligned rows; 20 words -> 8 rows hit 8
                     // disjoint groups of 4 banks, so the fragment loads are conflict-free)

__device__ __forceinline__ unsigned int pack_bf16x2(float lo, float hi) {
    return static_cast<unsigned int>(float_to_bf16(lo)) | (static_cast<unsigned int>(float_to_bf16(hi)) << 16);
}

__device__ __forceinline__ unsigned int lds32(const bf16_bits* p) {
    return *reinterpret_cast<const unsigned int*>(p);
}

__device__ __forceinline__ void mma_bf16_16816(float (&c)[4], const unsigned int (&af)[4], unsigned int b0,
                                               unsigned int b1) {
#if __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(af[0]), "r"(af[1]), "r"(af[2]), "r"(af[3]), "r"(b0), "r"(b1));
#endif
}

template <int VAR>
__device__ __forceinline__ void mma_gemm(EXPERT_GEMM_PARAMS(bf16_bits)) {
#if __CUDA_ARCH__ >= 800
    constexpr int NB = VAR == VAR_MOE_IN ? 2 : 1;
    constexpr int B_ROWS = NB * MMA_BN;                 // weight rows per tile (moe_in: 64 gate + 64 up)
    constexpr int B_CHUNKS = B_ROWS * (MMA_BK / 8) / MMA_THREADS;  // 16-byte chunks per thread: 2 or 4
    __shared__ u32x4 As_raw[2][MMA_BM * MMA_SROW / 8];  // bf16 tiles, declared as 16-byte vectors for alignment
    __shared__ u32x4 Bs_raw[2][B_ROWS * MMA_SROW / 8];
    __shared__ long long s_src[MMA_BM];
    __shared__ long long s_dst[MMA_BM];

    const long long b = blockIdx.x;
    if (b >= block_offsets[num_experts]) return;
    const long long e = expert_owning(block_offsets, num_experts, b);
    const long long blk_begin = expert_offsets[e] + (b - block_offsets[e]) * block_rows;
    const long long blk_end = min_ll(blk_begin + block_rows, expert_offsets[e + 1]);
    const long long col0 = (long long)blockIdx.y * MMA_BN;
    const bf16_bits* we = w + e * NB * n_out * k_in;

    const int t = threadIdx.x;
    const int lane = t & 31, warp = t >> 5;
    const int wm = warp & 1, wn = warp >> 1;  // warp tile: rows wm*32 .. +31, cols wn*32 .. +31
    const int g = lane >> 2, tig = lane & 3;  // mma groupID, threadID_in_group
    const bool vec_a = (k_in % 4 == 0) && aligned16(a);
    const bool vec_w = (k_in % 8 == 0) && aligned16(w);
    const long long num_k_tiles = (k_in + MMA_BK - 1) / MMA_BK;

    // Loader mapping. A: rows (t / 8) + 16 i, floats (t % 8) * 4 .. +3. B: chunk idx = t + 128 j -> tile row
    // idx / 4 (half = row / 64, column col0 + row % 64), bf16 (idx % 4) * 8 .. +7.
    const int a_row0 = t / 8, a_k = (t % 8) * 4;
    const bf16_bits* wrow[B_CHUNKS];
#pragma unroll
    for (int j = 0; j < B_CHUNKS; ++j) {
        const int row = (t + MMA_THREADS * j) / 4;
        const long long c = col0 + row % MMA_BN;
        wrow[j] = c < n_out ? we + ((row / MMA_BN) * n_out + c) * k_in : nullptr;
    }

    for (long long tile = blk_begin; tile < blk_end; tile += MMA_BM) {
        stage_tile_rows<VAR, MMA_BM>(sorted_slots, tile, blk_end, top_k, s_src, s_dst);

        const float* arow[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const long long src = s_src[a_row0 + 16 * i];
            arow[i] = src >= 0 ? a + src * k_in : nullptr;
        }

        f32x4 ra[4];
        u32x4 rb[B_CHUNKS];
        auto load_tile = [&](long long kt) {
            const long long k = kt * MMA_BK + a_k;
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float* p = arow[i];
                if (vec_a) {
                    ra[i] = (p != nullptr && k < k_in) ? *reinterpret_cast<const f32x4*>(p + k)
                                                       : f32x4{0.0f, 0.0f, 0.0f, 0.0f};
                } else {
                    ra[i].x = (p != nullptr && k + 0 < k_in) ? p[k + 0] : 0.0f;
                    ra[i].y = (p != nullptr && k + 1 < k_in) ? p[k + 1] : 0.0f;
                    ra[i].z = (p != nullptr && k + 2 < k_in) ? p[k + 2] : 0.0f;
                    ra[i].w = (p != nullptr && k + 3 < k_in) ? p[k + 3] : 0.0f;
                }
            }
#pragma unroll
            for (int j = 0; j < B_CHUNKS; ++j) {
                const bf16_bits* p = wrow[j];
                const long long kb = kt * MMA_BK + ((t + MMA_THREADS * j) % 4) * 8;
                if (vec_w) {
                    rb[j] = (p != nullptr && kb < k_in) ? *reinterpret_cast<const u32x4*>(p + kb)
                                                        : u32x4{0u, 0u, 0u, 0u};
                } else {
                    unsigned int v[8];
#pragma unroll
                    for (int q = 0; q < 8; ++q) v[q] = (p != nullptr && kb + q < k_in) ? p[kb + q] : 0u;
                    rb[j] = u32x4{v[0] | (v[1] << 16), v[2] | (v[3] << 16), v[4] | (v[5] << 16),
                                  v[6] | (v[7] << 16)};
                }
            }
        };
        auto store_tile = [&](int stage) {
            bf16_bits* as = reinterpret_cast<bf16_bits*>(As_raw[stage]);
            bf16_bits* bs = reinterpret_cast<bf16_bits*>(Bs_raw[stage]);
#pragma unroll
            for (int i = 0; i < 4; ++i)  // 4 floats -> 4 bf16 (8 bytes) at row a_row0 + 16 i, column a_k
                *reinterpret_cast<u32x2*>(as + (a_row0 + 16 * i) * MMA_SROW + a_k) =
                    u32x2{pack_bf16x2(ra[i].x, ra[i].y), pack_bf16x2(ra[i].z, ra[i].w)};
#pragma unroll
            for (int j = 0; j < B_CHUNKS; ++j) {
                const int idx = t + MMA_THREADS * j;
                *reinterpret_cast<u32x4*>(bs + (idx / 4) * MMA_SROW + (idx % 4) * 8) = rb[j];
            }
        };

        float acc[NB][2][4][4];  // [half][m16 tile][n8 tile][fragment]
#pragma unroll
        for (int h = 0; h < NB; ++h)
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j)
#pragma unroll
                    for (int q = 0; q < 4; ++q) acc[h][i][j][q] = 0.0f;

        load_tile(0);
        store_tile(0);
        __syncthreads();
        for (long long kt = 0; kt < num_k_tiles; ++kt) {
            const int stage = (int)(kt & 1);
            const bool more = kt + 1 < num_k_tiles;
            if (more) load_tile(kt + 1);
            const bf16_bits* as = reinterpret_cast<const bf16_bits*>(As_raw[stage]);
            const bf16_bits* bs = reinterpret_cast<const bf16_bits*>(Bs_raw[stage]);
#pragma unroll
            for (int ks = 0; ks < MMA_BK; ks += 16) {
                // A fragment (PTX ISA, m16n8k16 .bf16): regs 0/1 rows g / g+8, cols 2 tig (+1); regs 2/3 cols +8.
                unsigned int af[2][4];
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    const bf16_bits* p = as + (wm * 32 + i * 16 + g) * MMA_SROW + ks + tig * 2;
                    af[i][0] = lds32(p);
                    af[i][1] = lds32(p + 8 * MMA_SROW);
                    af[i][2] = lds32(p + 8);
                    af[i][3] = lds32(p + 8 * MMA_SROW + 8);
                }
#pragma unroll
                for (int h = 0; h < NB; ++h)
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        // B fragment (.col, i.e. W rows): column n = g, k = 2 tig (+1) and 2 tig + 8 (+1).
                        const bf16_bits* q = bs + (h * MMA_BN + wn * 32 + j * 8 + g) * MMA_SROW + ks + tig * 2;
                        const unsigned int b0 = lds32(q), b1 = lds32(q + 8);
#pragma unroll
                        for (int i = 0; i < 2; ++i) mma_bf16_16816(acc[h][i][j], af[i], b0, b1);
                    }
            }
            if (more) store_tile(stage ^ 1);
            __syncthreads();
        }

        // C fragment: regs 0/1 row g, regs 2/3 row g + 8; cols 2 tig, 2 tig + 1.
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const long long dst = s_dst[wm * 32 + i * 16 + g + 8 * half];
                if (dst < 0) continue;
#pragma unroll
                for (int j = 0; j < 4; ++j)
#pragma unroll
                    for (int q = 0; q < 2; ++q) {
                        const long long c = col0 + wn * 32 + j * 8 + tig * 2 + q;
                        if (c >= n_out) continue;
                        const float v = VAR == VAR_MOE_IN
                                            ? silu(acc[0][i][j][half * 2 + q]) * acc[NB - 1][i][j][half * 2 + q]
                                            : acc[0][i][j][half * 2 + q];
                        out[dst * n_out + c] = v;
                    }
            }
    }
#endif
}

// ------------------------------------------------------------------------------------------------ gemv path

#define GEMV_WARPS 8
#define GEMV_THREADS 256  // GEMV_WARPS warps
#define GEMV_MIN_BLOCKS 4
#define GEMV_ROWS 8  // an expert's rows are taken 8 at a time; the weight row is read once per 8 rows

// All of one warp's work: output column c of expert e, over the expert's rows in chunks of GEMV_ROWS.
// VEC_LOADS (16-byte loads of W and A) is a template argument so neither loop carries the choice in a register.
template <typename WT, int VAR, bool VEC_LOADS>
__device__ __forceinline__ void gemv_column(const float* __restrict__ a, const WT* __restrict__ w,
                                            float* __restrict__ out, const long long* __restrict__ sorted_slots,
                                            long long e, long long c, long long r_begin, long long r_end,
                                            long long top_k, long long n_out, long long k_in) {
    constexpr int NB = VAR == VAR_MOE_IN ? 2 : 1;
    constexpr int VEC = GemvVec<WT>::value;  // weights per 16-byte load
    __shared__ long long s_src[GEMV_WARPS][GEMV_ROWS];  // per warp: A offset (source row * k_in) of each chunk row
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const WT* wr[NB];
#pragma unroll
    for (int h = 0; h < NB; ++h) wr[h] = w + (e * NB * n_out + h * n_out + c) * k_in;

    for (long long chunk = r_begin; chunk < r_end; chunk += GEMV_ROWS) {
        const int rows = (int)min_ll(GEMV_ROWS, r_end - chunk);
        // The chunk's A row offsets live in shared memory (one broadcast load per use), not in 8 64-bit registers.
        __syncwarp();  // the previous chunk is done reading s_src
        if (lane < GEMV_ROWS) {
            const long long r = chunk + (lane < rows ? lane : 0);
            s_src[warp][lane] = source_row<VAR>(r, sorted_slots[r], top_k) * k_in;
        }
        __syncwarp();
        float acc[NB][GEMV_ROWS];
#pragma unroll
        for (int h = 0; h < NB; ++h)
#pragma unroll
            for (int i = 0; i < GEMV_ROWS; ++i) acc[h][i] = 0.0f;

        if (VEC_LOADS) {
            for (long long k = (long long)lane * VEC; k < k_in; k += 32 * VEC) {
                float wv[NB][VEC];
#pragma unroll
                for (int h = 0; h < NB; ++h) load_w_vec(wr[h], k, wv[h]);
#pragma unroll
                for (int i = 0; i < GEMV_ROWS; ++i) {
                    if (i < rows) {  // predicated, not a branch chain: the row loads issue back to back
                        float av[VEC];
                        load_f32_vec(a + s_src[warp][i] + k, av);
#pragma unroll
                        for (int h = 0; h < NB; ++h)
#pragma unroll
                            for (int q = 0; q < VEC; ++q) acc[h][i] = fmaf(av[q], wv[h][q], acc[h][i]);
                    }
                }
            }
        } else {
            for (long long k = lane; k < k_in; k += 32) {
                float wv[NB];
#pragma unroll
                for (int h = 0; h < NB; ++h) wv[h] = load_as_float(wr[h], k);
#pragma unroll
                for (int i = 0; i < GEMV_ROWS; ++i) {
                    if (i < rows) {
                        const float x = a[s_src[warp][i] + k];
#pragma unroll
                        for (int h = 0; h < NB; ++h) acc[h][i] = fmaf(x, wv[h], acc[h][i]);
                    }
                }
            }
        }

#pragma unroll
        for (int i = 0; i < GEMV_ROWS; ++i) {
            float v[NB];
#pragma unroll
            for (int h = 0; h < NB; ++h) v[h] = warp_sum(acc[h][i]);  // butterfly: every lane gets the same sum
            if (i < rows && lane == i) {
                const long long r = chunk + i;
                out[dest_row<VAR>(r, sorted_slots[r]) * n_out + c] = VAR == VAR_MOE_IN ? silu(v[0]) * v[NB - 1] : v[0];
            }
        }
    }
}

template <typename WT, int VAR>
__device__ __forceinline__ void gemv(EXPERT_GEMM_PARAMS(WT)) {
    const long long e = blockIdx.x;
    const long long c = (long long)blockIdx.y * GEMV_WARPS + (threadIdx.x >> 5);
    if (e >= num_experts || c >= n_out) return;  // no block barriers in this path: a warp may leave on its own
    const long long r_begin = expert_offsets[e], r_end = expert_offsets[e + 1];
    if (r_begin == r_end) return;  // an expert without tokens
    if ((k_in % GemvVec<WT>::value == 0) && aligned16(a) && aligned16(w))
        gemv_column<WT, VAR, true>(a, w, out, sorted_slots, e, c, r_begin, r_end, top_k, n_out, k_in);
    else
        gemv_column<WT, VAR, false>(a, w, out, sorted_slots, e, c, r_begin, r_end, top_k, n_out, k_in);
}

// --------------------------------------------------------------------------------------------- entry points

// __launch_bounds__(threads, min CTAs per SM): the gemv minimum keeps ptxas from squeezing below 64 registers
// (it then spills in the k loop on sm_90); 4 CTAs of 256 threads at <= 64 registers still fill an SM.
#define SIMT_BOUNDS __launch_bounds__(SIMT_THREADS)
#define MMA_BOUNDS __launch_bounds__(MMA_THREADS)
#define GEMV_BOUNDS __launch_bounds__(GEMV_THREADS, GEMV_MIN_BLOCKS)

#define DEFINE_EXPERT_GEMM(NAME, BOUNDS, WT, ...) \
    extern "C" __global__ void BOUNDS NAME(EXPERT_GEMM_PARAMS(WT)) { __VA_ARGS__(EXPERT_GEMM_ARGS); }

#define NAIVE_BOUNDS __launch_bounds__(NAIVE_THREADS)

#define DEFINE_VARIANT(VARNAME, VAR)                                                                          \
    DEFINE_EXPERT_GEMM(expert_gemm_naive_##VARNAME##_f32w, NAIVE_BOUNDS, float, naive_gemm<float, VAR>)      \
    DEFINE_EXPERT_GEMM(expert_gemm_naive_##VARNAME##_bf16w, NAIVE_BOUNDS, bf16_bits, naive_gemm<bf16_bits, VAR>) \
    DEFINE_EXPERT_GEMM(expert_gemm_simt_##VARNAME##_f32w, SIMT_BOUNDS, float, simt_gemm<float, VAR>)         \
    DEFINE_EXPERT_GEMM(expert_gemm_simt_##VARNAME##_bf16w, SIMT_BOUNDS, bf16_bits, simt_gemm<bf16_bits, VAR>) \
    DEFINE_EXPERT_GEMM(expert_gemm_gemv_##VARNAME##_f32w, GEMV_BOUNDS, float, gemv<float, VAR>)              \
    DEFINE_EXPERT_GEMM(expert_gemm_gemv_##VARNAME##_bf16w, GEMV_BOUNDS, bf16_bits, gemv<bf16_bits, VAR>)      \
    DEFINE_EXPERT_GEMM(expert_gemm_mma_##VARNAME##_bf16w, MMA_BOUNDS, bf16_bits, mma_gemm<VAR>)

DEFINE_VARIANT(moe_in, VAR_MOE_IN)
DEFINE_VARIANT(moe_out, VAR_MOE_OUT)
DEFINE_VARIANT(moa_map, VAR_MOA_MAP)
DEFINE_VARIANT(moa_reduce, VAR_MOA_REDUCE)

// ------------------------------------------------------------------------------------------------- combine

// y_slot [NK, d] slot order, gates [NK] (top_k_gates flattened), bias [d] -> out [n_tokens, d]:
//   out[n, c] = ((gate[n,0] * y[n*K, c] + gate[n,1] * y[n*K+1, c]) + ...) + bias[c]
// k in fixed order, each product and sum rounded separately (no FMA contraction), as NumPy's
// `np.sum(slot_y * gates[..., None], axis=1) + bias`. One thread per output element, grid-stride loop.
extern "C" __global__ void __launch_bounds__(256)
    expert_combine_f32(const float* __restrict__ y_slot, const float* __restrict__ gates,
                       const float* __restrict__ bias, float* __restrict__ out, long long n_tokens,
                       long long top_k, long long d) {
    const long long total = n_tokens * d;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        const long long n = idx / d, c = idx - n * d;
        const long long s0 = n * top_k;
        float acc = __fmul_rn(gates[s0], y_slot[s0 * d + c]);
        for (long long k = 1; k < top_k; ++k) acc = __fadd_rn(acc, __fmul_rn(gates[s0 + k], y_slot[(s0 + k) * d + c]));
        out[idx] = __fadd_rn(acc, bias[c]);
    }
}
