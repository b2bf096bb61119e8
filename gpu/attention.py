"""Masked attention of the MoA layer on the GPU: the twin of reference/attention.py's attention_probs + attend,
with reference/attention.py's additive_mask folded in.  Kernels: gpu/kernels/attention.cu.
Shapes: reference/__init__.py.

    attention(q, k, v, cache_position, attention_mask, top_k) -> context [B, T, K, H*Dh]

q [B, K*H, T, Dh] float32 (query head k*H + j attends with kv head j, HF's repeat), k, v [B, H, S, Dh] float32
or bf16 bits (uint16): the views KVCache.update returns, passed without a copy (the kernels take their
strides), cache_position [T] int64, attention_mask [B, S] int64 or None. Key s is hidden from query t when
s > cache_position[t] or attention_mask[b, s] == 0; a query with every key hidden gets uniform weights over
all S keys, as HF's float32 eager attention (finfo.min, not -inf).

The kernel is picked on the host from shapes only (no device sync): "prefill" (one block per 32 queries of a
head, online softmax over key tiles) or, for a few queries against many keys, "decode" (split-K over the keys,
partials merged by a second kernel in a fixed order; no atomics, so results are bitwise reproducible). "naive"
(one thread per query row, three plain passes over the keys) is never picked: kernel_kind="naive" forces it, the
first rung that the tests hold the other two to.
`plan_attention` holds that choice and every launch size; tests/gpu/host/test_attention_host.py checks it on the CPU.

CUDA graphs: with a StaticKVCache (gpu/cache.py) pass num_keys=cache.num_keys (a device int64 [1]: the kernels
use that many keys, S being the capacity), so a call launches the same kernels with the same arguments every step;
the launch sizes, the decode key split included, come from the capacity. gpu/graph.py serves the outputs and the
split workspace from its buffer plan; `out` and `workspace` (workspace_size(...) floats) take caller-owned buffers
instead.
"""

import functools
import math
from dataclasses import dataclass

import numpy as np

from reference.io import trace

from .device import require_cupy
from .experts import moa_map, moa_reduce
from .kernels import kernel
from .linear import linear
from .rope import apply_rope
from .routing import top_k_gating

__all__ = ["attention", "plan_attention", "choose_kernel", "decode_split", "workspace_size", "AttentionPlan"]

MAX_HEAD_DIM = 128  # the kernels keep a query row as 4 chunks of 32 lanes
PREFILL_ROWS = 32  # query rows per prefill block (4 warps x 8 rows)
PREFILL_THREADS = 128  # attention_prefill_* needs exactly 128 (4 warps)
NAIVE_THREADS = 128  # query rows per attention_naive_* block (any size works)
DECODE_ROWS = 4  # query rows (k, t) of one kv head per decode block
DECODE_THREADS = 128  # attention_decode_* needs exactly 128 (4 warps; one thread per head dim in the merge)
DECODE_KEY_ROUND = 128  # keys the 4 warps of a decode block take per round (32 each): chunks are multiples
COMBINE_THREADS = 128  # >= Dh
PROBS_THREADS = 256  # attention_probs_* needs exactly 256 (8 warps)
DECODE_ALWAYS_TOKENS = 4  # T <= this: always the decode kernel
DECODE_MAX_TOKENS = 16  # T > this: always the prefill kernel; in between, decode when prefill has few blocks
BLOCKS_PER_SM = 4  # decode aims at this many blocks per SM when it splits the keys
MAX_GRID_YZ = 65535
NULL = np.uint64(0)  # a null pointer argument (8 bytes, like a device pointer)


@dataclass(frozen=True)
class AttentionPlan:
    kernel: str  # "prefill", "decode" or "naive"
    grid: tuple  # of the attention kernel
    block: tuple
    num_splits: int = 1  # decode: key splits (1: the decode kernel writes the context itself)
    chunk: int = 0  # decode: keys per split
    combine_grid: tuple = None  # decode with num_splits > 1: grid of attention_decode_combine


def _ceil_div(a, b):
    return -(-a // b)


def choose_kernel(batch, q_heads, tokens, num_sms):
    """'decode' (split-K) for a few queries, 'prefill' otherwise; from shapes only."""
    if tokens > DECODE_MAX_TOKENS:
        return "prefill"
    if tokens <= DECODE_ALWAYS_TOKENS:
        return "decode"
    # 5..16 queries: prefill reads each key tile once per 32 queries but has only B*KH blocks; decode reads it
    # once per 4 rows but splits the keys. Use decode while prefill cannot fill the GPU twice over.
    return "decode" if batch * q_heads * _ceil_div(tokens, PREFILL_ROWS) < 2 * num_sms else "prefill"


def decode_split(num_keys, blocks, num_sms, num_splits=None):
    # num_keys S, blocks = decode blocks per split (B * H * row groups) -> (splits, keys per split)
    if num_splits is not None:  # forced (tests): as close to num_splits as whole chunks allow
        chunk = _ceil_div(num_keys, max(1, min(int(num_splits), num_keys)))
        return _ceil_div(num_keys, chunk), chunk
    wanted = max(1, _ceil_div(BLOCKS_PER_SM * num_sms, blocks))
    chunk = max(DECODE_KEY_ROUND, _ceil_div(_ceil_div(num_keys, wanted), DECODE_KEY_ROUND) * DECODE_KEY_ROUND)
    return _ceil_div(num_keys, chunk), chunk


def plan_attention(batch, q_heads, heads, tokens, num_keys, num_sms, num_splits=None, kernel_kind=None):
    """Which kernel and its launch sizes (host-side, from shapes). kernel_kind / num_splits force a choice."""
    top_k = q_heads // heads
    kind = kernel_kind or choose_kernel(batch, q_heads, tokens, num_sms)
    if kind == "prefill":
        plan = AttentionPlan("prefill", (_ceil_div(tokens, PREFILL_ROWS), q_heads, batch), (PREFILL_THREADS,))
    elif kind == "naive":
        plan = AttentionPlan("naive", (_ceil_div(q_heads * tokens, NAIVE_THREADS), 1, batch), (NAIVE_THREADS,))
    elif kind == "decode":
        row_groups = _ceil_div(top_k * tokens, DECODE_ROWS)
        splits, chunk = decode_split(num_keys, batch * heads * row_groups, num_sms, num_splits)
        plan = AttentionPlan("decode", (splits, heads, batch * row_groups), (DECODE_THREADS,), splits, chunk,
                             (tokens, q_heads, batch) if splits > 1 else None)
    else:
        raise ValueError(f"kernel_kind must be 'prefill', 'decode' or 'naive', got {kernel_kind!r}")
    for grid in (plan.grid, plan.combine_grid or (1, 1, 1), (tokens, q_heads, batch)):
        if max(grid[1:]) > MAX_GRID_YZ:
            raise ValueError(f"attention: grid {grid} exceeds CUDA's {MAX_GRID_YZ} blocks in y or z")
    return plan


def workspace_size(plan, batch, q_heads, tokens, head_dim):
    """float32 elements of decode scratch a plan needs (0 for prefill or one split): (m, l) and acc per split."""
    if plan.kernel != "decode" or plan.num_splits == 1:
        return 0
    return batch * q_heads * tokens * plan.num_splits * (2 + head_dim)


@functools.cache
def _num_sms(device_id):
    cp = require_cupy()
    return int(cp.cuda.Device(device_id).attributes["MultiProcessorCount"])


def _strides(array):
    # element strides of a view whose last dim is contiguous (RawKernel sees only the data pointer), or None
    item = array.itemsize
    if array.ndim and array.shape[-1] > 1 and array.strides[-1] != item:
        return None
    if any(s % item or s < 0 for s in array.strides):
        return None
    return tuple(np.int64(s // item) for s in array.strides)


def _strided(cp, array):
    # -> (array, element strides): the view itself when the kernels can read it, else a C-contiguous copy
    strides = _strides(array)
    if strides is None:
        array = cp.ascontiguousarray(array)
        strides = _strides(array)
    return array, strides


def _device_int64(cp, x, what):
    x = cp.asarray(x)  # a host array is copied (pass device arrays in a forward pass)
    if not (x.dtype.kind in "iu" or x.dtype == bool):
        raise TypeError(f"attention: {what} must hold integers, got {x.dtype}")
    return x if x.dtype == cp.int64 else x.astype(cp.int64)


def _check(cp, q, k, v, top_k):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention: q, k, v must be 4-d, got {q.shape}, {k.shape}, {v.shape}")
    if q.dtype != cp.float32:
        raise TypeError(f"attention: q must be float32, got {q.dtype}")
    if k.dtype != v.dtype or k.dtype not in (cp.float32, cp.uint16):
        raise TypeError(f"attention: k and v must both be float32 or bf16 bits (uint16), got {k.dtype}, {v.dtype}")
    batch, q_heads, tokens, head_dim = q.shape
    heads, num_keys = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"attention: k {k.shape} and v {v.shape} must be [B, H, S, Dh] matching q {q.shape}")
    if heads == 0 or q_heads != top_k * heads:
        raise ValueError(f"attention: q has {q_heads} heads, expected top_k * H = {top_k} * {heads}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"attention: head dim {head_dim} is outside 1..{MAX_HEAD_DIM}")
    if tokens == 0 or num_keys == 0 or batch == 0:
        raise ValueError(f"attention: empty input (B={batch}, T={tokens}, S={num_keys})")
    return batch, q_heads, tokens, head_dim, heads, num_keys


def attention(q, k, v, cache_position, attention_mask, top_k, output_probs=False, *, num_keys=None, out=None,
              probs_out=None, workspace=None, kernel_kind=None, num_splits=None):
    # q: [B, K*H, T, Dh] float32, k, v: [B, H, S, Dh] float32 or bf16 bits, cache_position: [T] int,
    # attention_mask: [B, S] int or None -> context [B, T, K, H*Dh] float32 (into `out` if given),
    # and probs [B, K*H, T, S] float32 (into `probs_out`) when output_probs.
    # num_keys: device int64 [1] or None: use that many keys (<= S; StaticKVCache.num_keys).
    # workspace: float32 device array of >= workspace_size(plan, ...) elements for split decode, or None.
    # kernel_kind ('prefill'/'decode'/'naive') and num_splits force the host's choice (tests).
    cp = require_cupy()
    batch, q_heads, tokens, head_dim, heads, keys = _check(cp, q, k, v, top_k)
    plan = plan_attention(batch, q_heads, heads, tokens, keys, _num_sms(cp.cuda.Device().id), num_splits,
                          kernel_kind)
    suffix = "bf16" if k.dtype == cp.uint16 else "f32"

    positions = cp.ascontiguousarray(_device_int64(cp, cache_position, "cache_position"))
    if positions.shape != (tokens,):
        raise ValueError(f"attention: cache_position has shape {positions.shape}, expected ({tokens},)")
    if attention_mask is None:
        mask, mask_sb = NULL, np.int64(0)
    else:
        mask = _device_int64(cp, attention_mask, "attention_mask")
        if mask.shape != (batch, keys):
            raise ValueError(f"attention: attention_mask has shape {mask.shape}, expected ({batch}, {keys})")
        mask, (mask_sb, _) = _strided(cp, mask)
    if num_keys is None:
        keys_dev = NULL
    elif num_keys.dtype != cp.int64 or num_keys.size < 1:
        raise TypeError("attention: num_keys must be a device int64 array holding the key count")
    else:
        keys_dev = num_keys

    if out is None:
        out = cp.empty((batch, tokens, top_k, heads * head_dim), cp.float32)
    elif out.shape != (batch, tokens, top_k, heads * head_dim) or out.dtype != cp.float32 or not out.flags.c_contiguous:
        raise ValueError(f"attention: out must be C-contiguous float32 {(batch, tokens, top_k, heads * head_dim)}")
    q, (q_sb, q_sh, q_st, _) = _strided(cp, q)
    k, (k_sb, k_sh, k_ss, _) = _strided(cp, k)
    v, (v_sb, v_sh, v_ss, _) = _strided(cp, v)
    common = (np.int64(tokens), np.int64(keys), np.int64(heads), np.int64(q_heads), np.int64(head_dim))
    sqrt_dh = np.float32(math.sqrt(head_dim))  # the reference divides the scores by float32(sqrt(Dh))
    qkv = (q, q_sb, q_sh, q_st, k, k_sb, k_sh, k_ss, v, v_sb, v_sh, v_ss, positions, mask, mask_sb, keys_dev)

    if plan.kernel in ("prefill", "naive"):  # the same arguments
        kernel("attention", f"attention_{plan.kernel}_{suffix}")(plan.grid, plan.block,
                                                                  qkv + (out,) + common + (sqrt_dh,))
    else:
        need = workspace_size(plan, batch, q_heads, tokens, head_dim)
        if need == 0:
            stats = acc = NULL
        else:
            if workspace is None:
                workspace = cp.empty(need, cp.float32)
            elif workspace.dtype != cp.float32 or workspace.size < need or not workspace.flags.c_contiguous:
                raise ValueError(f"attention: workspace must be C-contiguous float32 with >= {need} elements")
            stats = workspace[: 2 * (need // (2 + head_dim))]
            acc = workspace[stats.size:need]
        kernel("attention", f"attention_decode_{suffix}")(
            plan.grid, plan.block, qkv + (stats, acc, out) + common + (np.int64(plan.chunk), sqrt_dh))
        if need:
            kernel("attention", "attention_decode_combine")(
                plan.combine_grid, (COMBINE_THREADS,),
                (stats, acc, out, np.int64(tokens), np.int64(q_heads), np.int64(head_dim), np.int64(plan.num_splits)))
    if not output_probs:
        return out

    if probs_out is None:
        probs_out = cp.empty((batch, q_heads, tokens, keys), cp.float32)
    elif probs_out.shape != (batch, q_heads, tokens, keys) or probs_out.dtype != cp.float32 \
            or not probs_out.flags.c_contiguous:
        raise ValueError(f"attention: probs_out must be C-contiguous float32 {(batch, q_heads, tokens, keys)}")
    kernel("attention", f"attention_probs_{suffix}")(
        (tokens, q_heads, batch), (PROBS_THREADS,),
        (q, q_sb, q_sh, q_st, k, k_sb, k_sh, k_ss, positions, mask, mask_sb, keys_dev, probs_out) + common
        + (sqrt_dh,))
    return out, probs_out


# ------------------------------------------------------------------------------------------- NumPy models
# Plain NumPy transcriptions of the kernels' algorithms (float32, the same tiles, key ranges, splits and merge
# order, but NumPy's own summation order inside a tile), for CPU tests of the algorithm itself:
# tests/gpu/host/test_attention_host.py checks them against reference/, tests/gpu/device/test_kernels_attention.py
# the kernels.

NEG_MAX = np.float32(-np.finfo(np.float32).max)  # a hidden key's score (HF's score + finfo.min in float32)


def _visible(cache_position, attention_mask, b, rows, keys):
    # rows: [R] query indices, keys: [n] key indices -> [R, n] bool (s <= cache_position[t], mask[b, s] != 0)
    seen = keys[None, :] <= np.asarray(cache_position)[rows][:, None]
    if attention_mask is not None:
        seen = seen & (np.asarray(attention_mask)[b, keys] != 0)[None, :]
    return seen


def _online(state, x, values):
    # state (m [R], l [R], acc [R, Dh]); x: [R, n] scores; values: [n, Dh] -> new state (float32)
    m, l, acc = state
    with np.errstate(over="ignore", under="ignore"):
        m_new = np.maximum(m, x.max(axis=1))
        corr = np.exp(m - m_new)
        p = np.exp(x - m_new[:, None])
    return m_new, l * corr + p.sum(axis=1, dtype=np.float32), acc * corr[:, None] + p @ values


def _scores(q_rows, keys, seen, sqrt_dh):
    # q_rows: [R, Dh], keys: [n, Dh], seen: [R, n] -> [R, n] float32 scores with hidden keys at -FLT_MAX
    return np.where(seen, (q_rows @ keys.T) / sqrt_dh, NEG_MAX).astype(np.float32)


def _empty_state(rows, head_dim):
    return (np.full(rows, NEG_MAX, np.float32), np.zeros(rows, np.float32), np.zeros((rows, head_dim), np.float32))


def _merge(states):
    # [(m, l, acc)] in a fixed order -> one state: M = max m_i, L = sum l_i e^(m_i - M), A = sum acc_i e^(m_i - M)
    mm = np.max([m for m, _, _ in states], axis=0)
    with np.errstate(over="ignore", under="ignore"):
        scales = [np.exp(m - mm) for m, _, _ in states]
    ll = sum(l * s for (_, l, _), s in zip(states, scales))
    aa = sum(a * s[:, None] for (_, _, a), s in zip(states, scales))
    return mm, ll, aa


def _finish(state):
    _, l, acc = state
    return np.where(l[:, None] > 0, acc / np.where(l > 0, l, 1)[:, None], 0).astype(np.float32)


def prefill_key_range(cache_position_rows, attention_mask_row, num_keys):
    """Keys [lo, end) one prefill block visits for its rows (the kernel's rule; host copy for the model/tests)."""
    hi = np.minimum(np.asarray(cache_position_rows), num_keys - 1)
    max_hi = int(hi.max())
    if max_hi < 0:
        first = num_keys
    elif attention_mask_row is None:
        first = 0
    else:
        present = np.flatnonzero(np.asarray(attention_mask_row)[: max_hi + 1] != 0)
        first = int(present[0]) if present.size else num_keys
    if np.any(first > hi):  # a fully hidden row: it needs every key (uniform weights)
        return 0, num_keys
    return first, max_hi + 1


def prefill_model(q, k, v, cache_position, attention_mask, top_k, num_keys=None):
    # NumPy float32 model of attention_prefill_*: same shapes as attention() -> context [B, T, K, H*Dh]
    batch, q_heads, tokens, head_dim = q.shape
    heads = k.shape[1]
    n = k.shape[2] if num_keys is None else min(max(int(num_keys), 0), k.shape[2])
    sqrt_dh = np.float32(math.sqrt(head_dim))
    out = np.zeros((batch, tokens, q_heads, head_dim), np.float32)
    for b in range(batch):
        for qh in range(q_heads):
            j = qh % heads
            for t0 in range(0, tokens, PREFILL_ROWS):
                rows = np.arange(t0, min(t0 + PREFILL_ROWS, tokens))
                mask_row = None if attention_mask is None else np.asarray(attention_mask)[b]
                lo, end = prefill_key_range(np.asarray(cache_position)[rows], mask_row, n)
                state = _empty_state(len(rows), head_dim)
                for kv0 in range(lo, end, 32):
                    keys = np.arange(kv0, min(kv0 + 32, end))
                    x = _scores(q[b, qh, rows], k[b, j, keys], _visible(cache_position, attention_mask, b, rows, keys),
                                sqrt_dh)
                    state = _online(state, x, v[b, j, keys])
                out[b, rows, qh] = _finish(state)
    return out.reshape(batch, tokens, top_k, heads * head_dim)


def decode_model(q, k, v, cache_position, attention_mask, top_k, num_splits=1, chunk=None, num_keys=None):
    # NumPy float32 model of attention_decode_* (+ combine): splits of `chunk` keys; in each, 4 warps take
    # interleaved 32-key groups, merged in warp order, then the splits merged in split order
    batch, q_heads, tokens, head_dim = q.shape
    heads = k.shape[1]
    n = k.shape[2] if num_keys is None else min(max(int(num_keys), 0), k.shape[2])
    chunk = chunk or _ceil_div(k.shape[2], num_splits)
    sqrt_dh = np.float32(math.sqrt(head_dim))
    out = np.zeros((batch, tokens, q_heads, head_dim), np.float32)
    for b in range(batch):
        for qh in range(q_heads):
            j = qh % heads
            rows = np.arange(tokens)  # the kernel groups (k, t) rows by 4; rows are independent
            split_states = []
            for split in range(num_splits):
                c0, c1 = split * chunk, min(split * chunk + chunk, n)
                warp_states = []
                for warp in range(DECODE_THREADS // 32):
                    state = _empty_state(tokens, head_dim)
                    for g0 in range(c0 + 32 * warp, c1, DECODE_KEY_ROUND):
                        keys = np.arange(g0, min(g0 + 32, c1))
                        x = _scores(q[b, qh], k[b, j, keys], _visible(cache_position, attention_mask, b, rows, keys),
                                    sqrt_dh)
                        state = _online(state, x, v[b, j, keys])
                    warp_states.append(state)
                split_states.append(_merge(warp_states))
            out[b, :, qh] = _finish(_merge(split_states))
    return out.reshape(batch, tokens, top_k, heads * head_dim)


# ------------------------------------------------------------------------------------------- the MoA layer

def moa(x, w, position_ids, cache_position, attention_mask, cache, layer_idx, config, output_probs=False):
    # x: [B, T, D] float32 -> ([B, T, D], probs [B, K*H, T, S] or None, router logits [N, E])
    # The twin of reference.attention.moa: the same steps and trace names; probs are computed only when
    # asked for or traced (the fused kernels never materialize them).
    cp = require_cupy()
    batch, tokens, hidden = x.shape
    top_k, heads, head_dim = config.num_experts_per_tok, config.num_key_value_heads, config.kv_channels
    x2d = x.reshape(batch * tokens, hidden)  # [N, D]
    with trace.scope("router"):
        plan = top_k_gating(x2d, w.router, top_k)
    query = moa_map(x2d, plan, w.input_linear)  # [N, K, H*Dh]
    query = trace.record("query", query.reshape(batch, tokens, top_k, heads * head_dim))  # [B, T, K, H*Dh]
    q = cp.ascontiguousarray(query.reshape(batch, tokens, top_k * heads, head_dim).transpose(0, 2, 1, 3))
    kv = linear(x2d, w.kv_proj)  # [N, 2*H*Dh]: keys then values
    k, v = (cp.ascontiguousarray(part.reshape(batch, tokens, heads, head_dim).transpose(0, 2, 1, 3))
            for part in (kv[:, : heads * head_dim], kv[:, heads * head_dim:]))  # [B, H, T, Dh]
    k, v = trace.record("key", k), trace.record("value", v)
    q = trace.record("query_rope", apply_rope(q, position_ids, head_dim, config.rope_theta))  # [B, K*H, T, Dh]
    k = trace.record("key_rope", apply_rope(k, position_ids, head_dim, config.rope_theta))  # [B, H, T, Dh]
    num_keys = None  # all S keys of k and v; a StaticKVCache's keys are its capacity, of which num_keys are in use
    if cache is not None:
        k, v = cache.update(layer_idx, k, v)  # [B, H, S, Dh] views of the cache buffers
        num_keys = cache.num_keys
    probs = None
    if output_probs or trace.tracing():
        # probs is observed, not replaced: the fused kernel computes context from q, k and v itself
        context, probs = attention(q, k, v, cache_position, attention_mask, top_k, output_probs=True,
                                   num_keys=num_keys)
        trace.record("probs", probs)
    else:
        context = attention(q, k, v, cache_position, attention_mask, top_k, num_keys=num_keys)  # [B, T, K, H*Dh]
    context = trace.record("context", context)
    y = moa_reduce(context.reshape(batch * tokens, top_k, heads * head_dim), plan, w.output_linear, w.bias)
    return trace.record("output", y.reshape(batch, tokens, hidden)), probs, plan.logits
