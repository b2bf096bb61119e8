// Masked multi-head attention of the MoA layer, and the KV-cache writes: the twin of reference/attention.py's
// attention_probs + attend (with reference/attention.py's additive_mask) and reference/cache.py's update.
//
// Shapes: reference/__init__.py (T here counts query tokens; Dh <= 128). KH = K*H query heads; query head qh = k*H + j reads kv head j = qh % H (HF's repeat, NOT
// repeat_interleave). All sizes, strides and offsets are 64-bit element counts.
//
//   q               [B, KH, T, Dh] float32, strides (q_sb, q_sh, q_st), last dim contiguous
//   k, v            [B, H, S, Dh]  float32 (*_f32) or bf16 bits (*_bf16), strides (sb, sh, ss), last dim
//                   contiguous: a cache buffer [B, H, capacity, Dh] is passed as is (ss = Dh, sh = capacity*Dh)
//   cache_position  [T] int64: the position of each query
//   attention_mask  [B, >=S] int64 with row stride mask_sb, or a null pointer (all keys present)
//   num_keys_dev    [1] int64 or a null pointer: when given, the kernels use S' = clamp(*num_keys_dev, 0, S)
//                   keys instead of S (the static KV cache keeps the key count on the device so that one
//                   captured CUDA graph serves every decode step)
//   context         [B, T, KH, Dh] float32 contiguous = reference.attention.attend's [B, T, K, H*Dh]
//   probs           [B, KH, T, S] float32 contiguous
//
// Mask semantics (HF float32 eager attention, additive finfo.min): key s is hidden from query t when
// s > cache_position[t] or attention_mask[b, s] == 0. A hidden score is set to -FLT_MAX (HF's score + finfo.min
// rounds to exactly -FLT_MAX), not -inf: a row with at least one visible key gives its hidden keys exactly zero
// weight (exp(-FLT_MAX - m) underflows to 0), and a row with every key hidden holds -FLT_MAX everywhere, so
// softmax is exp(0) = 1 for every key: UNIFORM weights over all S keys, as HF. Padding lanes past the last key
// (tile tails) use -inf, so they never count even in a fully hidden row.
//
// Online softmax (flash attention), per query row: running max m (starts at -FLT_MAX, so m - m_new is never
// -inf - -inf), running sum l, unnormalized output acc. For each tile of scores x:
//   m_new = max(m, max x);  c = exp(m - m_new);  p = exp(x - m_new);  l = l*c + sum p;  acc = acc*c + p @ V
// and finally out = acc / l. Every reduction has a fixed shape (warp butterflies, fixed loops), there are no
// atomics: results are bitwise reproducible run to run.
//
// Kernels
//   attention_naive_{f32,bf16}     grid (ceil(KH*T/128), 1, B), block 128: one thread per query row, three plain
//                                  passes over the keys. The first rung: never chosen by the host, forced with
//                                  kernel_kind="naive"; the tests' oracle for the kernels below.
//   attention_prefill_{f32,bf16}   grid (ceil(T/32), KH, B), block 128: 4 warps x 8 query rows, 32-key tiles
//                                  staged in shared memory (K, then V in the same buffer). The block first works
//                                  out the key range it needs: keys past max(cache_position) of its rows, and
//                                  keys before the first present key of attention_mask[b], are hidden from all
//                                  of its rows and contribute exactly 0, so they are skipped, unless one of its
//                                  rows is fully hidden (then all S keys are visited, for the uniform row).
//   attention_decode_{f32,bf16}    split-K for few queries and long S: grid (splits, H, B*G), block 128. A block
//                                  takes up to 4 query rows (k, t) sharing kv head j (G = ceil(K*T/4) row
//                                  groups), and keys [split*chunk, (split+1)*chunk); each warp runs the online
//                                  softmax over 32-key groups (one key per lane), the 4 warp states merge in
//                                  shared memory, and the block writes its partial (m, l, acc) or, when
//                                  splits == 1, the normalized context directly.
//   attention_decode_combine       grid (T, KH, B), block 128: merges the splits' partials in split order:
//                                  M = max m_i, L = sum l_i e^(m_i - M), out = sum acc_i e^(m_i - M) / L.
//   attention_probs_{f32,bf16}     grid (T, KH, B), block 256: one row of probs (output_attentions, traces):
//                                  scores into the row, block max, exp and block sum, divide.
//   kv_cache_write_{f32,bf16}      grid-stride copy of new k, v [B, H, T, Dh] (any strides) into the cache
//                                  buffers [B, H, capacity, Dh] at position start (host value, or *start_dev
//                                  when start_dev is not null); bf16 rounds to nearest even. Positions outside
//                                  [0, capacity) are not written.
//   kv_cache_advance               one block: the static cache's step, on the device (capturable): with
//                                  offsets = [start, end]: start = end, end += tokens; positions[t] = old end + t;
//                                  attention_mask[b, old end + t] = 1 (each pointer optional).
//
// Reading order: the mask semantics and the online softmax above; key_visible, naive_score and attention_naive
// (the whole computation); attention_prefill (the same softmax, online over 32-key tiles in shared memory);
// attention_decode and attention_decode_combine (split-K for few queries); attention_probs_row; the KV-cache
// writes and kv_cache_advance.
#include "common.cuh"

#define ATT_DMAX 128              // largest head dim
#define ATT_DCH (ATT_DMAX / 32)   // head-dim chunks of 32 per lane: lane owns d = lane + 32*c
#define ATT_NEG_MAX (-3.40282346638528859812e+38f)  // -FLT_MAX: a hidden key (HF's + finfo.min)
#define ATT_FULL 0xffffffffu

#define PF_ROWS 8                 // prefill: query rows per warp
#define PF_WARPS 4
#define PF_BQ (PF_ROWS * PF_WARPS)  // 32 query rows per block
#define PF_BKV 32                 // keys per tile: one per lane in the score phase
#define PF_KV_STRIDE (ATT_DMAX + 4)

#define DC_ROWS 4                 // decode: query rows per block
#define DC_WARPS 4

#define PR_WARPS 8                // probs: warps per block

struct __align__(16) att_float4 {
    float x, y, z, w;
};

__device__ __forceinline__ float att_neg_inf() { return __uint_as_float(0xff800000u); }

__device__ __forceinline__ long long att_min(long long a, long long b) { return a < b ? a : b; }
__device__ __forceinline__ long long att_max(long long a, long long b) { return a > b ? a : b; }

__device__ __forceinline__ void store_from_float(float* p, long long i, float x) { p[i] = x; }
__device__ __forceinline__ void store_from_float(bf16_bits* p, long long i, float x) { p[i] = float_to_bf16(x); }

// The number of keys in use: S, or the device count clamped to [0, S].
__device__ __forceinline__ long long keys_in_use(const long long* num_keys_dev, long long num_keys) {
    if (num_keys_dev == nullptr) return num_keys;
    return att_max(0, att_min(num_keys_dev[0], num_keys));
}

// ------------------------------------------------------------------------------------------------ naive

// The first rung (llm.c's dev/cuda style): one thread per query row (qh, t) of batch row b = blockIdx.z, three
// plain passes over the keys (the row max, the softmax sum, then the probability-weighted sum of V written
// straight into the row's context). No shared memory, no tiles, no online rescaling: slow, and plainly the
// reference's softmax(q k^T / sqrt(Dh) + mask) v. The GPU tests' oracle between the NumPy model and the prefill
// and decode kernels. Same arguments and mask rule as prefill; grid (ceil(KH*T / 128), 1, B), block 128.

// Whether key s is visible to a query at position pos (the mask rule above); mrow: the batch row's mask or null.
__device__ __forceinline__ bool key_visible(long long s, long long pos, const long long* mrow) {
    return s <= pos && (mrow == nullptr || mrow[s] != 0);
}

// The masked, scaled score of one key: q . k / sqrt(Dh), or -FLT_MAX when hidden (HF: + finfo.min).
template <typename KV>
__device__ __forceinline__ float naive_score(const float* qrow, const KV* krow, long long head_dim, bool visible,
                                             float sqrt_dh) {
    float dot = 0.0f;
    for (long long d = 0; d < head_dim; ++d) dot = fmaf(qrow[d], load_as_float(krow, d), dot);
    return visible ? dot / sqrt_dh : ATT_NEG_MAX;
}

template <typename KV>
__device__ __forceinline__ void attention_naive(
    const float* __restrict__ q, long long q_sb, long long q_sh, long long q_st,
    const KV* __restrict__ k, long long k_sb, long long k_sh, long long k_ss,
    const KV* __restrict__ v, long long v_sb, long long v_sh, long long v_ss,
    const long long* __restrict__ cache_position, const long long* __restrict__ attention_mask, long long mask_sb,
    const long long* __restrict__ num_keys_dev, float* __restrict__ context,
    long long tokens, long long num_keys, long long heads, long long q_heads, long long head_dim, float sqrt_dh) {
    const long long row = (long long)blockIdx.x * blockDim.x + threadIdx.x, b = blockIdx.z;
    if (row >= q_heads * tokens) return;
    const long long qh = row / tokens, t = row % tokens, j = qh % heads, pos = cache_position[t];
    const long long n_keys = keys_in_use(num_keys_dev, num_keys);
    const float* qrow = q + b * q_sb + qh * q_sh + t * q_st;
    const KV* kb = k + b * k_sb + j * k_sh;
    const KV* vb = v + b * v_sb + j * v_sh;
    const long long* mrow = attention_mask == nullptr ? nullptr : attention_mask + b * mask_sb;
    float* out = context + ((b * tokens + t) * q_heads + qh) * head_dim;  // [B, T, KH, Dh]
    float m = ATT_NEG_MAX;
    for (long long s = 0; s < n_keys; ++s)
        m = fmaxf(m, naive_score(qrow, kb + s * k_ss, head_dim, key_visible(s, pos, mrow), sqrt_dh));
    float l = 0.0f;
    for (long long s = 0; s < n_keys; ++s)
        l += expf(naive_score(qrow, kb + s * k_ss, head_dim, key_visible(s, pos, mrow), sqrt_dh) - m);
    for (long long d = 0; d < head_dim; ++d) out[d] = 0.0f;
    for (long long s = 0; s < n_keys; ++s) {
        const float p = expf(naive_score(qrow, kb + s * k_ss, head_dim, key_visible(s, pos, mrow), sqrt_dh) - m) / l;
        for (long long d = 0; d < head_dim; ++d) out[d] = fmaf(p, load_as_float(vb + s * v_ss, d), out[d]);
    }
}

// ------------------------------------------------------------------------------------------------ prefill

template <typename KV>
__device__ __forceinline__ void attention_prefill(
    const float* __restrict__ q, long long q_sb, long long q_sh, long long q_st,
    const KV* __restrict__ k, long long k_sb, long long k_sh, long long k_ss,
    const KV* __restrict__ v, long long v_sb, long long v_sh, long long v_ss,
    const long long* __restrict__ cache_position, const long long* __restrict__ attention_mask, long long mask_sb,
    const long long* __restrict__ num_keys_dev, float* __restrict__ context,
    long long tokens, long long num_keys, long long heads, long long q_heads, long long head_dim, float sqrt_dh) {
    __shared__ __align__(16) float q_s[PF_BQ * ATT_DMAX];        // the block's query rows, row stride dp
    __shared__ __align__(16) float kv_s[PF_BKV * PF_KV_STRIDE];  // a K tile, then the V tile, row stride kvs
    __shared__ __align__(16) float p_s[PF_BQ * PF_BKV];          // probabilities of the tile, per query row
    __shared__ long long pos_s[PF_BQ];
    __shared__ long long red_s[PF_WARPS];

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long t0 = static_cast<long long>(blockIdx.x) * PF_BQ;
    const long long qh = blockIdx.y, b = blockIdx.z, j = qh % heads;
    const long long n_keys = keys_in_use(num_keys_dev, num_keys);
    const int dh = static_cast<int>(head_dim);
    const int dp = (dh + 3) & ~3;                          // head dim padded to whole float4s (pad is zero)
    const int kvs = ((dp >> 2) & 1) ? dp : dp + 4;         // an odd number of float4s: conflict-free rows
    const float* qb = q + b * q_sb + qh * q_sh;
    const KV* kb = k + b * k_sb + j * k_sh;
    const KV* vb = v + b * v_sb + j * v_sh;
    const long long* mrow = attention_mask == nullptr ? nullptr : attention_mask + b * mask_sb;

    if (threadIdx.x < PF_BQ) {
        const long long t = t0 + threadIdx.x;
        pos_s[threadIdx.x] = t < tokens ? cache_position[t] : -1;
    }
    for (int i = warp; i < PF_BQ; i += PF_WARPS) {
        const long long t = t0 + i;
        for (int d = lane; d < dp; d += 32) q_s[i * dp + d] = (t < tokens && d < dh) ? qb[t * q_st + d] : 0.0f;
    }
    __syncthreads();

    // Key range. Row i sees keys s <= hi_i = min(pos_i, S'-1) with mask[s] != 0; first = the first present key.
    // Row i is fully hidden iff first > hi_i. If no row is, keys outside [first, max hi] carry zero weight for
    // every row and are skipped; otherwise the block visits all S' keys (the uniform rows need them all).
    const bool row_valid = t0 + lane < tokens;
    const long long hi = row_valid ? att_min(pos_s[lane], n_keys - 1) : -1;
    long long max_hi = hi;
    for (int o = 16; o > 0; o >>= 1) max_hi = att_max(max_hi, __shfl_xor_sync(ATT_FULL, max_hi, o));
    long long first = 0;
    if (mrow != nullptr) {
        long long mine = n_keys;  // "none": any value > every hi
        for (long long s = threadIdx.x; s <= max_hi; s += blockDim.x) {
            if (mrow[s] != 0) {
                mine = s;
                break;
            }
        }
        for (int o = 16; o > 0; o >>= 1) mine = att_min(mine, __shfl_xor_sync(ATT_FULL, mine, o));
        if (lane == 0) red_s[warp] = mine;
        __syncthreads();
        first = red_s[0];
        for (int w = 1; w < PF_WARPS; ++w) first = att_min(first, red_s[w]);
    }
    if (max_hi < 0) first = n_keys;  // no row can see any key (all positions < 0, or S' = 0)
    const bool any_hidden_row = __any_sync(ATT_FULL, row_valid && first > hi);
    const long long lo = any_hidden_row ? 0 : first;
    const long long end = any_hidden_row ? n_keys : max_hi + 1;

    float m[PF_ROWS], l[PF_ROWS], acc[PF_ROWS][ATT_DCH];
#pragma unroll
    for (int r = 0; r < PF_ROWS; ++r) {
        m[r] = ATT_NEG_MAX;
        l[r] = 0.0f;
#pragma unroll
        for (int c = 0; c < ATT_DCH; ++c) acc[r][c] = 0.0f;
    }
    const att_float4* q4 = reinterpret_cast<const att_float4*>(q_s + warp * PF_ROWS * dp);
    const att_float4* k4 = reinterpret_cast<const att_float4*>(kv_s + lane * kvs);
    const att_float4* p4 = reinterpret_cast<const att_float4*>(p_s + warp * PF_ROWS * PF_BKV);
    const int dp4 = dp >> 2;

    for (long long kv0 = lo; kv0 < end; kv0 += PF_BKV) {
        const int nk = static_cast<int>(att_min(PF_BKV, end - kv0));  // keys in this tile (block-uniform)
        __syncthreads();  // the previous tile's V is no longer read
        for (int jj = warp; jj < PF_BKV; jj += PF_WARPS) {
            const KV* src = kb + (kv0 + jj) * k_ss;
            for (int d = lane; d < dp; d += 32)
                kv_s[jj * kvs + d] = (jj < nk && d < dh) ? load_as_float(src, d) : 0.0f;
        }
        __syncthreads();

        // Scores: lane = key kv0 + lane, rows warp*8 + r; float4 steps over the (zero-padded) head dim.
        float x[PF_ROWS];
#pragma unroll
        for (int r = 0; r < PF_ROWS; ++r) x[r] = 0.0f;
        for (int d4 = 0; d4 < dp4; ++d4) {
            const att_float4 kk = k4[d4];
#pragma unroll
            for (int r = 0; r < PF_ROWS; ++r) {
                const att_float4 qq = q4[r * dp4 + d4];
                x[r] = fmaf(qq.x, kk.x, x[r]);
                x[r] = fmaf(qq.y, kk.y, x[r]);
                x[r] = fmaf(qq.z, kk.z, x[r]);
                x[r] = fmaf(qq.w, kk.w, x[r]);
            }
        }
        const long long key = kv0 + lane;
        const bool in_tile = lane < nk;
        const bool present = in_tile && (mrow == nullptr || mrow[key] != 0);
#pragma unroll
        for (int r = 0; r < PF_ROWS; ++r) {
            const bool visible = present && key <= pos_s[warp * PF_ROWS + r];
            const float score = in_tile ? (visible ? x[r] / sqrt_dh : ATT_NEG_MAX) : att_neg_inf();
            const float m_new = fmaxf(m[r], warp_max(score));
            const float corr = expf(m[r] - m_new);
            const float p = expf(score - m_new);
            l[r] = l[r] * corr + warp_sum(p);
            m[r] = m_new;
#pragma unroll
            for (int c = 0; c < ATT_DCH; ++c) acc[r][c] *= corr;
            p_s[(warp * PF_ROWS + r) * PF_BKV + lane] = p;
        }
        __syncthreads();  // every warp is done with K (and its p_s rows are written)
        for (int jj = warp; jj < PF_BKV; jj += PF_WARPS) {
            const KV* src = vb + (kv0 + jj) * v_ss;
            for (int d = lane; d < dp; d += 32)
                kv_s[jj * kvs + d] = (jj < nk && d < dh) ? load_as_float(src, d) : 0.0f;
        }
        __syncthreads();

        // acc[r][d] += sum_jj p[r][jj] * V[jj][d]; V rows past nk are zero and so are their p.
        const int nk4 = (nk + 3) >> 2;
        for (int jq = 0; jq < nk4; ++jq) {
            float vv[4][ATT_DCH];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
#pragma unroll
                for (int c = 0; c < ATT_DCH; ++c) {
                    const int d = lane + 32 * c;
                    vv[e][c] = d < dp ? kv_s[(4 * jq + e) * kvs + d] : 0.0f;
                }
            }
#pragma unroll
            for (int r = 0; r < PF_ROWS; ++r) {
                const att_float4 pp = p4[r * (PF_BKV / 4) + jq];
#pragma unroll
                for (int c = 0; c < ATT_DCH; ++c) {
                    acc[r][c] = fmaf(pp.x, vv[0][c], acc[r][c]);
                    acc[r][c] = fmaf(pp.y, vv[1][c], acc[r][c]);
                    acc[r][c] = fmaf(pp.z, vv[2][c], acc[r][c]);
                    acc[r][c] = fmaf(pp.w, vv[3][c], acc[r][c]);
                }
            }
        }
    }

#pragma unroll
    for (int r = 0; r < PF_ROWS; ++r) {
        const long long t = t0 + warp * PF_ROWS + r;
        if (t >= tokens) continue;
        float* out = context + ((b * tokens + t) * q_heads + qh) * head_dim;
#pragma unroll
        for (int c = 0; c < ATT_DCH; ++c) {
            const int d = lane + 32 * c;
            if (d < dh) out[d] = l[r] > 0.0f ? acc[r][c] / l[r] : 0.0f;
        }
    }
}

#define PREFILL_PARAMS(KV)                                                                                      \
    const float *__restrict__ q, long long q_sb, long long q_sh, long long q_st, const KV *__restrict__ k,      \
        long long k_sb, long long k_sh, long long k_ss, const KV *__restrict__ v, long long v_sb, long long v_sh, \
        long long v_ss, const long long *__restrict__ cache_position,                                           \
        const long long *__restrict__ attention_mask, long long mask_sb,                                        \
        const long long *__restrict__ num_keys_dev, float *__restrict__ context, long long tokens,              \
        long long num_keys, long long heads, long long q_heads, long long head_dim, float sqrt_dh
#define PREFILL_ARGS                                                                                            \
    q, q_sb, q_sh, q_st, k, k_sb, k_sh, k_ss, v, v_sb, v_sh, v_ss, cache_position, attention_mask, mask_sb,    \
        num_keys_dev, context, tokens, num_keys, heads, q_heads, head_dim, sqrt_dh

// grid (ceil(T/32), KH, B), block 128 (exactly). Launch bounds: 3 blocks/SM, so ptxas may use up to 170
// registers (without the hint it caps sm_80 at 128 and spills).
// grid (ceil(KH*T / 128), 1, B), block 128 (any block size works).
extern "C" __global__ void __launch_bounds__(128) attention_naive_f32(PREFILL_PARAMS(float)) {
    attention_naive<float>(PREFILL_ARGS);
}

extern "C" __global__ void __launch_bounds__(128) attention_naive_bf16(PREFILL_PARAMS(bf16_bits)) {
    attention_naive<bf16_bits>(PREFILL_ARGS);
}

extern "C" __global__ void __launch_bounds__(128, 3) attention_prefill_f32(PREFILL_PARAMS(float)) {
    attention_prefill<float>(PREFILL_ARGS);
}

extern "C" __global__ void __launch_bounds__(128, 3) attention_prefill_bf16(PREFILL_PARAMS(bf16_bits)) {
    attention_prefill<bf16_bits>(PREFILL_ARGS);
}

// ------------------------------------------------------------------------------------------------ decode

template <typename KV>
__device__ __forceinline__ void attention_decode(
    const float* __restrict__ q, long long q_sb, long long q_sh, long long q_st,
    const KV* __restrict__ k, long long k_sb, long long k_sh, long long k_ss,
    const KV* __restrict__ v, long long v_sb, long long v_sh, long long v_ss,
    const long long* __restrict__ cache_position, const long long* __restrict__ attention_mask, long long mask_sb,
    const long long* __restrict__ num_keys_dev, float* __restrict__ part_stats, float* __restrict__ part_acc,
    float* __restrict__ context, long long tokens, long long num_keys, long long heads, long long q_heads,
    long long head_dim, long long chunk, float sqrt_dh) {
    __shared__ float m_s[DC_WARPS][DC_ROWS];
    __shared__ float l_s[DC_WARPS][DC_ROWS];
    __shared__ float acc_s[DC_WARPS][DC_ROWS][ATT_DMAX];

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long split = blockIdx.x, splits = gridDim.x, j = blockIdx.y;
    const long long top_k = q_heads / heads;
    const long long rows_total = top_k * tokens;  // rows (k, t) of kv head j, row index k*T + t
    const long long groups = (rows_total + DC_ROWS - 1) / DC_ROWS;
    const long long b = blockIdx.z / groups, row0 = (blockIdx.z % groups) * DC_ROWS;
    const int nrows = static_cast<int>(att_min(DC_ROWS, rows_total - row0));
    const long long n_keys = keys_in_use(num_keys_dev, num_keys);
    const int dh = static_cast<int>(head_dim);
    const KV* kb = k + b * k_sb + j * k_sh;
    const KV* vb = v + b * v_sb + j * v_sh;
    const long long* mrow = attention_mask == nullptr ? nullptr : attention_mask + b * mask_sb;

    long long qh_r[DC_ROWS], t_r[DC_ROWS], pos_r[DC_ROWS];
    float qv[DC_ROWS][ATT_DCH], m[DC_ROWS], l[DC_ROWS], acc[DC_ROWS][ATT_DCH];
#pragma unroll
    for (int r = 0; r < DC_ROWS; ++r) {
        const long long row = row0 + (r < nrows ? r : 0);
        qh_r[r] = (row / tokens) * heads + j;
        t_r[r] = row % tokens;
        pos_r[r] = cache_position[t_r[r]];
        const float* qrow = q + b * q_sb + qh_r[r] * q_sh + t_r[r] * q_st;
#pragma unroll
        for (int c = 0; c < ATT_DCH; ++c) {
            const int d = lane + 32 * c;
            qv[r][c] = (r < nrows && d < dh) ? qrow[d] : 0.0f;
            acc[r][c] = 0.0f;
        }
        m[r] = ATT_NEG_MAX;
        l[r] = 0.0f;
    }

    const long long c0 = split * chunk, c1 = att_min(c0 + chunk, n_keys);
    for (long long g0 = c0 + 32 * warp; g0 < c1; g0 += 32 * DC_WARPS) {
        const int nk = static_cast<int>(att_min(32, c1 - g0));  // keys of this group (warp-uniform)
        float x[DC_ROWS];
#pragma unroll
        for (int r = 0; r < DC_ROWS; ++r) x[r] = 0.0f;
#pragma unroll 4
        for (int jj = 0; jj < nk; ++jj) {
            const KV* krow = kb + (g0 + jj) * k_ss;
            float kv[ATT_DCH];
#pragma unroll
            for (int c = 0; c < ATT_DCH; ++c) {
                const int d = lane + 32 * c;
                kv[c] = d < dh ? load_as_float(krow, d) : 0.0f;
            }
#pragma unroll
            for (int r = 0; r < DC_ROWS; ++r) {
                if (r < nrows) {
                    float part = 0.0f;
#pragma unroll
                    for (int c = 0; c < ATT_DCH; ++c) part = fmaf(qv[r][c], kv[c], part);
                    const float dot = warp_sum(part);
                    if (lane == jj) x[r] = dot;
                }
            }
        }
        const long long key = g0 + lane;
        const bool in_group = lane < nk;
        const bool present = in_group && (mrow == nullptr || mrow[key] != 0);
        float p[DC_ROWS];
#pragma unroll
        for (int r = 0; r < DC_ROWS; ++r) {
            p[r] = 0.0f;
            if (r < nrows) {
                const bool visible = present && key <= pos_r[r];
                const float score = in_group ? (visible ? x[r] / sqrt_dh : ATT_NEG_MAX) : att_neg_inf();
                const float m_new = fmaxf(m[r], warp_max(score));
                const float corr = expf(m[r] - m_new);
                p[r] = expf(score - m_new);
                l[r] = l[r] * corr + warp_sum(p[r]);
                m[r] = m_new;
#pragma unroll
                for (int c = 0; c < ATT_DCH; ++c) acc[r][c] *= corr;
            }
        }
#pragma unroll 4
        for (int jj = 0; jj < nk; ++jj) {
            const KV* vrow = vb + (g0 + jj) * v_ss;
            float vv[ATT_DCH];
#pragma unroll
            for (int c = 0; c < ATT_DCH; ++c) {
                const int d = lane + 32 * c;
                vv[c] = d < dh ? load_as_float(vrow, d) : 0.0f;
            }
#pragma unroll
            for (int r = 0; r < DC_ROWS; ++r) {
                if (r < nrows) {
                    const float pj = __shfl_sync(ATT_FULL, p[r], jj);
#pragma unroll
                    for (int c = 0; c < ATT_DCH; ++c) acc[r][c] = fmaf(pj, vv[c], acc[r][c]);
                }
            }
        }
    }

    // Merge the 4 warps (fixed order), then write the partial, or the output when there is one split.
#pragma unroll
    for (int r = 0; r < DC_ROWS; ++r) {
        if (lane == 0) {
            m_s[warp][r] = m[r];
            l_s[warp][r] = l[r];
        }
#pragma unroll
        for (int c = 0; c < ATT_DCH; ++c) acc_s[warp][r][lane + 32 * c] = acc[r][c];
    }
    __syncthreads();
    const int d = threadIdx.x;  // blockDim.x == 128 == ATT_DMAX
#pragma unroll
    for (int r = 0; r < DC_ROWS; ++r) {
        if (r >= nrows) break;
        float mm = m_s[0][r];
        for (int w = 1; w < DC_WARPS; ++w) mm = fmaxf(mm, m_s[w][r]);
        float ll = 0.0f, aa = 0.0f;
        for (int w = 0; w < DC_WARPS; ++w) {
            const float scale = expf(m_s[w][r] - mm);
            ll = fmaf(l_s[w][r], scale, ll);
            aa = fmaf(acc_s[w][r][d], scale, aa);
        }
        if (splits == 1) {
            if (d < dh)
                context[((b * tokens + t_r[r]) * q_heads + qh_r[r]) * head_dim + d] = ll > 0.0f ? aa / ll : 0.0f;
        } else {
            const long long slot = ((b * q_heads + qh_r[r]) * tokens + t_r[r]) * splits + split;
            if (d == 0) {
                part_stats[2 * slot] = mm;
                part_stats[2 * slot + 1] = ll;
            }
            if (d < dh) part_acc[slot * head_dim + d] = aa;
        }
    }
}

#define DECODE_PARAMS(KV)                                                                                       \
    const float *__restrict__ q, long long q_sb, long long q_sh, long long q_st, const KV *__restrict__ k,      \
        long long k_sb, long long k_sh, long long k_ss, const KV *__restrict__ v, long long v_sb, long long v_sh, \
        long long v_ss, const long long *__restrict__ cache_position,                                           \
        const long long *__restrict__ attention_mask, long long mask_sb,                                        \
        const long long *__restrict__ num_keys_dev, float *__restrict__ part_stats, float *__restrict__ part_acc, \
        float *__restrict__ context, long long tokens, long long num_keys, long long heads, long long q_heads,   \
        long long head_dim, long long chunk, float sqrt_dh
#define DECODE_ARGS                                                                                             \
    q, q_sb, q_sh, q_st, k, k_sb, k_sh, k_ss, v, v_sb, v_sh, v_ss, cache_position, attention_mask, mask_sb,    \
        num_keys_dev, part_stats, part_acc, context, tokens, num_keys, heads, q_heads, head_dim, chunk, sqrt_dh

// grid (splits, H, B * ceil(K*T/4)), block 128 (exactly). part_stats [B, KH, T, splits, 2] (m, l) and
// part_acc [B, KH, T, splits, Dh] when splits > 1 (null otherwise: the context is written directly).
extern "C" __global__ void __launch_bounds__(128) attention_decode_f32(DECODE_PARAMS(float)) {
    attention_decode<float>(DECODE_ARGS);
}

extern "C" __global__ void __launch_bounds__(128) attention_decode_bf16(DECODE_PARAMS(bf16_bits)) {
    attention_decode<bf16_bits>(DECODE_ARGS);
}

// grid (T, KH, B), block 128 (>= Dh). Merges the partials of attention_decode_* in split order.
extern "C" __global__ void __launch_bounds__(128) attention_decode_combine(
    const float* __restrict__ part_stats, const float* __restrict__ part_acc, float* __restrict__ context,
    long long tokens, long long q_heads, long long head_dim, long long splits) {
    const long long t = blockIdx.x, qh = blockIdx.y, b = blockIdx.z;
    const long long first = ((b * q_heads + qh) * tokens + t) * splits;
    const long long d = threadIdx.x;
    if (d >= head_dim) return;
    float mm = ATT_NEG_MAX;
    for (long long i = 0; i < splits; ++i) mm = fmaxf(mm, part_stats[2 * (first + i)]);
    float ll = 0.0f, aa = 0.0f;
    for (long long i = 0; i < splits; ++i) {
        const float scale = expf(part_stats[2 * (first + i)] - mm);
        ll = fmaf(part_stats[2 * (first + i) + 1], scale, ll);
        aa = fmaf(part_acc[(first + i) * head_dim + d], scale, aa);
    }
    context[((b * tokens + t) * q_heads + qh) * head_dim + d] = ll > 0.0f ? aa / ll : 0.0f;
}

// ------------------------------------------------------------------------------------------------ probs

template <typename KV>
__device__ __forceinline__ void attention_probs_row(
    const float* __restrict__ q, long long q_sb, long long q_sh, long long q_st,
    const KV* __restrict__ k, long long k_sb, long long k_sh, long long k_ss,
    const long long* __restrict__ cache_position, const long long* __restrict__ attention_mask, long long mask_sb,
    const long long* __restrict__ num_keys_dev, float* __restrict__ probs, long long tokens, long long num_keys,
    long long heads, long long q_heads, long long head_dim, float sqrt_dh) {
    __shared__ float red_s[PR_WARPS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long t = blockIdx.x, qh = blockIdx.y, b = blockIdx.z, j = qh % heads;
    const long long n_keys = keys_in_use(num_keys_dev, num_keys);
    const int dh = static_cast<int>(head_dim);
    const float* qrow = q + b * q_sb + qh * q_sh + t * q_st;
    const KV* kb = k + b * k_sb + j * k_sh;
    const long long* mrow = attention_mask == nullptr ? nullptr : attention_mask + b * mask_sb;
    const long long pos = cache_position[t];
    float* row = probs + ((b * q_heads + qh) * tokens + t) * num_keys;

    float qv[ATT_DCH];
#pragma unroll
    for (int c = 0; c < ATT_DCH; ++c) qv[c] = lane + 32 * c < dh ? qrow[lane + 32 * c] : 0.0f;
    float local_max = att_neg_inf();
    for (long long s = warp; s < n_keys; s += PR_WARPS) {
        const KV* krow = kb + s * k_ss;
        float part = 0.0f;
#pragma unroll
        for (int c = 0; c < ATT_DCH; ++c) {
            const int d = lane + 32 * c;
            part = fmaf(qv[c], d < dh ? load_as_float(krow, d) : 0.0f, part);
        }
        const float dot = warp_sum(part);
        const float score = key_visible(s, pos, mrow) ? dot / sqrt_dh : ATT_NEG_MAX;
        if (lane == 0) row[s] = score;
        local_max = fmaxf(local_max, score);
    }
    if (lane == 0) red_s[warp] = local_max;
    __syncthreads();  // also makes the scores written above visible to the whole block
    float mm = red_s[0];
    for (int w = 1; w < PR_WARPS; ++w) mm = fmaxf(mm, red_s[w]);
    __syncthreads();  // red_s is reused below
    float local_sum = 0.0f;
    for (long long s = threadIdx.x; s < n_keys; s += blockDim.x) {
        const float e = expf(row[s] - mm);
        row[s] = e;
        local_sum += e;
    }
    local_sum = warp_sum(local_sum);
    if (lane == 0) red_s[warp] = local_sum;
    __syncthreads();
    float total = 0.0f;
    for (int w = 0; w < PR_WARPS; ++w) total += red_s[w];
    for (long long s = threadIdx.x; s < num_keys; s += blockDim.x) row[s] = s < n_keys ? row[s] / total : 0.0f;
}

#define PROBS_PARAMS(KV)                                                                                        \
    const float *__restrict__ q, long long q_sb, long long q_sh, long long q_st, const KV *__restrict__ k,      \
        long long k_sb, long long k_sh, long long k_ss, const long long *__restrict__ cache_position,           \
        const long long *__restrict__ attention_mask, long long mask_sb,                                        \
        const long long *__restrict__ num_keys_dev, float *__restrict__ probs, long long tokens,                \
        long long num_keys, long long heads, long long q_heads, long long head_dim, float sqrt_dh
#define PROBS_ARGS                                                                                              \
    q, q_sb, q_sh, q_st, k, k_sb, k_sh, k_ss, cache_position, attention_mask, mask_sb, num_keys_dev, probs,    \
        tokens, num_keys, heads, q_heads, head_dim, sqrt_dh

// grid (T, KH, B), block 256 (exactly). Entries for keys in [S', S) are 0.
extern "C" __global__ void __launch_bounds__(256) attention_probs_f32(PROBS_PARAMS(float)) {
    attention_probs_row<float>(PROBS_ARGS);
}

extern "C" __global__ void __launch_bounds__(256) attention_probs_bf16(PROBS_PARAMS(bf16_bits)) {
    attention_probs_row<bf16_bits>(PROBS_ARGS);
}

// ------------------------------------------------------------------------------------------------ KV cache

template <typename KV>
__device__ __forceinline__ void kv_cache_write(
    const float* __restrict__ k_src, long long k_sb, long long k_sh, long long k_st,
    const float* __restrict__ v_src, long long v_sb, long long v_sh, long long v_st,
    KV* __restrict__ k_dst, KV* __restrict__ v_dst, long long capacity, long long start,
    const long long* __restrict__ start_dev, long long batch, long long heads, long long tokens, long long head_dim) {
    const long long first = start_dev == nullptr ? start : start_dev[0];
    const long long total = batch * heads * tokens * head_dim;
    for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
         i += static_cast<long long>(gridDim.x) * blockDim.x) {
        const long long d = i % head_dim;
        long long rest = i / head_dim;
        const long long t = rest % tokens;
        rest /= tokens;
        const long long h = rest % heads, b = rest / heads;
        const long long pos = first + t;
        if (pos < 0 || pos >= capacity) continue;
        const long long dst = ((b * heads + h) * capacity + pos) * head_dim + d;
        store_from_float(k_dst, dst, k_src[b * k_sb + h * k_sh + t * k_st + d]);
        store_from_float(v_dst, dst, v_src[b * v_sb + h * v_sh + t * v_st + d]);
    }
}

#define CACHE_WRITE_PARAMS(KV)                                                                                  \
    const float *__restrict__ k_src, long long k_sb, long long k_sh, long long k_st,                            \
        const float *__restrict__ v_src, long long v_sb, long long v_sh, long long v_st, KV *__restrict__ k_dst, \
        KV *__restrict__ v_dst, long long capacity, long long start, const long long *__restrict__ start_dev,  \
        long long batch, long long heads, long long tokens, long long head_dim
#define CACHE_WRITE_ARGS                                                                                        \
    k_src, k_sb, k_sh, k_st, v_src, v_sb, v_sh, v_st, k_dst, v_dst, capacity, start, start_dev, batch, heads,  \
        tokens, head_dim

// k_src, v_src [B, H, T, Dh] float32 (strided, last dim contiguous) -> k_dst, v_dst [B, H, capacity, Dh] at
// positions first + t, first = *start_dev if start_dev else start. Any 1-d grid (grid-stride loop).
extern "C" __global__ void kv_cache_write_f32(CACHE_WRITE_PARAMS(float)) { kv_cache_write<float>(CACHE_WRITE_ARGS); }

extern "C" __global__ void kv_cache_write_bf16(CACHE_WRITE_PARAMS(bf16_bits)) {
    kv_cache_write<bf16_bits>(CACHE_WRITE_ARGS);
}

// offsets [2] int64 (start, end) -> (end, end + tokens); positions [tokens] int64 (or null) = old end + t;
// attention_mask [B, width] int64 with row stride mask_sb (or null): columns old end + t (< width) set to 1.
// grid 1, any block size.
extern "C" __global__ void kv_cache_advance(long long* __restrict__ offsets, long long tokens,
                                            long long* __restrict__ positions, long long* __restrict__ attention_mask,
                                            long long mask_sb, long long batch, long long width) {
    const long long end = offsets[1];
    __syncthreads();  // every thread has read the old end before thread 0 moves it
    if (threadIdx.x == 0) {
        offsets[0] = end;
        offsets[1] = end + tokens;
    }
    for (long long t = threadIdx.x; t < tokens; t += blockDim.x) {
        if (positions != nullptr) positions[t] = end + t;
        if (attention_mask != nullptr && end + t >= 0 && end + t < width)
            for (long long b = 0; b < batch; ++b) attention_mask[b * mask_sb + end + t] = 1;
    }
}
