"""Top-k gating and the dispatch plan on the GPU; the twin of reference/routing.py.  Legend: gpu/kernels/common.cuh.

The plan is what the grouped expert GEMMs (gpu/kernels/expert_gemm.cu) need, built without any host sync:
  sorted_slots    [NK]   slot ids n*K + k grouped by expert, ascending within an expert (a stable sort)
  expert_offsets  [E+1]  expert e owns sorted_slots[expert_offsets[e]:expert_offsets[e+1]]
  block_offsets   [E+1]  expert e owns GEMM row blocks block_offsets[e] .. block_offsets[e+1]-1, each of
                         `block_rows` grouped rows (the last one of an expert padded); a GEMM launches
                         max_blocks(NK, E) row blocks and a block past block_offsets[E] exits at once.
"""

from dataclasses import dataclass

from reference import trace

from .device import require_cupy


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


def top_k_gating(x2d, router_weight, top_k, block_rows=64):
    # x2d: [N, D] float32, router_weight: [E, D] float32 -> RoutingPlan
    cp = require_cupy()
    num_experts = router_weight.shape[0]
    logits = x2d @ router_weight.T  # [N, E] float32 (TF32 off: CuPy's default)
    order = cp.argsort(-logits, axis=1)[:, :top_k]  # [N, K] largest first
    top_k_indices = order.astype(cp.int64)
    top_k_logits = cp.take_along_axis(logits, top_k_indices, axis=1)
    shifted = cp.exp(top_k_logits - top_k_logits.max(axis=1, keepdims=True))
    top_k_gates = (shifted / shifted.sum(axis=1, keepdims=True)).astype(cp.float32)
    flat = top_k_indices.reshape(-1)
    sorted_slots = cp.argsort(flat, kind="stable").astype(cp.int64)
    counts = cp.bincount(flat, minlength=num_experts).astype(cp.int64)
    expert_offsets = cp.concatenate([cp.zeros(1, cp.int64), cp.cumsum(counts)]).astype(cp.int64)
    trace.record("logits", logits)
    trace.record("top_k_indices", top_k_indices)
    trace.record("top_k_gates", top_k_gates)
    return RoutingPlan(logits, top_k_indices, top_k_gates, sorted_slots, expert_offsets,
                       block_offsets_from_counts(cp, counts, block_rows), block_rows)
