"""Notebook 04: causal attention probabilities of the K*H query heads over the H shared kv heads."""

import numpy as np


def my_attention_probs(q, k):
    # q: [K*H, T, Dh], k: [H, T, Dh] -> [K*H, T, T]: query head qh reads kv head qh % H (HF's repeat)
    heads, tokens, head_dim = k.shape
    kv_head = np.arange(q.shape[0]) % heads  # [K*H]
    scores = q @ np.swapaxes(k[kv_head], -1, -2) / np.sqrt(head_dim)  # [K*H, T, T]
    scores = np.where(np.tril(np.ones((tokens, tokens), bool)), scores, -np.inf)  # key s > query t: hidden
    probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return probs / probs.sum(axis=-1, keepdims=True)
