"""Op ladder: each op of the reference against an independent oracle written plainly here.

Every oracle below is a direct transcription of the math (complex rotation, dense all-experts sums, Python loops
over heads and positions, a no-cache argmax loop, ...); none calls the reference helper it checks.

Randomness: every test draws fresh inputs and weights from `rng`, whose seed is printed (pytest shows it for a
failing test), so a failure can be replayed with np.random.default_rng(<seed>).

Tolerances are normwise: max|got - want| <= rtol * max|want| (see `assert_close`), stated at each check with its
reason. Shape legend (as reference/config.py): B batch, T tokens, S keys, D hidden, E experts, K top-k,
H kv heads, Dh head dim, F intermediate, V vocab, L layers, N = B*T.
"""

import math

import numpy as np
import pytest

import reference
from reference import JetMoeConfig, JetMoeForCausalLM, KVCache
from reference.attention import attend, attention_probs, moa, moa_map, moa_reduce
from reference.experts import moe
from reference.generation import positions_from_mask
from reference.attention import additive_mask
from reference.model import ExpertWeights
from reference.norm import BLOCK_NORM_EPS, rms_norm
from reference.rope import apply_rope, cos_sin
from reference.routing import top_k_gating

F64 = np.dtype(np.float64)


def assert_close(got, want, rtol, what):
    """Normwise check: max|got - want| <= rtol * max|want|, with the errors in the failure message."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    err = float(np.max(np.abs(got - want)))
    scale = float(np.max(np.abs(want)))
    assert scale > 0, f"{what}: oracle is all zeros, the check would be vacuous"
    assert err <= rtol * scale, f"{what}: max abs err {err:.3e}, max rel err {err / scale:.3e} > rtol {rtol:g}"


def normwise_diff(a, b):
    # max|a - b| / max|b|
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b)))


# ------------------------------------------------------------------------------------------------ oracles

def rope_oracle(x, positions, theta):
    # x: [..., P, Dh], positions: [P] -> [..., P, Dh]
    # Pair dims i and i + Dh/2 as z_i = x_i + 1j*x_{i+Dh/2}; rotate by exp(1j * pos * theta^(-2i/Dh)).
    head_dim = x.shape[-1]
    half = head_dim // 2
    z = x[..., :half] + 1j * x[..., half:]  # [..., P, Dh/2]
    freq = float(theta) ** (-2.0 * np.arange(half) / head_dim)  # [Dh/2]
    z = z * np.exp(1j * np.asarray(positions, dtype=np.float64)[:, None] * freq)  # [..., P, Dh/2]
    return np.concatenate([z.real, z.imag], axis=-1)


def silu_oracle(x):
    # x * sigmoid(x), sigmoid via tanh (a different formula from the reference's 1 / (1 + exp(-x)))
    return x * 0.5 * (1.0 + np.tanh(0.5 * x))


def rms_norm_oracle(x, weight, eps):
    # x: [..., D] -> [..., D], one row at a time in plain Python arithmetic
    flat = np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1])
    out = np.empty_like(flat)
    for r, row in enumerate(flat):
        mean_square = sum(float(v) * float(v) for v in row) / len(row)
        out[r] = weight * (row / math.sqrt(mean_square + eps))
    return out.reshape(x.shape)


def dense_top_k_gates(logits, k):
    # logits: [N, E] -> ([N, E] gates: zero except the k largest logits of a row, which hold the softmax over
    # only those k; [N, K] chosen experts, best first)
    gates = np.zeros_like(logits)
    chosen = np.empty((logits.shape[0], k), dtype=np.int64)
    for n, row in enumerate(logits):
        best = sorted(range(len(row)), key=lambda e: -row[e])[:k]
        weights = [math.exp(row[e] - row[best[0]]) for e in best]
        for e, wgt in zip(best, weights):
            gates[n, e] = wgt / sum(weights)
        chosen[n] = best
    return gates, chosen


def random_expert_weights(rng, num_experts, hidden, in_features, out_features, scale=0.4):
    # router [E, D], input_linear [E, in_out, D], output_linear [E, D, out_in], bias [D]: all random, none zero
    return ExpertWeights(router=rng.standard_normal((num_experts, hidden)),
                         input_linear=rng.standard_normal((num_experts, in_features, hidden)) * scale,
                         output_linear=rng.standard_normal((num_experts, hidden, out_features)) * scale,
                         bias=rng.standard_normal(hidden))


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


# ------------------------------------------------------------------------------------------------ 1. RoPE

@pytest.mark.parametrize("head_dim,theta", [(2, 10000.0), (6, 10000.0), (8, 1e6), (16, 500.0)])
def test_rope_matches_complex_rotation(rng, head_dim, theta):
    batch, heads, tokens = 2, 3, 7
    positions = rng.integers(0, 2048, size=(batch, tokens))  # [B, T]
    x = rng.standard_normal((batch, heads, tokens, head_dim))  # [B, heads, T, Dh]
    cos, sin = cos_sin(positions, head_dim, theta, F64)  # [B, T, Dh]
    assert cos.shape == sin.shape == (batch, tokens, head_dim)
    got = apply_rope(x, cos, sin)  # [B, heads, T, Dh]
    want = np.stack([rope_oracle(x[b], positions[b], theta) for b in range(batch)])  # [B, heads, T, Dh]
    # float64; angle = pos * freq, freq rounded differently here (theta**-e vs 1/theta**e, a few ulp), pos < 2048:
    # angles may differ by ~2048 * 4 * 1.1e-16 ~ 1e-12 rad, so the rotated vector by ~1e-12 * |x|.
    assert_close(got, want, 1e-11, "apply_rope vs complex rotation")
    # Rotation keeps each pair's norm (a check the oracle cannot share a mistake with).
    half = head_dim // 2

    def pair_norm(y):
        # [B, heads, T, Dh] -> [B, heads, T, Dh/2]: |z_i|^2 of each rotated pair
        return y[..., :half] ** 2 + y[..., half:] ** 2

    assert_close(pair_norm(got), pair_norm(x), 1e-13, "RoPE keeps pair norms")  # float64 rounding only


def test_rope_relative_position_invariance(rng):
    head_dim, theta, pairs = 8, 10000.0, 20
    q = rng.standard_normal((pairs, head_dim))  # [P, Dh]
    k = rng.standard_normal((pairs, head_dim))  # [P, Dh]
    m = rng.integers(0, 500, pairs)  # [P]
    n = rng.integers(0, 500, pairs)  # [P]
    shift = rng.integers(1, 500, pairs)  # [P]

    def dots(pos_q, pos_k):
        # <rope(q, pos_q), rope(k, pos_k)> per pair -> [P]
        positions = np.stack([pos_q, pos_k], axis=1)  # [P, 2]: batch P, tokens (q, k)
        cos, sin = cos_sin(positions, head_dim, theta, F64)  # [P, 2, Dh]
        x = np.stack([q, k], axis=1)[:, None]  # [P, 1, 2, Dh]
        r = apply_rope(x, cos, sin)[:, 0]  # [P, 2, Dh]
        return np.sum(r[:, 0] * r[:, 1], axis=-1)

    scale = np.linalg.norm(q, axis=1) * np.linalg.norm(k, axis=1)  # [P]
    base, shifted = dots(m, n), dots(m + shift, n + shift)
    # float64; angles up to ~1000 rad carry ~1e-13 rad rounding, so the dot product ~1e-12 * |q||k|
    assert np.all(np.abs(base - shifted) <= 1e-11 * scale), np.max(np.abs(base - shifted) / scale)
    # ... and it really depends on m - n: moving the key by one position changes it (not a vacuous invariance).
    # Typical change ~0.1 |q||k| (pair 0 turns by 1 rad); the median over 20 pairs is far above 1e-2.
    moved = dots(m, n + 1)
    assert np.median(np.abs(base - moved) / scale) > 1e-2, np.abs(base - moved) / scale


# ------------------------------------------------------------------------------------------------ 8. RMSNorm

@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-13), (np.float32, 2e-6)], ids=["float64", "float32"])
def test_rms_norm_matches_formula(rng, dtype, rtol):
    # rtol: float64 -> a few roundings and the summation order of the mean (~1e-16 each);
    # float32 (computed in float32, as HF) -> ~6e-8 per op over the D-term mean and a few ops.
    hidden = 24
    row_scale = np.array([1e-3, 0.1, 1.0, 30.0])[:, None, None]  # [4, 1, 1]: eps matters for the small rows
    x = (rng.standard_normal((4, 5, hidden)) * row_scale).astype(dtype)  # [4, 5, D]
    weight = rng.uniform(0.5, 1.5, hidden).astype(dtype)  # [D]
    eps = float(rng.choice([1e-6, 1e-5, 0.3]))
    got = rms_norm(x, weight, eps)  # [4, 5, D]
    assert got.dtype == dtype
    assert_close(got, rms_norm_oracle(x, weight.astype(np.float64), eps), rtol, f"rms_norm eps={eps}")


def test_block_norms_use_1e6_final_norm_uses_config_eps(rng):
    config = JetMoeConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_key_value_heads=2, kv_channels=4,
                          intermediate_size=12, num_local_experts=3, num_experts_per_tok=2,
                          max_position_embeddings=64, rms_norm_eps=0.5)
    model = JetMoeForCausalLM.from_random(config, seed=int(rng.integers(2**32)), std=0.3, dtype=np.float64)
    ids = rng.integers(0, config.vocab_size, size=(2, 6))  # [B, T]
    with reference.capture() as trace:
        model(input_ids=ids)
    assert BLOCK_NORM_EPS == 1e-6
    checks = []  # (name, norm input [B, T, D], weight [D], eps the name must use, the eps it must not use)
    for i, layer in enumerate(model.model.layers):
        before = trace["embed_tokens"] if i == 0 else trace[f"layers.{i - 1}.output"]
        checks.append((f"layers.{i}.input_layernorm", before, layer.input_layernorm, 1e-6, 0.5))
        checks.append((f"layers.{i}.post_attention_layernorm", trace[f"layers.{i}.post_attention_residual"],
                       layer.post_attention_layernorm, 1e-6, 0.5))
    checks.append(("norm", trace[f"layers.{config.num_hidden_layers - 1}.output"], model.model.norm, 0.5, 1e-6))
    for name, x, weight, eps, wrong_eps in checks:
        # float64, same formula: rounding only
        assert_close(trace[name], rms_norm_oracle(x, weight, eps), 1e-13, f"{name} with eps={eps}")
        # The other eps gives a clearly different result, so the check above tells the two apart.
        assert normwise_diff(trace[name], rms_norm_oracle(x, weight, wrong_eps)) > 1e-3, name


# ------------------------------------------------------------------------------------------------ 2. sparse MoE

@pytest.mark.parametrize("num_experts,top_k", [(4, 1), (4, 2), (4, 4), (5, 3)])
def test_moe_matches_dense_all_experts(rng, num_experts, top_k):
    batch, tokens, hidden, inter = 2, 5, 12, 7
    w = random_expert_weights(rng, num_experts, hidden, 2 * inter, inter)  # Win [E, 2F, D], Wout [E, D, F]
    x = rng.standard_normal((batch, tokens, hidden))  # [B, T, D]
    got, got_logits = moe(x, w, top_k)  # [B, T, D], [N, E]

    x2d = x.reshape(-1, hidden)  # [N, D]
    logits = np.einsum("ed,nd->ne", w.router, x2d)  # [N, E]
    gates, _ = dense_top_k_gates(logits, top_k)  # [N, E], K nonzeros per row
    assert np.all(np.count_nonzero(gates, axis=1) == top_k) and np.allclose(gates.sum(axis=1), 1.0)
    h = np.einsum("efd,nd->nef", w.input_linear, x2d)  # [N, E, 2F]: every expert on every token
    act = silu_oracle(h[..., :inter]) * h[..., inter:]  # [N, E, F]
    y_all = np.einsum("edf,nef->ned", w.output_linear, act)  # [N, E, D]
    want = np.einsum("ne,ned->nd", gates, y_all) + w.bias  # [N, D]

    # float64: same math, different summation order and sigmoid formula (~1e-16 per op)
    assert_close(got_logits, logits, 1e-12, "moe router logits")
    assert_close(got, want.reshape(batch, tokens, hidden), 1e-12, f"moe E={num_experts} K={top_k} vs dense")


@pytest.mark.parametrize("num_experts,top_k", [(4, 1), (4, 2), (4, 4), (5, 3)])
def test_moa_map_reduce_match_dense(rng, num_experts, top_k):
    tokens, hidden, heads, head_dim = 9, 12, 2, 3
    hd = heads * head_dim
    w = random_expert_weights(rng, num_experts, hidden, hd, hd)  # Wq [E, H*Dh, D], Wo [E, D, H*Dh]
    x2d = rng.standard_normal((tokens, hidden))  # [N, D]
    plan = top_k_gating(x2d, w.router, top_k)

    logits = np.einsum("ed,nd->ne", w.router, x2d)  # [N, E]
    gates, chosen = dense_top_k_gates(logits, top_k)  # [N, E], [N, K]
    # The plan routes like the oracle: same experts, best first, same gates (float64 rounding only).
    np.testing.assert_array_equal(plan.top_k_indices, chosen)
    assert_close(plan.top_k_gates, np.take_along_axis(gates, chosen, axis=1), 1e-12, "top-k gates")

    # map: every expert's query projection on every token, then a one-hot [N, K, E] selection of slot (n, k)
    q_all = np.einsum("ehd,nd->neh", w.input_linear, x2d)  # [N, E, H*Dh]
    select = (chosen[..., None] == np.arange(num_experts)).astype(np.float64)  # [N, K, E]
    want_q = np.einsum("nke,neh->nkh", select, q_all)  # [N, K, H*Dh]
    assert_close(moa_map(x2d, plan, w.input_linear), want_q, 1e-12, "moa_map vs dense")  # float64, sum order

    # reduce: put slot (n, k)'s context in column chosen[n, k] of a dense [N, E, H*Dh] tensor whose other
    # columns hold random junk; the zero gates must cancel the junk.
    context = rng.standard_normal((tokens, top_k, hd))  # [N, K, H*Dh]
    dense_context = rng.standard_normal((tokens, num_experts, hd))  # [N, E, H*Dh]
    for n in range(tokens):
        for kk in range(top_k):
            dense_context[n, chosen[n, kk]] = context[n, kk]
    y_all = np.einsum("edh,neh->ned", w.output_linear, dense_context)  # [N, E, D]
    want_y = np.einsum("ne,ned->nd", gates, y_all) + w.bias  # [N, D]
    got_y = moa_reduce(context, plan, w.output_linear, w.bias)  # [N, D]
    assert_close(got_y, want_y, 1e-12, "moa_reduce vs dense")  # float64, summation order only


# ------------------------------------------------------------------------------------------------ 3. attention

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


# ------------------------------------------------------------------------------------------------ models

BASE = dict(vocab_size=61, hidden_size=24, num_hidden_layers=2, intermediate_size=20, max_position_embeddings=128,
            bos_token_id=1, eos_token_id=None, pad_token_id=0)
MODEL_CONFIGS = {
    "E4_K2_H2": dict(num_local_experts=4, num_experts_per_tok=2, num_key_value_heads=2, kv_channels=6),
    "E3_K1_H3_untied": dict(num_local_experts=3, num_experts_per_tok=1, num_key_value_heads=3, kv_channels=4,
                            tie_word_embeddings=False),
    "E3_K3_H1": dict(num_local_experts=3, num_experts_per_tok=3, num_key_value_heads=1, kv_channels=8),
}


def make_model(rng, name, dtype=np.float64, **overrides):
    config = JetMoeConfig(**{**BASE, **MODEL_CONFIGS[name], **overrides})
    # std=0.3: sharper attention and routing than the default 0.1, so masking/position mistakes show up
    return JetMoeForCausalLM.from_random(config, seed=int(rng.integers(2**32)), std=0.3, dtype=dtype)


def real_tokens(rng, config, size):
    # ids in [1, V): never pad_token_id=0, so HF's default mask (no padding) applies to them
    return rng.integers(1, config.vocab_size, size=size)


# ------------------------------------------------------------------------------------------------ 4. KV cache

@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
def test_cached_decode_matches_full_forward(rng, name):
    model = make_model(rng, name)
    config = model.config
    batch, tokens = 2, 11
    ids = real_tokens(rng, config, (batch, tokens))  # [B, T]
    full = model(input_ids=ids, use_cache=True)  # logits [B, T, V]

    splits = [3, 1, 1, 4, 2]  # prefix, 1-token steps, a multi-token step, another multi-token step
    cache, start, pieces, capacities = None, 0, [], []
    for n in splits:
        out = model(input_ids=ids[:, start:start + n], past_key_values=cache, use_cache=True)  # [B, n, V]
        assert out.logits.shape == (batch, n, config.vocab_size)
        cache, start = out.past_key_values, start + n
        assert cache.get_seq_length() == start
        capacities.append(cache.capacity)
        pieces.append(out.logits)
    # The first forward allocates capacity = prefix length; the later steps must outgrow it (doubling).
    assert capacities[0] == splits[0] and capacities[-1] > capacities[0], capacities
    # float64: the same per-token math in differently shaped matmuls -> summation order only
    assert_close(np.concatenate(pieces, axis=1), full.logits, 1e-12, "prefix + cached steps vs full forward")
    for i in range(config.num_hidden_layers):
        assert_close(cache.key_cache[i], full.past_key_values.key_cache[i], 1e-12, f"cached keys layer {i}")
        assert_close(cache.value_cache[i], full.past_key_values.value_cache[i], 1e-12, f"cached values layer {i}")


def test_cache_growing_from_capacity_one(rng):
    model = make_model(rng, "E4_K2_H2")
    config = model.config
    batch, tokens = 3, 9
    ids = real_tokens(rng, config, (batch, tokens))  # [B, T]
    full = model(input_ids=ids).logits  # [B, T, V]
    cache = KVCache.for_config(config, batch, model.dtype, capacity=1)
    steps, seen = [], []
    for t in range(tokens):  # one token at a time: capacity 1 -> 2 -> 4 -> 8 -> 16
        before = cache.capacity
        steps.append(model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
        assert cache.get_seq_length() == t + 1
        # reference/cache.py's rule: an outgrown buffer becomes max(needed, 2 * old), so decoding reallocates
        # O(log T) times, not once per token.
        assert cache.capacity == (before if t + 1 <= before else max(t + 1, 2 * before)), (t, before)
        seen.append(cache.capacity)
    assert seen == [1, 2, 4, 4, 8, 8, 8, 8, 16], seen
    assert_close(np.concatenate(steps, axis=1), full, 1e-12, "1-token decode from capacity 1")  # sum order only


# ------------------------------------------------------------------------------------------------ 5. padding

@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
def test_left_and_right_padding_match_unpadded(rng, name):
    model = make_model(rng, name)
    config = model.config
    width = 8
    lengths = [width, int(rng.integers(2, width)), 1]
    rows = [real_tokens(rng, config, n) for n in lengths]
    solo = [model(input_ids=r[None]).logits[0] for r in rows]  # each [n, V]
    # Padding slots hold random junk tokens (not pad_token_id): the mask alone must hide them.
    left = real_tokens(rng, config, (len(rows), width))  # [B, W]
    right = real_tokens(rng, config, (len(rows), width))  # [B, W]
    left_mask = np.zeros((len(rows), width), dtype=np.int64)  # [B, W]
    right_mask = np.zeros((len(rows), width), dtype=np.int64)  # [B, W]
    for b, r in enumerate(rows):
        left[b, width - len(r):], left_mask[b, width - len(r):] = r, 1
        right[b, :len(r)], right_mask[b, :len(r)] = r, 1
    # HF's positions for padding: real tokens count 0, 1, ..., pads hold 1 (masked_fill(mask == 0, 1)).
    for b, r in enumerate(rows):
        want = [1] * (width - len(r)) + list(range(len(r)))
        np.testing.assert_array_equal(positions_from_mask(left_mask)[b], want)
    left_out = model(input_ids=left, attention_mask=left_mask, position_ids=positions_from_mask(left_mask)).logits
    right_out = model(input_ids=right, attention_mask=right_mask).logits  # default positions 0..W-1
    for b, r in enumerate(rows):
        n = len(r)
        # float64: masked keys get weight exactly 0; only the batch shape (summation order) differs
        assert_close(left_out[b, width - n:], solo[b], 1e-12, f"left-padded row {b} (length {n})")
        assert_close(right_out[b, :n], solo[b], 1e-12, f"right-padded row {b} (length {n})")


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_left_padding_outputs_are_finite(rng, dtype):
    # A left-pad query sees no key; HF's eager float64 path gives NaN there, the reference must stay finite.
    model = make_model(rng, "E4_K2_H2", dtype=dtype)
    config = model.config
    ids = real_tokens(rng, config, (2, 7))  # [B, T]
    mask = np.ones_like(ids)
    mask[0, :4] = 0  # [B, T]: row 0 left-padded by 4
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                output_attentions=True, output_hidden_states=True, output_router_logits=True)
    named = {"logits": out.logits, "aux_loss": out.aux_loss}
    named.update({f"hidden_states.{i}": h for i, h in enumerate(out.hidden_states)})
    named.update({f"attentions.{i}": a for i, a in enumerate(out.attentions)})
    named.update({f"router_logits.{i}": r for i, r in enumerate(out.router_logits)})
    for key, value in named.items():
        assert np.all(np.isfinite(value)), f"{np.dtype(dtype).name} left padding: {key} is not finite"
    # Sanity that the padded rows were really fully masked: their attention is spread over all keys.
    assert np.all(out.attentions[0][0, :, :4] > 0)


# ------------------------------------------------------------------------------------------------ 6. generate

def greedy_no_cache(model, prompt, max_new_tokens):
    # prompt: [T] -> new tokens [<= max_new]: argmax of a full forward each step, stop after an eos
    tokens = list(prompt)
    new = []
    for _ in range(max_new_tokens):
        nxt = int(np.argmax(model(input_ids=np.array([tokens]), use_cache=False).logits[0, -1]))
        tokens.append(nxt)
        new.append(nxt)
        if nxt in model.config.eos_token_ids:
            break
    return np.array(new, dtype=np.int64)


@pytest.mark.parametrize("with_eos", [False, True], ids=["no_eos", "eos_mid_way"])
@pytest.mark.parametrize("name", ["E4_K2_H2", "E3_K1_H3_untied"])
def test_batched_left_padded_generate_matches_solo(rng, name, with_eos):
    model = make_model(rng, name)
    config = model.config
    width, max_new = 6, 6
    lengths = [width, int(rng.integers(2, width)), 1]
    prompts = [real_tokens(rng, config, n) for n in lengths]
    if with_eos:
        # Make row 0's third new token an eos, so at least one row stops early and gets pad tokens after.
        config.eos_token_id = int(greedy_no_cache(model, prompts[0], 3)[-1])
    solo = []
    for p in prompts:
        out = model.generate(p[None], max_new_tokens=max_new)  # [1, n + new]
        np.testing.assert_array_equal(out[0, :len(p)], p)
        new = out[0, len(p):]
        # Independent oracle: argmax of a full forward (no cache) each step.
        np.testing.assert_array_equal(new, greedy_no_cache(model, p, max_new))
        solo.append(new)
    if with_eos:
        assert len(solo[0]) <= 3 and solo[0][-1] == config.eos_token_id

    ids = real_tokens(rng, config, (len(prompts), width))  # [B, W]: junk in the padding slots
    mask = np.zeros((len(prompts), width), dtype=np.int64)  # [B, W]
    for b, p in enumerate(prompts):
        ids[b, width - len(p):], mask[b, width - len(p):] = p, 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=max_new)  # [B, W + new]
    np.testing.assert_array_equal(batched[:, :width], ids)
    new = batched[:, width:]  # [B, new]
    # Generation runs until every row is done: max_new, or the longest row's eos.
    assert new.shape[1] == max(len(s) for s in solo)
    for b, s in enumerate(solo):
        np.testing.assert_array_equal(new[b, :len(s)], s, err_msg=f"row {b}")
        assert np.all(new[b, len(s):] == config.pad_token_id), f"row {b} continues after its eos: {new[b]}"


# ------------------------------------------------------------------------------------------------ 7. trace

def test_trace_names_and_capture_is_transparent(rng):
    model = make_model(rng, "E4_K2_H2")
    config = model.config
    ids = real_tokens(rng, config, (2, 5))  # [B, T]
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                  output_attentions=True, output_hidden_states=True, output_router_logits=True)
    plain = model(**kwargs)
    with reference.capture() as trace:
        traced = model(**kwargs)
    names = list(trace)
    for name in ["embed_tokens", "layers.0.attention.router.top_k_indices", "layers.0.attention.probs",
                 "layers.1.mlp.expert_out", "layers.1.output", "norm", "logits"]:
        assert name in trace, f"trace lacks {name}; has {names}"
    assert names[0] == "embed_tokens" and names[-2:] == ["norm", "logits"]
    assert names.index("layers.0.output") < names.index("layers.1.input_layernorm")
    assert trace["layers.0.attention.router.top_k_indices"].shape == (ids.size, config.num_experts_per_tok)
    assert trace["layers.1.mlp.expert_out"].shape == (ids.size, config.num_experts_per_tok, config.hidden_size)
    # Capturing changes nothing, bitwise.
    np.testing.assert_array_equal(traced.logits, plain.logits)
    for a, b in zip(traced.hidden_states + traced.attentions + traced.router_logits,
                    plain.hidden_states + plain.attentions + plain.router_logits):
        np.testing.assert_array_equal(a, b)
    # The recorded tensors are the real ones.
    np.testing.assert_array_equal(trace["embed_tokens"], model.model.embed_tokens[ids])
    np.testing.assert_array_equal(trace["norm"], plain.hidden_states[-1])
    np.testing.assert_array_equal(trace["logits"], plain.logits)
    np.testing.assert_array_equal(trace["layers.0.attention.probs"], plain.attentions[0])


def test_trace_compare_finds_first_divergence(rng):
    seed = int(rng.integers(2**32))
    config = JetMoeConfig(**{**BASE, **MODEL_CONFIGS["E4_K2_H2"]})
    model_a = JetMoeForCausalLM.from_random(config, seed=seed, std=0.3, dtype=np.float64)
    model_b = JetMoeForCausalLM.from_random(config, seed=seed, std=0.3, dtype=np.float64)
    ids = real_tokens(rng, config, (2, 6))  # [B, T]
    with reference.capture() as trace_a:
        model_a(input_ids=ids)
    with reference.capture() as trace_a2:
        model_a(input_ids=ids)
    first, rows = reference.compare(trace_a, trace_a2)
    assert first is None and len(rows) == len(trace_a) and all(r.ok and r.max_abs == 0 for r in rows)

    # Perturb one weight of layer 1's MLP: output_linear[e, d, f] of an expert that token 0 uses, at the
    # feature f where that token's activation is largest, so the change is certain to show.
    e = int(trace_a["layers.1.mlp.router.top_k_indices"][0, 0])
    f = int(np.argmax(np.abs(trace_a["layers.1.mlp.expert_act"][0, 0])))
    d = int(rng.integers(config.hidden_size))
    mlp = model_b.model.layers[1].mlp
    mlp.output_linear = mlp.output_linear.copy()
    mlp.output_linear[e, d, f] += 1.0
    with reference.capture() as trace_b:
        model_b(input_ids=ids)
    first, rows = reference.compare(trace_a, trace_b)
    assert first is not None and not first.ok
    assert first.name.startswith("layers.1.mlp."), f"first divergence {first.name}, expected in layers.1.mlp"
    assert first.name == "layers.1.mlp.expert_out"  # the router and the activations come before this weight
    before = rows[:[r.name for r in rows].index(first.name)]
    assert before and all(r.ok for r in before)
    a, b = trace_a[first.name], trace_b[first.name]
    max_abs = float(np.max(np.abs(a - b)))
    assert max_abs > 0 and first.max_abs == max_abs
    assert first.max_rel == pytest.approx(max_abs / float(np.max(np.abs(b))), rel=1e-12)  # one division
    assert not next(r for r in rows if r.name == "logits").ok  # and it propagates to the logits
