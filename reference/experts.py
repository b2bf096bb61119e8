"""Expert dispatch and the Mixture of MLP experts (MoE).  Shapes: reference/__init__.py.

Dispatch, shared with the MoA (reference/attention.py):
  gather   rows of x in grouped-by-expert slot order         [N*K, in]
  linear   one matmul per expert over its contiguous group   [N*K, out]
  ungroup  back to slot order                                [N, K, out]
  combine  sum_k gate[n, k] * y[n, k] + bias                 [N, out]
No per-token loop: E matmuls per projection, like HF's JetMoeParallelExperts.

Notebook: notebooks/03_mixture_of_mlp_experts.ipynb.
"""

import numpy as np

from . import trace
from .routing import top_k_gating
from .weights import linear


def grouped_linear(grouped_x, weights, plan):
    # grouped_x: [N*K, in] rows in plan.sorted_slots order, weights: [E, out, in] -> [N*K, out]
    out = np.empty((grouped_x.shape[0], weights.shape[1]), dtype=grouped_x.dtype)
    for expert, rows in plan.expert_groups():
        out[rows] = linear(grouped_x[rows], weights[expert])  # x @ W_e^T
    return out


def ungroup(grouped_y, plan):
    # grouped_y: [N*K, out] in grouped order -> [N, K, out] in slot order (slot n*K + k)
    slot_y = np.empty_like(grouped_y)
    slot_y[plan.sorted_slots] = grouped_y
    return slot_y.reshape(-1, plan.top_k, grouped_y.shape[-1])


def group(slot_x, plan):
    # slot_x: [N, K, in] in slot order -> [N*K, in] in grouped order (the inverse of ungroup)
    return slot_x.reshape(-1, slot_x.shape[-1])[plan.sorted_slots]


def combine(slot_y, gates, bias):
    # slot_y: [N, K, out], gates: [N, K], bias: [out] -> [N, out]
    # A fixed-order sum over k, so the result is deterministic (HF's index_add gives the same sum for K=2).
    return np.sum(slot_y * gates[..., None], axis=1) + bias


def silu(x):
    with np.errstate(over="ignore"):  # exp(-x) -> inf for very negative x gives the correct limit -0
        return x / (1 + np.exp(-x))


def swiglu(h):
    # h: [M, 2F] -> [M, F]: silu(first half) * second half (HF chunk(2, dim=-1))
    half = h.shape[-1] // 2
    return silu(h[:, :half]) * h[:, half:]


def moe(x, w, top_k):
    # x: [B, T, D] -> [B, T, D], router logits [N, E]
    # w: input_linear [E, 2F, D], output_linear [E, D, F], router [E, D], bias [D]
    batch, tokens, hidden = x.shape
    x2d = x.reshape(batch * tokens, hidden)  # [N, D]
    with trace.scope("router"):
        plan = top_k_gating(x2d, w.router, top_k)
    grouped_x = x2d[plan.sorted_tokens]  # [N*K, D]
    act = swiglu(grouped_linear(grouped_x, w.input_linear, plan))  # [N*K, F]
    act = trace.record_view("expert_act", act, lambda a: ungroup(a, plan), lambda a: group(a, plan))  # [N, K, F]
    slot_y = trace.record("expert_out", ungroup(grouped_linear(act, w.output_linear, plan), plan))  # [N, K, D]
    y = combine(slot_y, plan.top_k_gates, w.bias)  # [N, D]
    return trace.record("output", y.reshape(batch, tokens, hidden)), plan.logits
