"""Rung 5 of the op ladder (tests/reference/helpers.py lists them): the mixture of attention heads.

Masked attention (additive_mask, attention_probs, attend) against per-head Python loops, including the kv head
each query head uses (HF's repeat, not repeat_interleave); then the whole MoA layer (router, per-expert query,
shared kv_proj, RoPE, masked attention, output experts) against per-token, per-head loops with left padding.
"""

import math

import numpy as np
import pytest

from reference import JetMoeConfig
from reference.attention import additive_mask, attend, attention_probs, moa

from helpers import F64, assert_close, dense_top_k_gates, normwise_diff, random_expert_weights, rope_oracle


def attention_oracle(q, k, v, allowed, kv_head_of):
    # q: [B, K, H, T, Dh], k/v: [B, H, S, Dh], allowed: [B, T, S] bool, kv_head_of: query head -> kv head
    # -> probs [B, K*H, T, S], out [B, T, K, H*Dh]. Query head hq = kk*H + j is q[:, kk, j].
    batch, top_k, heads, tokens, head_dim = q.shape
    keys = k.shape[2]
    probs = np.zeros((batch, top_k * heads, tokens, keys))
    out = np.zeros((batch, tokens, top_k, heads * head_dim))
    for b in range(batch):
        for hq in range(top_k * heads):
            kk, j = divmod(hq, heads)
            kv = kv_head_of(hq)
            for t in range(tokens):
                scores = [sum(float(a) * float(c) for a, c in zip(q[b, kk, j, t], k[b, kv, s])) / math.sqrt(head_dim)
                          for s in range(keys)]
                visible = [s for s in range(keys) if allowed[b, t, s]]
                if visible:
                    top = max(scores[s] for s in visible)
                    weights = {s: math.exp(scores[s] - top) for s in visible}
                    total = sum(weights.values())
                    for s in visible:
                        probs[b, hq, t, s] = weights[s] / total
                else:  # HF: every score + finfo.min rounds to finfo.min, so the softmax is uniform
                    probs[b, hq, t, :] = 1.0 / keys
                for s in range(keys):
                    out[b, t, kk, j * head_dim:(j + 1) * head_dim] += probs[b, hq, t, s] * v[b, kv, s]
    return probs, out


def hf_cos_sin(positions, head_dim, theta):
    # positions: [B, T] -> cos, sin [B, T, Dh] in HF's layout (angles of the Dh/2 pairs, repeated twice)
    freq = float(theta) ** (-2.0 * np.arange(head_dim // 2) / head_dim)  # [Dh/2]
    angles = positions[..., None].astype(np.float64) * freq  # [B, T, Dh/2]
    angles = np.concatenate([angles, angles], axis=-1)  # [B, T, Dh]
    return np.cos(angles), np.sin(angles)


# ------------------------------------------------------------------------------------------------ 5. MoA

@pytest.mark.parametrize("top_k,heads", [(2, 3), (3, 2), (1, 2), (2, 1)])
def test_attention_matches_loops(rng, top_k, heads):
    batch, tokens, past, head_dim = 2, 4, 3, 4
    keys = past + tokens  # S: cached + new
    q = rng.standard_normal((batch, top_k, heads, tokens, head_dim))  # [B, K, H, T, Dh]
    k = rng.standard_normal((batch, heads, keys, head_dim))  # [B, H, S, Dh]
    v = rng.standard_normal((batch, heads, keys, head_dim))  # [B, H, S, Dh]
    mask2d = (rng.random((batch, keys)) < 0.7).astype(np.int64)  # [B, S] padding mask with random holes
    mask2d[0, :past + 2] = 0  # row 0: queries t=0,1 see no key at all (left-pad rows)
    mask2d[1, past:] = 1  # row 1: every query sees at least itself
    cache_position = np.arange(past, keys)  # [T]

    allowed = np.zeros((batch, tokens, keys), dtype=bool)  # [B, T, S]: causal and not padding
    for b in range(batch):
        for t in range(tokens):
            for s in range(keys):
                allowed[b, t, s] = s <= past + t and mask2d[b, s] == 1
    mask = np.where(allowed[:, None], 0.0, np.finfo(np.float64).min)  # [B, 1, T, S] additive
    np.testing.assert_array_equal(additive_mask(mask2d, cache_position, keys, F64), mask)

    probs = attention_probs(q, k, mask)  # [B, K*H, T, S]
    out = attend(probs, v, top_k)  # [B, T, K, H*Dh]
    want_probs, want_out = attention_oracle(q, k, v, allowed, kv_head_of=lambda hq: hq % heads)  # HF repeat
    # float64: scaled dot products and softmax; rounding and summation order only
    assert_close(probs, want_probs, 1e-12, "attention probs vs loops")
    assert_close(out, want_out, 1e-12, "attention output vs loops")
    if top_k > 1 and heads > 1:
        # repeat_interleave would pair query head hq with kv head hq // K: a different result.
        _, interleaved = attention_oracle(q, k, v, allowed, kv_head_of=lambda hq: hq // top_k)
        assert normwise_diff(out, interleaved) > 1e-3, "repeat and repeat_interleave are indistinguishable here"


@pytest.mark.parametrize("num_experts,top_k,heads", [(4, 2, 2), (3, 1, 2), (3, 3, 1)])
def test_moa_layer_matches_loops(rng, num_experts, top_k, heads):
    # The whole MoA layer (router, per-expert query, shared kv_proj, RoPE, masked attention, output experts)
    # against per-token, per-head loops, with left padding.
    batch, tokens, hidden, head_dim, theta = 2, 5, 12, 4, 10000.0
    config = JetMoeConfig(vocab_size=10, hidden_size=hidden, num_hidden_layers=1, num_key_value_heads=heads,
                          kv_channels=head_dim, intermediate_size=8, num_local_experts=num_experts,
                          num_experts_per_tok=top_k, rope_theta=theta)
    hd = heads * head_dim
    w = random_expert_weights(rng, num_experts, hidden, hd, hd)  # Wq [E, H*Dh, D], Wo [E, D, H*Dh]
    w.kv_proj = rng.standard_normal((2 * hd, hidden)) * 0.4  # [2*H*Dh, D]: keys then values
    x = rng.standard_normal((batch, tokens, hidden))  # [B, T, D]
    mask2d = np.ones((batch, tokens), dtype=np.int64)  # [B, T]
    mask2d[1, :2] = 0  # row 1 left-padded by 2
    positions = np.where(mask2d == 1, np.cumsum(mask2d, axis=1) - 1, 1)  # [B, T]: HF's positions for padding
    allowed = np.array([[[s <= t and mask2d[b, s] == 1 for s in range(tokens)] for t in range(tokens)]
                        for b in range(batch)])  # [B, T, S]
    mask = np.where(allowed[:, None], 0.0, np.finfo(np.float64).min)  # [B, 1, T, S]
    cos, sin = hf_cos_sin(positions, head_dim, theta)  # [B, T, Dh]
    got, got_probs, got_logits = moa(x, w, cos, sin, mask, None, 0, config)  # [B, T, D], [B, K*H, T, S], [N, E]

    want = np.zeros((batch, tokens, hidden))
    want_probs = np.zeros((batch, top_k * heads, tokens, tokens))
    for b in range(batch):
        kv = np.array([w.kv_proj @ x[b, s] for s in range(tokens)])  # [S, 2*H*Dh]
        keys = kv[:, :hd].reshape(tokens, heads, head_dim).transpose(1, 0, 2)  # [H, S, Dh]
        values = kv[:, hd:].reshape(tokens, heads, head_dim).transpose(1, 0, 2)  # [H, S, Dh]
        keys = rope_oracle(keys, positions[b], theta)  # [H, S, Dh]
        for t in range(tokens):
            gates, chosen = dense_top_k_gates((w.router @ x[b, t])[None], top_k)  # [1, E], [1, K]
            for kk, e in enumerate(chosen[0]):
                query = (w.input_linear[e] @ x[b, t]).reshape(heads, 1, head_dim)  # [H, 1, Dh]
                query = rope_oracle(query, positions[b, t:t + 1], theta)[:, 0]  # [H, Dh]
                context = np.zeros(hd)  # [H*Dh]
                for j in range(heads):  # query head kk*H + j uses kv head j
                    scores = [float(query[j] @ keys[j, s]) / math.sqrt(head_dim) for s in range(tokens)]
                    visible = [s for s in range(tokens) if allowed[b, t, s]]
                    p = np.full(tokens, 1.0 / tokens)  # no visible key: uniform, as HF with finfo.min
                    if visible:
                        p[:] = 0.0
                        top = max(scores[s] for s in visible)
                        for s in visible:
                            p[s] = math.exp(scores[s] - top)
                        p /= p.sum()
                    want_probs[b, kk * heads + j, t] = p
                    context[j * head_dim:(j + 1) * head_dim] = sum(p[s] * values[j, s] for s in range(tokens))
                want[b, t] += gates[0, e] * (w.output_linear[e] @ context)
            want[b, t] += w.bias
    # float64 throughout; rotation angles < 5 rad, rounding and summation order only
    assert_close(got_logits, np.einsum("ed,nd->ne", w.router, x.reshape(-1, hidden)), 1e-12, "moa router logits")
    assert_close(got_probs, want_probs, 1e-12, "moa probs vs loops")
    assert_close(got, want, 1e-12, "moa output vs loops")
