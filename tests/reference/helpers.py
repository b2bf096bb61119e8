"""Shared by the reference subject tests: the normwise check, the oracles several subjects use, the small models.

The op ladder checks each op of the reference against an independent oracle written plainly in the tests, one file
per subject, in forward order:

   1. test_norm.py        RMSNorm against the formula; which eps each norm of the model uses
   2. test_rope.py        RoPE against a complex rotation; relative-position invariance
   3. test_routing.py     top-k gating and the plan's gather (moa_map) and gated combine (moa_reduce) vs dense sums
   4. test_moe.py         the sparse MLP experts against a dense all-experts sum
   5. test_moa.py         masked attention and the whole MoA layer against per-token, per-head loops
   6. test_cache.py       cached decoding against the full forward; how the KV cache grows
   7. test_padding.py     left and right padding against unpadded rows; finite outputs under left padding
   8. test_generation.py  batched, left-padded greedy generate against solo runs and a no-cache argmax loop
   9. test_trace.py       trace names, capture changing nothing, compare finding the first divergence
  10. test_checkpoint.py  save/load round trips and the HF checkpoint layouts
  11. test_errors.py      bad inputs fail loudly, naming the argument

Beside the ladder: test_golden.py (the whole model against stored HF outputs), test_sampling.py (the logits
warpers and the draw) and test_tokenizer.py.

Every oracle is a direct transcription of the math (complex rotation, dense all-experts sums, Python loops over
heads and positions, a no-cache argmax loop, ...); none calls the reference helper it checks.

Randomness: every test draws fresh inputs and weights from `rng` (tests/conftest.py), whose seed is printed (pytest
shows it for a failing test), so a failure can be replayed with np.random.default_rng(<seed>).

Tolerances are normwise: max|got - want| <= rtol * max|want| (see `assert_close`), stated at each check with its
reason. Shape legend (as reference/__init__.py): B batch, T tokens, S keys, D hidden, E experts, K top-k,
H kv heads, Dh head dim, F intermediate, V vocab, L layers, N = B*T.
"""

import math

import numpy as np

from reference import JetMoeConfig, JetMoeForCausalLM
from reference.model import ExpertWeights

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


def dense_top_k_gates(logits, k):
    # logits: [N, E] -> ([N, E] gates: zero except the k largest logits of a row, which hold the softmax over
    # only those k; [N, K] chosen experts, best first, equal logits in expert id order: Python's sort is stable)
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
