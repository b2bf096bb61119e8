"""Expert dispatch and the MoE on the GPU; the twin of reference/experts.py.  Shapes: reference/__init__.py.

One fused kernel per projection (gpu/kernels/expert_gemm.cu): the gather of A's rows, one GEMM per expert over
its contiguous group of the routing plan, and the scatter to slot order happen in the same launch, so no
gathered [NK, D] copy of x is ever built (scattermoe's scatter2scatter):

  moe_in      x [N, D], input_linear [E, 2F, D]  -> act [NK, F] grouped order, silu(first half) * second half
  moe_out     act [NK, F], output_linear [E, D, F] -> y_slot [NK, D] slot order (unweighted: the traced
              `expert_out`)
  moa_map     x [N, D], input_linear [E, H*Dh, D] -> q [NK, H*Dh] slot order
  moa_reduce  context [NK, H*Dh], output_linear [E, D, H*Dh] -> y_slot [NK, D] slot order
  combine     y[n] = sum_k gate[n, k] * y_slot[n*K + k] + bias, k in fixed order    [N, D]

The gates are applied in `combine`, as in the reference (`sum(slot_y * gates) + bias`, same rounding order),
not in the GEMM epilogue: the unweighted y_slot is then the traced `expert_out` for free, and tracing never
changes the code path or the result.

Paths (select_path, from shapes only, never a host sync):
  gemv  N <= GEMV_MAX_TOKENS: a token's K choices are distinct experts, so no expert has more than N rows;
        one warp per output column streams the weight row once per 8 of the expert's rows (<= 2 passes at
        N = 16, the second mostly from L2). Decode is this case.
  mma   otherwise, bf16 weights on sm_80+: tensor cores, A rounded to bf16 when staged (float32 accumulate).
  simt  otherwise: float32 weights (exact float32 FMAs), or bf16 weights before sm_80.
  naive never chosen; path="naive" forces it: one thread per output, a plain dot product (the first rung, the
        tests' oracle for the three above).
Weights are float32 or bf16 carried as raw uint16 bits; activations and results are float32.
"""

import numpy as np

from reference.io import trace

from .device import require_cupy
from .kernels import kernel
from .routing import max_blocks, top_k_gating

OP = "expert_gemm"
VARIANTS = ("moe_in", "moe_out", "moa_map", "moa_reduce")
PATHS = ("naive", "simt", "mma", "gemv")
GATHER_BY_TOKEN = ("moe_in", "moa_map")  # A has one row per token [N, k_in]; the others one per slot [NK, k_in]

GEMV_MAX_TOKENS = 16  # gemv when N <= this (see the module docstring); an untuned first choice
MMA_MIN_CC = 80  # mma.sync m16n8k16 bf16 needs sm_80

# Launch geometry; must match the #defines in gpu/kernels/expert_gemm.cu.
TILE_COLS = 64  # SIMT_BN = MMA_BN: output columns per CTA of the tiled paths
SIMT_THREADS = 256
MMA_THREADS = 128
GEMV_COLS = 8  # GEMV_WARPS: one warp per output column
GEMV_THREADS = 256
NAIVE_THREADS = 256
NAIVE_MAX_BLOCKS = 1 << 20  # grid-stride loop beyond this
COMBINE_THREADS = 256
COMBINE_MAX_BLOCKS = 1 << 20  # grid-stride loop beyond this
MAX_GRID_X = 2**31 - 1
MAX_GRID_Y = 65535


# ------------------------------------------------------------------------------------------ host-side logic

def weight_kind(dtype):
    """'f32w' for float32 weights, 'bf16w' for bf16 carried as uint16 bits."""
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return "f32w"
    if dtype == np.uint16:
        return "bf16w"
    raise ValueError(f"expert weights must be float32 or bf16 bits as uint16, got {dtype}")


def select_path(num_tokens, weight_dtype, compute_capability):
    """'gemv' | 'mma' | 'simt' from shapes and the device only (no host sync)."""
    kind = weight_kind(weight_dtype)
    if num_tokens <= GEMV_MAX_TOKENS:
        return "gemv"
    if kind == "bf16w" and compute_capability >= MMA_MIN_CC:
        return "mma"
    return "simt"


def check_path(path, weight_dtype, compute_capability):
    if path not in PATHS:
        raise ValueError(f"unknown expert GEMM path {path!r}; expected one of {PATHS}")
    if path == "mma":
        if weight_kind(weight_dtype) != "bf16w":
            raise ValueError("the mma path needs bf16 weights (uint16 bits); float32 weights use simt or gemv")
        if compute_capability < MMA_MIN_CC:
            raise ValueError(f"the mma path needs compute capability >= {MMA_MIN_CC}, got {compute_capability}")


def kernel_name(path, variant, weight_dtype):
    if variant not in VARIANTS:
        raise ValueError(f"unknown expert GEMM variant {variant!r}; expected one of {VARIANTS}")
    return f"expert_gemm_{path}_{variant}_{weight_kind(weight_dtype)}"


def out_features(variant, weight_shape):
    # weight_shape [E, rows, k_in] -> output columns (moe_in: rows = 2F -> F)
    rows = weight_shape[1]
    if variant == "moe_in":
        if rows % 2:
            raise ValueError(f"moe input_linear must have 2F rows (gate then up), got {rows}")
        return rows // 2
    return rows


def check_shapes(variant, a_shape, weight_shape, num_slots, top_k, num_experts):
    """ValueError naming the argument when A or the weights do not fit the plan."""
    if len(weight_shape) != 3 or weight_shape[0] != num_experts:
        raise ValueError(f"{variant}: weights must be [E={num_experts}, out, in], got {tuple(weight_shape)}")
    k_in = weight_shape[2]
    rows = num_slots // top_k if variant in GATHER_BY_TOKEN else num_slots
    if tuple(a_shape) != (rows, k_in):
        what = "N tokens" if variant in GATHER_BY_TOKEN else "N*K slots"
        raise ValueError(f"{variant}: input must be [{what}={rows}, in={k_in}], got {tuple(a_shape)}")
    out_features(variant, weight_shape)


def launch_config(path, num_slots, num_experts, block_rows, n_out):
    """(grid, block) of one expert GEMM launch."""
    if path == "naive":
        grid = (max(1, min(-(-(num_slots * n_out) // NAIVE_THREADS), NAIVE_MAX_BLOCKS)),)
        block = (NAIVE_THREADS,)
    elif path == "gemv":
        grid = (num_experts, -(-n_out // GEMV_COLS))
        block = (GEMV_THREADS,)
    else:
        grid = (max_blocks(num_slots, num_experts, block_rows), -(-n_out // TILE_COLS))
        block = (SIMT_THREADS if path == "simt" else MMA_THREADS,)
    if grid[0] > MAX_GRID_X or any(g > MAX_GRID_Y for g in grid[1:]):
        raise ValueError(f"expert GEMM grid {grid} exceeds the CUDA limits (n_out={n_out} too large)")
    return grid, block


def combine_launch(num_tokens, d):
    blocks = max(1, min(-(-(num_tokens * d) // COMBINE_THREADS), COMBINE_MAX_BLOCKS))
    return (blocks,), (COMBINE_THREADS,)


def compute_capability():
    cp = require_cupy()
    return int(cp.cuda.Device().compute_capability)  # a cached device attribute, no stream sync


# ----------------------------------------------------------------------------------------------- launches

def _contiguous(cp, array, dtype, what):
    if array.dtype != dtype:
        raise ValueError(f"{what} must be {np.dtype(dtype)}, got {array.dtype}")
    return cp.ascontiguousarray(array)


def expert_gemm(a, weights, plan, variant, out=None, path=None):
    """One fused expert projection (see the module docstring) -> out [NK, n_out] float32.

    a: float32, [N, k_in] for moe_in / moa_map, [NK, k_in] for moe_out / moa_reduce; weights [E, rows, k_in]
    float32 or uint16 (bf16 bits); out: an optional C-contiguous float32 [NK, n_out] to write into;
    path: None (select_path) or 'naive' | 'simt' | 'mma' | 'gemv'.
    """
    cp = require_cupy()
    num_slots, top_k, num_experts = plan.num_slots, plan.top_k, plan.num_experts
    check_shapes(variant, a.shape, weights.shape, num_slots, top_k, num_experts)
    weight_dtype = weights.dtype
    weight_kind(weight_dtype)
    a = _contiguous(cp, a, np.float32, f"{variant} input")
    weights = cp.ascontiguousarray(weights)
    n_out, k_in = out_features(variant, weights.shape), weights.shape[2]
    if out is None:
        out = cp.empty((num_slots, n_out), dtype=cp.float32)
    elif out.shape != (num_slots, n_out) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"{variant}: out must be C-contiguous float32 [{num_slots}, {n_out}], got "
                         f"{out.dtype} {tuple(out.shape)}")
    cc = compute_capability()
    path = select_path(num_slots // top_k, weight_dtype, cc) if path is None else path
    check_path(path, weight_dtype, cc)
    if num_slots == 0:
        return out
    grid, block = launch_config(path, num_slots, num_experts, plan.block_rows, n_out)
    kernel(OP, kernel_name(path, variant, weight_dtype))(grid, block, (
        a, weights, out, plan.sorted_slots, plan.expert_offsets, plan.block_offsets, np.int64(num_experts),
        np.int64(plan.block_rows), np.int64(top_k), np.int64(n_out), np.int64(k_in)))
    return out


def combine(slot_y, gates, bias, out=None):
    # slot_y: [N, K, D] or [NK, D] slot order, gates: [N, K], bias: [D] -> [N, D]
    cp = require_cupy()
    num_tokens, top_k = gates.shape
    d = bias.shape[0]
    if slot_y.size != num_tokens * top_k * d or slot_y.shape[-1] != d:
        raise ValueError(f"combine: slot_y must be [N={num_tokens}, K={top_k}, D={d}], got {tuple(slot_y.shape)}")
    slot_y = _contiguous(cp, slot_y, np.float32, "combine slot_y")
    gates = _contiguous(cp, gates, np.float32, "combine gates")
    bias = _contiguous(cp, bias, np.float32, "combine bias")
    if out is None:
        out = cp.empty((num_tokens, d), dtype=cp.float32)
    elif out.shape != (num_tokens, d) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"combine: out must be C-contiguous float32 [{num_tokens}, {d}], got "
                         f"{out.dtype} {tuple(out.shape)}")
    if num_tokens * d == 0:
        return out
    grid, block = combine_launch(num_tokens, d)
    kernel(OP, "expert_combine_f32")(grid, block, (slot_y, gates, bias, out, np.int64(num_tokens),
                                                   np.int64(top_k), np.int64(d)))
    return out


def group(slot_x, plan):
    # slot_x: [N, K, in] in slot order -> [NK, in] grouped order (only for trace replacements: the GEMMs gather)
    return require_cupy().ascontiguousarray(slot_x.reshape(-1, slot_x.shape[-1])[plan.sorted_slots])


def ungroup(grouped_y, plan):
    # grouped_y: [NK, out] in grouped order -> [N, K, out] in slot order (only for traces: the GEMMs scatter)
    cp = require_cupy()
    slot_y = cp.empty_like(grouped_y)
    slot_y[plan.sorted_slots] = grouped_y  # a permutation: each slot written once, deterministic
    return slot_y.reshape(-1, plan.top_k, grouped_y.shape[-1])


# ------------------------------------------------------------------------------------------------ the MoE

def moe_experts(x2d, plan, w, path=None):
    # x2d: [N, D], plan from top_k_gating -> [N, D]; records expert_act and expert_out as the reference does
    act = expert_gemm(x2d, w.input_linear, plan, "moe_in", path=path)  # [NK, F] grouped order
    act = trace.record_view("expert_act", act, lambda a: ungroup(a, plan), lambda a: group(a, plan))  # [N, K, F]
    slot_y = expert_gemm(act, w.output_linear, plan, "moe_out", path=path)  # [NK, D] slot order, unweighted
    slot_y = trace.record("expert_out", slot_y.reshape(-1, plan.top_k, slot_y.shape[-1]))  # [N, K, D]
    return combine(slot_y, plan.top_k_gates, w.bias)  # [N, D]


def moe(x, w, top_k, path=None):
    # x: [B, T, D] float32 -> ([B, T, D], router logits [N, E])
    # w: router [E, D] float32, input_linear [E, 2F, D], output_linear [E, D, F] (float32 or bf16 bits), bias [D]
    batch, tokens, hidden = x.shape
    x2d = x.reshape(batch * tokens, hidden)  # [N, D]
    with trace.scope("router"):
        plan = top_k_gating(x2d, w.router, top_k)
    y = moe_experts(x2d, plan, w, path=path)
    return trace.record("output", y.reshape(batch, tokens, hidden)), plan.logits


# ------------------------------------------------------------------------------------- the MoA projections

def moa_map(x2d, plan, query_weights, path=None):
    # x2d: [N, D], query_weights: [E, H*Dh, D] -> [N, K, H*Dh]
    q = expert_gemm(x2d, query_weights, plan, "moa_map", path=path)  # [NK, H*Dh] slot order
    return q.reshape(-1, plan.top_k, q.shape[-1])


def moa_reduce(context, plan, output_weights, bias, path=None):
    # context: [N, K, H*Dh], output_weights: [E, D, H*Dh], bias: [D] -> [N, D]
    grouped = context.reshape(-1, context.shape[-1])  # [NK, H*Dh] slot order; the kernel gathers by slot
    slot_y = expert_gemm(grouped, output_weights, plan, "moa_reduce", path=path)  # [NK, D] slot order
    return combine(slot_y, plan.top_k_gates, bias)
