"""Rung 1 of the op ladder (tests/reference/helpers.py lists them): RMSNorm.

rms_norm against the formula computed row by row in plain Python, and which eps each norm of the model uses (1e-6
in the blocks, the config's rms_norm_eps in the final norm).
"""

import math

import numpy as np
import pytest

import reference
from reference import JetMoeConfig, JetMoeForCausalLM
from reference.norm import BLOCK_NORM_EPS, rms_norm

from helpers import assert_close, normwise_diff


def rms_norm_oracle(x, weight, eps):
    # x: [..., D] -> [..., D], one row at a time in plain Python arithmetic
    flat = np.asarray(x, dtype=np.float64).reshape(-1, x.shape[-1])
    out = np.empty_like(flat)
    for r, row in enumerate(flat):
        mean_square = sum(float(v) * float(v) for v in row) / len(row)
        out[r] = weight * (row / math.sqrt(mean_square + eps))
    return out.reshape(x.shape)


# ------------------------------------------------------------------------------------------------ 1. RMSNorm

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
