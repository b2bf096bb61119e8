"""Mixture of Attention heads (MoA).  Shapes: reference/__init__.py.

One shared kv_proj gives H key/value heads. The router picks K of E attention experts per token; expert e owns
a query projection [H*Dh, D] and an output projection [D, H*Dh]. So a token has K*H query heads, and query head
k*H + j attends with kv head j: HF's `key_states.repeat(1, K, 1, 1)` (repeat, not repeat_interleave).

  map      q[n, k] = Wq[e(n,k)] @ x[n]                          [N, K, H*Dh]
  attend   softmax(q k^T / sqrt(Dh) + mask) v, per query head    [N, K, H*Dh]
  reduce   y[n] = sum_k gate[n,k] * Wo[e(n,k)] @ o[n,k] + bias   [N, D]

Backward, in reverse: reduce (combine, then each expert's output projection from its own group), attend and
softmax (the mask is a constant, so a hidden key gets no gradient), RoPE's transposed rotation, then kv_proj and
map. A kv head serves the K chosen experts' query heads, so its key and value gradients sum over those K.

Notebook: notebooks/04_mixture_of_attention_heads.ipynb.
"""

import math

import numpy as np

from .experts import combine, combine_backward, gather_backward, group, grouped_linear, grouped_linear_backward, ungroup
from .io import trace
from .linear import linear, linear_backward
from .precision import compute_dtype
from .rope import apply_rope, apply_rope_backward
from .routing import softmax, softmax_backward, top_k_gates_backward, top_k_gating, top_k_gating_backward


def additive_mask(attention_mask, cache_position, num_keys, dtype):
    # attention_mask: [B, S] or None, cache_position: [T] -> [B|1, 1, T, S] with 0 (attend) or finfo.min
    # HF _prepare_4d_causal_attention_mask_with_cache_position: key s is hidden from query t when
    # s > cache_position[t] or attention_mask[b, s] == 0. A fully hidden row (a left-pad query) then holds
    # only finfo.min and softmax makes it uniform: finite in float32 and float64 alike.
    dtype = np.dtype(dtype)
    allowed = np.arange(num_keys)[None, :] <= cache_position[:, None]  # [T, S]
    allowed = allowed[None, None]  # [1, 1, T, S]
    if attention_mask is not None:
        allowed = allowed & (attention_mask[:, None, None, :] != 0)  # [B, 1, T, S]
    return np.where(allowed, dtype.type(0), np.finfo(dtype).min).astype(dtype)


def moa_map(x2d, plan, query_weights):
    # x2d: [N, D], query_weights: [E, H*Dh, D] -> [N, K, H*Dh]
    return ungroup(grouped_linear(x2d[plan.sorted_tokens], query_weights, plan), plan)


def moa_map_backward(d_query, x2d, plan, query_weights):
    # d_query: [N, K, H*Dh], x2d: [N, D] -> d_x [N, D], d_query_weights [E, H*Dh, D]
    d_grouped_x, d_weights = grouped_linear_backward(group(d_query, plan), x2d[plan.sorted_tokens], query_weights, plan)
    return gather_backward(d_grouped_x, plan), d_weights


def moa_reduce(context, plan, output_weights, bias, saved=None):
    # context: [N, K, H*Dh], output_weights: [E, D, H*Dh], bias: [D] -> [N, D]; saved: None or a dict for backward
    grouped_context = group(context, plan)  # [N*K, H*Dh]
    slot_y = ungroup(grouped_linear(grouped_context, output_weights, plan), plan)  # [N, K, D]
    if saved is not None:
        saved.update(grouped_context=grouped_context, slot_y=slot_y)
    return combine(slot_y, plan.top_k_gates, bias)


def moa_reduce_backward(d_y, saved, plan, output_weights):
    # d_y: [N, D] -> d_context [N, K, H*Dh], d_gates [N, K], d_output_weights [E, D, H*Dh], d_bias [D]
    d_slot_y, d_gates, d_bias = combine_backward(d_y, saved["slot_y"], plan.top_k_gates)
    d_grouped, d_weights = grouped_linear_backward(group(d_slot_y, plan), saved["grouped_context"], output_weights,
                                                   plan)
    return ungroup(d_grouped, plan), d_gates, d_weights, d_bias


def attention_probs(q, k, mask):
    # q: [B, K, H, T, Dh], k: [B, H, S, Dh], mask: [B|1, 1, T, S] additive -> probs [B, K*H, T, S]
    batch, top_k, heads, tokens, head_dim = q.shape
    scores = q @ np.swapaxes(k, -1, -2)[:, None]  # [B, K, H, T, S]
    scores /= q.dtype.type(math.sqrt(head_dim))  # in place: the scores are the largest arrays of a forward
    scores = scores.reshape(batch, top_k * heads, tokens, -1)  # head k*H + j sees kv head j
    scores += mask
    # softmax in float32 or better, as HF's eager attention
    return softmax(scores.astype(compute_dtype(q.dtype), copy=False)).astype(q.dtype, copy=False)


def attention_probs_backward(d_probs, probs, q, k):
    # d_probs, probs: [B, K*H, T, S], q: [B, K, H, T, Dh], k: [B, H, S, Dh] -> d_q [B, K, H, T, Dh], d_k [B, H, S, Dh]
    # The 1/sqrt(Dh) scale is applied to d_q and d_k, T/Dh times smaller than the scores it multiplies.
    batch, top_k, heads, tokens, head_dim = q.shape
    d_scores = softmax_backward(d_probs, probs).astype(q.dtype, copy=False)  # the additive mask: no gradient
    d_scores = d_scores.reshape(batch, top_k, heads, tokens, -1)  # [B, K, H, T, S]
    scale = q.dtype.type(1 / math.sqrt(head_dim))
    d_q = d_scores @ k[:, None]  # [B, K, H, T, Dh]
    d_q *= scale
    d_k = np.sum(np.swapaxes(d_scores, -1, -2) @ q, axis=1)  # [B, H, S, Dh]: kv head j serves query heads k*H + j
    d_k *= scale
    return d_q, d_k


def attend(probs, v, top_k):
    # probs: [B, K*H, T, S], v: [B, H, S, Dh] -> [B, T, K, H*Dh]
    batch, heads, keys, head_dim = v.shape
    tokens = probs.shape[2]
    out = probs.reshape(batch, top_k, heads, tokens, keys) @ v[:, None]  # [B, K, H, T, Dh]
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, tokens, top_k, heads * head_dim)


def attend_backward(d_out, probs, v, top_k):
    # d_out: [B, T, K, H*Dh], probs: [B, K*H, T, S], v: [B, H, S, Dh] -> d_probs [B, K*H, T, S], d_v [B, H, S, Dh]
    batch, heads, keys, head_dim = v.shape
    tokens = probs.shape[2]
    d_o = d_out.reshape(batch, tokens, top_k, heads, head_dim).transpose(0, 2, 3, 1, 4)  # [B, K, H, T, Dh]
    d_probs = d_o @ np.swapaxes(v, -1, -2)[:, None]  # [B, K, H, T, S]
    d_v = np.sum(np.swapaxes(probs.reshape(batch, top_k, heads, tokens, keys), -1, -2) @ d_o, axis=1)  # [B, H, S, Dh]
    return d_probs.reshape(batch, top_k * heads, tokens, keys), d_v


def moa(x, w, cos, sin, mask, cache, layer_idx, config, saved=None):
    # x: [B, T, D], cos/sin: [B|1, T, Dh], mask: [B|1, 1, T, S] -> ([B, T, D], probs [B, K*H, T, S], logits [N, E])
    # saved: None, or a dict that receives what moa_backward needs (reference.training.value_and_grad)
    batch, tokens, hidden = x.shape
    top_k, heads, head_dim = config.num_experts_per_tok, config.num_key_value_heads, config.kv_channels
    x2d = x.reshape(batch * tokens, hidden)  # [N, D]
    with trace.scope("router"):
        plan = top_k_gating(x2d, w.router, top_k)
    query = moa_map(x2d, plan, w.input_linear)  # [N, K, H*Dh]
    query = trace.record("query", query.reshape(batch, tokens, top_k, heads * head_dim))  # [B, T, K, H*Dh]
    q = query.reshape(batch, tokens, top_k, heads, head_dim).transpose(0, 2, 3, 1, 4)  # [B, K, H, T, Dh]
    kv = linear(x2d, w.kv_proj)  # [N, 2*H*Dh]: keys then values (HF chunk(2, dim=-1))
    k, v = (part.reshape(batch, tokens, heads, head_dim).transpose(0, 2, 1, 3)  # [B, H, T, Dh]
            for part in np.split(kv, 2, axis=-1))
    k, v = trace.record("key", k), trace.record("value", v)
    q = trace.record("query_rope", apply_rope(q.reshape(batch, top_k * heads, tokens, head_dim), cos, sin))
    k = trace.record("key_rope", apply_rope(k, cos, sin))  # q: [B, K*H, T, Dh], k: [B, H, T, Dh]
    if cache is not None:
        k, v = cache.update(layer_idx, k, v)  # [B, H, S, Dh]: cached keys are stored after RoPE, as in HF
    probs = attention_probs(q.reshape(batch, top_k, heads, tokens, head_dim), k, mask)  # [B, K*H, T, S]
    probs = trace.record("probs", probs)
    context = trace.record("context", attend(probs, v, top_k))  # [B, T, K, H*Dh]
    y = moa_reduce(context.reshape(batch * tokens, top_k, heads * head_dim), plan, w.output_linear, w.bias, saved)
    if saved is not None:
        saved.update(x2d=x2d, plan=plan, q=q, k=k, v=v, probs=probs, cos=cos, sin=sin)
    return trace.record("output", y.reshape(batch, tokens, hidden)), probs, plan.logits


def moa_backward(d_y, saved, w, config, d_router_logits=None):
    # d_y: [B, T, D], saved: moa's dict, d_router_logits: [N, E] from the aux loss or None
    # -> d_x [B, T, D], {router, input_linear, output_linear, bias, kv_proj: gradients of w's tensors}
    # Saves per token: x (D), q after RoPE (K*H*Dh), k and v (2*H*Dh), the context and the slot outputs
    # (K*H*Dh + K*D) and the probabilities (K*H*S): at the bundled shape with S = 256, 2,944 floats = 11.5 KiB a
    # token, 8 KiB of it the probabilities (recomputing them instead would cost the QK^T product again).
    batch, tokens, hidden = d_y.shape
    top_k, heads, head_dim = config.num_experts_per_tok, config.num_key_value_heads, config.kv_channels
    # Each gradient of one of moa's trace points is the trace point grad.<its name> (reference/model.py backward).
    plan, x2d = saved["plan"], saved["x2d"]
    d_y = trace.record("output", d_y)
    d_context, d_gates, d_output_linear, d_bias = moa_reduce_backward(d_y.reshape(-1, hidden), saved, plan,
                                                                      w.output_linear)
    d_context = trace.record("context", d_context.reshape(batch, tokens, top_k, heads * head_dim))  # [B, T, K, H*Dh]
    with trace.scope("router"):
        d_gates = trace.record("top_k_gates", d_gates)  # [N, K]
    d_probs, d_v = attend_backward(d_context, saved["probs"], saved["v"], top_k)
    d_probs, d_v = trace.record("probs", d_probs), trace.record("value", d_v)  # [B, K*H, T, S], [B, H, T, Dh]
    q = saved["q"]  # [B, K*H, T, Dh] after RoPE
    d_q, d_k = attention_probs_backward(d_probs, saved["probs"], q.reshape(batch, top_k, heads, tokens, head_dim),
                                        saved["k"])
    d_q, d_k = trace.record("query_rope", d_q.reshape(q.shape)), trace.record("key_rope", d_k)
    d_k = trace.record("key", apply_rope_backward(d_k, saved["cos"], saved["sin"]))  # [B, H, T, Dh]
    d_q = apply_rope_backward(d_q, saved["cos"], saved["sin"])  # [B, K*H, T, Dh]
    d_kv = np.concatenate([part.transpose(0, 2, 1, 3).reshape(batch * tokens, heads * head_dim)
                           for part in (d_k, d_v)], axis=1)  # [N, 2*H*Dh]: keys then values, as kv_proj's rows
    d_x_kv, d_kv_proj = linear_backward(d_kv, x2d, w.kv_proj)
    d_query = d_q.reshape(batch, top_k, heads, tokens, head_dim).transpose(0, 3, 1, 2, 4)  # [B, T, K, H, Dh]
    d_query = trace.record("query", d_query.reshape(batch, tokens, top_k, heads * head_dim))  # [B, T, K, H*Dh]
    d_x_map, d_input_linear = moa_map_backward(d_query.reshape(batch * tokens, top_k, heads * head_dim), x2d, plan,
                                               w.input_linear)
    d_logits = top_k_gates_backward(d_gates, plan)  # [N, E]
    if d_router_logits is not None:
        d_logits += d_router_logits
    with trace.scope("router"):
        d_logits = trace.record("logits", d_logits)
    d_x_router, d_router = top_k_gating_backward(d_logits, x2d, w.router)
    grads = dict(router=d_router, input_linear=d_input_linear, output_linear=d_output_linear, bias=d_bias,
                 kv_proj=d_kv_proj)
    return (d_x_map + d_x_kv + d_x_router).reshape(d_y.shape), grads
