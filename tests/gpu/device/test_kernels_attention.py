"""GPU parity: attention (gpu/kernels/attention.cu through gpu.attention) and the device KV cache (gpu.cache)
against reference.attention.attention_probs/attend with reference.model.additive_mask, and reference/cache.py.

Marked requires_gpu (CuPy and a CUDA GPU, or the CPU emulator cudasim where there is none). Every test draws fresh float64 inputs from `rng` (its
seed is printed, so a failure can be replayed), rounded to float32 (or bf16) once, so the reference (float64
arithmetic) and the kernels see the same numbers and only the kernels' arithmetic is measured. Outputs are poisoned:
`out=` buffers start as NaN and `poisoned_pool` leaves 0xFF bytes (NaN as float32) in CuPy's free pool, so scratch
the wrapper allocates starts as garbage too. Non-finite outputs are rejected.

Tolerances, with their reasons:
- context, float32 K/V: max|got - want| <= 1e-5 * max|v|. The context is a convex combination of value rows, so
  its rounding error scales with max|v| (averaging over many keys shrinks max|context| but not the error); the
  error is float32 rounding of the dot products (~Dh eps) and of the S-term weighted sums (~sqrt(S) eps,
  ~3e-6 at S = 2048), plus expf's 2 ulp (on the CPU emulator glibc's expf, within 1 ulp: the same bound holds,
  the last bits differ from a GPU's).
- probs: max|got - want| <= 1e-5 * max|want| (probabilities: relative float32 error of the scores and sums).
- bf16 K/V: the same 1e-5 against the reference run on the bf16-rounded K/V (the kernel widens bf16 exactly),
  and 2e-2 * max|v| against the unrounded float64 inputs (bf16 keeps 8 mantissa bits: 2^-9 relative per value).
- determinism, head mapping, the cache's stored bits and uniform rows: exact where stated.
- prefill and decode against the naive kernel (the same device inputs): 1e-5 * max|v|, float32 in another order.
"""

import ml_dtypes
import numpy as np
import pytest

from gpu import attention as gpu_attention
from gpu.cache import KVCache as GpuKVCache
from gpu.cache import StaticKVCache
from reference.cache import KVCache as RefKVCache

from gpu_helpers import F64, cp, draw, nan_like, reference_attention

pytestmark = pytest.mark.requires_gpu  # no CUDA GPU: they run on the CPU emulator (tests/conftest.py)

F32_TOL = 1e-5
BF16_TOL = 2e-2
KINDS = ("naive", "prefill", "decode")


# ------------------------------------------------------------------------------------------------ helpers

def to_bf16_bits(x):
    return np.ascontiguousarray(x).astype(ml_dtypes.bfloat16).view(np.uint16)


def from_bf16_bits(bits):
    return np.asarray(bits).view(ml_dtypes.bfloat16).astype(F64)


def host(x):
    got = cp.asnumpy(x)
    assert np.all(np.isfinite(got)), "non-finite values (an unwritten or NaN output element)"
    return got.astype(F64)


def check_context(got, want, v, tol, what):
    err = float(np.max(np.abs(host(got) - want)))
    scale = float(np.max(np.abs(v)))
    assert err <= tol * scale, f"{what}: max abs err {err:.3e} > {tol:g} * max|v| = {tol * scale:.3e}"


def check_probs(got, want, tol, what):
    err = float(np.max(np.abs(host(got) - want)))
    assert err <= tol * float(np.max(want)), f"{what}: max abs err {err:.3e} > {tol:g} * max p"


def run(q, k, v, cache_position, attention_mask, top_k, kind=None, splits=None, probs=False, **kwargs):
    # device arrays in -> (context, probs or None) from poisoned out= buffers
    batch, q_heads, tokens, _ = q.shape
    heads, head_dim, keys = k.shape[1], k.shape[3], k.shape[2]
    out = nan_like((batch, tokens, top_k, heads * head_dim))
    probs_out = nan_like((batch, q_heads, tokens, keys)) if probs else None
    result = gpu_attention.attention(q, k, v, cache_position, attention_mask, top_k, output_probs=probs, out=out,
                                     probs_out=probs_out, kernel_kind=kind, num_splits=splits, **kwargs)
    if probs:
        assert result[0] is out and result[1] is probs_out
        return result
    assert result is out
    return out, None


def fully_hidden_rows(cache_position, attention_mask, batch, keys):
    # -> [B, T] bool: query rows that see no key
    seen = np.arange(keys)[None, None, :] <= np.asarray(cache_position)[None, :, None]  # [1, T, S]
    if attention_mask is not None:
        seen = seen & (np.asarray(attention_mask)[:, None, :] != 0)
    return ~np.broadcast_to(seen, (batch,) + seen.shape[1:]).any(axis=-1)


# ------------------------------------------------------------------------------------------------ attention

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("head_dim", [8, 64, 128, 5, 100])
def test_causal_self_attention(rng, poisoned_pool, kind, head_dim):
    batch, top_k, heads, tokens = 2, 2, 3, 37  # 37 queries: two prefill query tiles, the second partial
    q, k, v = draw(rng, batch, top_k, heads, tokens, tokens, head_dim)
    positions = np.arange(tokens)
    want_probs, want = reference_attention(q, k, v, positions, None, top_k)
    got, got_probs = run(cp.asarray(q), cp.asarray(k), cp.asarray(v), cp.asarray(positions), None, top_k, kind,
                         probs=True)
    check_context(got, want, v, F32_TOL, f"causal context ({kind}, Dh={head_dim})")
    check_probs(got_probs, want_probs, F32_TOL, f"causal probs (Dh={head_dim})")
    assert np.all(cp.asnumpy(got_probs)[:, :, 0, 1:] == 0), "a future key got weight"


@pytest.mark.parametrize("kind", KINDS)
def test_left_padding_and_fully_hidden_rows(rng, poisoned_pool, kind):
    batch, top_k, heads, tokens, head_dim = 4, 2, 2, 21, 64
    q, k, v = draw(rng, batch, top_k, heads, tokens, tokens, head_dim)
    mask = np.ones((batch, tokens), np.int64)
    mask[1, :5] = 0  # left padding: queries 0..4 of row 1 see nothing
    mask[2, :20] = 0  # only the last token present
    mask[3, :] = 0  # every query of row 3 is fully hidden
    mask[0, 7] = 0  # a hole
    positions = np.arange(tokens)
    want_probs, want = reference_attention(q, k, v, positions, mask, top_k)
    got, got_probs = run(cp.asarray(q), cp.asarray(k), cp.asarray(v), cp.asarray(positions), cp.asarray(mask),
                         top_k, kind, probs=True)
    check_context(got, want, v, F32_TOL, f"padded context ({kind})")
    check_probs(got_probs, want_probs, F32_TOL, "padded probs")
    hidden = fully_hidden_rows(positions, mask, batch, tokens)  # [B, T]
    assert hidden[1, :5].all() and hidden[3].all() and not hidden[0].any()
    probs = cp.asnumpy(got_probs)  # [B, KH, T, S]
    b_idx, t_idx = np.nonzero(hidden)
    np.testing.assert_allclose(probs[b_idx, :, t_idx], 1.0 / tokens, rtol=1e-6, err_msg="uniform rows")
    visible = ~hidden
    hidden_keys = (mask == 0)[:, None, None, :] & visible[:, None, :, None]  # masked keys of rows that see some
    assert np.all(probs[np.broadcast_to(hidden_keys, probs.shape)] == 0), "a masked key got weight"
    # A fully hidden row's context is the mean of v over all S keys (HF: softmax of equal finfo.min scores).
    mean_v = v.astype(F64).mean(axis=2)  # [B, H, Dh]
    got_ctx = host(got).reshape(batch, tokens, top_k, heads, head_dim)
    for b, t in zip(b_idx, t_idx):
        for kk in range(top_k):
            np.testing.assert_allclose(got_ctx[b, t, kk], mean_v[b], rtol=0, atol=F32_TOL * np.max(np.abs(v)))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cache_with_past_keys(rng, poisoned_pool, kind, head_dim):
    # k, v are views [B, H, S, Dh] of capacity-80 buffers (row stride 80*Dh): the kernels read them in place.
    batch, top_k, heads, past, tokens, capacity = 3, 2, 2, 45, 13, 80
    keys = past + tokens
    q, k, v = draw(rng, batch, top_k, heads, tokens, keys, head_dim)
    k_buf = cp.asarray(rng.standard_normal((batch, heads, capacity, head_dim)).astype(np.float32))
    v_buf = cp.asarray(rng.standard_normal((batch, heads, capacity, head_dim)).astype(np.float32))
    k_buf[:, :, :keys] = cp.asarray(k)
    v_buf[:, :, :keys] = cp.asarray(v)
    mask = np.ones((batch, keys), np.int64)
    mask[1, :3] = 0
    mask[2, :] = 0  # fully hidden: uniform over the S = 58 keys, not over the 80 of the buffer
    positions = np.arange(past, past + tokens)
    # q as a non-contiguous view: [B, T, KH, Dh] transposed
    q_dev = cp.asarray(np.ascontiguousarray(q.transpose(0, 2, 1, 3))).transpose(0, 2, 1, 3)
    want_probs, want = reference_attention(q, k, v, positions, mask, top_k)
    got, got_probs = run(q_dev, k_buf[:, :, :keys], v_buf[:, :, :keys], cp.asarray(positions), cp.asarray(mask),
                         top_k, kind, probs=True)
    check_context(got, want, v, F32_TOL, f"cached context ({kind}, Dh={head_dim})")
    check_probs(got_probs, want_probs, F32_TOL, "cached probs")


@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("splits", [None, 1, 5])
def test_decode_long_cache(rng, poisoned_pool, tokens, splits):
    batch, top_k, heads, keys, head_dim = 1, 2, 4, 2048, 128  # JetMoE-8B's Dh; K*H = 8 query heads
    q, k, v = draw(rng, batch, top_k, heads, tokens, keys, head_dim)
    mask = (rng.random((batch, keys)) > 0.1).astype(np.int64)
    mask[:, -tokens:] = 1
    positions = np.arange(keys - tokens, keys)
    plan = gpu_attention.plan_attention(batch, top_k * heads, heads, tokens, keys, 132, splits, "decode")
    assert splits != 5 or plan.num_splits == 5
    want_probs, want = reference_attention(q, k, v, positions, mask, top_k)
    got, got_probs = run(cp.asarray(q), cp.asarray(k), cp.asarray(v), cp.asarray(positions), cp.asarray(mask),
                         top_k, "decode", splits, probs=True)
    check_context(got, want, v, F32_TOL, f"decode context (T={tokens}, splits={splits})")
    check_probs(got_probs, want_probs, F32_TOL, "decode probs")
    if splits is None:  # the host's own choice: decode for T <= 4
        auto, _ = run(cp.asarray(q), cp.asarray(k), cp.asarray(v), cp.asarray(positions), cp.asarray(mask), top_k)
        assert cp.array_equal(auto, got)


@pytest.mark.parametrize("kind", KINDS)
def test_heads_repeat_not_repeat_interleave(rng, kind):
    # Query head k*H + j must read kv head j (HF's key_states.repeat(1, K, 1, 1)).
    batch, top_k, heads, tokens, head_dim = 2, 2, 3, 9, 32
    q, k, v = draw(rng, batch, top_k, heads, tokens, tokens, head_dim)
    positions = np.arange(tokens)
    _, want = reference_attention(q, k, v, positions, None, top_k)
    # repeat_interleave: query head hq reads kv head hq // K
    k_int, v_int = np.repeat(k, top_k, axis=1), np.repeat(v, top_k, axis=1)  # [B, K*H, S, Dh]
    _, interleaved = reference_attention(q, k_int, v_int, positions, None, 1)  # one "expert" of K*H heads
    interleaved = interleaved.reshape(batch, tokens, top_k, heads * head_dim)
    got, _ = run(cp.asarray(q), cp.asarray(k), cp.asarray(v), cp.asarray(positions), None, top_k, kind)
    check_context(got, want, v, F32_TOL, f"repeat mapping ({kind})")
    gap = float(np.max(np.abs(host(got) - interleaved)))
    assert gap > 100 * F32_TOL * np.max(np.abs(v)), f"indistinguishable from repeat_interleave (gap {gap:.2e})"


@pytest.mark.parametrize("kind,splits", [("naive", None), ("prefill", None), ("decode", 1), ("decode", 6)])
def test_bitwise_deterministic(rng, kind, splits):
    batch, top_k, heads, tokens, keys, head_dim = 2, 2, 2, 5, 700, 64
    q, k, v = draw(rng, batch, top_k, heads, tokens, keys, head_dim)
    mask = (rng.random((batch, keys)) > 0.2).astype(np.int64)
    positions = np.arange(keys - tokens, keys)
    args = (cp.asarray(q), cp.asarray(k), cp.asarray(v), cp.asarray(positions), cp.asarray(mask), top_k, kind, splits)
    first, first_probs = run(*args, probs=True)
    second, second_probs = run(*args, probs=True)
    assert cp.asnumpy(first).tobytes() == cp.asnumpy(second).tobytes()
    assert cp.asnumpy(first_probs).tobytes() == cp.asnumpy(second_probs).tobytes()


@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind,splits,tokens", [("prefill", None, 37), ("prefill", None, 3), ("decode", 1, 1),
                                                ("decode", 7, 1), ("decode", 4, 3)])
def test_fast_kernels_equal_the_naive_kernel(rng, poisoned_pool, kind, splits, tokens, kv_dtype):
    # The ladder's middle rung: prefill and decode against the one-thread-per-row kernel on the same device
    # inputs, reading a capacity-600 cache through num_keys (the static cache's device count), with left padding,
    # a hole and a fully hidden batch row. Both are float32 arithmetic in different orders: F32_TOL.
    batch, top_k, heads, head_dim, capacity = 3, 2, 2, 100, 600
    keys = 500
    q, k, v = draw(rng, batch, top_k, heads, tokens, capacity, head_dim)
    if kv_dtype == "bfloat16":
        k, v = to_bf16_bits(k), to_bf16_bits(v)
    mask = np.ones((batch, capacity), np.int64)
    mask[0, :40] = 0  # left padding
    mask[1, 123] = 0  # a hole
    mask[2, :] = 0  # every query of row 2 is fully hidden: uniform over the num_keys keys
    positions = np.arange(keys - tokens, keys)
    num_keys = cp.asarray(np.array([keys], np.int64))
    args = (cp.asarray(q), cp.asarray(k), cp.asarray(v), cp.asarray(positions), cp.asarray(mask), top_k)
    naive, _ = run(*args, "naive", num_keys=num_keys)
    fast, _ = run(*args, kind, splits, num_keys=num_keys)
    v_scale = from_bf16_bits(v) if kv_dtype == "bfloat16" else v
    check_context(fast, host(naive), v_scale, F32_TOL, f"{kind} (splits={splits}, T={tokens}) against naive")


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_cache(rng, poisoned_pool, kind):
    batch, top_k, heads, past, tokens, head_dim = 2, 2, 2, 300, 4, 128
    keys = past + tokens
    q, k, v = draw(rng, batch, top_k, heads, tokens, keys, head_dim)
    k_bits, v_bits = to_bf16_bits(k), to_bf16_bits(v)
    mask = np.ones((batch, keys), np.int64)
    mask[0, :11] = 0
    positions = np.arange(past, past + tokens)
    want_probs, want = reference_attention(q, from_bf16_bits(k_bits), from_bf16_bits(v_bits), positions, mask,
                                           top_k)
    _, unrounded = reference_attention(q, k, v, positions, mask, top_k)
    got, got_probs = run(cp.asarray(q), cp.asarray(k_bits), cp.asarray(v_bits), cp.asarray(positions),
                         cp.asarray(mask), top_k, kind, probs=True)
    check_context(got, want, v, F32_TOL, f"bf16 cache vs rounded reference ({kind})")
    check_probs(got_probs, want_probs, F32_TOL, "bf16 probs vs rounded reference")
    check_context(got, unrounded, v, BF16_TOL, f"bf16 cache vs float64 reference ({kind})")


def test_bad_inputs_raise():
    q = cp.zeros((1, 4, 2, 8), cp.float32)
    k = cp.zeros((1, 2, 5, 8), cp.float32)
    positions = cp.arange(3, 5)
    with pytest.raises(ValueError, match="top_k"):
        gpu_attention.attention(q, k, k, positions, None, 3)
    with pytest.raises(ValueError, match="head dim"):
        big = cp.zeros((1, 2, 5, 130), cp.float32)
        gpu_attention.attention(cp.zeros((1, 4, 2, 130), cp.float32), big, big, positions, None, 2)
    with pytest.raises(ValueError, match="attention_mask"):
        gpu_attention.attention(q, k, k, positions, cp.ones((1, 4), cp.int64), 2)
    with pytest.raises(TypeError, match="float32 or bf16"):
        gpu_attention.attention(q, k.astype(cp.float64), k.astype(cp.float64), positions, None, 2)


# ------------------------------------------------------------------------------------------------ KV cache

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("capacity", [0, 6])
def test_device_cache_matches_reference(rng, dtype, capacity):
    layers, batch, heads, head_dim = 2, 2, 3, 16
    ref = RefKVCache(layers, batch, heads, head_dim, np.float32, capacity)
    dev = GpuKVCache(layers, batch, heads, head_dim, dtype, capacity)
    assert len(dev) == layers and dev.batch_size == batch and dev.get_seq_length() == 0
    for tokens in [5, 1, 1, 7, 1, 20]:
        for layer in range(layers):
            k = rng.standard_normal((batch, heads, tokens, head_dim)).astype(np.float32)
            v = rng.standard_normal((batch, heads, tokens, head_dim)).astype(np.float32)
            want_k, want_v = ref.update(layer, k, v)
            # the new keys as a non-contiguous view ([B, T, H, Dh] transposed), as the MoA layer produces them
            k_dev = cp.asarray(np.ascontiguousarray(k.transpose(0, 2, 1, 3))).transpose(0, 2, 1, 3)
            got_k, got_v = dev.update(layer, k_dev, cp.asarray(v))
            assert got_k.shape == want_k.shape and dev.get_seq_length(layer) == ref.get_seq_length(layer)
            for got, want in ((got_k, want_k), (got_v, want_v)):
                if dtype == "float32":
                    np.testing.assert_array_equal(cp.asnumpy(got), want)
                else:
                    np.testing.assert_array_equal(cp.asnumpy(got), to_bf16_bits(want))  # round to nearest even
        assert dev.capacity == ref.capacity, "capacity growth differs from the reference's"
    for got, want in zip(dev.key_cache + dev.value_cache, ref.key_cache + ref.value_cache):
        expected = want if dtype == "float32" else to_bf16_bits(want)
        np.testing.assert_array_equal(cp.asnumpy(got), expected)
    keys, values = dev[1]
    assert keys.shape == ref[1][0].shape and values.shape == ref[1][1].shape


def test_cache_views_feed_attention(rng):
    # The views update() returns go to attention() as they are (row stride = capacity), float32 and bf16.
    layers, batch, top_k, heads, head_dim, prompt = 1, 2, 2, 2, 64, 9
    for dtype in ("float32", "bfloat16"):
        cache = GpuKVCache(layers, batch, heads, head_dim, dtype, capacity=4)
        history_k, history_v = [], []
        for start, tokens in [(0, prompt), (prompt, 1), (prompt + 1, 2)]:
            q, k, v = draw(rng, batch, top_k, heads, tokens, tokens, head_dim)
            keys, values = cache.update(0, cp.asarray(k), cp.asarray(v))
            history_k.append(k)
            history_v.append(v)
            all_k, all_v = np.concatenate(history_k, axis=2), np.concatenate(history_v, axis=2)
            if dtype == "bfloat16":
                all_k, all_v = from_bf16_bits(to_bf16_bits(all_k)), from_bf16_bits(to_bf16_bits(all_v))
            positions = np.arange(start, start + tokens)
            _, want = reference_attention(q, all_k, all_v, positions, None, top_k)
            got, _ = run(cp.asarray(q), keys, values, cp.asarray(positions), None, top_k)
            check_context(got, want, all_v, F32_TOL, f"attention over cache views ({dtype}, T={tokens})")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_static_cache_cuda_graph_replay(rng, poisoned_pool, dtype):
    # Prefill eagerly, one eager decode step (compiles, allocates the step's buffers), then capture one decode step
    # and replay it: the offsets, positions and mask column advance on the device each replay.
    batch, top_k, heads, head_dim, prompt, capacity, steps = 2, 2, 2, 64, 20, 40, 4
    bf16 = dtype == "bfloat16"
    cache = StaticKVCache(1, batch, heads, head_dim, dtype, capacity)
    mask = cp.zeros((batch, capacity), cp.int64)
    prompt_mask = np.ones((batch, prompt), np.int64)
    prompt_mask[1, :6] = 0  # left padding
    mask[:, :prompt] = cp.asarray(prompt_mask)
    hist_k, hist_v = [], []

    def expected(q, k, v):
        hist_k.append(k)
        hist_v.append(v)
        all_k, all_v = np.concatenate(hist_k, axis=2), np.concatenate(hist_v, axis=2)
        if bf16:
            all_k, all_v = from_bf16_bits(to_bf16_bits(all_k)), from_bf16_bits(to_bf16_bits(all_v))
        n = all_k.shape[2]
        host_mask = np.concatenate([prompt_mask, np.ones((batch, n - prompt), np.int64)], axis=1)
        positions = np.arange(n - q.shape[2], n)
        return reference_attention(q, all_k, all_v, positions, host_mask, top_k), all_v

    q, k, v = draw(rng, batch, top_k, heads, prompt, prompt, head_dim)
    positions = cache.begin_step(prompt)
    keys, values = cache.update(0, cp.asarray(k), cp.asarray(v))
    assert keys.shape == (batch, heads, capacity, head_dim)
    got, got_probs = run(cp.asarray(q), keys, values, positions, mask, top_k, probs=True, num_keys=cache.num_keys)
    (want_probs, want), all_v = expected(q, k, v)
    check_context(got, want, all_v, F32_TOL, "static prefill")
    check_probs(got_probs[..., :prompt], want_probs, F32_TOL, "static prefill probs")
    assert np.all(cp.asnumpy(got_probs)[..., prompt:] == 0), "keys past num_keys got weight"
    np.testing.assert_array_equal(cp.asnumpy(positions), np.arange(prompt))

    q_buf = cp.empty((batch, top_k * heads, 1, head_dim), cp.float32)
    k_buf = cp.empty((batch, heads, 1, head_dim), cp.float32)
    v_buf = cp.empty((batch, heads, 1, head_dim), cp.float32)
    out = nan_like((batch, 1, top_k, heads * head_dim))
    plan = gpu_attention.plan_attention(batch, top_k * heads, heads, 1, capacity, 132, 3, "decode")
    workspace = cp.empty(gpu_attention.workspace_size(plan, batch, top_k * heads, 1, head_dim), cp.float32)

    def step():
        positions = cache.begin_step(1, attention_mask=mask)
        keys, values = cache.update(0, k_buf, v_buf)
        gpu_attention.attention(q_buf, keys, values, positions, mask, top_k, num_keys=cache.num_keys, out=out,
                                workspace=workspace, kernel_kind="decode", num_splits=3)

    cp.cuda.Device().synchronize()  # a non-blocking stream does not wait for the legacy default stream's work
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        for i in range(steps + 1):
            q, k, v = draw(rng, batch, top_k, heads, 1, 1, head_dim)
            q_buf[...] = cp.asarray(q)
            k_buf[...] = cp.asarray(k)
            v_buf[...] = cp.asarray(v)
            out.fill(cp.nan)
            if i == 0:
                step()  # eager warm-up step
            else:
                if i == 1:
                    try:
                        stream.begin_capture()
                    except AttributeError:
                        pytest.skip("this CuPy has no stream capture")
                    step()
                    graph = stream.end_capture()
                graph.launch(stream)
            stream.synchronize()
            (_, want), all_v = expected(q, k, v)
            check_context(out, want, all_v, F32_TOL, f"graph decode step {i}")
    assert cache.get_seq_length() == prompt + steps + 1
    np.testing.assert_array_equal(cp.asnumpy(mask[:, prompt:prompt + steps + 1]), 1)
    np.testing.assert_array_equal(cp.asnumpy(mask[:, prompt + steps + 1:]), 0)
    stored = cp.asnumpy(cache.key_cache[0])
    expected_keys = np.concatenate(hist_k, axis=2)
    np.testing.assert_array_equal(stored, to_bf16_bits(expected_keys) if bf16 else expected_keys)
