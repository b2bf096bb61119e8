"""Top-k gating and the dispatch plan on the GPU; the twin of reference/routing.py.  Shapes: reference/__init__.py.

The plan is what the grouped expert GEMMs (gpu/kernels/expert_gemm.cu) need, built without any host sync:
  sorted_slots    [NK]   slot ids n*K + k grouped by expert, ascending within an expert (a stable sort)
  expert_offsets  [E+1]  expert e owns sorted_slots[expert_offsets[e]:expert_offsets[e+1]]
  block_offsets   [E+1]  expert e owns GEMM row blocks block_offsets[e] .. block_offsets[e+1]-1, each of
                         `block_rows` grouped rows (the last one of an expert padded); a GEMM launches
                         max_blocks(NK, E) row blocks and a block past block_offsets[E] exits at once.

Kernels: gpu/kernels/routing.cu (topk_softmax_f32, plan_count, plan_offsets, plan_place). Each has a plain NumPy
model here (`*_model`), step for step, which tests/gpu/host/test_routing_host.py checks against reference.routing
on the CPU and tests/gpu/device/test_kernels_routing.py checks the kernels against on a GPU.
"""

from dataclasses import dataclass

import numpy as np

from reference.io import trace

from .device import require_cupy
from .kernels import kernel
from .linear import linear

TOPK_THREADS = 256  # 8 warps, one token each
PLAN_CHUNK = 1024  # slots per plan_count / plan_place block (its blockDim.x: a multiple of 32, <= 1024)
PLAN_OFFSETS_THREADS = 1024  # plan_offsets: one warp per expert at a time
MAX_EXPERTS = 65535  # plan grids put experts on gridDim.y


@dataclass
class RoutingPlan:
    logits: object  # [N, E] float32
    top_k_indices: object  # [N, K] int64
    top_k_gates: object  # [N, K] float32
    sorted_slots: object  # [NK] int64
    expert_offsets: object  # [E+1] int64
    block_offsets: object  # [E+1] int64
    block_rows: int

    @property
    def top_k(self):
        return self.top_k_indices.shape[1]

    @property
    def num_slots(self):
        return self.sorted_slots.shape[0]

    @property
    def num_experts(self):
        return self.expert_offsets.shape[0] - 1


def max_blocks(num_slots, num_experts, block_rows):
    """Upper bound on row blocks over all experts: sum_e ceil(c_e / M) <= ceil(NK / M) + E - 1 (host-side)."""
    return -(-num_slots // block_rows) + num_experts - 1


def block_offsets_from_counts(xp, counts, block_rows):
    # counts: [E] int64 -> [E+1] int64 cumulative row blocks (xp: numpy or cupy, so CPU tests run it too)
    blocks = (counts + block_rows - 1) // block_rows
    return xp.concatenate([xp.zeros(1, dtype=xp.int64), xp.cumsum(blocks)]).astype(xp.int64)


# ------------------------------------------------------------------------------------------------ GPU

def router_logits(x2d, router_weight):
    # x2d: [N, D] float32, router_weight: [E, D] float32 or bf16 bits (uint16) -> [N, E] float32
    # Our linear kernel rather than cuBLAS: float32 FMAs with TF32 impossible, and capturable in a CUDA graph.
    return linear(x2d, router_weight)


def top_k_softmax(logits, top_k):
    # logits: [N, E] float32 -> top_k_indices [N, K] int64 (largest first, ties to the lower id), gates [N, K] float32
    cp = require_cupy()
    num_tokens, num_experts = logits.shape
    _check_top_k(top_k, num_experts)
    logits = cp.ascontiguousarray(logits, dtype=cp.float32)
    indices = cp.empty((num_tokens, top_k), dtype=cp.int64)
    gates = cp.empty((num_tokens, top_k), dtype=cp.float32)
    if num_tokens > 0:
        warps_per_block = TOPK_THREADS // 32
        grid = (-(-num_tokens // warps_per_block),)
        kernel("routing", "topk_softmax_f32")(
            grid, (TOPK_THREADS,),
            (logits, indices, gates, np.int64(num_tokens), np.int64(num_experts), np.int64(top_k)))
    return indices, gates


def dispatch_plan(top_k_indices, num_experts, block_rows):
    # top_k_indices: [N, K] int64 -> sorted_slots [NK] int64, expert_offsets [E+1] int64, block_offsets [E+1] int64
    cp = require_cupy()
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"num_experts={num_experts} must be in [1, {MAX_EXPERTS}]")
    if block_rows < 1:
        raise ValueError(f"block_rows={block_rows} must be >= 1")
    experts = cp.ascontiguousarray(top_k_indices, dtype=cp.int64).reshape(-1)  # [NK] expert id of slot s
    num_slots = experts.shape[0]
    num_chunks = -(-num_slots // PLAN_CHUNK)
    chunk_counts = cp.empty((num_chunks, num_experts), dtype=cp.int64)  # [C, E]: counts, then per-chunk starts
    sorted_slots = cp.empty(num_slots, dtype=cp.int64)
    expert_offsets = cp.empty(num_experts + 1, dtype=cp.int64)
    block_offsets = cp.empty(num_experts + 1, dtype=cp.int64)
    sizes = (np.int64(num_slots), np.int64(num_experts))
    grid = (num_chunks, num_experts)
    if num_chunks > 0:
        kernel("routing", "plan_count")(grid, (PLAN_CHUNK,), (experts, chunk_counts) + sizes)
    kernel("routing", "plan_offsets")(
        (1,), (PLAN_OFFSETS_THREADS,),
        (chunk_counts, expert_offsets, block_offsets, np.int64(num_chunks), np.int64(num_experts),
         np.int64(block_rows)))
    if num_chunks > 0:
        kernel("routing", "plan_place")(
            grid, (PLAN_CHUNK,), (experts, chunk_counts, expert_offsets, sorted_slots) + sizes)
    return sorted_slots, expert_offsets, block_offsets


def top_k_gating(x2d, router_weight, top_k, block_rows=64):
    # x2d: [N, D] float32, router_weight: [E, D] float32 or bf16 bits -> RoutingPlan
    # Each step reads the previous one's trace point, as in the reference, so a substituted choice carries on.
    cp = require_cupy()
    num_experts = router_weight.shape[0]
    logits = trace.record("logits", router_logits(x2d, router_weight))  # [N, E]
    chosen, gates = top_k_softmax(logits, top_k)  # [N, K], [N, K]
    top_k_indices = trace.record("top_k_indices", chosen)
    if top_k_indices is not chosen:  # a trace handler replaced the choice: the gates follow it (HF's softmax)
        chosen_logits = cp.take_along_axis(logits, top_k_indices, axis=1)  # [N, K]
        gates = cp.exp(chosen_logits - chosen_logits.max(axis=1, keepdims=True))
        gates /= gates.sum(axis=1, keepdims=True)
    top_k_gates = trace.record("top_k_gates", gates)
    sorted_slots, expert_offsets, block_offsets = dispatch_plan(top_k_indices, num_experts, block_rows)
    return RoutingPlan(logits, top_k_indices, top_k_gates, sorted_slots, expert_offsets, block_offsets, block_rows)


def _check_top_k(top_k, num_experts):
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")


# ------------------------------------------------------------------------------ NumPy models of the kernels

def topk_keys_model(logits):
    # logits: [N, E] float32 -> [N, E] uint64 keys of topk_softmax_f32: order-preserving float bits, then ~expert
    # CuPy compiles with -ftz=true, under which the kernel's `logit == 0.0f` holds for a subnormal too: so subnormals
    # and -0 become +0 here, and tie with 0 (the reference keeps a subnormal above 0).
    logits = np.asarray(logits, dtype=np.float32)
    logits = np.where(np.abs(logits) < np.finfo(np.float32).tiny, np.float32(0), logits)
    bits = logits.view(np.uint32).astype(np.uint64)
    ordered = np.where(bits & 0x80000000, ~bits & 0xFFFFFFFF, bits | 0x80000000)
    tie_break = np.uint64(0xFFFFFFFF) - np.arange(logits.shape[1], dtype=np.uint64)
    return (ordered << np.uint64(32)) | tie_break


def top_k_softmax_model(logits, top_k):
    # logits: [N, E] float32 -> indices [N, K] int64, gates [N, K] float32, as topk_softmax_f32 computes them
    _check_top_k(top_k, logits.shape[1])
    keys = topk_keys_model(logits)
    indices = np.argsort(keys, axis=1)[:, ::-1][:, :top_k].astype(np.int64)  # keys are distinct: order is total
    chosen = np.take_along_axis(logits, indices, axis=1)  # [N, K], largest first
    shifted = np.exp(chosen - chosen[:, :1])
    return indices, (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)


def dispatch_plan_model(flat_experts, num_experts, block_rows, chunk=PLAN_CHUNK):
    # flat_experts: [NK] int -> sorted_slots [NK], expert_offsets [E+1], block_offsets [E+1] (all int64),
    # by the kernels' steps: per-chunk counts, prefixes over chunks and experts, then in-chunk ranks.
    num_slots = len(flat_experts)
    num_chunks = -(-num_slots // chunk)
    chunk_of = np.arange(num_slots) // chunk  # [NK]
    mine = flat_experts[None, :] == np.arange(num_experts)[:, None]  # [E, NK]
    # plan_count: [C, E]
    chunk_counts = np.zeros((num_chunks, num_experts), dtype=np.int64)
    for c in range(num_chunks):
        chunk_counts[c] = mine[:, c * chunk:(c + 1) * chunk].sum(axis=1)
    # plan_offsets
    chunk_starts = np.cumsum(chunk_counts, axis=0) - chunk_counts  # exclusive over chunks, per expert
    counts = chunk_counts.sum(axis=0)  # [E]
    expert_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    block_offsets = np.concatenate([[0], np.cumsum((counts + block_rows - 1) // block_rows)]).astype(np.int64)
    # plan_place: rank among the chunk's earlier slots of the same expert
    sorted_slots = np.full(num_slots, -1, dtype=np.int64)
    for slot in range(num_slots):
        expert, c = flat_experts[slot], chunk_of[slot]
        if not 0 <= expert < num_experts:
            continue  # never placed, as in the kernel
        rank = np.count_nonzero(flat_experts[c * chunk:slot] == expert)
        sorted_slots[expert_offsets[expert] + chunk_starts[c, expert] + rank] = slot
    return sorted_slots, expert_offsets, block_offsets
