"""Host-side logic of the GPU attention and KV cache, on the CPU with NumPy only (no CuPy, no GPU).

- gpu.attention's launch planning: kernel choice (prefill vs split-K decode), grid sizes, key splits, workspace.
- The constants the Python side assumes agree with gpu/kernels/attention.cu's #defines.
- The NumPy models of the kernels' algorithms (gpu.attention.prefill_model / decode_model: the same tiles, key
  ranges, -FLT_MAX masking, online softmax and split merge as the kernels), against reference.attention with
  reference.model.additive_mask. tests/gpu/device/test_kernels_attention.py checks the CUDA kernels on a GPU.

Tolerance for the models: max|got - want| <= 1e-5 * max|v| (float32 throughout; the context is a convex
combination of value rows, so its error scales with max|v|). Randomness: `rng` (tests/conftest.py) prints its
seed; hypothesis prints a failing example.
"""

import os
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu import attention as ga
from gpu.cache import storage_dtype
from gpu.kernels import KERNEL_DIR

from gpu_helpers import draw, reference_attention

TOL = 1e-5


def cu_defines():
    with open(os.path.join(KERNEL_DIR, "attention.cu")) as f:
        text = f.read()
    return {m.group(1): m.group(2) for m in re.finditer(r"^#define (\w+) ([^\s/]+)", text, re.M)}


def test_python_constants_match_the_kernel():
    d = cu_defines()
    assert int(d["ATT_DMAX"]) == ga.MAX_HEAD_DIM
    assert int(d["PF_ROWS"]) * int(d["PF_WARPS"]) == ga.PREFILL_ROWS
    assert 32 * int(d["PF_WARPS"]) == ga.PREFILL_THREADS
    assert int(d["DC_ROWS"]) == ga.DECODE_ROWS
    assert 32 * int(d["DC_WARPS"]) == ga.DECODE_THREADS == ga.DECODE_KEY_ROUND
    assert ga.DECODE_THREADS >= ga.MAX_HEAD_DIM  # one thread per head dim in the decode merge
    assert 32 * int(d["PR_WARPS"]) == ga.PROBS_THREADS
    with open(os.path.join(KERNEL_DIR, "attention.cu")) as f:
        naive_bounds = set(re.findall(r"__launch_bounds__\((\d+)\) attention_naive_\w+\(PREFILL_PARAMS", f.read()))
    assert naive_bounds == {str(ga.NAIVE_THREADS)}  # both entries, with prefill's arguments (the host passes those)
    assert ga.COMBINE_THREADS >= ga.MAX_HEAD_DIM


# ------------------------------------------------------------------------------------------ planning

def test_choose_kernel():
    assert ga.choose_kernel(1, 32, 1, 132) == "decode"
    assert ga.choose_kernel(64, 32, 4, 132) == "decode"  # a few queries: always split-K
    assert ga.choose_kernel(1, 32, 2048, 132) == "prefill"
    assert ga.choose_kernel(1, 32, 17, 132) == "prefill"
    assert ga.choose_kernel(1, 32, 16, 132) == "decode"  # 32 prefill blocks cannot fill 132 SMs
    assert ga.choose_kernel(64, 32, 16, 132) == "prefill"  # 2048 prefill blocks can


@settings(max_examples=500, deadline=None)
@given(keys=st.integers(1, 200_000), blocks=st.integers(1, 20_000), sms=st.integers(1, 200),
       forced=st.one_of(st.none(), st.integers(1, 300)))
def test_decode_split_covers_every_key_once(keys, blocks, sms, forced):
    splits, chunk = ga.decode_split(keys, blocks, sms, forced)
    assert splits >= 1 and chunk >= 1
    assert (splits - 1) * chunk < keys <= splits * chunk  # every key in exactly one split, no empty split
    if forced is None:
        assert chunk % ga.DECODE_KEY_ROUND == 0  # whole rounds of the 4 warps
        if splits > 1:  # splitting only as far as the GPU needs
            assert blocks * (splits - 1) < ga.BLOCKS_PER_SM * sms
    else:
        assert splits <= forced


def test_batch_one_decode_fills_the_gpu():
    # JetMoE-8B decode (B=1, H=16, K=2, Dh=128) at S=2048 on an H100 (132 SMs): split-K gives >= 1 block per SM.
    plan = ga.plan_attention(1, 32, 16, 1, 2048, 132)
    assert plan.kernel == "decode" and plan.num_splits > 1
    assert plan.grid[0] * plan.grid[1] * plan.grid[2] >= 132
    assert plan.grid == (plan.num_splits, 16, 1)  # K*T = 2 rows: one row group per kv head
    assert plan.combine_grid == (1, 32, 1)


@pytest.mark.parametrize("batch,top_k,heads,tokens,keys", [(1, 2, 16, 1, 5), (3, 2, 3, 37, 60), (2, 8, 1, 3, 9000),
                                                           (2, 1, 4, 16, 16), (5, 3, 2, 200, 300)])
def test_plan_grids(batch, top_k, heads, tokens, keys):
    q_heads = top_k * heads
    for kind in ("prefill", "decode", "naive"):
        plan = ga.plan_attention(batch, q_heads, heads, tokens, keys, 132, kernel_kind=kind)
        if kind == "prefill":
            assert plan.grid == (-(-tokens // 32), q_heads, batch) and plan.block == (128,)
            assert ga.workspace_size(plan, batch, q_heads, tokens, 64) == 0
        elif kind == "naive":  # one thread per query row (qh, t) of each batch row
            assert plan.grid == (-(-(q_heads * tokens) // 128), 1, batch) and plan.block == (128,)
            assert plan.grid[0] * plan.block[0] >= q_heads * tokens
            assert ga.workspace_size(plan, batch, q_heads, tokens, 64) == 0
        else:
            groups = -(-(top_k * tokens) // 4)
            assert plan.grid == (plan.num_splits, heads, batch * groups) and plan.block == (128,)
            assert (plan.combine_grid is None) == (plan.num_splits == 1)
            assert plan.combine_grid in (None, (tokens, q_heads, batch))
            need = ga.workspace_size(plan, batch, q_heads, tokens, 64)
            assert need == (0 if plan.num_splits == 1 else batch * q_heads * tokens * plan.num_splits * 66)
    auto = ga.plan_attention(batch, q_heads, heads, tokens, keys, 132)
    assert auto.kernel == ga.choose_kernel(batch, q_heads, tokens, 132)


def test_plan_rejects_oversized_grids_and_unknown_kinds():
    with pytest.raises(ValueError, match="65535"):
        ga.plan_attention(70_000, 2, 1, 1, 10, 132)
    with pytest.raises(ValueError, match="kernel_kind"):
        ga.plan_attention(1, 2, 1, 1, 10, 132, kernel_kind="flash")


def test_storage_dtypes():
    import ml_dtypes
    assert storage_dtype(np.float32) == np.float32 and storage_dtype("float32") == np.float32
    for bf16 in ("bfloat16", ml_dtypes.bfloat16, np.uint16):
        assert storage_dtype(bf16) == np.uint16
    with pytest.raises(TypeError):
        storage_dtype(np.float64)


# ------------------------------------------------------------------------------------------ key range

def test_prefill_key_range():
    # no mask: keys 0..max position
    assert ga.prefill_key_range(np.array([3, 4, 5]), None, 10) == (0, 6)
    # left padding, every row sees a key: skip the padded prefix
    mask = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    assert ga.prefill_key_range(np.array([5, 6, 7]), mask, 8) == (3, 8)
    # a row that sees nothing (a padding query): every key, for its uniform weights
    assert ga.prefill_key_range(np.array([1, 2, 3]), mask, 8) == (0, 8)
    assert ga.prefill_key_range(np.array([4]), np.zeros(8, np.int64), 8) == (0, 8)
    # positions past the keys in use (a static cache's num_keys) are clamped
    assert ga.prefill_key_range(np.array([20]), None, 8) == (0, 8)


# ------------------------------------------------------------------------------------------ NumPy models

def assert_context(got, want, v, what):
    assert np.all(np.isfinite(got)), f"{what}: non-finite"
    err = float(np.max(np.abs(got - want)))
    assert err <= TOL * float(np.max(np.abs(v))), f"{what}: max abs err {err:.3e}"


CASES = {
    "causal": dict(batch=2, past=0, tokens=37, pad=None),
    "left_padding": dict(batch=3, past=0, tokens=40, pad=[0, 7, 40]),  # row 2: every query fully hidden
    "cache": dict(batch=2, past=50, tokens=9, pad=[3, 0]),
    "decode": dict(batch=2, past=300, tokens=1, pad=[0, 290]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_models_match_reference(rng, case):
    c = CASES[case]
    batch, top_k, heads, head_dim = c["batch"], 2, 3, 16
    keys = c["past"] + c["tokens"]
    q, k, v = draw(rng, batch, top_k, heads, c["tokens"], keys, head_dim)
    positions = np.arange(c["past"], keys)
    mask = None
    if c["pad"] is not None:
        mask = np.ones((batch, keys), np.int64)
        for b, p in enumerate(c["pad"]):
            mask[b, :p] = 0
        mask[0, keys // 2] = 0  # a hole
    _, want = reference_attention(q, k, v, positions, mask, top_k)
    assert_context(ga.prefill_model(q, k, v, positions, mask, top_k), want, v, f"prefill model, {case}")
    for splits in (1, 3):
        got = ga.decode_model(q, k, v, positions, mask, top_k, num_splits=splits)
        assert_context(got, want, v, f"decode model, {case}, {splits} splits")


def test_models_use_only_num_keys(rng):
    # A static cache passes its whole buffer (S = capacity) and the key count on the device.
    batch, top_k, heads, head_dim, used, capacity = 2, 2, 2, 8, 21, 64
    q, k, v = draw(rng, batch, top_k, heads, 1, capacity, head_dim)
    k[:, :, used:] = np.nan  # never read
    v[:, :, used:] = np.nan
    positions = np.array([used - 1])
    mask = np.ones((batch, capacity), np.int64)
    mask[1, :4] = 0
    _, want = reference_attention(q, k[:, :, :used], v[:, :, :used], positions, mask[:, :used], top_k)
    got = ga.decode_model(q, k, v, positions, mask, top_k, num_splits=4, chunk=16, num_keys=used)
    assert_context(got, want, v[:, :, :used], "decode model with num_keys")
    got = ga.prefill_model(q, k, v, positions, mask, top_k, num_keys=used)
    assert_context(got, want, v[:, :, :used], "prefill model with num_keys")


def test_fully_hidden_rows_are_uniform(rng):
    # HF's float32 finfo.min (our -FLT_MAX) rather than -inf: a row with every key hidden averages all S values.
    batch, top_k, heads, tokens, head_dim = 1, 2, 2, 6, 8
    q, k, v = draw(rng, batch, top_k, heads, tokens, tokens, head_dim)
    mask = np.zeros((batch, tokens), np.int64)
    mean_v = v.mean(axis=2)  # [B, H, Dh]
    want = np.broadcast_to(mean_v.reshape(batch, 1, 1, heads * head_dim), (batch, tokens, top_k, heads * head_dim))
    for got in (ga.prefill_model(q, k, v, np.arange(tokens), mask, top_k),
                ga.decode_model(q, k, v, np.arange(tokens), mask, top_k, num_splits=2, chunk=4)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
