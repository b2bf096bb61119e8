// Top-k gating and the dispatch plan: the twin of reference/routing.py (NumPy models: gpu/routing.py).
//
// Shapes: reference/__init__.py, and NK = N*K slots (common.cuh), C = ceil(NK / chunk) slot chunks, `chunk` = blockDim.x of plan_count / plan_place (a multiple of 32,
// at most 1024).
//
// topk_softmax_f32   logits [N, E] -> indices [N, K] int64, gates [N, K] float32.  One warp per token.
//     Each logit becomes a 64-bit key: high word = its float bits mapped to an unsigned integer of the same
//     order, low word = ~expert, so keys are distinct, larger logit = larger key and, on equal logits, the
//     lower expert id wins. Round k takes the largest key below the key chosen in round k-1 (a warp max), so
//     no "already chosen" state is needed and any E works. Gates: softmax over only the K chosen logits,
//     shifted by the largest one (reference.routing.softmax). NaN ranks by its sign bit (positive NaN above
//     +inf, as torch.topk does), so every index stays in [0, E) whatever the logits hold.
//
// The plan is a stable counting sort of the NK expert ids, with no float or integer atomics:
//   plan_count    grid (C, E): chunk_counts[c, e] = #slots of chunk c routed to expert e (__syncthreads_count)
//   plan_offsets  one block:   chunk_counts[c, e] -> exclusive prefix over chunks c (per expert, one warp
//                              each); expert_offsets [E+1] and block_offsets [E+1] as exclusive prefixes over e
//   plan_place    grid (C, E): each slot of chunk c routed to e goes to expert_offsets[e] + chunk_counts[c, e]
//                              + (#earlier slots of the chunk routed to e) (a ballot + popc block prefix)
// Positions depend only on the slot order, so the result is deterministic and stable within an expert, exactly
// np.argsort(flat_experts, kind="stable"). Cost: every (c, e) block reads its chunk's ids, E * NK reads in
// all, mostly from L2; fine for E <= 64. Ids outside [0, E) are never placed, so no write goes out of bounds.
#include "common.cuh"

// ----------------------------------------------------------------------------------------------- top-k

// Order-preserving key of (logit, expert): see the header.
__device__ __forceinline__ unsigned long long topk_key(float logit, long long expert) {
    // -0 == +0 as floats, so they tie and the lower expert id wins. (Under CuPy's -ftz=true a subnormal logit
    // also compares equal to 0 here, so it ties with 0 too, as gpu.routing.topk_keys_model models; reference.routing
    // keeps it above 0.)
    if (logit == 0.0f) logit = 0.0f;
    const unsigned int bits = __float_as_uint(logit);
    // Negative floats: flip all bits (more negative = smaller); positive: set the sign bit (above negatives).
    const unsigned int ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    const unsigned int tie_break = 0xffffffffu - static_cast<unsigned int>(expert);  // lower id = larger key
    return (static_cast<unsigned long long>(ordered) << 32) | tie_break;
}

__device__ __forceinline__ long long topk_key_expert(unsigned long long key) {
    return static_cast<long long>(0xffffffffu - static_cast<unsigned int>(key & 0xffffffffull));
}

__device__ __forceinline__ unsigned long long warp_max_u64(unsigned long long v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        const unsigned long long other = __shfl_xor_sync(0xffffffffu, v, offset);
        v = other > v ? other : v;
    }
    return v;
}

// logits: [N, E] float32, indices: [N, K] int64, gates: [N, K] float32; 1 <= K <= E; blockDim.x % 32 == 0,
// grid covers N warps. The gate of choice k lives with lane k % 32 from the start to the end, so each lane only
// reads back its own global writes and no cross-lane memory ordering is needed.
extern "C" __global__ void topk_softmax_f32(const float* __restrict__ logits, long long* __restrict__ indices,
                                            float* __restrict__ gates, long long num_tokens,
                                            long long num_experts, long long top_k) {
    const long long token = (static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (token >= num_tokens) return;  // token is the same for the whole warp, so whole warps leave
    const float* row = logits + token * num_experts;
    long long* row_indices = indices + token * top_k;
    float* row_gates = gates + token * top_k;

    // Rounds of "largest key below the previous winner"; the raw chosen logits go to row_gates for now.
    unsigned long long previous = ~0ull;  // above every key
    float top_logit = 0.0f;
    for (long long k = 0; k < top_k; ++k) {
        unsigned long long best = 0;  // below every key (a key's low word ~expert is never 0 for E < 2^32)
        for (long long e = lane; e < num_experts; e += 32) {
            const unsigned long long key = topk_key(row[e], e);
            if (key < previous && key > best) best = key;
        }
        best = warp_max_u64(best);  // K <= E, so some lane always found a key
        previous = best;
        const long long expert = topk_key_expert(best);
        const float logit = row[expert];
        if (k == 0) top_logit = logit;
        if (lane == k % 32) {
            row_indices[k] = expert;
            row_gates[k] = logit;
        }
    }

    // Softmax over the K chosen logits: exp(l - l_max) / sum; the sum is a fixed-order warp tree (deterministic).
    float partial = 0.0f;
    for (long long k = lane; k < top_k; k += 32) {
        const float shifted = expf(row_gates[k] - top_logit);
        row_gates[k] = shifted;
        partial += shifted;
    }
    const float total = warp_sum(partial);
    for (long long k = lane; k < top_k; k += 32) row_gates[k] = row_gates[k] / total;
}

// ------------------------------------------------------------------------------------------------ plan
// The plan kernels run blocks of up to 1024 threads, hence __launch_bounds__(1024) (at most 64 registers each).

// experts: [NK] int64 (top_k_indices flattened), chunk_counts: [C, E] int64. grid (C, E), blockDim = chunk.
extern "C" __global__ void __launch_bounds__(1024)
plan_count(const long long* __restrict__ experts, long long* __restrict__ chunk_counts, long long num_slots,
           long long num_experts) {
    const long long chunk = blockIdx.x, expert = blockIdx.y;
    const long long slot = chunk * blockDim.x + threadIdx.x;
    const int mine = slot < num_slots && experts[slot] == expert;
    const int count = __syncthreads_count(mine);  // every thread reaches it: no early return above
    if (threadIdx.x == 0) chunk_counts[chunk * num_experts + expert] = count;
}

// Inclusive prefix sum across the 32 lanes of a warp (Hillis-Steele over shuffles).
__device__ __forceinline__ long long warp_inclusive_scan(long long v) {
    const int lane = threadIdx.x % 32;
    for (int offset = 1; offset < 32; offset <<= 1) {
        const long long below = __shfl_up_sync(0xffffffffu, v, offset);
        if (lane >= offset) v += below;
    }
    return v;
}

// Exclusive prefix over `length` values at values[0], values[stride], ... in place, 32 at a time by one warp.
// Returns the total (in every lane).
__device__ long long warp_exclusive_scan_strided(long long* values, long long length, long long stride) {
    const int lane = threadIdx.x % 32;
    long long running = 0;
    for (long long base = 0; base < length; base += 32) {
        const long long i = base + lane;
        const long long value = i < length ? values[i * stride] : 0;
        const long long inclusive = warp_inclusive_scan(value);
        if (i < length) values[i * stride] = running + inclusive - value;
        running += __shfl_sync(0xffffffffu, inclusive, 31);
    }
    return running;
}

// chunk_counts: [C, E] int64 counts in, within-expert exclusive prefixes over c out; expert_offsets, block_offsets:
// [E+1] int64. One block, blockDim.x % 32 == 0. expert_offsets[e+1] first holds expert e's total, then (after the
// barrier) warp 0 turns the totals into offsets: global writes are visible block-wide after __syncthreads.
extern "C" __global__ void __launch_bounds__(1024)
plan_offsets(long long* __restrict__ chunk_counts, long long* __restrict__ expert_offsets,
             long long* __restrict__ block_offsets, long long num_chunks, long long num_experts, long long block_rows) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, num_warps = blockDim.x / 32;
    for (long long e = warp; e < num_experts; e += num_warps) {
        const long long total = warp_exclusive_scan_strided(chunk_counts + e, num_chunks, num_experts);
        if (lane == 0) expert_offsets[e + 1] = total;
    }
    __syncthreads();
    if (warp != 0) return;
    long long slots_before = 0, blocks_before = 0;
    for (long long base = 0; base < num_experts; base += 32) {
        const long long e = base + lane;
        const long long count = e < num_experts ? expert_offsets[e + 1] : 0;
        const long long slots = warp_inclusive_scan(count);
        const long long blocks = warp_inclusive_scan((count + block_rows - 1) / block_rows);
        if (e < num_experts) {
            expert_offsets[e + 1] = slots_before + slots;
            block_offsets[e + 1] = blocks_before + blocks;
        }
        slots_before += __shfl_sync(0xffffffffu, slots, 31);
        blocks_before += __shfl_sync(0xffffffffu, blocks, 31);
    }
    if (lane == 0) {
        expert_offsets[0] = 0;
        block_offsets[0] = 0;
    }
}

// experts: [NK] int64, chunk_starts: [C, E] (plan_offsets' output), expert_offsets: [E+1], sorted_slots: [NK] int64.
// grid (C, E), blockDim = chunk (a multiple of 32, <= 1024).
extern "C" __global__ void __launch_bounds__(1024)
plan_place(const long long* __restrict__ experts, const long long* __restrict__ chunk_starts,
           const long long* __restrict__ expert_offsets, long long* __restrict__ sorted_slots, long long num_slots,
           long long num_experts) {
    __shared__ int warp_counts[32];
    const long long chunk = blockIdx.x, expert = blockIdx.y;
    const long long slot = chunk * blockDim.x + threadIdx.x;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const bool mine = slot < num_slots && experts[slot] == expert;
    const unsigned int ballot = __ballot_sync(0xffffffffu, mine);  // all lanes present: no early return above
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    if (!mine) return;
    int rank = __popc(ballot & ((1u << lane) - 1u));  // earlier slots of this warp routed to `expert`
    for (int w = 0; w < warp; ++w) rank += warp_counts[w];  // ... and of the earlier warps of the chunk
    sorted_slots[expert_offsets[expert] + chunk_starts[chunk * num_experts + expert] + rank] = slot;
}
