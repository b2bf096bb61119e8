"""Mixture of Attention heads (MoA).  Shapes: reference/__init__.py.

One shared kv_proj gives H key/value heads. The router picks K of E attention experts per token; expert e owns
a query projection [H*Dh, D] and an output projection [D, H*Dh]. So a token has K*H query heads, and query head
k*H + j attends with kv head j: HF's `key_states.repeat(1, K, 1, 1)` (repeat, not repeat_interleave).

  map      q[n, k] = Wq[e(n,k)] @ x[n]                          [N, K, H*Dh]
  attend   softmax(q k^T / sqrt(Dh) + mask) v, per query head    [N, K, H*Dh]
  reduce   y[n] = sum_k gate[n,k] * Wo[e(n,k)] @ o[n,k] + bias   [N, D]

Notebook: notebooks/04_mixture_of_attention_heads.ipynb.
"""

import math

import numpy as np

from . import trace
from .experts import combine, group, grouped_linear, ungroup
from .precision import compute_dtype
from .rope import apply_rope
from .routing import softmax, top_k_gating
from .weights import linear


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


def moa_reduce(context, plan, output_weights, bias):
    # context: [N, K, H*Dh], output_weights: [E, D, H*Dh], bias: [D] -> [N, D]
    return combine(ungroup(grouped_linear(group(context, plan), output_weights, plan), plan), plan.top_k_gates, bias)


def attention_probs(q, k, mask):
    # q: [B, K, H, T, Dh], k: [B, H, S, Dh], mask: [B|1, 1, T, S] additive -> probs [B, K*H, T, S]
    batch, top_k, heads, tokens, head_dim = q.shape
    scores = (q @ np.swapaxes(k, -1, -2)[:, None]) / q.dtype.type(math.sqrt(head_dim))  # [B, K, H, T, S]
    scores = scores.reshape(batch, top_k * heads, tokens, -1) + mask  # head k*H + j sees kv head j
    # softmax in float32 or better, as HF's eager attention
    return softmax(scores.astype(compute_dtype(q.dtype), copy=False)).astype(q.dtype, copy=False)


def attend(probs, v, top_k):
    # probs: [B, K*H, T, S], v: [B, H, S, Dh] -> [B, T, K, H*Dh]
    batch, heads, keys, head_dim = v.shape
    tokens = probs.shape[2]
    out = probs.reshape(batch, top_k, heads, tokens, keys) @ v[:, None]  # [B, K, H, T, Dh]
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, tokens, top_k, heads * head_dim)


def moa(x, w, cos, sin, mask, cache, layer_idx, config):
    # x: [B, T, D], cos/sin: [B|1, T, Dh], mask: [B|1, 1, T, S] -> ([B, T, D], probs [B, K*H, T, S], logits [N, E])
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
    y = moa_reduce(context.reshape(batch * tokens, top_k, heads * head_dim), plan, w.output_linear, w.bias)
    return trace.record("output", y.reshape(batch, tokens, hidden)), probs, plan.logits
