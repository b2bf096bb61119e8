"""Rung 6 of the op ladder (tests/reference/helpers.py lists them): the KV cache.

A prefix plus cached steps of one and several tokens give the full forward's logits and keys/values, and a cache
started at capacity 1 grows by doubling.
"""

import numpy as np
import pytest

from reference import KVCache

from helpers import MODEL_CONFIGS, assert_close, make_model, real_tokens


# ------------------------------------------------------------------------------------------------ 6. KV cache

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
