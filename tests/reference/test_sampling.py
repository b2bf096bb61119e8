"""Sampling: HF's logits warpers (temperature, top-k, top-p) against a per-row loop written from HF's definitions,
the inverse-CDF draw against its probabilities, and generate()'s seeding, streaming and batching.

The same filtered probabilities are compared with HF's own warpers in tests/oracle/test_bundled_oracle.py.
"""

import numpy as np
import pytest

from reference import JetMoeConfig, JetMoeForCausalLM
from reference.generation import sample, sampling_probabilities


def loop_probabilities(logits, temperature, top_k, top_p):
    """One row at a time, in plain Python: divide by temperature; keep the top_k largest scores (every score equal
    to the k-th largest too); then, walking from the least likely token up, drop a token while the probability mass
    of it and every less likely token is <= 1 - top_p (never the most likely one); softmax over what is left."""
    out = np.zeros_like(logits, dtype=np.float64)
    for b, row in enumerate(logits.astype(np.float64)):
        scores = [x / temperature for x in row]
        if top_k:
            kth = sorted(scores, reverse=True)[min(top_k, len(scores)) - 1]
            scores = [s if s >= kth else -np.inf for s in scores]
        if top_p < 1:
            finite = [s for s in scores if s != -np.inf]
            top = max(finite)
            total = sum(np.exp(s - top) for s in finite)
            mass_at_or_below = 0.0
            for i in sorted(range(len(scores)), key=lambda i: scores[i])[:-1]:  # ascending, the largest kept
                mass_at_or_below += np.exp(scores[i] - top) / total if scores[i] != -np.inf else 0.0
                if mass_at_or_below <= 1 - top_p:
                    scores[i] = -np.inf
        top = max(scores)
        weights = [np.exp(s - top) for s in scores]
        out[b] = np.array(weights) / sum(weights)
    return out


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.9), (0.5, 10, 0.8), (2.0, 1, 1.0), (1.0, 40, 0.3), (1.0, 0, 1e-6),
])
def test_filtered_probabilities_match_loop(rng, temperature, top_k, top_p):
    logits = rng.normal(0, 3, size=(4, 37)).astype(np.float64)  # continuous: no ties at the top-k boundary
    got = sampling_probabilities(logits, temperature, top_k, top_p)
    want = loop_probabilities(logits, temperature, top_k, top_p)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)  # float64, only summation order differs
    kept = (got > 0).sum(axis=-1)
    if top_k:
        assert (kept <= top_k).all()
    if top_p <= 1e-6:
        assert (kept == 1).all() and (got.argmax(-1) == logits.argmax(-1)).all()  # only the most likely survives


def test_top_k_keeps_ties(rng):
    logits = np.array([[3.0, 1.0, 1.0, 1.0, -2.0]])
    probs = sampling_probabilities(logits, 1.0, 2, 1.0)
    assert (probs[0, :4] > 0).all() and probs[0, 4] == 0  # HF keeps every score equal to the k-th largest


def test_float32_logits_stay_float32(rng):
    probs = sampling_probabilities(rng.normal(size=(2, 9)).astype(np.float32), 0.8, 3, 0.9)
    assert probs.dtype == np.float32  # HF samples from float32 logits
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)  # float32 round-off of a 9-term sum


def test_draws_follow_probabilities(rng):
    probs = sampling_probabilities(rng.normal(0, 1.5, size=(1, 12)), 1.0, 8, 0.95)
    n = 200_000
    draws = sample(np.repeat(probs, n, axis=0), rng)
    counts = np.bincount(draws, minlength=12)
    assert counts[probs[0] == 0].sum() == 0  # a filtered-out token is never drawn
    expected = n * probs[0]
    sigma = np.sqrt(expected * (1 - probs[0])) + 1e-12
    assert (np.abs(counts - expected) <= 5 * sigma).all(), (counts, expected)  # binomial, 5 sigma


def tiny_model(seed, **overrides):
    config = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_key_value_heads=2, kv_channels=4,
               intermediate_size=12, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
               eos_token_id=None, pad_token_id=0, bos_token_id=1)
    config.update(overrides)
    return JetMoeForCausalLM.from_random(JetMoeConfig(**config), seed=seed, dtype=np.float64)


def test_same_seed_same_tokens(seed, rng):
    model = tiny_model(seed)
    prompt = rng.integers(2, 40, size=(2, 5))
    first = model.generate(prompt, max_new_tokens=12, do_sample=True, temperature=1.5, top_k=0, seed=7)
    again = model.generate(prompt, max_new_tokens=12, do_sample=True, temperature=1.5, top_k=0,
                           seed=np.random.default_rng(7))
    other = model.generate(prompt, max_new_tokens=12, do_sample=True, temperature=1.5, top_k=0, seed=8)
    np.testing.assert_array_equal(first, again)
    assert (first[:, 5:] != other[:, 5:]).any()  # 24 draws at temperature 1.5 over 40 tokens: never all equal
    np.testing.assert_array_equal(first[:, :5], prompt)


def test_top_k_one_is_greedy(seed, rng):
    model = tiny_model(seed)
    prompt = rng.integers(2, 40, size=(3, 4))
    sampled = model.generate(prompt, max_new_tokens=8, do_sample=True, top_k=1, seed=seed)
    np.testing.assert_array_equal(sampled, model.generate(prompt, max_new_tokens=8))


def test_streamer_sees_every_new_token(seed, rng):
    model = tiny_model(seed)
    prompt = rng.integers(2, 40, size=(2, 3))
    streamed = []
    tokens = model.generate(prompt, max_new_tokens=6, do_sample=True, seed=3, streamer=streamed.append)
    np.testing.assert_array_equal(np.stack(streamed, axis=1), tokens[:, 3:])


def test_sampling_stops_at_eos(seed, rng):
    model = tiny_model(seed)
    prompt = rng.integers(2, 40, size=(1, 4))
    free = model.generate(prompt, max_new_tokens=10, do_sample=True, seed=5)
    eos = int(free[0, 6])  # the third sampled token; with it as eos, the same draws stop there
    stopped = tiny_model(seed, eos_token_id=eos).generate(prompt, max_new_tokens=10, do_sample=True, seed=5)
    first_eos = 4 + int(np.argmax(free[0, 4:] == eos))
    np.testing.assert_array_equal(stopped[0], free[0, :first_eos + 1])


def test_batched_left_padding_keeps_prompts_apart(seed, rng):
    """With top_k=1 sampling is deterministic, so a left-padded batch must give each row its solo result."""
    model = tiny_model(seed)
    short, long = rng.integers(2, 40, size=3), rng.integers(2, 40, size=6)
    ids = np.zeros((2, 6), np.int64)
    ids[0, 3:], ids[1] = short, long
    mask = (np.arange(6) >= np.array([[3], [0]])).astype(np.int64)
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=True, top_k=1, seed=0)
    for row, prompt in enumerate([short, long]):
        solo = model.generate(prompt[None], max_new_tokens=5, do_sample=True, top_k=1, seed=0)
        np.testing.assert_array_equal(batched[row, 6:], solo[0, len(prompt):])
