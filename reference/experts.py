"""Expert dispatch and the Mixture of MLP experts (MoE).  Shapes: reference/__init__.py.

Dispatch, shared with the MoA (reference/attention.py):
  gather   rows of x in grouped-by-expert slot order         [N*K, in]
  linear   one matmul per expert over its contiguous group   [N*K, out]
  ungroup  back to slot order                                [N, K, out]
  combine  sum_k gate[n, k] * y[n, k] + bias                 [N, out]
No per-token loop: E matmuls per projection, like HF's JetMoeParallelExperts.

Backward, op by op in reverse: combine gives the slots' and the gates' gradients; ungroup's backward is group (a
permutation's inverse); each expert's weight gradient comes from its own group only, so an expert no token chose
gets exactly zero; gather's backward sums each token's K slot gradients.

Notebook: notebooks/03_mixture_of_mlp_experts.ipynb.
"""

import numpy as np

from .io import trace
from .linear import linear, linear_backward
from .routing import top_k_gates_backward, top_k_gating, top_k_gating_backward


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


def grouped_linear_backward(d_out, grouped_x, weights, plan):
    # d_out: [N*K, out], grouped_x: [N*K, in], weights: [E, out, in] -> d_grouped_x [N*K, in], d_weights [E, out, in]
    d_x = np.empty_like(grouped_x)
    d_weights = np.zeros(weights.shape, grouped_x.dtype)  # experts without tokens keep a zero gradient
    for expert, rows in plan.expert_groups():
        d_x[rows], d_weights[expert] = linear_backward(d_out[rows], grouped_x[rows], weights[expert])
    return d_x, d_weights


def gather_backward(d_grouped_x, plan):
    # d_grouped_x: [N*K, in] in grouped order -> d_x [N, in]: token n was gathered into its K slots, so its
    # gradient is the sum of theirs (ungroup puts the K slots of token n side by side)
    return ungroup(d_grouped_x, plan).sum(axis=1)


def combine_backward(d_y, slot_y, gates):
    # d_y: [N, out], slot_y: [N, K, out], gates: [N, K] -> d_slot_y [N, K, out], d_gates [N, K], d_bias [out]
    # y = sum_k g_k y_k + b: each slot's output gets g_k d_y, each gate the dot product d_y . y_k.
    d_gates = np.einsum("nd,nkd->nk", d_y, slot_y)
    return d_y[:, None, :] * gates[..., None], d_gates, d_y.sum(axis=0)


def silu(x):
    with np.errstate(over="ignore"):  # exp(-x) -> inf for very negative x gives the correct limit -0
        return x / (1 + np.exp(-x))


def swiglu(h):
    # h: [M, 2F] -> [M, F]: silu(first half) * second half (HF chunk(2, dim=-1))
    half = h.shape[-1] // 2
    return silu(h[:, :half]) * h[:, half:]


def swiglu_backward(d_act, h):
    # d_act: [M, F], h: [M, 2F] the pre-activation -> d_h [M, 2F]
    # a = silu(u) * v, so d_u = d_act * v * silu'(u) with silu'(u) = s (1 + u (1 - s)), s = sigmoid(u), and
    # d_v = d_act * silu(u). Saves h; s is recomputed. In-place steps: these are the MoE's largest arrays.
    half = h.shape[-1] // 2
    u, v = h[:, :half], h[:, half:]
    d_h = np.empty_like(h)
    d_u, d_v = d_h[:, :half], d_h[:, half:]
    with np.errstate(over="ignore"):
        sig = np.exp(-u)
    sig += 1
    np.reciprocal(sig, out=sig)  # s = sigmoid(u)
    np.multiply(u, sig, out=d_v)
    d_v *= d_act  # d_act * silu(u)
    slope = 1 - sig
    slope *= u
    slope += 1
    slope *= sig  # silu'(u)
    np.multiply(d_act, v, out=d_u)
    d_u *= slope
    return d_h


def moe(x, w, top_k, saved=None):
    # x: [B, T, D] -> [B, T, D], router logits [N, E]
    # w: input_linear [E, 2F, D], output_linear [E, D, F], router [E, D], bias [D]
    # saved: None, or a dict that receives what moe_backward needs (reference.training.value_and_grad)
    batch, tokens, hidden = x.shape
    x2d = x.reshape(batch * tokens, hidden)  # [N, D]
    with trace.scope("router"):
        plan = top_k_gating(x2d, w.router, top_k)
    grouped_x = x2d[plan.sorted_tokens]  # [N*K, D]
    h = grouped_linear(grouped_x, w.input_linear, plan)  # [N*K, 2F]
    act = swiglu(h)  # [N*K, F]
    act = trace.record_view("expert_act", act, lambda a: ungroup(a, plan), lambda a: group(a, plan))  # [N, K, F]
    slot_y = trace.record("expert_out", ungroup(grouped_linear(act, w.output_linear, plan), plan))  # [N, K, D]
    y = combine(slot_y, plan.top_k_gates, w.bias)  # [N, D]
    if saved is not None:
        saved.update(x2d=x2d, plan=plan, grouped_x=grouped_x, h=h, act=act, slot_y=slot_y)
    return trace.record("output", y.reshape(batch, tokens, hidden)), plan.logits


def moe_backward(d_y, saved, w, d_router_logits=None):
    # d_y: [B, T, D], saved: moe's dict, d_router_logits: [N, E] from the aux loss or None
    # -> d_x [B, T, D], {router, input_linear, output_linear, bias: gradients of w's tensors}
    # Saves per token: x (D), then per slot the gathered x (D), h (2F), act (F) and the slot output (D), so
    # (D + K*(2D + 3F)) numbers; at the bundled shape (D=128, K=2, F=256) 2,176 floats = 8.5 KiB a token.
    # Each gradient of one of moe's trace points is the trace point grad.<its name> (reference/model.py backward).
    plan = saved["plan"]
    d_y = trace.record("output", d_y)
    d_y2d = d_y.reshape(-1, d_y.shape[-1])  # [N, D]
    d_slot_y, d_gates, d_bias = combine_backward(d_y2d, saved["slot_y"], plan.top_k_gates)
    d_slot_y = trace.record("expert_out", d_slot_y)  # [N, K, D]
    with trace.scope("router"):
        d_gates = trace.record("top_k_gates", d_gates)  # [N, K]
    d_act, d_output_linear = grouped_linear_backward(group(d_slot_y, plan), saved["act"], w.output_linear, plan)
    d_act = trace.record_view("expert_act", d_act, lambda a: ungroup(a, plan), lambda a: group(a, plan))  # [N, K, F]
    d_h = swiglu_backward(d_act, saved["h"])  # [N*K, 2F]
    d_grouped_x, d_input_linear = grouped_linear_backward(d_h, saved["grouped_x"], w.input_linear, plan)
    d_logits = top_k_gates_backward(d_gates, plan)  # [N, E]
    if d_router_logits is not None:
        d_logits += d_router_logits
    with trace.scope("router"):
        d_logits = trace.record("logits", d_logits)
    d_x_router, d_router = top_k_gating_backward(d_logits, saved["x2d"], w.router)
    d_x = gather_backward(d_grouped_x, plan) + d_x_router  # [N, D]
    grads = dict(router=d_router, input_linear=d_input_linear, output_linear=d_output_linear, bias=d_bias)
    return d_x.reshape(d_y.shape), grads
